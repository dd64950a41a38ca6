"""A hostile host's view of the real helper image in the emulator (tests/test_hostile_*.py).

Boots out/MigrationHelper.efi (built fresh, once per process) in the UEFI stand-in with SEV and a
launch secret, creates the mirror VM the way the chosen option says (the same steps as
tests/test_mirror.py) and drives batches through the shared mailbox with raw host writes, a
doorbell and `VCpu.run`. On top of that it gives the attacker's instruments:

* `MirrorHost.batch()` runs one batch with an instruction budget and returns the Exit instead of
  raising, so a fuzzer can count faults and budget overruns as findings;
* write tracking: a UC_HOOK_MEM_WRITE over all DRAM except the helper's data region and the
  mailbox, recording which RAM-window pages a batch wrote and any write anywhere else;
* `on_read(lo, hi, fn)`: a UC_HOOK_MEM_READ on mailbox DRAM for TOCTOU attacks (the host
  rewrites shared bytes while the helper is running).

unicorn hands memory hooks the physical address its TLB entry points at, which in this emulator
is the HPA (offset into the memory controller's DRAM), so every instrument works on HPAs. The
RAM window memslot maps ram_addr 0 to HPA 0, so a window page's HPA is its ram_addr.
"""

from __future__ import annotations

import functools
import json
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from unicorn import UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE

from emulate.attacker import HostHands, Stop
from emulate.cpuid import CpuidModel
from emulate.machine import VM, Exit, VCpu
from emulate.memctl import MemoryController
from emulate.uefi import UefiStandIn
from helperfw.runtime import platform, secrets
from helperfw.runtime import protocol as P

ROOT = Path(__file__).resolve().parents[1]
PAGE = P.PAGE_SIZE
KEY = bytes(range(7, 39))
RAM = 64 << 20
MIRROR_ONLY_HPA = RAM  # isolated: mirror-only memory lives above the guest's RAM
BATCH_BUDGET = 5_000_000  # instructions per batch; the worst honest batch needs far less

_HDR = struct.Struct("<IIQIIQQ")  # Command: op, count, session_id, epoch, version, ram_size,
#                                    challenge
_ENTRY = struct.Struct("<QIi")
_CTL = struct.Struct("<QQiIII")
assert _HDR.size == P.Command.offset("entries") and _ENTRY.size == P.Entry.size
assert _CTL.size == P.Control.size


@functools.cache
def symbols() -> dict[str, int]:
    """RVA of every symbol of the built image (from its .map)."""
    m = json.loads(efi_path().with_suffix(".map").read_text())
    return {n: s["rva"] for n, s in m["symbols"].items()}


@functools.cache
def symbol_sizes() -> dict[str, int]:
    m = json.loads(efi_path().with_suffix(".map").read_text())
    return {n: s["size"] for n, s in m["symbols"].items()}


@functools.cache
def efi_path() -> Path:
    """Build the firmware from the current sources once per process (never a stale out/)."""
    out = Path(tempfile.mkdtemp(prefix="mh-hostile-"))
    subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(out)], check=True,
                   cwd=ROOT, capture_output=True)
    return out / "MigrationHelper.efi"


class _Announced:
    def __init__(self) -> None:
        self.bootinfo_gpa: int | None = None
        self.shared: list[tuple[int, int]] = []

    def __call__(self, vcpu, nr, a0, a1, a2, a3):
        if nr == P.MH_HC_ANNOUNCE:
            self.bootinfo_gpa = a0
            return 0
        if nr == platform.KVM_HC_MAP_GPA_RANGE:
            self.shared.append((a0, a1))
            return 0
        return (-1000) & (2**64 - 1)


def boot(cbit: int, option: int, *, key: bytes = KEY, seed: int = 31337,
         xts_key: bytes | None = None, shift_high: int = 0):
    """Load the driver in a main VM with SEV; return (mc, vm, BootInfo)."""
    efi = efi_path()
    mc = MemoryController(RAM + (16 << 20))
    vm = VM(mc, cpuid=CpuidModel(sev=True, cbit=cbit), name="main", key=xts_key,
            rdrand_seed=seed)
    host = _Announced()
    vm.hypercall = host
    u = UefiStandIn(vm, ram_size=RAM, seed=seed + option, symbols=symbols())
    u.install_launch_secret([(secrets.KEY_ENTRY_GUID, key)])
    cfg = u.allocate_pool(16, 4)
    vm.write(cfg, P.MhConfig.build(option=option, shift_high=shift_high), encrypted=True)
    u.install_config_table(P.MH_CONFIG_GUID, cfg)
    r = u.start_image(efi)
    assert r.ok, (r.exit, r.debug_log)
    assert host.bootinfo_gpa is not None
    # the host reads BootInfo in plaintext: the driver made every lane's mailbox shared and
    # said so
    bi = P.BootInfo.parse(mc.host_read(vm.gpa_to_hpa(host.bootinfo_gpa), P.BootInfo.size))
    assert (host.bootinfo_gpa, P.MAILBOX_PAGES * bi.lanes) in host.shared
    assert (bi.magic, bi.version, bi.option, bi.c_bit, bi.active) == (
        P.BOOTINFO_MAGIC, P.PROTOCOL_VERSION.value, option, cbit, 1)
    return mc, vm, bi


