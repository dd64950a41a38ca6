"""The EFI entry point: self-test, SEV detection, and (with SEV) the helper's set-up.

Loaded by OVMF as a DXE runtime driver. Without SEV it proves it works (self-test on port 0x402
and ConOut) and returns EFI_SUCCESS, inactive.
"""

from __future__ import annotations

from helperfw import Ptr, addr, cpuid, efi_call, function, u32, u64

from .console import con_hex, con_puts, con_set_conout, text
from .efi import (
    ALLOCATE_ANY_PAGES,
    EFI_LOAD_ERROR,
    EFI_SUCCESS,
    EfiBootServices,
    EfiSystemTable,
)
from .pagetables import (
    MAP_ENC,
    MAP_W,
    MAP_X,
    PT_OK,
    PTE_NX,
    PTE_PS,
    PTE_RW,
    PtBuilder,
    pt_init,
    pt_lookup,
    pt_map,
)
from .protocol import CPUID_SEV_LEAF

EFI_BOOT_SERVICES_DATA = 4
SELFTEST_POOL_PAGES = 8
SELFTEST_POOL_PA = 0x7F00000000  # pretend mirror GPA of the pool: entries must carry it
SELFTEST_C_BIT = 47

MSG_BANNER = text("MigrationHelper: loaded (protocol v1)\n")
MSG_PT_OK = text("MigrationHelper: selftest page tables ok\n")
MSG_PT_FAIL = text("MigrationHelper: selftest page tables FAILED at check ")
MSG_ALLOC_FAIL = text("MigrationHelper: AllocatePages failed ")
MSG_NL = text("\n")
MSG_SELFTEST_OK = text("MigrationHelper: selftest passed\n")
MSG_NO_SEV = text("MigrationHelper: SEV not active, helper stays inactive\n")
MSG_SEV = text("MigrationHelper: SEV active, C-bit ")
MSG_SEV_TODO = text("MigrationHelper: SEV mirror set-up not in this build; inactive\n")


@function
def selftest_check_map(b: Ptr[PtBuilder], va: u64, want_pa: u64, want_bits: u64) -> bool:
    bits: u64 = 0
    pa = pt_lookup(b, va, addr(bits))
    return pa == want_pa and bits == want_bits


@function
def selftest_pagetables(pool: u64) -> u32:
    """Build a small mirror address space and walk it back: returns 0 or the failing check."""
    b: PtBuilder
    c = u64(1) << SELFTEST_C_BIT
    if pt_init(addr(b), pool, SELFTEST_POOL_PA, SELFTEST_POOL_PAGES, SELFTEST_C_BIT, 52) != PT_OK:
        return 1
    if pt_map(addr(b), 0x100000, 0x7E00000000, 0x3000, MAP_X | MAP_ENC) != PT_OK:
        return 2
    if pt_map(addr(b), 0x200000, 0x7E00200000, 0x200000, MAP_W | MAP_ENC) != PT_OK:
        return 3
    if pt_map(addr(b), u64(1) << 32, u64(1) << 32, u64(1) << 31, MAP_W | MAP_ENC) != PT_OK:
        return 4
    if pt_map(addr(b), 0x600000, 0x600000, 0x1000, MAP_W) != PT_OK:
        return 5
    if pt_map(addr(b), 0x700000, 0x700000, 0x1000, MAP_W | MAP_X) == PT_OK:
        return 6  # W^X must be refused
    if not selftest_check_map(addr(b), 0x101234, 0x7E00001234, c):
        return 7
    if not selftest_check_map(addr(b), 0x3FFFF8, 0x7E003FFFF8, c | PTE_NX | PTE_RW | PTE_PS):
        return 8
    if not selftest_check_map(addr(b), (u64(1) << 32) + 0x40000010, (u64(1) << 32) + 0x40000010,
                              c | PTE_NX | PTE_RW | PTE_PS):
        return 9
    if not selftest_check_map(addr(b), 0x600008, 0x600008, PTE_NX | PTE_RW):
        return 10
    bits: u64 = 0
    if pt_lookup(addr(b), 0x800000, addr(bits)) != ~u64(0):
        return 11
    # the tables' own entries must point at the pool's mirror GPA, not at its VA
    if (Ptr[u64](pool)[0] & ~u64(0xFFF) & ~c & ((u64(1) << 52) - 1)) != SELFTEST_POOL_PA + 0x1000:
        return 12
    return 0


@function
def selftest(bs: Ptr[EfiBootServices]) -> bool:
    pool: u64 = 0
    st = efi_call(bs.AllocatePages, ALLOCATE_ANY_PAGES, EFI_BOOT_SERVICES_DATA,
                  SELFTEST_POOL_PAGES, addr(pool))
    if st != 0:
        con_puts(addr(MSG_ALLOC_FAIL[0]))
        con_hex(st)
        con_puts(addr(MSG_NL[0]))
        return False
    r = selftest_pagetables(pool)
    efi_call(bs.FreePages, pool, SELFTEST_POOL_PAGES)
    if r != 0:
        con_puts(addr(MSG_PT_FAIL[0]))
        con_hex(u64(r))
        con_puts(addr(MSG_NL[0]))
        return False
    con_puts(addr(MSG_PT_OK[0]))
    return True


@function
def sev_c_bit() -> u32:
    """C-bit position if the CPU reports SEV (CPUID 0x8000001F EAX bit 1), else 0."""
    maxleaf, b0, c0, d0 = cpuid(0x80000000, 0)
    if maxleaf < CPUID_SEV_LEAF:
        return 0
    a, b, c, d = cpuid(CPUID_SEV_LEAF, 0)
    if (a & 2) == 0:
        return 0
    return b & 63


@function(abi="efi", name="efi_main")
def efi_main(image_handle: u64, system_table: u64) -> u64:
    st = Ptr[EfiSystemTable](system_table)
    con_set_conout(st.ConOut)
    con_puts(addr(MSG_BANNER[0]))
    if not selftest(Ptr[EfiBootServices](st.BootServices)):
        con_set_conout(0)
        return EFI_LOAD_ERROR
    con_puts(addr(MSG_SELFTEST_OK[0]))
    cbit = sev_c_bit()
    if cbit == 0:
        con_puts(addr(MSG_NO_SEV[0]))
        con_set_conout(0)
        return EFI_SUCCESS
    con_puts(addr(MSG_SEV[0]))
    con_hex(u64(cbit))
    con_puts(addr(MSG_NL[0]))
    con_puts(addr(MSG_SEV_TODO[0]))
    con_set_conout(0)
    return EFI_SUCCESS
