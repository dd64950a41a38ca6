"""The GHCB, guest side: asking the host for something by VMGEXIT under SEV-ES.

Why: under SEV-ES the host cannot read registers. A VMMCALL becomes a #VC, and the #VC handler
decides what the host sees: OVMF's passes RAX and CPL only, so a hypercall with arguments
(KVM_HC_MAP_GPA_RANGE, MH_HC_ANNOUNCE) must fill a GHCB itself, as OVMF's own
SetMemoryEncDecHypercall3 does. The same functions serve the emulator's guest workload (its AP
jump table and AP reset hold).

A request: `ghcb_begin` (no field valid), `ghcb_set` of exactly the inputs the exit needs
(each marks its qword in the valid bitmap), `ghcb_exit` with the exit code and info words. The
GHCB's GPA goes into the GHCB MSR only for the VMGEXIT (the previous value is put back, so the
firmware's own registration survives). Every access is volatile: the page is shared and the
host rewrites it during the VMGEXIT. Layout facts: platform.py (GHCB_*).
"""

from __future__ import annotations

from helperfw import (
    Ptr,
    function,
    rdmsr,
    read_cs,
    u8,
    u16,
    u32,
    u64,
    vload,
    vmgexit,
    vmmcall,
    vstore,
    wrmsr,
)

from .platform import (
    GHCB_CPL,
    GHCB_MSR_CPUID_REQ,
    GHCB_MSR_CPUID_RESP,
    GHCB_MSR_INFO_MASK,
    GHCB_PROTOCOL_VERSION,
    GHCB_RAX,
    GHCB_RBX,
    GHCB_RCX,
    GHCB_RDX,
    GHCB_SW_EXIT_CODE,
    GHCB_SW_EXIT_INFO1,
    GHCB_SW_EXIT_INFO2,
    GHCB_USAGE,
    GHCB_VALID_BITMAP,
    GHCB_VERSION_MIN,
    MSR_AMD64_SEV,
    MSR_AMD64_SEV_ES_ENABLED,
    MSR_AMD64_SEV_ES_GHCB,
    SVM_EXIT_VMMCALL,
)

GHCB_NO_ANSWER = 0xFFFF_FFFF  # ghcb_exit: the host left SwExitInfo1 invalid
HYPERCALL_FAILED = 0xFFFF_FFFF_FFFF_FFFF  # hypercall: no GHCB, or no valid RAX came back


@function(small=True)
def ghcb_mark(g: u64, off: u64) -> None:
    """Mark the qword at `off` valid."""
    q = off >> 3
    b = Ptr[u8](g + GHCB_VALID_BITMAP + (q >> 3))
    vstore(b, vload(b) | u8(u64(1) << (q & 7)))


@function(small=True)
def ghcb_valid(g: u64, off: u64) -> bool:
    q = off >> 3
    return ((u64(vload(Ptr[u8](g + GHCB_VALID_BITMAP + (q >> 3)))) >> (q & 7)) & 1) != 0


@function(small=True)
def ghcb_set(g: u64, off: u64, value: u64) -> None:
    vstore(Ptr[u64](g + off), value)
    ghcb_mark(g, off)


@function(small=True)
def ghcb_get(g: u64, off: u64) -> u64:
    return vload(Ptr[u64](g + off))


@function(small=True)
def ghcb_begin(g: u64) -> None:
    """A fresh request: nothing valid (the host ignores every field not marked)."""
    vstore(Ptr[u64](g + GHCB_VALID_BITMAP), u64(0))
    vstore(Ptr[u64](g + GHCB_VALID_BITMAP + 8), u64(0))


@function(small=True)
def ghcb_vmgexit(g: u64) -> u64:
    """VMGEXIT with GHCB `g` registered in the GHCB MSR (the previous value put back after);
    returns SwExitInfo1's low half (0: served, 1: the host asks for an exception, 2:
    malformed input) or GHCB_NO_ANSWER."""
    vstore(Ptr[u16](g + GHCB_PROTOCOL_VERSION), u16(GHCB_VERSION_MIN))
    vstore(Ptr[u32](g + GHCB_USAGE), u32(0))
    old = rdmsr(MSR_AMD64_SEV_ES_GHCB)
    wrmsr(MSR_AMD64_SEV_ES_GHCB, g)
    vmgexit()
    wrmsr(MSR_AMD64_SEV_ES_GHCB, old)
    if not ghcb_valid(g, GHCB_SW_EXIT_INFO1):
        return GHCB_NO_ANSWER
    return ghcb_get(g, GHCB_SW_EXIT_INFO1) & 0xFFFF_FFFF


