"""The migrated guest's workload, as a DSL program (this module holds the program only).

Why a real program: migration must be shown against a guest that behaves like one: it writes
private memory through its own (C-bit) page tables, converts some pages to shared the way Linux
does (`set_memory_decrypted`: clear the C-bit in its PTEs, flush, report with
KVM_HC_MAP_GPA_RANGE), enables migration with MSR_KVM_MIGRATION_CONTROL, and then keeps dirtying
memory (a hot set plus scattered cold writes) for as long as the host lets it run.

`guest_main(cfg)` never returns. Its set-up ends with the MSR write, on which the host stops
the vCPU; after that, every run of the vCPU with an instruction budget is one slice of the
dirtying loop. All state lives in `GuestCfg` (private guest memory), so the loop resumes
exactly where a budget exit left it, also on the destination after migration.

Under SEV-ES (MSR_AMD64_SEV bit 1, and the host gave it a GHCB page) the host can neither read
nor set its registers, so the program parks its vCPU cooperatively, the way SEV-ES guests
offline CPUs (docs/PROTOCOL.md, "SEV-ES launch"):

* at set-up it shares its GHCB and a control page (clears their C-bits, reports them with
  KVM_HC_MAP_GPA_RANGE through the GHCB: under OVMF's #VC handler a plain VMMCALL would pass
  RAX only) and registers its AP jump table (VMGEXIT AP_JUMP_TABLE set), a private page;
* each loop iteration reads a request counter the host writes into the control page; a new
  value makes it park: `guest_park` saves the callee-saved registers, RSP, RFLAGS and CR3 into
  the jump table page and holds (VMGEXIT AP_RESET_HOLD, the "AP HLT loop") until woken;
* the jump table page, stack and config migrate as ordinary private pages; on the destination
  the firmware's own hold loop, woken by the host, enters the table's `entry` (`guest_wake`,
  RDI = the table), which restores the saved state and returns into the loop. Woken on the
  source instead (a migration that failed), the hold returns through the same restore.

Its CPUID, MSR and VMMCALL instructions become #VC, served by the firmware's #VC handler (the
UEFI stand-in), as for any OS running on OVMF's IDT.

It is compiled like any DSL program (`helperfw.codegen.pipeline.build([guest_main])`); the
emulator's loader (`emulate.guest.load`) places a built image in a main VM.
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    const,
    cpuid,
    efi_call,
    func_addr,
    function,
    rdmsr,
    read_cr3,
    routine,
    struct,
    u8,
    u32,
    u64,
    vload,
    vmmcall,
    write_cr3,
    wrmsr,
)
from helperfw.runtime.ghcb import ghcb_begin, ghcb_exit, ghcb_get, ghcb_valid, ghcb_vmmcall
from helperfw.runtime.platform import (
    CPUID_SEV_LEAF,
    GHCB_SW_EXIT_INFO2,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MIGRATION_READY,
    MSR_AMD64_SEV,
    MSR_AMD64_SEV_ES_ENABLED,
    MSR_KVM_MIGRATION_CONTROL,
    PTE_P,
    PTE_PS,
    PTE_RW,
    SVM_VMGEXIT_AP_JUMP_TABLE,
    SVM_VMGEXIT_AP_JUMP_TABLE_SET,
    SVM_VMGEXIT_AP_RESET_HOLD,
)

GUEST_MAGIC = 0x54534547  # "GEST"
MAX_GUEST_REGIONS = 8

GR_PRIVATE = 0  # filled through C=1 mappings
GR_SHARED = 1  # converted to shared (C-bit cleared, reported to the host), then filled
GR_DIRTY = 2  # the loop may write here after set-up (else: filled once, never touched again)

PHYS_MASK = const(u64, 0x000F_FFFF_FFFF_F000)  # bits 51:12; the C-bit is cleared from it separately
WORDS_PER_TOUCH = 8  # u64 stores per dirtied page (spread over the page)
MIX = 0x9E3779B97F4A7C15  # golden-ratio multiplier: a cheap, well-spread page pattern
JT_MAGIC = 0x544A5041  # "APJT": a woken vCPU enters only a table this program wrote


@struct
class GuestRegion:
    va: u64  # identity mapped: also the GPA
    pages: u64
    flags: u32  # GR_*
    seed: u32


@struct
class GuestCfg:
    """Written by the host before the first run; the guest keeps its state here."""

    magic: u32
    nregions: u32
    regions: Array[GuestRegion, MAX_GUEST_REGIONS]
    pt_pool: u64  # pages for splitting large leaves when sharing 4 KiB granules
    pt_pool_pages: u32
    pt_pool_used: u32
    hot_va: u64  # the hot set: most writes go here
    hot_pages: u64
    cold_shift: u32  # one write in 2^cold_shift goes to a random page of a GR_DIRTY region
    phase: u32  # 0 set-up, 1 dirtying
    rng: u64  # xorshift64 state
    generation: u64  # bumped on every touch: a rewritten page never repeats its content
    touches: u64  # pages written by the loop so far
    shared_calls: u64  # KVM_HC_MAP_GPA_RANGE calls made
    hc_errors: u64  # hypercalls that returned non-zero
    dirty_pages: u64  # total pages of GR_DIRTY regions (computed at set-up)
    ghcb: u64  # SEV-ES: this vCPU's GHCB page (0: none given)
    ctl: u64  # SEV-ES: the shared page the host writes park requests into (u64 counter)
    jt: u64  # SEV-ES: the AP jump table page (private; ApJumpTable)
    park_seen: u64  # the last park request honoured
    parks: u64  # times this vCPU parked and came back (on either side)
    sev_es: u32  # set-up found SEV-ES on and registered the jump table
    reserved: u32


@struct
class ApJumpTable:
    """The page registered with VMGEXIT AP_JUMP_TABLE: a woken vCPU enters `entry` with RDI =
    this table; the rest is the state `guest_park` saved (win64 callee-saved registers: the
    park is called through efi_call)."""

    entry: u64
    magic: u64
    rbx: u64
    rbp: u64
    rsi: u64
    rdi: u64
    r12: u64
    r13: u64
    r14: u64
    r15: u64
    rsp: u64
    rflags: u64
    cr3: u64
    xmm: Array[u8, 160]  # xmm6 .. xmm15


@function
def mix(a: u64, gen: u64) -> u64:
    x = (a ^ (gen << 40)) * MIX
    return x ^ (x >> 29)


@function
def fill_page(va: u64, gen: u64) -> None:
    p = Ptr[u64](va)
    for i in range(512):
        p[i] = mix(va + u64(i) * 8, gen)


@function
def touch_page(va: u64, gen: u64) -> None:
    p = Ptr[u64](va)
    for i in range(WORDS_PER_TOUCH):
        p[u64(i) * (512 // WORDS_PER_TOUCH)] = mix(va + u64(i) * 8, gen)


@function
def xorshift(c: Ptr[GuestCfg]) -> u64:
    x = c.rng
    x ^= x << 13
    x ^= x >> 7
    x ^= x << 17
    c.rng = x
    return x


@function
def c_mask() -> u64:
    a, b, _c, _d = cpuid(CPUID_SEV_LEAF, 0)
    if (a & 2) == 0:
        return 0
    return u64(1) << u64(b & 63)


@function
def split_leaf(c: Ptr[GuestCfg], entry: Ptr[u64], shift: u64, cm: u64) -> bool:
    """Replace the large leaf at `entry` (1 GiB: shift 30, 2 MiB: shift 21) by a table of
    512 smaller leaves with the same attributes, as Linux does before converting one page."""
    if c.pt_pool_used >= c.pt_pool_pages:
        return False
    table = c.pt_pool + u64(c.pt_pool_used) * 4096
    c.pt_pool_used += 1
    e = entry[0]
    base = e & PHYS_MASK & ~cm & ~((u64(1) << shift) - 1)
    attrs = (e & ~PHYS_MASK) | (e & cm)  # P, RW, A, D, PS, NX; the C-bit sits in PHYS_MASK
    child = u64(1) << (shift - 9)
    if shift - 9 == 12:
        attrs &= ~u64(PTE_PS)  # bit 7 of a 4 KiB PTE is PAT, not PS
    t = Ptr[u64](table)
    for i in range(512):
        t[i] = (base + u64(i) * child) | attrs
    entry[0] = table | cm | PTE_P | PTE_RW
    return True


@function
def set_encrypted(c: Ptr[GuestCfg], va: u64, enc: bool) -> bool:
    """Set or clear the C-bit of the 4 KiB mapping of `va` (splitting large leaves)."""
    cm = c_mask()
    table = read_cr3() & PHYS_MASK & ~cm
    shift: u64 = 39
    while True:
        entry = Ptr[u64](table) + ((va >> shift) & 511)
        e = entry[0]
        if (e & PTE_P) == 0:
            return False
        if shift == 12:
            entry[0] = (e | cm) if enc else (e & ~cm)
            return True
        if (e & PTE_PS) != 0:
            if not split_leaf(c, entry, shift, cm):
                return False
            e = entry[0]
        table = e & PHYS_MASK & ~cm
        shift -= 9


@function
def guest_hypercall(c: Ptr[GuestCfg], nr: u64, a0: u64, a1: u64, a2: u64) -> u64:
    """VMMCALL, or under SEV-ES through this vCPU's GHCB (with all its arguments)."""
    if c.sev_es != 0:
        return ghcb_vmmcall(c.ghcb, nr, a0, a1, a2)
    return vmmcall(nr, a0, a1, a2, 0)


