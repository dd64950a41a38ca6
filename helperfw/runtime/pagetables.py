"""4-level page tables for the mirror VM's address space, built by the helper itself.

Runs in the guest at driver load (static part) and in the mirror at *_BEGIN (the RAM window).
Entries hold mirror GPAs; table pages come from a pool whose mirror GPA is known, so the builder
converts its own table VAs to mirror addresses. Leaves are as large as alignment allows
(1 GiB, 2 MiB, 4 KiB). No leaf is both writable and executable; everything not code is NX;
private memory carries the C-bit, shared memory (the mailbox) does not.
"""

from __future__ import annotations

from helperfw import Ptr, const, function, i32, struct, u32, u64

from . import platform
from .platform import PAGE_1G, PAGE_2M, PTE_A, PTE_D, PTE_P, PTE_PS, PTE_RW
from .protocol import (
    PT_E_ALIGN,
    PT_E_OVERLAP,
    PT_E_POOL,
    PT_E_RANGE,
    PT_E_WX,
)

PTE_NX = const(u64, platform.PTE_NX)  # bit 63: a u64 constant, not an i64 literal

MAP_W = 1  # writable
MAP_X = 2  # executable
MAP_ENC = 4  # private (C-bit set)

NEXT_IS_LEAF = const(u64, 0xFFFFFFFFFFFFFFFF)

PAGE_4K = platform.PAGE_SIZE

PT_OK = 0


@struct
class PtBuilder:
    pool_va: u64  # VA of the first pool page (== its main-VM GPA at load time)
    pool_pa: u64  # mirror GPA of the first pool page
    pool_pages: u32
    used: u32  # pool pages handed out; page 0 is the PML4
    c_mask: u64  # 1 << C-bit position
    addr_mask: u64  # bits of a PTE that hold the physical frame (C-bit excluded)
    pml4_va: u64
    phys_limit: u64  # 1 << usable physical-address bits (MAXPHYADDR minus SEV's reduction)


@function
def pt_zero_page(va: u64) -> None:
    p = Ptr[u64](va)
    for i in range(512):
        p[i] = 0


@function
def pt_init(b: Ptr[PtBuilder], pool_va: u64, pool_pa: u64, pool_pages: u32, c_bit: u32,
            phys_bits: u32) -> i32:
    """Start an empty address space in the pool. phys_bits: usable physical-address bits,
    i.e. MAXPHYADDR minus the SEV reduction (CPUID 0x8000001F EBX[11:6])."""
    if pool_pages == 0 or (pool_va & 0xFFF) != 0 or (pool_pa & 0xFFF) != 0:
        return PT_E_ALIGN
    b.pool_va = pool_va
    b.pool_pa = pool_pa
    b.pool_pages = pool_pages
    b.used = 1
    b.c_mask = u64(1) << u64(c_bit)
    b.addr_mask = ((u64(1) << u64(phys_bits)) - 1) & ~u64(0xFFF) & ~b.c_mask
    b.pml4_va = pool_va
    b.phys_limit = u64(1) << u64(phys_bits)
    if c_bit < phys_bits or pool_pa + u64(pool_pages) * PAGE_4K > b.phys_limit:
        return PT_E_RANGE  # the C-bit must lie above the address field; the pool inside it
    pt_zero_page(pool_va)
    return PT_OK


@function
def pt_cr3(b: Ptr[PtBuilder]) -> u64:
    """CR3 for the mirror: the PML4's mirror GPA, read encrypted (C-bit set)."""
    return b.pool_pa | b.c_mask


@function
def pt_alloc(b: Ptr[PtBuilder]) -> u64:
    if b.used >= b.pool_pages:
        return 0
    va = b.pool_va + u64(b.used) * PAGE_4K
    b.used += 1
    pt_zero_page(va)
    return va


@function
def pt_next(b: Ptr[PtBuilder], table_va: u64, index: u64) -> u64:
    """VA of the next-level table under entry `index`, creating it. Returns 0 when the pool is
    exhausted and NEXT_IS_LEAF when the entry is already a large-page leaf (an overlap)."""
    e = Ptr[u64](table_va) + index
    v = e[0]
    if v & PTE_P:
        if v & PTE_PS:
            return NEXT_IS_LEAF
        return (v & b.addr_mask) - b.pool_pa + b.pool_va
    nva = pt_alloc(b)
    if nva == 0:
        return 0
    # intermediate entries: present, writable, executable (leaves decide), private
    e[0] = (nva - b.pool_va + b.pool_pa) | b.c_mask | PTE_P | PTE_RW | PTE_A
    return nva


