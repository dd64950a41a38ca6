"""Driver-load set-up of the mirror VM: regions, the mirror's page tables, a shared mailbox,
the BootInfo block and the announce hypercall.

Runs in the main VM at driver load (boot services available, OVMF's identity map active).
Regions keep their main-VM address as their VA in the mirror, so every pointer the image holds
stays valid there; only their mirror GPAs differ between the options.
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    efi_call,
    func_addr,
    function,
    i32,
    rdmsr,
    read_cr3,
    sizeof,
    static,
    struct,
    symbol_addr,
    u8,
    u32,
    u64,
    write_cr3,
)

from .efi import ALLOCATE_MAX_ADDRESS, EFI_RUNTIME_SERVICES_DATA, EfiBootServices
from .ghcb import hypercall
from .memops import wipe
from .pagetables import (
    MAP_ENC,
    MAP_W,
    MAP_X,
    PT_OK,
    PTE_NX,
    PTE_PS,
    pt_cr3,
    pt_init,
    pt_map,
)
from .platform import (
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    MSR_AMD64_SEV,
    PAGE_SHIFT,
    PAGE_SIZE,
    PML4_SHIFT,
    PT_ENTRIES,
    PT_LEVEL_BITS,
    PTE_P,
    PTE_PAT_LARGE,
    PTE_RW,
)
from .protocol import (
    BOOTINFO_MAGIC,
    DEFAULT_LANES,
    DEFAULT_SLOTS,
    E_BAD_ARG,
    E_SETUP_ALLOC,
    E_SETUP_HIGH_REGION,
    E_SETUP_LANES,
    E_SETUP_OPTION,
    E_SETUP_SHARE,
    E_SETUP_TABLES,
    MAILBOX_BYTES,
    MAILBOX_PAGES,
    MAX_LANES,
    MAX_REGIONS,
    MH_HC_ANNOUNCE,
    OK,
    OPT_ISOLATED,
    OPT_SHIFT,
    OPT_TUPLES,
    PROTOCOL_VERSION,
    REGION_CODE,
    REGION_DATA,
    REGION_MAILBOX,
    REGION_RODATA,
    BootInfo,
)
from .session import STACK, STACK_SIZE, HelperCtx, LaneCtx, init_lane, lane0
from .vcpu import mh_entry

PT_POOL_PAGES = 32  # static tables (~10 pages) plus 1 GiB-page windows up to ~10 TiB
PT_POOL = static(Array[u8, PT_POOL_PAGES * PAGE_SIZE], align=PAGE_SIZE)
FOUR_GIB = 1 << 32
CANONICAL_LIMIT = 1 << 47
LANE_CTX_BYTES = (LaneCtx.size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE
LANE_BYTES = LANE_CTX_BYTES + STACK_SIZE  # a lane > 0: its LaneCtx, then its stack



@struct
class SetupParams:
    option: u32
    shift_high: u32  # shift option: RAM at 2^(phys_bits-1) instead of 4 GiB
    c_bit: u32
    phys_bits: u32  # MAXPHYADDR minus the SEV reduction
    lanes: u32  # 1..MAX_LANES


@function(small=True)
def region_flags(kind: u32) -> u32:
    if kind == REGION_CODE:
        return MAP_X | MAP_ENC
    if kind == REGION_RODATA:
        return MAP_ENC
    if kind == REGION_MAILBOX:
        return MAP_W
    return MAP_W | MAP_ENC


@function(small=True)
def add_region(c: Ptr[HelperCtx], main: u64, length: u64, kind: u32) -> None:
    if length == 0:
        return
    r = addr(c.regions[c.nregions])
    r.main_gpa = main
    r.length = length
    r.mirror_gpa = main
    r.kind = kind
    r.flags = region_flags(kind)
    c.nregions += 1


@function(small=True)
def place_regions(c: Ptr[HelperCtx], p: Ptr[SetupParams]) -> i32:
    """Choose mirror GPAs and the RAM window base for the option."""
    top = u64(1) << u64(p.phys_bits)
    if p.option == OPT_SHIFT:
        for i in range(c.nregions):
            r = addr(c.regions[i])
            if r.main_gpa + r.length > FOUR_GIB:
                return E_SETUP_HIGH_REGION
        if p.shift_high != 0:
            c.ram_base = top >> 1
            c.ram_max = top >> 1
        else:
            c.ram_base = FOUR_GIB
            c.ram_max = min(top, u64(CANONICAL_LIMIT)) - FOUR_GIB
        return OK
    if p.option != OPT_TUPLES and p.option != OPT_ISOLATED:
        return E_SETUP_OPTION
    # tuples/isolated: regions packed from 2^(phys_bits-2), RAM in the top half
    next_gpa = top >> 2
    for i in range(c.nregions):
        r = addr(c.regions[i])
        r.mirror_gpa = next_gpa
        next_gpa += (r.length + PAGE_SIZE - 1) & ~u64(PAGE_SIZE - 1)
    c.ram_base = top >> 1
    c.ram_max = top >> 1
    return OK


@function(small=True)
def mirror_of(c: Ptr[HelperCtx], va: u64) -> u64:
    """Mirror GPA of a VA inside one of the helper's regions (0 if none)."""
    for i in range(c.nregions):
        r = addr(c.regions[i])
        if va >= r.main_gpa and va - r.main_gpa < r.length:
            return r.mirror_gpa + (va - r.main_gpa)
    return 0


