"""The mirror vCPU's life: where it starts, the batch loop, how it exits, and its own exception
handlers.

Each batch ends in HLT, an automatic exit under SEV and SEV-ES; before it, every vector register
and every caller-saved general register is zeroed, so whatever a batch left there (round keys,
plaintext blocks) is gone when the host gets control (on SEV it reads them; under SEV-ES it
cannot, and the zeroing keeps it that way should a register ever be exposed).

A CPU exception while a batch runs (an instruction the host's CPUID promised but the CPU lacks,
a #VC under SEV-ES, a page the host took away) must not become a triple fault: the helper loads
its own IDT, whose 32 entry stubs (an assembly routine: the CPU's frame needs a fixed-size
prologue) call `mh_fault`. That records the exception in the mailbox's FaultRecord, ends the
session (wiping its keys; a receiving session that installed pages discards the helper), marks
the batch complete with E_FAULT and starts over at `mh_resume` on a fresh stack. A #UD also
refuses the wide AEAD path for good (gcmsiv_wide.wide_refuse): the likeliest cause is a host
whose CPUID promised VAES on a CPU without it, and only later sessions can be spared. Other
faults say nothing about the wide instructions (a page the host took away faults either path),
so they leave the path alone: a host cannot demote it with them.
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    clear_scratch_regs,
    func_addr,
    function,
    hlt,
    lidt,
    mask_key,
    mfence,
    read_cr2,
    read_cs,
    resume_at,
    routine,
    static,
    struct,
    symbol_addr,
    u8,
    u16,
    u32,
    u64,
    vstore,
    wipe_stack_below,
)

from .gcmsiv_wide import wide_refuse
from .platform import X86_TRAP_UD
from .protocol import (
    CONTROL_OFFSET,
    E_FAULT,
    FAULT_OFFSET,
    ST_ABORTED,
    Control,
    FaultRecord,
)
from .session import CTX, STACK_SIZE, LaneCtx, end_session, lane_ctx, process_batch, rng64

VECTORS = 32  # the architectural exceptions
STUB_SIZE = 16  # bytes per entry stub (`.balign 16`): gate v points at table + 16 v
WITH_ERROR_CODE = (8, 10, 11, 12, 13, 14, 17, 21, 29, 30)  # AMD APM vol. 2 §8.2
GATE_INTERRUPT = 0x8E  # present, DPL 0, 64-bit interrupt gate (IF cleared on entry)


@struct
class IdtGate:
    offset_lo: u16
    selector: u16
    ist: u8
    type_attr: u8
    offset_mid: u16
    offset_hi: u32
    reserved: u32


@struct(packed=True)
class Idtr:
    limit: u16
    base: u64


@struct
class IsrFrame:
    """What the entry stubs leave on the stack: vector, error code, then the CPU's frame."""

    vector: u64
    error_code: u64
    rip: u64
    cs: u64
    rflags: u64
    rsp: u64
    ss: u64


IDT = static(Array[IdtGate, VECTORS], align=16)
IDTR = static(Idtr, align=16)


@function(small=True)
def lane_at(sp: u64) -> Ptr[LaneCtx]:
    """The lane whose stack holds sp. Every lane's vCPU starts on its own stack (BootInfo's lane
    entry), so the stack says which lane's mailbox and state the code serves; 0 if none (a
    host that started a vCPU elsewhere gets nothing served)."""
    h = addr(CTX)
    for i in range(h.nlanes):
        c = lane_ctx(h, u32(i))
        if sp < c.stack_top and c.stack_top - sp <= STACK_SIZE:
            return c
    return Ptr[LaneCtx](0)


@function
def this_lane() -> Ptr[LaneCtx]:
    """The running vCPU's lane, from where its stack is."""
    here: u64 = 0
    return lane_at(u64(addr(here)))


@function
def stranded() -> None:
    """No lane owns this stack: exit and never serve anything."""
    while True:
        clear_scratch_regs()
        hlt()


