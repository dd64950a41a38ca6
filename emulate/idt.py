"""Exception delivery through the guest's IDT: the default "fault" entry of every exit table.

Why: the helper catches its own exceptions in the mirror (an IDT whose handlers write a
FaultRecord and report E_FAULT), and an SEV-ES guest cannot even run CPUID without a #VC
handler. A fault the guest cannot take is a triple fault (the VM shuts down): the run ends and
the host gets the crash dump, with `GuestFault.delivery` saying why the delivery failed.

What is modelled (AMD APM vol. 2 §8.9, long mode at CPL 0, the only mode the emulator runs):
IDTR as the guest loaded it (LIDT); the 16-byte gate of the vector, which must be present, a
64-bit interrupt (0xE) or trap (0xF) gate, IST 0 and the current code selector; the frame the
CPU pushes on the current stack aligned down to 16 bytes: SS, RSP, RFLAGS, CS, RIP and, for the
vectors that have one, the error code. Entry clears TF, NT and RF, an interrupt gate also IF;
a #PF loads CR2. Not modelled, and so refused like a missing gate: IST stacks (no TSS), task
gates, other code selectors (no GDT). A fault while reading the gate or pushing the frame (a
double fault) ends the run too. Nothing here runs unless the guest faults: the normal path
keeps unicorn's native speed.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from unicorn.x86_const import UC_X86_REG_IDTR

from emulate.mmu import PageFault

if TYPE_CHECKING:
    from emulate.faults import GuestFault
    from emulate.machine import VCpu

GATE_SIZE = 16
GATE = struct.Struct("<HHBBHII")  # offset 15:0, selector, IST, type/attributes, 31:16, 63:32, 0
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF
GATE_PRESENT = 0x80
WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})  # AMD APM vol. 2 §8.2
TRAP_VECTORS = frozenset({3})  # the pushed RIP is past the instruction (INT3)
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF = 1 << 8, 1 << 9, 1 << 14, 1 << 16
SS_KERNEL = 0  # the SS a 64-bit CPL-0 interrupt pushes (null selector is legal in long mode)


def idtr(v: VCpu) -> tuple[int, int]:
    """(base, limit) of the IDT the guest loaded; limit 0 when it loaded none."""
    _sel, base, limit, _flags = v.uc.reg_read(UC_X86_REG_IDTR)
    return base, limit


def gate_handler(v: VCpu, vector: int) -> tuple[int, int] | str:
    """(handler address, gate type) of `vector`'s gate, or why the gate cannot be used."""
    base, limit = idtr(v)
    if limit == 0:
        return "no IDT loaded (IDTR limit 0)"
    off = vector * GATE_SIZE
    if off + GATE_SIZE - 1 > limit:
        return f"vector {vector} lies beyond the IDT limit {limit:#x}"
    try:
        raw = v.read_virt(base + off, GATE_SIZE)
    except PageFault as pf:
        return f"double fault: #PF reading IDT gate {vector} at {base + off:#x} ({pf.reason})"
    lo, selector, ist, attr, mid, hi, _ = GATE.unpack(raw)
    kind = attr & 0xF
    if not attr & GATE_PRESENT:
        return f"IDT gate {vector} not present"
    if kind not in (GATE_INTERRUPT, GATE_TRAP):
        return f"IDT gate {vector} has type {kind:#x}, not a 64-bit interrupt or trap gate"
    if ist & 7:
        return f"IDT gate {vector} uses IST {ist & 7} (no TSS is modelled)"
    if selector != v.regs["cs"]:
        return f"IDT gate {vector} selector {selector:#x} is not CS {v.regs['cs']:#x}"
    return lo | mid << 16 | hi << 32, kind


def deliver(v: VCpu, fault: GuestFault) -> int | None:
    """The "fault" entry: push the frame of `fault` and return its handler's address, or record
    in `fault.delivery` why not (the run then ends as a triple fault). What is no exception of
    the guest (a nested-paging miss, an emulator error) ends the run as a host-side exit."""
    vector = fault.vector
    if vector is None:
        return None
    gate = gate_handler(v, vector)
    if isinstance(gate, str):
        fault.delivery = gate
        return None
    handler, kind = gate
    r = v.regs
    rip = fault.rip + (1 if vector in TRAP_VECTORS else 0)
    rflags = r["rflags"]
    frame = [rip, r["cs"], rflags, r["rsp"], SS_KERNEL]
    if vector in WITH_ERROR_CODE:
        frame.insert(0, fault.error_code)
    top = (r["rsp"] & ~0xF) - 8 * len(frame)
    try:
        v.write_virt(top, struct.pack(f"<{len(frame)}Q", *frame))
    except PageFault as pf:
        fault.delivery = f"double fault: #PF pushing the frame at {top:#x} ({pf.reason})"
        return None
    cleared = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | (RFLAGS_IF if kind == GATE_INTERRUPT else 0)
    r["rflags"] = rflags & ~cleared
    r["rsp"] = top
    if vector == 14 and fault.cr2 is not None:
        r["cr2"] = fault.cr2
    v.exceptions_delivered += 1
    return handler