def make_mirror(mc: MemoryController, vm: VM, bi, cbit: int) -> VM:
    """The host creates the mirror VM for BootInfo's option (as tests/test_mirror.py does)."""
    mirror = VM(mc, cpuid=CpuidModel(sev=True, cbit=cbit), mirror_of=vm, name="mirror")
    slot = 0
    regions = list(bi.regions)[: bi.nregions]
    if bi.option == P.OPT_SHIFT:
        mirror.set_user_memory_region(slot, 0, RAM, vm.gpa_to_hpa(0))
        slot += 1
    else:
        free = MIRROR_ONLY_HPA
        for r in regions:
            if bi.option == P.OPT_ISOLATED and r.kind != P.REGION_MAILBOX:
                plain = vm.read(r.main_gpa, r.length, encrypted=True)
                mirror.set_user_memory_region(slot, r.mirror_gpa, r.length, free)
                mirror.write(r.mirror_gpa, plain, encrypted=True)
                free += r.length
            else:
                mirror.set_user_memory_region(slot, r.mirror_gpa, r.length,
                                              vm.gpa_to_hpa(r.main_gpa))
            slot += 1
    mirror.set_user_memory_region(slot, bi.ram_base, RAM, vm.gpa_to_hpa(0))
    return mirror


def pack_command(op: int, entries=(), *, count: int | None = None, session_id: int = 0,
                 epoch: int = 0, version: int = P.PROTOCOL_VERSION.value, ram_size: int = 0,
                 challenge: int = 0) -> bytes:
    """The Command page bytes (entries: (ram_addr, flags) pairs; the rest are zero)."""
    n = len(entries) if count is None else count
    body = b"".join(_ENTRY.pack(a, f, 0) for a, f in entries)
    return (_HDR.pack(op, n & 0xFFFFFFFF, session_id, epoch, version, ram_size, challenge) + body
            + bytes(P.Command.size - _HDR.size - len(body)))


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
                 seed: int = 31337, xts_key: bytes | None = None, track_writes: bool = True):
        self.cbit, self.option = cbit, option
        self.mc, self.vm, self.bi = boot(cbit, option, key=key, seed=seed, xts_key=xts_key)
        self.mirror = make_mirror(self.mc, self.vm, self.bi, cbit)
        bi = self.bi
        self.regions = list(bi.regions)[: bi.nregions]
        self.vcpu: VCpu = self.mirror.create_vcpu(rip=bi.entry_rip, cr3=bi.cr3, rsp=bi.rsp)
        self.image_base = bi.entry_rip - symbols()["mh_entry"]
        self.mb = self.vm.gpa_to_hpa(bi.mailbox_gpa)  # host view: raw DRAM
        self.mb_size = P.MAILBOX_PAGES * PAGE
        self.bell = 0
        self.ram_base = bi.ram_base
        self._window: set[int] = set()
        self._bad: list[tuple[int, int, int]] = []
        self.hands = HostHands(self.mc)  # the attacker's hands on this machine
        if track_writes:
            self._install_write_hooks()

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
        return self.mb + 2 * PAGE + i * P.SLOT_SIZE

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
        self.mc.host_write(self.mb + PAGE, command)
        for i, data in (slots or {}).items():
            self.write_slot(i, data)
        self.bell += 1
        self.mc.host_write(self.mb + P.CONTROL_OFFSET, struct.pack("<Q", self.bell))
        self._window = set()
        self._bad = []
        if preempt:
            ex = self.hands.run_preempted(self.vcpu, preempt, budget=budget)
        else:
            ex = self.vcpu.run(budget)
        res = BatchResult(ex, window_pages_written=self._window, bad_writes=self._bad)
        if ex.reason != "hlt":
            return res
        ctl = _CTL.unpack(self.mc.host_read(self.mb + P.CONTROL_OFFSET, _CTL.size))
        if ctl[1] != self.bell:
            return res
        res.status = ctl[2]
        count = struct.unpack_from("<I", command, 4)[0]
        n = min(count, P.MAX_SLOTS)
        raw = self.mc.host_read(self.mb + PAGE + _HDR.size, n * _ENTRY.size)
        res.entry_status = [_ENTRY.unpack_from(raw, i * _ENTRY.size)[2] for i in range(n)]
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