@function
def make_shared(c: Ptr[GuestCfg], va: u64, pages: u64) -> None:
    for i in range(pages):
        if not set_encrypted(c, va + i * 4096, False):
            c.hc_errors += 1
    write_cr3(read_cr3())  # flush: no stale C=1 translation may survive the conversion
    # a2: bit 4 clear = decrypted, low bits 0 = 4 KiB pages (Linux hypercalls.rst)
    if guest_hypercall(c, KVM_HC_MAP_GPA_RANGE, va, pages, 0) != 0:
        c.hc_errors += 1
    c.shared_calls += 1


# ---- SEV-ES: parking the vCPU ------------------------------------------------------------------
def _jt(name: str) -> int:
    return ApJumpTable.offset(name)


_SAVED = ("rbx", "rbp", "rsi", "rdi", "r12", "r13", "r14", "r15")


def _park_text() -> str:
    """guest_park(jt, cfg) (win64: RCX, RDX): save the state into the table, hold; woken on this
    side, continue through guest_wake like a vCPU woken elsewhere."""
    lines = [f"mov %{r}, {_jt(r)}(%rcx)" for r in _SAVED]
    lines += [f"movdqu %xmm{6 + i}, {_jt('xmm') + 16 * i}(%rcx)" for i in range(10)]
    return "\n".join(["guest_park:", *lines,
                      "pushfq", f"popq {_jt('rflags')}(%rcx)",
                      "mov %cr3, %rax", f"mov %rax, {_jt('cr3')}(%rcx)",
                      f"mov %rsp, {_jt('rsp')}(%rcx)",
                      "mov %rcx, %rbx",  # callee-saved across the hold: the table
                      "mov %rdx, %rdi",
                      "sub $8, %rsp",  # the call below needs RSP = 0 mod 16
                      "call guest_hold",
                      "mov %rbx, %rdi",
                      "jmp guest_wake"])