@function(small=True)
def build_mirror_tables(c: Ptr[HelperCtx], p: Ptr[SetupParams]) -> i32:
    pool = addr(PT_POOL[0])
    pool_va = u64(pool)
    if pt_init(addr(c.pt), pool_va, mirror_of(c, pool_va), PT_POOL_PAGES, p.c_bit,
               p.phys_bits) != PT_OK:
        return E_SETUP_TABLES
    order: Array[u32, MAX_REGIONS]
    n = c.nregions
    for i in range(n):  # insertion sort of region indexes by main GPA
        order[i] = u32(i)
        j = i
        while j > 0 and c.regions[order[j - 1]].main_gpa > c.regions[order[j]].main_gpa:
            t = order[j]
            order[j] = order[j - 1]
            order[j - 1] = t
            j -= 1
    cursor: u64 = 0
    for i in range(n):
        r = addr(c.regions[order[i]])
        # shift: the rest of the low 4 GiB, 1:1, private, never executable
        if p.option == OPT_SHIFT and r.main_gpa > cursor and pt_map(
                addr(c.pt), cursor, cursor, r.main_gpa - cursor, MAP_W | MAP_ENC) != PT_OK:
            return E_SETUP_TABLES
        if pt_map(addr(c.pt), r.main_gpa, r.mirror_gpa, r.length, r.flags) != PT_OK:
            return E_SETUP_TABLES
        cursor = r.main_gpa + r.length
    if p.option == OPT_SHIFT and cursor < FOUR_GIB and pt_map(
            addr(c.pt), cursor, cursor, FOUR_GIB - cursor, MAP_W | MAP_ENC) != PT_OK:
        return E_SETUP_TABLES
    return OK


# -- making the mailbox shared in the guest's own (OVMF) page tables ---------------------------
@function(small=True)
def split_large(bs: Ptr[EfiBootServices], entry: Ptr[u64], size: u64, amask: u64) -> bool:
    """Replace a 1 GiB / 2 MiB leaf by a table of the next smaller pages, same attributes."""
    page: u64 = FOUR_GIB - 1  # identity-mapped: the table must be addressable as is
    if efi_call(bs.AllocatePages, ALLOCATE_MAX_ADDRESS, EFI_RUNTIME_SERVICES_DATA, 1,
                addr(page)) != 0:
        return False
    e = entry[0]
    base = e & amask & ~(size - 1)
    attrs = e & ~amask & ~u64(PTE_PAT_LARGE)  # keep C-bit, NX, RW...; drop the large-page PAT bit
    sub = size >> PT_LEVEL_BITS
    t = Ptr[u64](page)
    for i in range(PT_ENTRIES):
        if sub == PAGE_SIZE:
            t[i] = (base + u64(i) * sub) | (attrs & ~u64(PTE_PS))
        else:
            t[i] = (base + u64(i) * sub) | attrs
    # the new table is private memory like every OVMF table: reference it with the C-bit
    entry[0] = page | (e & ~amask & ~u64(PTE_PS) & ~u64(PTE_PAT_LARGE) & ~PTE_NX) | PTE_P | PTE_RW
    return True