@function(small=True)
def ghcb_exit(g: u64, code: u64, info1: u64, info2: u64) -> u64:
    """The request in GHCB `g` (its inputs already set) for exit `code`: see ghcb_vmgexit."""
    ghcb_set(g, GHCB_SW_EXIT_CODE, code)
    ghcb_set(g, GHCB_SW_EXIT_INFO1, info1)
    ghcb_set(g, GHCB_SW_EXIT_INFO2, info2)
    return ghcb_vmgexit(g)


def _valid_bitmap(*offsets: int) -> tuple[int, int]:
    """The 16-byte valid bitmap with the qwords at `offsets` marked, as two u64 words."""
    bits = sum(1 << (off // 8) for off in offsets)
    return bits & (2**64 - 1), bits >> 64


VMMCALL_VALID_LO, VMMCALL_VALID_HI = _valid_bitmap(
    GHCB_RAX, GHCB_RBX, GHCB_RCX, GHCB_RDX, GHCB_CPL, GHCB_SW_EXIT_CODE, GHCB_SW_EXIT_INFO1,
    GHCB_SW_EXIT_INFO2)
RAX_VALID = _valid_bitmap(GHCB_RAX)[0]


@function(small=True)
def ghcb_vmmcall(g: u64, nr: u64, a0: u64, a1: u64, a2: u64) -> u64:
    """A KVM hypercall through GHCB `g` (RAX = nr, RBX/RCX/RDX = a0..a2, CPL): its result, or
    HYPERCALL_FAILED. The whole valid bitmap is stored at once (this is in the firmware image,
    which has to stay small)."""
    vstore(Ptr[u64](g + GHCB_RAX), nr)
    vstore(Ptr[u64](g + GHCB_RBX), a0)
    vstore(Ptr[u64](g + GHCB_RCX), a1)
    vstore(Ptr[u64](g + GHCB_RDX), a2)
    vstore(Ptr[u8](g + GHCB_CPL), u8(read_cs() & 3))
    vstore(Ptr[u64](g + GHCB_SW_EXIT_CODE), u64(SVM_EXIT_VMMCALL))
    vstore(Ptr[u64](g + GHCB_SW_EXIT_INFO1), u64(0))
    vstore(Ptr[u64](g + GHCB_SW_EXIT_INFO2), u64(0))
    vstore(Ptr[u64](g + GHCB_VALID_BITMAP), u64(VMMCALL_VALID_LO))
    vstore(Ptr[u64](g + GHCB_VALID_BITMAP + 8), u64(VMMCALL_VALID_HI))
    if ghcb_vmgexit(g) != 0 or (vload(Ptr[u64](g + GHCB_VALID_BITMAP)) & RAX_VALID) == 0:
        return HYPERCALL_FAILED
    return ghcb_get(g, GHCB_RAX)


@function(small=True)
def hypercall(nr: u64, a0: u64, a1: u64, a2: u64) -> u64:
    """A KVM hypercall from firmware context with SEV on: VMMCALL, or under SEV-ES through the
    firmware's GHCB (the page the GHCB MSR names, as OVMF finds it)."""
    if (rdmsr(MSR_AMD64_SEV) & MSR_AMD64_SEV_ES_ENABLED) == 0:
        return vmmcall(nr, a0, a1, a2, 0)
    g = rdmsr(MSR_AMD64_SEV_ES_GHCB)
    if g == 0 or (g & GHCB_MSR_INFO_MASK) != 0:
        return HYPERCALL_FAILED
    return ghcb_vmmcall(g, nr, a0, a1, a2)


@function(small=True)
def ghcb_cpuid(leaf: u32, reg: u32) -> u32:
    """CPUID register `reg` (platform.CPUID_EAX..CPUID_EDX) of `leaf`, subleaf 0, by the GHCB MSR
    protocol: under SEV-ES the CPUID instruction is a #VC, and the mirror vCPU has neither a #VC
    handler that serves it nor a GHCB page. The GHCB MSR's value is put back. 0 when the host's
    answer is not a CPUID response for that register (a feature bit then reads as absent)."""
    old = rdmsr(MSR_AMD64_SEV_ES_GHCB)
    wrmsr(MSR_AMD64_SEV_ES_GHCB, (u64(leaf) << 32) | (u64(reg) << 30) | GHCB_MSR_CPUID_REQ)
    vmgexit()
    r = rdmsr(MSR_AMD64_SEV_ES_GHCB)
    wrmsr(MSR_AMD64_SEV_ES_GHCB, old)
    if (r & GHCB_MSR_INFO_MASK) != GHCB_MSR_CPUID_RESP or ((r >> 30) & 3) != u64(reg):
        return 0
    return u32(r >> 32)
