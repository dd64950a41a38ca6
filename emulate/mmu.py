"""x86-64 4-level page walk with SEV C-bit handling, in Python.

Why in Python: unicorn's own walker honours only 40 physical-address bits, so PTEs carrying C-bit 47
or 51, or mirror GPAs at 2^42+, page-fault there. The vCPU uses UC_TLB_VIRTUAL and calls `walk`
from its UC_HOOK_TLB_FILL hook. Bit positions: Intel SDM vol. 3A §4.5, AMD APM vol. 2 §5.3/§7.10.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Page-table entry bits (same in all four levels where defined).
# Deliberately independent of helperfw.runtime.platform: this walk is the oracle the helper's
# page-table builder is tested against, so it must not share the builder's constants.
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_US = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_G = 1 << 8
PTE_NX = 1 << 63

# #PF error code bits (SDM vol. 3A §4.7).
PFEC_P = 1 << 0
PFEC_W = 1 << 1
PFEC_U = 1 << 2
PFEC_RSVD = 1 << 3
PFEC_I = 1 << 4

PAGE_4K = 1 << 12
PAGE_2M = 1 << 21
PAGE_1G = 1 << 30

ACCESS_READ, ACCESS_WRITE, ACCESS_FETCH = "read", "write", "fetch"


@dataclass(frozen=True)
class PhysLayout:
    """Physical-address layout the walk enforces.

    maxphyaddr: CPUID 0x80000008 EAX[7:0]. cbit: C-bit position or None without SEV. reduction:
    CPUID 0x8000001F EBX[11:6]. With SEV the address field is bits [maxphyaddr-reduction-1:12];
    the C-bit is stripped from it, and the other reduced bits (AMD APM vol. 2 §7.10.1: "treated as
    reserved") and bits [51:maxphyaddr] are reserved: a set one faults with PFEC_RSVD."""

    maxphyaddr: int = 48
    cbit: int | None = None
    reduction: int = 0
    nxe: bool = True  # EFER.NXE; if clear, bit 63 is reserved
    wp: bool = True  # CR0.WP; supervisor writes honour RW

    @property
    def phys_bits(self) -> int:
        return self.maxphyaddr - (self.reduction if self.cbit is not None else 0)

    @property
    def addr_mask(self) -> int:
        return ((1 << self.phys_bits) - 1) & ~(PAGE_4K - 1)

    @property
    def c_mask(self) -> int:
        return 0 if self.cbit is None else 1 << self.cbit

    @property
    def rsvd_mask(self) -> int:
        m = ((1 << 52) - 1) & ~((1 << self.phys_bits) - 1)
        m &= ~self.c_mask
        if not self.nxe:
            m |= PTE_NX
        return m


@dataclass(frozen=True)
class Translation:
    """Result of a walk: the guest-physical address, C-bit of the leaf, permissions, page size."""

    gpa: int
    encrypted: bool
    writable: bool
    executable: bool
    page_size: int


class PageFault(Exception):
    """A walk failure, with the x86 error code. `gpa_missing` marks a GPA with no memslot (NPF)."""

    def __init__(self, va: int, access: str, error_code: int, reason: str,
                 gpa_missing: int | None = None) -> None:
        self.va, self.access, self.error_code, self.reason = va, access, error_code, reason
        self.gpa_missing = gpa_missing
        super().__init__(f"{reason} (va={va:#x}, {access}, error_code={error_code:#x})")


ReadQword = Callable[[int, bool], int]
"""read_qword(gpa, encrypted) -> u64: reads one table entry as the guest would (raises PageFault
with gpa_missing set when no memslot covers the GPA)."""

_LEVELS = ((39, "PML4E"), (30, "PDPTE"), (21, "PDE"), (12, "PTE"))


def is_canonical(va: int) -> bool:
    top = va >> 47
    return top == 0 or top == (1 << 17) - 1


def walk(read_qword: ReadQword, cr3: int, va: int, access: str, layout: PhysLayout) -> Translation:
    """Translate `va` for an access of kind `access`, or raise PageFault (supervisor mode only;
    Accessed/Dirty bits are not written back)."""
    pfec_access = {ACCESS_READ: 0, ACCESS_WRITE: PFEC_W, ACCESS_FETCH: PFEC_I}[access]
    if not is_canonical(va):
        raise PageFault(va, access, pfec_access, "non-canonical address")
    amask, cmask, rmask = layout.addr_mask, layout.c_mask, layout.rsvd_mask
    table = cr3 & amask
    table_enc = bool(cr3 & cmask)
    writable, executable = True, True
    for shift, name in _LEVELS:
        index = (va >> shift) & 0x1FF
        entry = read_qword(table + index * 8, table_enc)
        if not entry & PTE_P:
            raise PageFault(va, access, pfec_access, f"{name} not present")
        rsvd = entry & rmask
        large = bool(entry & PTE_PS) and shift in (30, 21)
        if entry & PTE_PS and shift == 39:
            rsvd |= PTE_PS
        if large:
            # bits [size-1:13] of a large-page entry are reserved (bit 12 is PAT)
            rsvd |= entry & ((1 << shift) - 1) & ~((1 << 13) - 1)
        if rsvd:
            raise PageFault(va, access, pfec_access | PFEC_P | PFEC_RSVD,
                            f"reserved bits {rsvd:#x} set in {name} {entry:#x}")
        writable &= bool(entry & PTE_RW)
        executable &= not (layout.nxe and entry & PTE_NX)
        if large or shift == 12:
            size = 1 << shift
            base = entry & amask & ~(size - 1)
            gpa = base | (va & (size - 1))
            if access == ACCESS_WRITE and not writable and layout.wp:
                raise PageFault(va, access, pfec_access | PFEC_P, "write to read-only page")
            if access == ACCESS_FETCH and not executable:
                raise PageFault(va, access, pfec_access | PFEC_P, "fetch from NX page")
            return Translation(gpa, bool(entry & cmask), writable, executable, size)
        table = entry & amask
        table_enc = bool(entry & cmask)
    raise AssertionError("unreachable")


class PageTableBuilder:
    """Builds 4-level tables in guest memory from Python (tests and the UEFI stand-in's identity
    map). `alloc()` returns a zeroed table page GPA; `write_qword(gpa, value)` stores an entry."""

    def __init__(self, alloc: Callable[[], int], read_qword: Callable[[int], int],
                 write_qword: Callable[[int, int], None], cbit: int | None = None) -> None:
        self._alloc, self._rd, self._wr = alloc, read_qword, write_qword
        self.c_mask = 0 if cbit is None else 1 << cbit
        self.root = alloc()

    @property
    def cr3(self) -> int:
        return self.root | self.c_mask

    def map(self, va: int, gpa: int, size: int = PAGE_4K, *, writable: bool = True,
            executable: bool = True, encrypted: bool = True, extra: int = 0) -> None:
        """Map one page of `size` (4K/2M/1G) at va → gpa."""
        leaf_shift = {PAGE_4K: 12, PAGE_2M: 21, PAGE_1G: 30}[size]
        assert va % size == 0 and gpa % size == 0, "unaligned mapping"
        table = self.root
        for shift, _ in _LEVELS:
            slot = table + ((va >> shift) & 0x1FF) * 8
            if shift == leaf_shift:
                e = gpa | PTE_P | extra
                e |= PTE_RW if writable else 0
                e |= 0 if executable else PTE_NX
                e |= self.c_mask if encrypted else 0
                e |= PTE_PS if shift != 12 else 0
                self._wr(slot, e)
                return
            e = self._rd(slot)
            if not e & PTE_P:
                nxt = self._alloc()
                self._wr(slot, nxt | PTE_P | PTE_RW | self.c_mask)
                table = nxt
            else:
                assert not e & PTE_PS, "mapping under an existing large page"
                table = e & ~self.c_mask & ((1 << 52) - 1) & ~0xFFF

    def map_range(self, va: int, gpa: int, length: int, **kw: object) -> None:
        """Map [va, va+length) with the largest aligned pages that fit."""
        end = va + length
        while va < end:
            for size in (PAGE_1G, PAGE_2M, PAGE_4K):
                if va % size == 0 and gpa % size == 0 and va + size <= end:
                    self.map(va, gpa, size, **kw)  # type: ignore[arg-type]
                    va += size
                    gpa += size
                    break