@function
def pt_leaf_bits(b: Ptr[PtBuilder], flags: u32) -> u64:
    bits: u64 = PTE_P | PTE_A | PTE_D
    if flags & MAP_W:
        bits |= PTE_RW
    if (flags & MAP_X) == 0:
        bits |= PTE_NX
    if flags & MAP_ENC:
        bits |= b.c_mask
    return bits


@function
def pt_map(b: Ptr[PtBuilder], va: u64, pa: u64, size: u64, flags: u32) -> i32:
    """Map [va, va+size) → [pa, pa+size) with the largest pages alignment allows."""
    if (flags & MAP_W) != 0 and (flags & MAP_X) != 0:
        return PT_E_WX
    if ((va | pa | size) & 0xFFF) != 0 or va >= (u64(1) << 47):
        return PT_E_ALIGN
    if size > (u64(1) << 47) - va:
        return PT_E_ALIGN
    if pa >= b.phys_limit or size > b.phys_limit - pa:
        return PT_E_RANGE
    bits = pt_leaf_bits(b, flags)
    while size != 0:
        pdpt = pt_next(b, b.pml4_va, (va >> 39) & 511)
        if pdpt == 0:
            return PT_E_POOL
        if pdpt == NEXT_IS_LEAF:
            return PT_E_OVERLAP
        e1 = Ptr[u64](pdpt) + ((va >> 30) & 511)
        if ((va | pa) & (PAGE_1G - 1)) == 0 and size >= PAGE_1G:
            if e1[0] & PTE_P:
                return PT_E_OVERLAP
            e1[0] = pa | bits | PTE_PS
            va += PAGE_1G
            pa += PAGE_1G
            size -= PAGE_1G
            continue
        pd = pt_next(b, pdpt, (va >> 30) & 511)
        if pd == 0:
            return PT_E_POOL
        if pd == NEXT_IS_LEAF:
            return PT_E_OVERLAP
        e2 = Ptr[u64](pd) + ((va >> 21) & 511)
        if ((va | pa) & (PAGE_2M - 1)) == 0 and size >= PAGE_2M:
            if e2[0] & PTE_P:
                return PT_E_OVERLAP
            e2[0] = pa | bits | PTE_PS
            va += PAGE_2M
            pa += PAGE_2M
            size -= PAGE_2M
            continue
        pt = pt_next(b, pd, (va >> 21) & 511)
        if pt == 0:
            return PT_E_POOL
        if pt == NEXT_IS_LEAF:
            return PT_E_OVERLAP
        e3 = Ptr[u64](pt) + ((va >> 12) & 511)
        if e3[0] & PTE_P:
            return PT_E_OVERLAP
        e3[0] = pa | bits
        va += PAGE_4K
        pa += PAGE_4K
        size -= PAGE_4K
    return PT_OK


@function
def pt_lookup(b: Ptr[PtBuilder], va: u64, out_bits: Ptr[u64]) -> u64:
    """Walk the tables built here: the mirror GPA `va` maps to, or ~0 if unmapped.
    `out_bits` receives the leaf's permission bits (RW, NX, C-bit, PS)."""
    table = b.pml4_va
    shift: u64 = 39
    while True:
        e = (Ptr[u64](table) + ((va >> shift) & 511))[0]
        if (e & PTE_P) == 0:
            return ~u64(0)
        if shift == 12 or (e & PTE_PS) != 0:
            size = u64(1) << shift
            out_bits[0] = e & (PTE_RW | PTE_NX | PTE_PS | b.c_mask)
            return (e & b.addr_mask & ~(size - 1)) | (va & (size - 1))
        table = (e & b.addr_mask) - b.pool_pa + b.pool_va
        shift -= 9


@function(abi="c")
def mh_test_pt_build(b: Ptr[PtBuilder], pool_va: u64, pool_pa: u64, pool_pages: u32,
                     c_bit: u32, phys_bits: u32, spec: Ptr[u64], nspec: u32) -> i32:
    """Test entry: init, then map `nspec` ranges given as (va, pa, size, flags) quadruples."""
    r = pt_init(b, pool_va, pool_pa, pool_pages, c_bit, phys_bits)
    if r != PT_OK:
        return r
    for i in range(nspec):
        q = spec + u64(i) * 4
        r = pt_map(b, q[0], q[1], q[2], u32(q[3]))
        if r != PT_OK:
            return r
    return PT_OK


@function(abi="c")
def mh_test_pt_lookup(b: Ptr[PtBuilder], va: u64, out_bits: Ptr[u64]) -> u64:
    return pt_lookup(b, va, out_bits)