@function(small=True)
def guest_clear_cbit(bs: Ptr[EfiBootServices], va: u64, pages: u64, c_mask: u64,
                     phys_bits: u32) -> bool:
    """Clear the C-bit of `pages` 4 KiB pages at `va` in the current (identity-mapped) tables,
    splitting large pages as needed, then flush the TLB."""
    amask = ((u64(1) << u64(phys_bits)) - 1) & ~u64(PAGE_SIZE - 1)
    for k in range(pages):
        v = va + k * PAGE_SIZE
        table = read_cr3() & amask
        shift: u64 = PML4_SHIFT
        while True:
            entry = Ptr[u64](table) + ((v >> shift) & (PT_ENTRIES - 1))
            e = entry[0]
            if (e & PTE_P) == 0:
                return False
            if shift == PAGE_SHIFT:
                entry[0] = e & ~c_mask
                break
            if (e & PTE_PS) != 0:
                if shift == PML4_SHIFT or not split_large(bs, entry, u64(1) << shift, amask):
                    return False
                e = entry[0]
            table = e & amask
            shift -= PT_LEVEL_BITS
    write_cr3(read_cr3())
    return True


@function(small=True)
def share_with_host(bs: Ptr[EfiBootServices], va: u64, pages: u64, c_mask: u64,
                    phys_bits: u32) -> i32:
    if not guest_clear_cbit(bs, va, pages, c_mask, phys_bits):
        return E_SETUP_SHARE
    # tell the host: KVM_HC_MAP_GPA_RANGE(gpa, pages, 4 KiB pages, not encrypted)
    hypercall(KVM_HC_MAP_GPA_RANGE, va, pages, KVM_MAP_GPA_RANGE_PAGE_SZ_4K)
    p = Ptr[u64](va)
    for i in range(pages * (PAGE_SIZE // sizeof(u64))):
        p[i] = 0  # what was there was ciphertext as seen through C=0
    return OK


# -- the whole set-up ------------------------------------------------------------------------------
@function(small=True)
def alloc_below_4g(bs: Ptr[EfiBootServices], pages: u64) -> u64:
    """Runtime-services data below 4 GiB (the shift option maps only the low 4 GiB), or 0."""
    a: u64 = FOUR_GIB - 1
    if efi_call(bs.AllocatePages, ALLOCATE_MAX_ADDRESS, EFI_RUNTIME_SERVICES_DATA, pages,
                addr(a)) != 0:
        return 0
    return a


@function(small=True)
def setup_lanes(c: Ptr[HelperCtx], bs: Ptr[EfiBootServices], mailbox: u64, n: u32) -> i32:
    """Lane 0 lives in CTX with the .bss STACK; lanes 1..n-1 get one allocation (each a
    LaneCtx and a stack, zeroed), a region of the helper's own. Every lane gets its mailbox:
    lane l's follows lane l-1's."""
    c.nlanes = n
    init_lane(c, 0, lane0(c), mailbox, u64(addr(STACK[0])) + STACK_SIZE)
    if n == 1:
        return OK
    size = u64(n - 1) * LANE_BYTES
    mem = alloc_below_4g(bs, size // PAGE_SIZE)
    if mem == 0:
        return E_SETUP_ALLOC
    wipe(Ptr[u8](mem), size)
    for i in range(1, n):
        base = mem + u64(i - 1) * LANE_BYTES
        init_lane(c, u32(i), Ptr[LaneCtx](base), mailbox + u64(i) * MAILBOX_BYTES,
                  base + LANE_BYTES)
    add_region(c, mem, size, REGION_DATA)
    return OK


@function(small=True)
def mirror_setup(c: Ptr[HelperCtx], bs: Ptr[EfiBootServices], p: Ptr[SetupParams]) -> i32:
    n = p.lanes
    if n == 0:
        n = DEFAULT_LANES
    if n > MAX_LANES:
        return E_SETUP_LANES
    mailbox = alloc_below_4g(bs, u64(n) * MAILBOX_PAGES)
    if mailbox == 0:
        return E_SETUP_ALLOC
    c_mask = u64(1) << u64(p.c_bit)
    st = share_with_host(bs, mailbox, u64(n) * MAILBOX_PAGES, c_mask, p.phys_bits)  # all lanes'
    if st != OK:
        return st
    c.option = p.option
    c.c_bit = p.c_bit
    c.phys_bits = p.phys_bits
    c.slots = DEFAULT_SLOTS
    c.nregions = 0
    c.window_mapped = 0
    c.flags = 0
    add_region(c, symbol_addr("__text_start"), symbol_addr("__text_end") -
               symbol_addr("__text_start"), REGION_CODE)
    add_region(c, symbol_addr("__rodata_start"), symbol_addr("__rodata_end") -
               symbol_addr("__rodata_start"), REGION_RODATA)
    add_region(c, symbol_addr("__data_start"), symbol_addr("__image_end") -
               symbol_addr("__data_start"), REGION_DATA)
    st = setup_lanes(c, bs, mailbox, n)
    if st != OK:
        return st
    add_region(c, mailbox, u64(n) * MAILBOX_BYTES, REGION_MAILBOX)
    st = place_regions(c, p)
    if st != OK:
        return st
    st = build_mirror_tables(c, p)
    if st != OK:
        return st
    if c.ram_max == 0:
        return E_BAD_ARG
    bi = Ptr[BootInfo](mailbox)
    bi.magic = BOOTINFO_MAGIC
    bi.version = PROTOCOL_VERSION
    bi.option = p.option
    bi.c_bit = p.c_bit
    bi.entry_rip = func_addr(mh_entry)
    bi.cr3 = pt_cr3(addr(c.pt))
    bi.mailbox_pages = MAILBOX_PAGES
    bi.slots = c.slots
    bi.ram_base = c.ram_base
    bi.ram_max = c.ram_max
    bi.nregions = c.nregions
    for i in range(c.nregions):
        d = addr(bi.regions[i])
        s = addr(c.regions[i])
        d.main_gpa = s.main_gpa
        d.length = s.length
        d.mirror_gpa = s.mirror_gpa
        d.kind = s.kind
        d.flags = s.flags
    bi.lanes = n
    for i in range(n):
        lc = Ptr[LaneCtx](c.lane_ctx[i])
        e = addr(bi.lane_info[i])
        e.mailbox_gpa = lc.mailbox
        e.mailbox_mirror_gpa = mirror_of(c, lc.mailbox)
        e.rsp = lc.stack_top - sizeof(u64)  # as if mh_entry had been called
    bi.rsp = bi.lane_info[0].rsp
    bi.mailbox_gpa = mailbox
    bi.mailbox_mirror_gpa = bi.lane_info[0].mailbox_mirror_gpa
    c.sev_status = u32(rdmsr(MSR_AMD64_SEV))
    bi.sev_status = c.sev_status
    bi.active = 1
    return OK


@function(small=True)
def announce(c: Ptr[HelperCtx]) -> u64:
    return hypercall(MH_HC_ANNOUNCE, lane0(c).mailbox, u64(PROTOCOL_VERSION), 0)