@function(abi="c", small=True)
def mh_fault(f: Ptr[IsrFrame]) -> None:
    """Called by the entry stubs on the interrupted stack (the lane's own); never returns."""
    clear_scratch_regs()
    c = lane_at(u64(f))
    if u64(c) == 0:
        stranded()
    rec = Ptr[FaultRecord](c.mailbox + FAULT_OFFSET)
    c.faults += 1
    vstore(addr(rec.count), c.faults)
    vstore(addr(rec.vector), u32(f.vector))
    vstore(addr(rec.error_code), f.error_code)
    vstore(addr(rec.rip), f.rip - symbol_addr("__image_start"))
    vstore(addr(rec.cr2), read_cr2())
    if f.vector == X86_TRAP_UD:  # e.g. a wide instruction a lying CPUID promised
        wide_refuse(addr(c.wide))
    end_session(c, ST_ABORTED)
    ctl = Ptr[Control](c.mailbox + CONTROL_OFFSET)
    vstore(addr(ctl.status), E_FAULT)
    vstore(addr(ctl.state), c.state)
    vstore(addr(ctl.processed), u32(0))
    mfence()
    vstore(addr(ctl.completed), c.cur_bell)
    c.last_bell = c.cur_bell
    resume_at(c.stack_top - 8, func_addr(mh_resume))


def _isr_text() -> str:
    """32 entry stubs (vector pushed, and a zero where the CPU pushes no error code), then the
    common part: pass the frame to mh_fault on a 16-byte aligned stack."""
    lines = [".balign 16", "mh_isr_table:"]
    for v in range(VECTORS):
        if v not in WITH_ERROR_CODE:
            lines.append("pushq $0")
        lines += [f"pushq ${v}", "jmp mh_isr_common", ".balign 16"]
    lines += ["mh_isr_common:", "movq %rsp, %rdi", "andq $-16, %rsp", "call mh_fault", "ud2"]
    return "\n".join(lines)


ISR_TABLE = routine("mh_isr_table", _isr_text(), calls=(mh_fault,))


@function(small=True)
def install_idt() -> None:
    """Point all 32 exception vectors at the entry stubs and load the IDT."""
    base = func_addr(ISR_TABLE)
    cs = read_cs()
    for v in range(VECTORS):
        h = base + u64(v) * STUB_SIZE
        g = addr(IDT[v])
        g.offset_lo = u16(h)
        g.selector = cs
        g.ist = 0
        g.type_attr = GATE_INTERRUPT
        g.offset_mid = u16(h >> 16)
        g.offset_hi = u32(h >> 32)
        g.reserved = 0
    r = addr(IDTR)
    r.limit = u16(VECTORS * 16 - 1)
    r.base = u64(addr(IDT[0]))
    lidt(u64(r))


@function(small=True)
def draw_mask_key(c: Ptr[LaneCtx]) -> None:
    """A fresh staging-mask key for this vCPU run (gcmsiv: what a record stages in memory is
    masked with it). It lives only in mm6:mm7, which no compiled code touches and which the
    exits keep: under SEV-ES the host can neither read nor roll it back. Without RDRAND it is
    0, but then no session can start either."""
    mask_key(rng64(c), rng64(c))


@function
def park(c: Ptr[LaneCtx]) -> None:
    """Hand the batch back: nothing of it stays on the dead part of the lane's stack (key
    schedules and page bytes that the batch's calls spilled there) or in a register, then HLT
    (an automatic exit)."""
    wipe_stack_below(c.stack_top - STACK_SIZE, STACK_SIZE)
    clear_scratch_regs()
    hlt()


@function
def start_vcpu() -> Ptr[LaneCtx]:
    """A vCPU's start, fresh or after a fault: its lane (from its stack; none: stranded), its
    own IDT and a fresh mask key."""
    c = this_lane()
    if u64(c) == 0:
        stranded()
    install_idt()
    draw_mask_key(c)
    return c


@function(abi="c", name="mh_entry")
def mh_entry() -> None:
    """Every lane's mirror vCPU starts here (RIP from BootInfo, RSP from its lane entry) and
    never returns: each HLT hands the batch back to the host, which re-enters after the HLT
    with the next doorbell of the lane's mailbox."""
    c = start_vcpu()
    while True:
        process_batch(c)
        park(c)


@function(abi="c")
def mh_resume() -> None:
    """Where mh_fault continues (on the lane's fresh stack): the faulted batch is already
    completed, so exit first."""
    c = start_vcpu()
    while True:
        park(c)
        process_batch(c)