def _wake_text() -> str:
    """guest_wake (RDI = the table): the saved state back, then return from guest_park."""
    lines = [f"cmpq ${JT_MAGIC}, {_jt('magic')}(%rdi)", "jne 1f",
             f"mov {_jt('cr3')}(%rdi), %rax", "mov %rax, %cr3",
             f"mov {_jt('rsp')}(%rdi), %rsp"]
    lines += [f"mov {_jt(r)}(%rdi), %{r}" for r in _SAVED if r != "rdi"]
    lines += [f"movdqu {_jt('xmm') + 16 * i}(%rdi), %xmm{6 + i}" for i in range(10)]
    lines += [f"pushq {_jt('rflags')}(%rdi)", "popfq", f"mov {_jt('rdi')}(%rdi), %rdi",
              "mov $1, %eax", "ret", "1: ud2"]
    return "\n".join(["guest_wake:", *lines])


@function(abi="c")
def guest_hold(c: Ptr[GuestCfg]) -> None:
    """The AP reset hold (the "AP HLT loop"): VMGEXIT until the host wakes this vCPU here."""
    while True:
        ghcb_begin(c.ghcb)
        answered = ghcb_exit(c.ghcb, SVM_VMGEXIT_AP_RESET_HOLD, 0, 0) == 0
        if answered and ghcb_valid(c.ghcb, GHCB_SW_EXIT_INFO2) and ghcb_get(
                c.ghcb, GHCB_SW_EXIT_INFO2) != 0:
            return  # woken (SwExitInfo2 != 0); anything else: hold again


