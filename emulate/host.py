"""The host: a Python model of QEMU + KVM around one SEV guest.

What it models, and why each piece is here:

* **RAM blocks with ram_addr_t.** QEMU addresses guest RAM by its offset in the RAM-block list,
  not by GPA; a block may be mapped at a GPA (pc.ram, a DIMM) or at none (an unplugged
  virtio-mem block) and is migrated either way. Every block lives at some host-physical
  address in this host's DRAM (`MemoryController`).
* **The shared-region list, indexed by ram_addr.** The guest reports conversions with
  KVM_HC_MAP_GPA_RANGE in GPAs; the host converts each page to its ram_addr on the spot, so
  the list survives re-mapping and covers unmapped blocks.
* **MSR_KVM_MIGRATION_CONTROL.** The guest opts in to migration with it; the write ends the
  vCPU's run so the host sees the moment.
* **Dirty logging (KVM_MEM_LOG_DIRTY_PAGES).** As in KVM, by write protection: while logging is
  on, a vCPU's TLB entry for a page grants write only after a write fault on it, which marks the
  page dirty; fetching (and clearing) the log flushes the TLBs so the next write faults again.
* **Firmware and helper.** The UEFI stand-in boots the guest RAM and loads the helper's PE file
  with a launch secret and the MH_CONFIG boot parameter; the driver announces its BootInfo with
  MH_HC_ANNOUNCE. `create_mirror` then builds the mirror VM the option asks for
  (`emulate.mirror`).
* **One seed.** Every key and random stream of this host (DRAM keys, each VM's RDRAND, the
  firmware's load address) derives from the host's `Seeds` (`emulate.seeds`), so a run replays
  from the one seed it prints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from unicorn import UC_PROT_WRITE

from emulate.cpuid import CpuidModel
from emulate.machine import VM, VCpu
from emulate.memctl import PAGE, MemoryController
from emulate.mirror import FOUR_GIB, HelperInfo, Mirror, create_mirror
from emulate.rdrand import RdrandSource
from emulate.seeds import Seeds
from emulate.uefi import EFI_BOOT_SERVICES_DATA, UefiStandIn
from helperfw.runtime import protocol as P
from helperfw.runtime.platform import (
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    KVM_MAP_GPA_RANGE_PAGE_SZ_MASK,
    MSR_KVM_MIGRATION_CONTROL,
    PAGE_1G,
    PAGE_2M,
    PAGE_SIZE,
)
from helperfw.runtime.secrets import KEY_ENTRY_GUID

# KVM_HC_MAP_GPA_RANGE's page-size field: the unit of a1 (Linux hypercalls.rst)
_MAP_PAGE_SIZES = {KVM_MAP_GPA_RANGE_PAGE_SZ_4K: PAGE_SIZE, KVM_MAP_GPA_RANGE_PAGE_SZ_2M: PAGE_2M,
                   KVM_MAP_GPA_RANGE_PAGE_SZ_1G: PAGE_1G}


def _neg(errno: int) -> int:
    return (-errno) & (2**64 - 1)


# -- RAM blocks and the shared-region list ----------------------------------------------------
@dataclass
class RamBlock:
    """One QEMU RAMBlock: ram_addr range [offset, offset+size), DRAM at hpa, mapped at gpa."""

    name: str
    offset: int
    size: int
    hpa: int
    gpa: int | None = None  # None: not mapped at any GPA (e.g. unplugged virtio-mem)
    slot: int | None = None  # KVM memslot while mapped

    @property
    def end(self) -> int:
        return self.offset + self.size


class SharedRegions:
    """Which pages of ram_addr space are shared (C=0). Page granular; `ranges()` gives the list."""

    def __init__(self, ram_size: int) -> None:
        self.bits = bytearray(ram_size // PAGE)

    def set(self, ram_addr: int, length: int, shared: bool) -> None:
        first, n = ram_addr // PAGE, -(-length // PAGE)
        self.bits[first : first + n] = (b"\x01" if shared else b"\x00") * n

    def is_shared(self, ram_addr: int) -> bool:
        return bool(self.bits[ram_addr // PAGE])

    def ranges(self) -> list[tuple[int, int]]:
        """(ram_addr, length) of each maximal shared run, ascending."""
        out: list[tuple[int, int]] = []
        b = bytes(self.bits)
        i = b.find(1)
        while i >= 0:
            j = b.find(0, i)
            j = len(b) if j < 0 else j
            out.append((i * PAGE, (j - i) * PAGE))
            i = b.find(1, j)
        return out

    def replace(self, ranges: list[tuple[int, int]]) -> None:
        self.bits[:] = bytes(len(self.bits))
        for start, length in ranges:
            self.set(start, length, True)

    @property
    def pages(self) -> int:
        return self.bits.count(1)


# -- KVM with dirty logging ---------------------------------------------------------------------
class KvmVM(VM):
    """A VM with KVM's dirty log. `get_dirty_log()` returns and clears the dirty host frames of
    its memslots ({slot: [page index within the slot]}), re-arming write protection.

    As in KVM, by write protection: while logging is on, a TLB entry grants write only for a
    frame already dirty; the first write to a clean frame is the write-protection fault (an
    exit, counted in `write_faults`) that marks it."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.dirty_logging = False
        self.dirty_frames: set[int] = set()
        self.write_faults = 0

    def fill_permissions(self, page_hpa: int, write: bool, perms: int) -> int:
        if not self.dirty_logging:
            return perms
        frame = page_hpa // PAGE
        if write:
            if frame not in self.dirty_frames:
                self.write_faults += 1
                self.dirty_frames.add(frame)
        elif frame not in self.dirty_frames:
            perms &= ~UC_PROT_WRITE
        return perms

    def note_write(self, hpa: int, n: int) -> None:
        if self.dirty_logging:
            self.dirty_frames.update(range(hpa // PAGE, (hpa + n - 1) // PAGE + 1))

    def _rearm(self) -> None:
        for v in self.vcpus:
            v.flush_tlb()

    def set_dirty_logging(self, on: bool) -> None:
        self.dirty_logging = on
        self.dirty_frames.clear()
        self._rearm()

    def get_dirty_log(self) -> dict[int, list[int]]:
        frames, self.dirty_frames = self.dirty_frames, set()
        self._rearm()
        out: dict[int, list[int]] = {}
        for slot, s in self.slots.items():
            lo, hi = s.hpa // PAGE, (s.hpa + s.size) // PAGE
            hit = sorted(f - lo for f in frames if lo <= f < hi)
            if hit:
                out[slot] = hit
        return out


# -- the host -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockSpec:
    name: str
    size: int
    gpa: int | None  # None: never mapped (virtio-mem unplugged)


def default_layout(mem: int) -> list[BlockSpec]:
    """pc.ram at GPA 0 (3/4), a DIMM at 4 GiB (1/8), an unplugged virtio-mem block (1/8)."""
    unit = 2 << 20
    if mem % (8 * unit) or mem < 8 * (8 << 20) // 2:
        raise ValueError("guest RAM must be a multiple of 16 MiB and at least 32 MiB")
    eighth = mem // 8
    return [BlockSpec("pc.ram", mem - 2 * eighth, 0), BlockSpec("dimm0", eighth, FOUR_GIB),
            BlockSpec("virtio-mem0", eighth, None)]


class Host:
    """QEMU+KVM for one guest on one host machine: DRAM, RAM blocks, the main VM with its
    firmware, exits (hypercalls, MSRs), the helper's announcement and the mirror VM.

    `seed` (an int or a `Seeds` scope) determines every key and random stream of this host;
    `sev_status`/`sev_es` configure the main VM's MSR_AMD64_SEV and SEV-ES flag (the mirror
    inherits them). With `sev_es` the CPUID model reports SEV-ES, the firmware has a GHCB and a
    #VC handler (the UEFI stand-in), and its GHCB page is in the shared-region list from boot."""

    def __init__(self, name: str, blocks: list[BlockSpec], *, cbit: int = 47,
                 seed: int | Seeds = 0, mirror_only: int = 16 << 20,
                 uefi_seed: int | None = None, sev_status: int | None = None,
                 sev_es: bool = False) -> None:
        self.name = name
        self.seeds = seed if isinstance(seed, Seeds) else Seeds(seed)
        ram = sum(b.size for b in blocks)
        if blocks[0].gpa != 0:
            raise ValueError("the first block is pc.ram at GPA 0 (ram_addr 0 == GPA 0)")
        self.mc = MemoryController(ram + mirror_only, rng=self.seeds.rng("dram-keys").randbytes)
        self.vm = KvmVM(self.mc, cpuid=CpuidModel(sev=True, sev_es=sev_es, cbit=cbit),
                        name=f"{name}-main",
                        rdrand=RdrandSource(self.seeds.derive("rdrand:main")),
                        sev_status=sev_status, sev_es=sev_es)
        self.cbit = cbit
        self.blocks: list[RamBlock] = []
        off = 0
        for spec in blocks:
            if spec.size % (2 << 20):
                raise ValueError(f"block {spec.name}: size must be a multiple of 2 MiB")
            self.blocks.append(RamBlock(spec.name, off, spec.size, hpa=off))
            off += spec.size
        self.ram_size = off
        self._mirror_free = off  # bump allocator for mirror-only DRAM (isolated)
        self.shared = SharedRegions(self.ram_size)
        self.migration_control = 0
        self.hypercalls = 0
        self.hypercall_errors: list[tuple[int, int, int, int]] = []
        self.info: HelperInfo | None = None
        self.mirror: Mirror | None = None
        self.on_migration_control: Callable[[int], None] | None = None
        # firmware: pc.ram as the stand-in's identity-mapped RAM (slot 0), other blocks mapped
        pc = self.blocks[0]
        if uefi_seed is None:
            uefi_seed = self.seeds.number("uefi-layout", 32)
        self.uefi = UefiStandIn(self.vm, ram_size=pc.size, hpa=pc.hpa, seed=uefi_seed,
                                label=pc.name)
        pc.gpa, pc.slot = 0, 0
        self._next_slot = 1
        for spec, blk in zip(blocks[1:], self.blocks[1:], strict=True):
            if spec.gpa is not None:
                self.plug(blk, spec.gpa)
        self.vm.hypercall = self._hypercall
        self.vm.msr_write = self._msr_write
        self.vm.msr_read = lambda msr: self.migration_control
        if sev_es:  # the firmware's early boot: its GHCB is shared, and the host learns it
            self.uefi.report_shared_ghcb()

    # ---- address conversions ------------------------------------------------------------------
    @property
    def vcpu(self) -> VCpu:
        """The main VM's vCPU (the one its firmware boots on and the guest program runs on)."""
        return self.uefi.vcpu

    def block(self, name: str) -> RamBlock:
        return next(b for b in self.blocks if b.name == name)

    def block_of(self, ram_addr: int) -> RamBlock:
        for b in self.blocks:
            if b.offset <= ram_addr < b.end:
                return b
        raise ValueError(f"ram_addr {ram_addr:#x} outside every RAM block")

    def gpa_to_ram_addr(self, gpa: int) -> int | None:
        for b in self.blocks:
            if b.gpa is not None and b.gpa <= gpa < b.gpa + b.size:
                return b.offset + gpa - b.gpa
        return None

    def ram_addr_to_gpa(self, ram_addr: int) -> int | None:
        b = self.block_of(ram_addr)
        return None if b.gpa is None else b.gpa + ram_addr - b.offset

    def ram_hpa(self, ram_addr: int) -> int:
        b = self.block_of(ram_addr)
        return b.hpa + ram_addr - b.offset

    # ---- memory hot(un)plug ---------------------------------------------------------------------
    def plug(self, blk: RamBlock, gpa: int) -> None:
        """Map a block at `gpa` (a memslot) and into the firmware's identity map."""
        blk.gpa, blk.slot = gpa, self._next_slot
        self._next_slot += 1
        self.vm.set_user_memory_region(blk.slot, gpa, blk.size, blk.hpa, blk.name)
        self.uefi.map_ram(gpa, blk.size)

    def unplug(self, blk: RamBlock) -> None:
        """Remove the block's memslot: it keeps its ram_addr range and contents (and is still
        migrated), but no GPA reaches it any more."""
        assert blk.slot is not None
        self.vm.set_user_memory_region(blk.slot, 0, 0, 0)
        blk.gpa = blk.slot = None

    # ---- exits ------------------------------------------------------------------------------------
    def _hypercall(self, vcpu: VCpu, nr: int, a0: int, a1: int, a2: int, a3: int) -> int:
        self.hypercalls += 1
        if nr == KVM_HC_MAP_GPA_RANGE:
            size = _MAP_PAGE_SIZES.get(a2 & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK)
            if size is None or a0 % size or a2 & ~(KVM_MAP_GPA_RANGE_PAGE_SZ_MASK
                                                   | KVM_MAP_GPA_RANGE_ENCRYPTED):
                self.hypercall_errors.append((nr, a0, a1, a2))
                return _neg(KVM_EINVAL)
            return self.map_gpa_range(a0, a1 * size, not a2 & KVM_MAP_GPA_RANGE_ENCRYPTED)
        if nr == P.MH_HC_ANNOUNCE:
            if a1 != P.PROTOCOL_VERSION.value:
                return _neg(KVM_EINVAL)
            self._announce(a0)
            return 0
        self.hypercall_errors.append((nr, a0, a1, a2))
        return _neg(KVM_ENOSYS)

    def map_gpa_range(self, gpa: int, length: int, shared: bool) -> int:
        """Record a conversion by ram_addr, page by page (a range may span blocks). Converted
        pages are marked dirty: their migrated form (raw or sealed) changes."""
        ras = [self.gpa_to_ram_addr(g) for g in range(gpa, gpa + length, PAGE)]
        if any(r is None for r in ras):
            self.hypercall_errors.append((KVM_HC_MAP_GPA_RANGE, gpa, length, int(shared)))
            return _neg(KVM_EINVAL)
        for r in ras:
            assert r is not None
            self.shared.set(r, PAGE, shared)
            if self.vm.dirty_logging:
                self.vm.dirty_frames.add(self.ram_hpa(r) // PAGE)
        return 0

    def _msr_write(self, msr: int, value: int) -> None:
        if msr == MSR_KVM_MIGRATION_CONTROL:
            self.migration_control = value
            for v in self.vm.vcpus:
                v.request_stop(f"MSR_KVM_MIGRATION_CONTROL={value}")
            if self.on_migration_control:
                self.on_migration_control(value)

    def _announce(self, gpa: int) -> None:
        hpa = self.vm.gpa_to_hpa(gpa)
        if hpa is None:
            raise ValueError(f"BootInfo GPA {gpa:#x} outside guest RAM")
        bi = P.BootInfo.parse(self.mc.host_read(hpa, P.BootInfo.size))  # shared: plaintext
        regions = list(bi.regions)[: min(bi.nregions, P.MAX_REGIONS)]
        self.info = HelperInfo(gpa, bi, regions)

    # ---- firmware and helper ------------------------------------------------------------------
    def boot_helper(self, image: Path | str, transport_key: bytes, option: int | None,
                    *, shift_high: int = 0) -> HelperInfo:
        """Start the helper's PE file in the firmware with the launch secret and the option's
        boot parameter (None: no parameter, the build default applies)."""
        self.uefi.install_launch_secret([(KEY_ENTRY_GUID, transport_key)])
        if option is not None:
            cfg = self.uefi.allocate_pool(P.MhConfig.size, EFI_BOOT_SERVICES_DATA)
            self.vm.write(cfg, P.MhConfig.build(option=option, shift_high=shift_high))
            self.uefi.install_config_table(P.MH_CONFIG_GUID, cfg)
        r = self.uefi.start_image(Path(image))  # its link map, if beside it, names faults
        if not r.ok:
            raise RuntimeError(f"{self.name}: helper driver failed: {r.exit}; "
                               f"log: {r.debug_log.decode(errors='replace')}")
        if self.info is None or not self.info.bootinfo.active:  # type: ignore[attr-defined]
            raise RuntimeError(f"{self.name}: helper did not announce itself; "
                               f"log: {r.debug_log.decode(errors='replace')}")
        return self.info

    def helper_ram_ranges(self) -> list[tuple[int, int]]:
        """ram_addr ranges of the helper's own regions (its image and mailbox): never migrated."""
        assert self.info is not None
        out = []
        for r in self.info.regions:
            first = r.main_gpa & ~(PAGE - 1)
            last = (r.main_gpa + r.length + PAGE - 1) & ~(PAGE - 1)
            for gpa in range(first, last, PAGE):
                ra = self.gpa_to_ram_addr(gpa)
                if ra is None:
                    continue
                if out and out[-1][0] + out[-1][1] == ra:
                    out[-1] = (out[-1][0], out[-1][1] + PAGE)
                else:
                    out.append((ra, PAGE))
        return sorted(out)

    def alloc_mirror_only(self, size: int) -> int:
        hpa = self._mirror_free
        if hpa + size > self.mc.size:
            raise MemoryError("mirror-only DRAM exhausted")
        self._mirror_free += size
        return hpa

    def create_mirror(self) -> Mirror:
        """KVM_CREATE_VM + KVM_CAP_VM_COPY_ENC_CONTEXT_FROM(main) for the announced helper
        (emulate.mirror); remembered as `self.mirror`."""
        self.mirror = create_mirror(self)
        return self.mirror

    def settle_private_views(self) -> int:
        """Put every private page of guest RAM into the VM key's plaintext view at once.

        Why: the memory controller converts a page's representation on its first access with
        another view and then flushes every vCPU's TLB. Pages nobody touched since power-on are
        in the raw view, so without this the helper's first C=1 access to each of them (every
        page on the destination) would cost a full TLB flush. Contents are unchanged; only the
        emulator's representation moves. Returns the pages converted."""
        before = self.mc.conversions
        for b in self.blocks:
            run = None
            for ra in range(b.offset, b.end + PAGE, PAGE):
                private = ra < b.end and not self.shared.is_shared(ra)
                if private and run is None:
                    run = ra
                elif not private and run is not None:
                    self.mc.make_state(self.ram_hpa(run), ra - run, self.vm.key_id, True)
                    run = None
        return self.mc.conversions - before

    # ---- host views of guest memory -------------------------------------------------------------
    def read_private(self, ram_addr: int, n: int = PAGE) -> bytes:
        """The page as the guest sees it through a C=1 mapping (this VM's key)."""
        return self.mc.guest_read(self.ram_hpa(ram_addr), n, self.vm.key_id, True)

    def read_raw(self, ram_addr: int, n: int = PAGE) -> bytes:
        """What QEMU reads: DRAM bytes (ciphertext for private pages)."""
        return self.mc.host_read(self.ram_hpa(ram_addr), n)

    def write_raw(self, ram_addr: int, data: bytes) -> None:
        self.mc.host_write(self.ram_hpa(ram_addr), data)

    def pages(self) -> Iterator[int]:
        for b in self.blocks:
            yield from range(b.offset, b.end, PAGE)
