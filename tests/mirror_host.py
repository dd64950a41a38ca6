"""A hostile host's view of the real helper image in the emulator (tests/test_hostile_*.py).

The machine is the emulator's own host model: `emulate.host.Host` boots the built image in the
UEFI stand-in with SEV and a launch secret, `Host.create_mirror` builds the mirror VM the option
asks for, and `emulate.mailbox.HelperChannel` rings the doorbell. This module only adds what a
hostile test needs on top:

* `MirrorHost.batch()` takes the raw Command page (any count, any field), runs one batch with an
  instruction budget or preempted, and returns the Exit instead of raising, so a fuzzer can
  count faults and budget overruns as findings;
* write tracking: a UC_HOOK_MEM_WRITE over all DRAM except the helper's data region and the
  mailbox, recording which RAM-window pages a batch wrote and any write anywhere else;
* `on_read(lo, hi, fn)`: a UC_HOOK_MEM_READ on mailbox DRAM for TOCTOU attacks (the host
  rewrites shared bytes while the helper is running).

unicorn hands memory hooks the physical address its TLB entry points at, which in this emulator
is the HPA (offset into the memory controller's DRAM), so every instrument works on HPAs. The
guest's one RAM block starts at HPA 0 and the RAM window maps ram_addr 0 to it, so a window
page's HPA is its ram_addr.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from unicorn import UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE

from emulate.attacker import HostHands, Stop
from emulate.host import BlockSpec, Host
from emulate.machine import Exit, VCpu
from emulate.mailbox import HelperChannel, pack_command
from helperfw.runtime import protocol as P
from ovmf_glue.linkmap import map_path_for, read_symbol_map
from tests.firmware import efi_path

__all__ = ["KEY", "PAGE", "RAM", "MirrorHost", "efi_path", "pack_command"]

PAGE = P.PAGE_SIZE
KEY = bytes(range(7, 39))
RAM = 64 << 20
_COUNT = P.Command.offset("count")
BATCH_BUDGET = 5_000_000  # instructions per batch; the worst honest batch needs far less


@functools.cache
def symbols() -> dict[str, int]:
    """RVA of every symbol of the built image (from its .map)."""
    return {n: s.rva for n, s in read_symbol_map(map_path_for(efi_path())).items()}


@functools.cache
def symbol_sizes() -> dict[str, int]:
    return {n: s.size for n, s in read_symbol_map(map_path_for(efi_path())).items()}




def boot(cbit: int, option: int, *, key: bytes = KEY, seed: int = 31337,
         shift_high: int = 0) -> Host:
    """A host with one RAM block of RAM bytes at GPA 0 whose firmware loaded the helper
    (SEV, the launch secret, the option's boot parameter); the helper has announced itself."""
    host = Host("mh", [BlockSpec("pc.ram", RAM, 0)], cbit=cbit, seed=seed,
                uefi_seed=seed + option)
    host.boot_helper(efi_path(), key, option, shift_high=shift_high)
    return host


@dataclass
class BatchResult:
    exit: Exit
    status: int | None = None  # Control.status (None if the batch did not complete)
    entry_status: list[int] = field(default_factory=list)
    window_pages_written: set[int] = field(default_factory=set)  # ram_addrs
    bad_writes: list[tuple[int, int, int]] = field(default_factory=list)  # (rip, va, size)


class MirrorHost:
    """The host of one helper instance: main VM (guest), mirror VM, its vCPU and the mailbox."""

    def __init__(self, cbit: int = 47, option: int = P.OPT_SHIFT, *, key: bytes = KEY,
                 seed: int = 31337, track_writes: bool = True):
        self.cbit, self.option = cbit, option
        self.host = boot(cbit, option, key=key, seed=seed)
        self.ch = HelperChannel(self.host.mc, self.host.create_mirror())
        self.mc, self.vm = self.host.mc, self.host.vm
        self.mirror = self.ch.mirror.vm
        self.vcpu: VCpu = self.ch.vcpu
        info = self.ch.mirror.info
        self.bi, self.regions = info.bootinfo, info.regions
        self.image_base = self.bi.entry_rip - symbols()["mh_entry"]
        self.mb = self.ch.mb  # host view: raw DRAM
        self.mb_size = P.MAILBOX_PAGES * PAGE
        self.ram_base = self.ch.mirror.ram_base
        self._window: set[int] = set()
        self._bad: list[tuple[int, int, int]] = []
        self.hands = HostHands(self.mc)  # the attacker's hands on this machine
        if track_writes:
            self._install_write_hooks()

    @property
    def bell(self) -> int:
        """The doorbell count (the channel's; a restored snapshot puts an old one back)."""
        return self.ch.bell

    @bell.setter
    def bell(self, value: int) -> None:
        self.ch.bell = value

    # -- instruments -----------------------------------------------------------------------
    # unicorn reports memory-hook addresses as the physical address the TLB fill chose, i.e.
    # the HPA (DRAM offset) here, so writes are classified by the DRAM they land in.
    def hpa_ranges(self) -> dict[str, tuple[int, int]]:
        """DRAM the running helper may write: its data region (context, stack, page-table pool;
        for `isolated` the mirror-only copy), the mailbox, and the RAM window (ram_addr 0 is
        HPA 0 here, so window page ram_addr = HPA)."""
        data = self.region(P.REGION_DATA)
        data_hpa = self.mirror.gpa_to_hpa(data.mirror_gpa)
        return {"data": (data_hpa, data_hpa + data.length),
                "mailbox": (self.mb, self.mb + self.mb_size),
                "window": (0, RAM)}

    def _install_write_hooks(self) -> None:
        """One hook for every HPA outside the data region and the mailbox (the helper's own
        frequent writes stay at native speed): window writes are recorded per page, anything
        else is a stray write."""
        r = self.hpa_ranges()
        skip = sorted([r["data"], r["mailbox"]])
        lo = 0
        uc = self.vcpu.uc
        for a, b in skip:
            if a > lo:
                uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write, None, lo, a - 1)
            lo = b
        uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write, None, lo, 2**64 - 1)

    def _on_write(self, uc, access, hpa, size, value, _ud) -> None:
        if hpa + size <= RAM:
            self._window.add(hpa & ~(PAGE - 1))
            self._window.add((hpa + size - 1) & ~(PAGE - 1))
        else:
            self._bad.append((self.vcpu.get("rip"), hpa, size))

    def on_read(self, hpa_lo: int, hpa_hi: int, fn) -> int:
        """fn(hpa, size) on every helper read of DRAM [hpa_lo, hpa_hi]; returns the handle."""
        return self.vcpu.uc.hook_add(UC_HOOK_MEM_READ,
                                     lambda uc, acc, a, size, val, ud: fn(a, size), None,
                                     hpa_lo, hpa_hi)

    def remove_hook(self, h: int) -> None:
        self.vcpu.uc.hook_del(h)

    # -- raw shared memory (the host's only view) ---------------------------------------------
    def slot_hpa(self, i: int) -> int:
        return self.ch.slot_hpa + i * P.SLOT_SIZE

    def read_mailbox(self) -> bytes:
        return self.mc.host_read(self.mb, self.mb_size)

    def read_slot(self, i: int, n: int = P.SLOT_SIZE) -> bytes:
        return self.mc.host_read(self.slot_hpa(i), n)

    def write_slot(self, i: int, data: bytes) -> None:
        self.mc.host_write(self.slot_hpa(i), data)

    def poke(self, off: int, data: bytes) -> None:
        """Raw write into the mailbox from inside a hook (no page-state change: it is shared)."""
        self.mc.mem[self.mb + off: self.mb + off + len(data)] = data

    # -- the guest's private memory (what the guest sees; the host can't) ---------------------
    def guest_page(self, ram_addr: int) -> bytes:
        return self.vm.read(ram_addr, PAGE, encrypted=True)

    def set_guest_page(self, ram_addr: int, data: bytes) -> None:
        self.vm.write(ram_addr, data, encrypted=True)

    # -- one batch -----------------------------------------------------------------------------
    def batch(self, command: bytes, slots: dict[int, bytes] | None = None, *,
              budget: int = BATCH_BUDGET,
              preempt: list[tuple[int, Stop]] | None = None) -> BatchResult:
        """Write the command (and slot contents), ring, run to HLT; never raises on a fault.
        `preempt`: (instruction count, action) pairs where the host stops the vCPU mid-batch."""
        self.ch.ring(command, slots)
        self._window = set()
        self._bad = []
        if preempt:
            ex = self.hands.run_preempted(self.vcpu, preempt, budget=budget)
        else:
            ex = self.ch.run(budget)
        res = BatchResult(ex, window_pages_written=self._window, bad_writes=self._bad)
        count = int.from_bytes(command[_COUNT:_COUNT + 4], "little")
        done = self.ch.completion(count) if ex.reason == "hlt" else None
        if done is not None:
            res.status, res.entry_status = done.status, done.entry_status
        return res

    def command(self, op: int, entries=(), *, slots=None, **fields) -> BatchResult:
        r = self.batch(pack_command(op, entries, **fields), slots)
        assert r.exit.reason == "hlt", str(r.exit)
        return r

    def save(self, guest_pages: list[int] | None = None) -> tuple[object, int]:
        """The machine (DRAM, page views, the mirror vCPU) and the doorbell count: what a host
        that snapshots the entire VM keeps. With `guest_pages` (ram_addrs) only the pages a
        batch can change are kept: the helper's regions and those guest pages (faster)."""
        if guest_pages is None:
            return self.hands.snapshot_machine([self.vcpu]), self.bell
        hpas = [h for r in self.regions for h in self.private_hpas(r.main_gpa, r.length)]
        hpas += [self.vm.gpa_to_hpa(a) for a in guest_pages]
        return self.hands.snapshot_machine([self.vcpu], hpas), self.bell

    def restore(self, saved: tuple[object, int]) -> None:
        snap, self.bell = saved
        self.hands.restore_machine(snap)  # type: ignore[arg-type]

    def private_hpas(self, gpa: int, length: int) -> list[int]:
        """DRAM pages behind the helper's own range [gpa, gpa+length) as the running helper
        uses them (for `isolated`, its mirror-only copy)."""
        r = next(r for r in self.regions if r.main_gpa <= gpa < r.main_gpa + r.length)
        return self.hands.page_hpas(self.mirror, r.mirror_gpa + gpa - r.main_gpa, length)

    def symbol_hpas(self, name: str, size: int | None = None) -> list[int]:
        """DRAM pages of an image symbol (CTX, STACK, PT_POOL...) in the running helper."""
        return self.private_hpas(self.symbol_gpa(name), size or symbol_sizes()[name])

    def symbol_gpa(self, name: str) -> int:
        """Main-VM GPA (= the helper's VA) of an image symbol (CTX, STACK, PT_POOL, ...)."""
        return self.image_base + symbols()[name]

    def region(self, kind: int):
        return next(r for r in self.regions if r.kind == kind)