GUEST_WAKE = routine("guest_wake", _wake_text())
GUEST_PARK = routine("guest_park", _park_text(), calls=(guest_hold,))


@function
def share_page(c: Ptr[GuestCfg], va: u64) -> None:
    """One page shared under SEV-ES: C-bit cleared (and flushed), zeroed through C=0 (it read
    as ciphertext), reported through the GHCB."""
    if not set_encrypted(c, va, False):
        c.hc_errors += 1
    write_cr3(read_cr3())
    p = Ptr[u64](va)
    for i in range(512):
        p[i] = 0
    if guest_hypercall(c, KVM_HC_MAP_GPA_RANGE, va, 1, 0) != 0:
        c.hc_errors += 1
    c.shared_calls += 1


@function
def es_setup(c: Ptr[GuestCfg]) -> None:
    """SEV-ES: share the GHCB and the control page, register the AP jump table."""
    c.sev_es = 1  # hypercalls go through the GHCB: the first one reports the GHCB itself
    share_page(c, c.ghcb)
    share_page(c, c.ctl)
    jt = Ptr[ApJumpTable](c.jt)
    jt.entry = func_addr(GUEST_WAKE)
    jt.magic = JT_MAGIC
    ghcb_begin(c.ghcb)
    if ghcb_exit(c.ghcb, SVM_VMGEXIT_AP_JUMP_TABLE, SVM_VMGEXIT_AP_JUMP_TABLE_SET, c.jt) != 0:
        c.hc_errors += 1
    c.park_seen = vload(Ptr[u64](c.ctl))


@function
def park_if_asked(c: Ptr[GuestCfg]) -> None:
    """A new request in the control page: park (returns once woken, here or elsewhere)."""
    req = vload(Ptr[u64](c.ctl))
    if req != c.park_seen:
        c.park_seen = req
        efi_call(func_addr(GUEST_PARK), c.jt, u64(c))
        c.parks += 1


@function
def pick_dirty_page(c: Ptr[GuestCfg], r: u64) -> u64:
    """The r-th page (mod the total) of the GR_DIRTY regions, as a VA."""
    n = r % c.dirty_pages
    for i in range(c.nregions):
        g = addr(c.regions[i])
        if (g.flags & GR_DIRTY) != 0:
            if n < g.pages:
                return g.va + n * 4096
            n -= g.pages
    return c.hot_va


@function(abi="c", name="guest_main")
def guest_main(c: Ptr[GuestCfg]) -> None:
    if c.magic != GUEST_MAGIC:
        return
    # 1. set-up: private patterns, shared conversions, then migration may start
    if c.ghcb != 0 and (rdmsr(MSR_AMD64_SEV) & MSR_AMD64_SEV_ES_ENABLED) != 0:
        es_setup(c)
    c.dirty_pages = 0
    for i in range(c.nregions):
        g = addr(c.regions[i])
        if (g.flags & GR_SHARED) != 0:
            make_shared(c, g.va, g.pages)
        for p in range(g.pages):
            fill_page(g.va + p * 4096, u64(g.seed))
        if (g.flags & GR_DIRTY) != 0:
            c.dirty_pages += g.pages
    c.phase = 1
    wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    # 2. keep dirtying memory until the host stops running this vCPU
    while True:
        if c.sev_es != 0:
            park_if_asked(c)
        r = xorshift(c)
        c.generation += 1
        if c.dirty_pages != 0 and (r & ((u64(1) << u64(c.cold_shift)) - 1)) == 0:
            va = pick_dirty_page(c, r >> 20)
        else:
            va = c.hot_va + ((r >> 20) % c.hot_pages) * 4096
        touch_page(va, c.generation)
        c.touches += 1
