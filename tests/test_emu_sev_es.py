"""SEV-ES in the emulator, mechanics: exceptions through the guest's IDT (frame, alignment, IF,
error code, CR2) and the triple faults when that fails; #VC with the right error code for every
intercept of an SEV-ES VM (IN/OUT caught before they execute) and none for what is no
intercept; the GHCB MSR protocol and the GHCB page protocol with its valid-bitmap checks; the
AP reset hold and SIPI; the UEFI stand-in's OVMF-like #VC handler and its AP reset hold."""

from __future__ import annotations

import struct

import pytest

from emulate import idt
from emulate.cpuid import CpuidModel
from emulate.flat import FlatGuest
from emulate.ghcb import GhcbPage
from emulate.machine import VM, VCpu
from emulate.memctl import PAGE, MemoryController
from emulate.uefi import AP_HOLD_ASM, AP_HOLD_CODE, EFI_LOADER_CODE, UefiStandIn
from helperfw.codegen.emit import assemble
from helperfw.runtime.platform import (
    GHCB_CPL,
    GHCB_ERR_INVALID_EVENT,
    GHCB_ERR_INVALID_INPUT,
    GHCB_ERR_INVALID_USAGE,
    GHCB_ERR_MISSING_INPUT,
    GHCB_RAX,
    GHCB_RBX,
    GHCB_RCX,
    GHCB_RDX,
    GHCB_SW_EXIT_CODE,
    GHCB_SW_EXIT_INFO1,
    GHCB_SW_EXIT_INFO2,
    GHCB_USAGE,
    IOIO_DATA_8,
    IOIO_DATA_16,
    IOIO_TYPE_IN,
    KVM_HC_MAP_GPA_RANGE,
    MSR_KVM_MIGRATION_CONTROL,
    SVM_EXIT_CPUID,
    SVM_EXIT_IOIO,
    SVM_EXIT_MSR,
    SVM_EXIT_NPF,
    SVM_EXIT_VMMCALL,
    SVM_EXIT_WBINVD,
    SVM_VMGEXIT_AP_JUMP_TABLE,
    SVM_VMGEXIT_AP_RESET_HOLD,
)

CBIT = 47
RAM = 4 << 20
UNBACKED = 8 << 20  # a GPA beyond every memslot
SENTINEL = 0x5E5E
# #VC handler for the snippets: error code -> r14, faulting RIP -> r15, back on the interrupted
# stack, continue at r13 (no IRETQ: no GDT is modelled)
VC_HANDLER = """
vc:
    pop %r14
    pop %r15
    mov 16(%rsp), %rsp
    jmp *%r13
"""


def idt_prologue(handlers: dict[int, str]) -> str:
    """Guest code that fills an IDT at R9 (interrupt gates, this CS) and loads it (LIDT)."""
    lines = []
    for vec, lab in handlers.items():
        o = 16 * vec
        lines += [f"lea {lab}(%rip), %rax", f"mov %ax, {o}(%r9)", "mov %cs, %dx",
                  f"mov %dx, {o + 2}(%r9)", f"movw $0x8e00, {o + 4}(%r9)", "shr $16, %rax",
                  f"mov %ax, {o + 6}(%r9)", "shr $16, %rax", f"mov %eax, {o + 8}(%r9)",
                  f"movl $0, {o + 12}(%r9)"]
    lines += ["movw $511, 0x800(%r9)", "mov %r9, 0x802(%r9)", "lidt 0x800(%r9)"]
    return "\n".join(lines)


def es_guest(asm: str, *, sev_es: bool = True, handlers: dict[int, str] | None = None,
             unbacked_va: int | None = None) -> tuple[VM, VCpu, int]:
    """A guest running `asm` (after loading an IDT with `handlers`: vector -> label, if any),
    with VC_HANDLER appended. Returns the VM, the vCPU and the address of `asm`'s first byte."""
    vm = VM(MemoryController(RAM), cpuid=CpuidModel(cbit=CBIT, sev_es=sev_es), name="es")
    g = FlatGuest(vm, ram_size=RAM)
    prologue = assemble(idt_prologue(handlers)) if handlers else b""
    body = "\n".join([idt_prologue(handlers) if handlers else "", asm, VC_HANDLER])
    code = assemble(body)
    base = g.place(code)
    start = base + len(prologue)
    if unbacked_va is not None:
        g.map(unbacked_va, UNBACKED, PAGE, writable=True, executable=False)
    v = g.vcpu(base, symbolize=lambda a: f"snippet+{a - start:#x}" if start <= a < base + len(
        code) else "")
    v.regs["r14"] = v.regs["r15"] = SENTINEL
    if handlers:
        table = g.pages.alloc(1)
        g.map(table, table, PAGE, writable=True, executable=False)
        v.regs["r9"] = table
    return vm, v, start


# ---- exception delivery ------------------------------------------------------------------------
@pytest.mark.parametrize("sev_es", [False, True])
def test_exception_frame_through_the_idt(sev_es: bool) -> None:
    """#UD (no error code) and #PF (error code, CR2): the handler runs with IF clear on the
    interrupted stack aligned down to 16, under the frame RIP, CS, RFLAGS, RSP, SS."""
    _vm, v, _ = es_guest("""
        sti
        sub $8, %rsp
        mov %rsp, %rbx
        lea 1f(%rip), %r13
        ud2
    1:  movabs $0x7fff00000010, %rax
        lea 3f(%rip), %r13
        movq $7, (%rax)
    3:  hlt
        jmp 3b
    ud:
        mov %rsp, %r12
        mov (%rsp), %rcx
        mov 8(%rsp), %rsi
        mov 16(%rsp), %rdi
        mov 32(%rsp), %rbp
        pushfq
        pop %r11
        mov 24(%r12), %rsp
        jmp *%r13
    pf:
        mov %rsp, %r10
        mov %cr2, %r9
        mov 32(%r10), %rsp
        jmp *%r13
    """, sev_es=sev_es, handlers={6: "ud", 14: "pf"})
    ex = v.run()
    assert ex.reason == "hlt", str(ex)
    r = v.regs
    old_rsp = r["rbx"]
    assert v.read_virt(r["rcx"], 2) == b"\x0f\x0b", "frame RIP: the ud2"
    assert (r["rsi"], r["rbp"]) == (r["cs"], 0), "frame CS and SS"
    assert r["rdi"] & idt.RFLAGS_IF and not r["r11"] & idt.RFLAGS_IF, "IF saved set, clear inside"
    assert r["r12"] == (old_rsp & ~0xF) - 40, "frame below RSP aligned down to 16"
    assert r["rsp"] == old_rsp, "the handler found the interrupted RSP in the frame"
    pf_frame = struct.unpack("<6Q", v.read_virt(r["r10"], 48))
    assert pf_frame[0] == 2, "error code: write to a not-present page"
    assert v.read_virt(pf_frame[1], 3) == b"\x48\xc7\x00", "RIP of the faulting store"
    assert r["r9"] == 0x7FFF00000010, "CR2"
    assert r["r10"] == (old_rsp & ~0xF) - 48, "six qwords with the error code"
    assert v.exceptions_delivered == 2


@pytest.mark.parametrize("case,asm,handlers,why", [
    ("no IDT", "cpuid\nhlt", None, "no IDT loaded (IDTR limit 0)"),
    ("gate not present", "cpuid\nhlt", {6: "vc"}, "IDT gate 29 not present"),
    ("double fault", "movabs $0x7fff00000000, %rsp\ncpuid\nhlt", {29: "vc"},
     "double fault: #PF pushing the frame at 0x7ffeffffffd0 (PML4E not present)"),
])
def test_vc_that_cannot_be_delivered_is_a_triple_fault(case: str, asm: str, handlers: dict | None,
                                                       why: str) -> None:
    """The run ends with the crash dump: the #VC with its error code, registers as the
    emulator saw them, RIP as symbol+offset, and why delivery failed."""
    print(case)
    _vm, v, _ = es_guest("mov $0x8000001f, %eax\n" + asm, handlers=handlers)
    ex = v.run()
    f = ex.fault
    assert ex.reason == "fault" and f is not None
    assert (f.kind, f.error_code, f.delivery) == ("#VC", SVM_EXIT_CPUID, why)
    before = assemble("mov $0x8000001f, %eax\n" + asm.split("cpuid")[0])
    assert f.symbol == f"snippet+{len(before):#x}"
    assert f.disasm == "cpuid"
    assert f.registers["rax"] == 0x8000001F and f.registers["rip"] == f.rip
    dump = f.dump()
    assert f"triple fault: {why}" in dump.splitlines()[0]
    assert "rax=0x000000008000001f" in dump and "memory map" in dump


def test_a_gate_the_emulator_cannot_model_is_refused() -> None:
    """IST stacks need a TSS, which is not modelled: such a gate ends the run, it is not
    silently delivered on the wrong stack."""
    _vm, v, _ = es_guest("mov $0x8000001f, %eax\ncpuid\nhlt", handlers={29: "vc"})
    v.run(budget=len(idt_prologue({29: "vc"}).splitlines()))  # the guest loads its IDT
    base, _limit = idt.idtr(v)
    gate = bytearray(v.read_virt(base + 16 * 29, 16))
    gate[4] = 1  # IST 1
    v.write_virt(base + 16 * 29, bytes(gate))
    ex = v.run()
    assert ex.fault is not None and ex.fault.delivery == "IDT gate 29 uses IST 1 (no TSS is modelled)"


# ---- #VC for every intercept ---------------------------------------------------------------------
INTERCEPTS = [  # (name, setup, instruction, SVM exit code)
    ("cpuid", "mov $0x8000001f, %eax", "cpuid", SVM_EXIT_CPUID),
    ("rdmsr", f"mov ${MSR_KVM_MIGRATION_CONTROL}, %ecx", "rdmsr", SVM_EXIT_MSR),
    ("wrmsr", f"mov ${MSR_KVM_MIGRATION_CONTROL}, %ecx\nmov $1, %eax\nxor %edx, %edx", "wrmsr",
     SVM_EXIT_MSR),
    ("vmmcall", f"mov ${KVM_HC_MAP_GPA_RANGE}, %eax", "vmmcall", SVM_EXIT_VMMCALL),
    ("out dx", "mov $0x402, %dx\nmov $0x41, %al", "out %al, %dx", SVM_EXIT_IOIO),
    ("out imm8", "mov $0x41, %al", "out %al, $0x80", SVM_EXIT_IOIO),
    ("in 16-bit", "mov $0x510, %dx", "in %dx, %ax", SVM_EXIT_IOIO),
    ("in imm8", "", "in $0x61, %al", SVM_EXIT_IOIO),
    ("wbinvd", "", "wbinvd", SVM_EXIT_WBINVD),
    ("mmio (NPF)", "movabs $0x7f0000000000, %rax", "mov (%rax), %rcx", SVM_EXIT_NPF),
]


@pytest.mark.parametrize("name,setup,insn,code", INTERCEPTS, ids=[i[0] for i in INTERCEPTS])
def test_intercepts_raise_vc_with_the_exit_code(name: str, setup: str, insn: str,
                                                code: int) -> None:
    """Under SEV-ES the instruction does not execute and the host sees nothing: the guest's
    #VC handler gets the SVM exit code and the instruction's address."""
    vm, v, _ = es_guest(f"""
        {setup}
        lea 1f(%rip), %r13
        lea 2f(%rip), %rbx
    2:  {insn}
    1:  hlt
    """, handlers={29: "vc"}, unbacked_va=0x7F0000000000)
    reads = []
    vm.port_read = lambda port, size: reads.append(port) or 0
    vm.msr_write = lambda msr, value: reads.append(msr)
    ex = v.run()
    assert ex.reason == "hlt", str(ex)
    assert v.regs["r14"] == code, f"{name}: error code {v.regs['r14']:#x}"
    assert v.regs["r15"] == v.regs["rbx"], "RIP of the intercepted instruction"
    assert not reads and not vm.debug_log and not vm.io_log and not vm.hypercall_log.calls
    assert not vm.ghcb.log, "nothing reached the host"


def test_same_instructions_exit_to_the_host_without_sev_es() -> None:
    vm, v, _ = es_guest(f"""
        mov $0x402, %dx
        mov $0x41, %al
        out %al, %dx
        mov ${KVM_HC_MAP_GPA_RANGE}, %eax
        rep vmmcall
        mov $0x8000001f, %eax
        cpuid
        hlt
    """, sev_es=False, handlers={29: "vc"})
    assert v.run().reason == "hlt"
    assert v.regs["r14"] == SENTINEL, "no #VC"
    assert vm.debug_log == b"A"
    assert [c[0] for c in vm.hypercall_log.calls] == [KVM_HC_MAP_GPA_RANGE], "VMGEXIT is VMMCALL"


def test_what_is_no_intercept_runs_without_vc() -> None:
    """MSR_AMD64_SEV, the GHCB MSR, the CPU's own MSRs and RDRAND run without a #VC; HLT is
    an automatic exit."""
    _vm, v, _ = es_guest("""
        mov $0xc0010131, %ecx
        rdmsr
        mov %rax, %r8
        mov $0xc0010130, %ecx
        mov $0x5000, %eax
        xor %edx, %edx
        wrmsr
        xor %eax, %eax
        rdmsr
        mov %rax, %r9
        mov $0xc0000080, %ecx
        rdmsr
        mov %rax, %r10
        rdrand %r11
        hlt
    """, handlers={29: "vc"})
    assert v.run().reason == "hlt"
    assert v.regs["r14"] == SENTINEL
    assert (v.regs["r8"], v.regs["r9"], v.ghcb_msr) == (3, 0x5000, 0x5000)
    assert v.regs["r10"] & 1 << 10, "EFER.LMA"


# ---- GHCB MSR protocol -------------------------------------------------------------------------
def msr_request(value: int) -> str:
    return f"""
        mov $0xc0010130, %ecx
        mov ${value & 0xFFFFFFFF:#x}, %eax
        mov ${value >> 32:#x}, %edx
        wrmsr
        rep vmmcall
        rdmsr
    """


def test_msr_protocol_sev_info_cpuid_and_ap_reset_hold() -> None:
    vm, v, _ = es_guest(msr_request(0x002) + "mov %rax, %r8\nmov %rdx, %r9\n"
                        + msr_request(0x8000001F << 32 | 1 << 30 | 0x004)
                        + "mov %rax, %r10\nmov %rdx, %r11\n"
                        + msr_request(0x006) + "mov %rax, %r12\nmov %rdx, %r13\nhlt")
    ex = v.run()
    assert ex.reason == "reset_hold" and v.hold == ("msr", 0)
    assert v.run().reason == "reset_hold", "a held vCPU does not run before INIT-SIPI"
    v.sipi()
    assert v.run().reason == "hlt"
    r = v.regs
    assert (r["r8"], r["r9"]) == (CBIT << 24 | 0x001, 1 << 16 | 1), "versions 1..1, C-bit"
    ebx = vm.cpuid.query(0x8000001F)[1]
    assert (r["r10"], r["r11"]) == (1 << 30 | 0x005, ebx), "CPUID response: EBX in 63:32"
    assert (r["r12"], r["r13"]) == (0x007 | 1 << 12, 0), "woken: result 1 in bits 63:12"
    assert [e.request for e in vm.ghcb.log] == ["SEV_INFO_REQ", "CPUID_REQ", "AP_RESET_HOLD_REQ"]
    with pytest.raises(RuntimeError, match="not in the AP reset hold"):
        v.sipi()


def test_msr_protocol_termination_and_unknown_requests() -> None:
    _vm, v, _ = es_guest(msr_request(0x100 | 1 << 12 | 0x23 << 16) + "hlt")
    ex = v.run()
    assert ex.reason == "terminate"
    assert ex.detail == "termination request: reason set 1, reason code 0x23"
    assert v.run().reason == "terminate", "a terminated guest never runs again"
    _vm, v, _ = es_guest(msr_request(0x0FE) + "hlt")
    ex = v.run()
    assert ex.reason == "invalid" and "0xfe" in ex.detail


# ---- GHCB page protocol -------------------------------------------------------------------------
GHCB_LOOP = """
1:  mov $0xc0010130, %ecx
    mov %rbx, %rax
    mov %rbx, %rdx
    shr $32, %rdx
    wrmsr
    rep vmmcall
    hlt
    jmp 1b
"""


class GhcbGuest:
    """A guest with a shared GHCB that VMGEXITs whenever it runs; the test fills the page."""

    def __init__(self) -> None:
        self.vm = VM(MemoryController(RAM), cpuid=CpuidModel(cbit=CBIT, sev_es=True), name="g")
        g = FlatGuest(self.vm, ram_size=RAM)
        self.gpa = g.pages.alloc(1, encrypted=False)
        g.map(self.gpa, self.gpa, PAGE, writable=True, executable=False, encrypted=False)
        self.v = g.vcpu(g.place(assemble(GHCB_LOOP)))
        self.v.regs["rbx"] = self.gpa
        self.calls: list[tuple[int, ...]] = []
        self.vm.hypercall = lambda v, *a: self.calls.append(a) or 0x77

    def request(self, code: int | None, info1: int = 0, info2: int = 0,
                fields: dict[int, int] | None = None, usage: int = 0,
                expect: str = "hlt") -> GhcbPage:
        page = GhcbPage()
        page.version = 1
        struct.pack_into("<I", page.data, GHCB_USAGE, usage)
        for off, value in (fields or {}).items():
            page.set(off, value)
        if code is not None:
            page.set(GHCB_SW_EXIT_CODE, code)
            page.set(GHCB_SW_EXIT_INFO1, info1)
            page.set(GHCB_SW_EXIT_INFO2, info2)
        self.vm.write(self.gpa, bytes(page.data), encrypted=False)
        ex = self.v.run()
        assert ex.reason == expect, str(ex)
        return GhcbPage(self.vm.read(self.gpa, PAGE, encrypted=False))


def answer(page: GhcbPage) -> tuple[int, int]:
    assert page.is_valid(GHCB_SW_EXIT_INFO1) and page.is_valid(GHCB_SW_EXIT_INFO2)
    return page.get(GHCB_SW_EXIT_INFO1), page.get(GHCB_SW_EXIT_INFO2)


def test_ghcb_cpuid_msr_ioio_vmmcall() -> None:
    gg = GhcbGuest()
    vm = gg.vm
    p = gg.request(SVM_EXIT_CPUID, fields={GHCB_RAX: 0x8000001F, GHCB_RCX: 0})
    assert answer(p) == (0, 0)
    assert [p.get(o) for o in (GHCB_RAX, GHCB_RBX, GHCB_RCX, GHCB_RDX)] == list(
        vm.cpuid.query(0x8000001F))
    assert p.get(GHCB_RAX) & 1 << 3, "CPUID reports SEV-ES"
    assert set(p.valid_fields()) == {"rax", "rbx", "rcx", "rdx", "sw_exit_info1",
                                     "sw_exit_info2"}, "the host answers, the bitmap is cleared"
    # IOIO: OUT to the debug port, a 16-bit IN keeps RAX's upper bits
    p = gg.request(SVM_EXIT_IOIO, 0x402 << 16 | IOIO_DATA_8, fields={GHCB_RAX: 0x41})
    assert answer(p) == (0, 0) and vm.debug_log == b"A"
    vm.port_read = lambda port, size: 0xBEEF if (port, size) == (0x510, 2) else 0
    p = gg.request(SVM_EXIT_IOIO, 0x510 << 16 | IOIO_DATA_16 | IOIO_TYPE_IN,
                   fields={GHCB_RAX: 0x1234_0000})
    assert p.get(GHCB_RAX) == 0x1234_BEEF
    # MSR: the migration-control MSR both ways, an unknown MSR is a #GP for the guest
    written = []
    vm.msr_write = lambda msr, value: written.append((msr, value))
    vm.msr_read = lambda msr: 0x1_0000_0005
    p = gg.request(SVM_EXIT_MSR, 0, fields={GHCB_RCX: MSR_KVM_MIGRATION_CONTROL})
    assert answer(p) == (0, 0) and (p.get(GHCB_RAX), p.get(GHCB_RDX)) == (5, 1)
    gg.request(SVM_EXIT_MSR, 1, fields={GHCB_RCX: MSR_KVM_MIGRATION_CONTROL, GHCB_RAX: 1,
                                        GHCB_RDX: 0})
    assert written == [(MSR_KVM_MIGRATION_CONTROL, 1)]
    p = gg.request(SVM_EXIT_MSR, 0, fields={GHCB_RCX: 0x1234})
    assert answer(p) == (1, 13 | 3 << 8 | 1 << 31), "ISSUE_EXCEPTION: #GP"
    # VMMCALL: the hypercall sees exactly what the guest marked valid
    p = gg.request(SVM_EXIT_VMMCALL, fields={GHCB_RAX: 12, GHCB_RBX: 0x5000, GHCB_RCX: 2,
                                             GHCB_CPL: 0})
    assert answer(p) == (0, 0) and p.get(GHCB_RAX) == 0x77
    assert gg.calls == [(12, 0x5000, 2, 0, 0)], "RDX not valid: 0, as KVM reads it"
    assert [e.request for e in vm.ghcb.log] == ["CPUID", "IOIO", "IOIO", "MSR", "MSR", "MSR",
                                                "VMMCALL"]


@pytest.mark.parametrize("case,code,info1,fields,usage,reason", [
    ("no exit code", None, 0, {GHCB_RAX: 1, GHCB_RCX: 0}, 0, GHCB_ERR_MISSING_INPUT),
    ("cpuid without rcx", SVM_EXIT_CPUID, 0, {GHCB_RAX: 1}, 0, GHCB_ERR_MISSING_INPUT),
    ("cpuid 0xd without xcr0", SVM_EXIT_CPUID, 0, {GHCB_RAX: 0xD, GHCB_RCX: 0}, 0,
     GHCB_ERR_MISSING_INPUT),
    ("out without rax", SVM_EXIT_IOIO, 0x80 << 16 | IOIO_DATA_8, {}, 0, GHCB_ERR_MISSING_INPUT),
    ("wrmsr without rdx", SVM_EXIT_MSR, 1, {GHCB_RCX: 1, GHCB_RAX: 1}, 0,
     GHCB_ERR_MISSING_INPUT),
    ("vmmcall without cpl", SVM_EXIT_VMMCALL, 0, {GHCB_RAX: 12}, 0, GHCB_ERR_MISSING_INPUT),
    ("usage 1", SVM_EXIT_CPUID, 0, {GHCB_RAX: 1, GHCB_RCX: 0}, 1, GHCB_ERR_INVALID_USAGE),
    ("unknown exit", 0x1234, 0, {}, 0, GHCB_ERR_INVALID_EVENT),
    ("jump table info1 7", SVM_VMGEXIT_AP_JUMP_TABLE, 7, {}, 0, GHCB_ERR_INVALID_INPUT),
])
def test_ghcb_valid_bitmap_checks(case: str, code: int | None, info1: int, fields: dict,
                                  usage: int, reason: int) -> None:
    """A request missing an input the exit needs (by the valid bitmap), with another usage, or
    of an unknown exit is refused: SwExitInfo1 = 2, SwExitInfo2 = the reason; nothing runs."""
    print(case)
    gg = GhcbGuest()
    gg.vm.msr_write = lambda msr, value: pytest.fail("the WRMSR ran")
    p = gg.request(code, info1, fields=fields, usage=usage)
    assert answer(p) == (2, reason)
    assert not gg.calls and not gg.vm.io_log


def test_ghcb_ap_jump_table_and_reset_hold() -> None:
    gg = GhcbGuest()
    assert answer(gg.request(SVM_VMGEXIT_AP_JUMP_TABLE, 0, 0x7000)) == (0, 0)
    assert gg.vm.ghcb.ap_jump_table == 0x7000
    assert answer(gg.request(SVM_VMGEXIT_AP_JUMP_TABLE, 1)) == (0, 0x7000)
    p = gg.request(SVM_VMGEXIT_AP_RESET_HOLD, expect="reset_hold")
    assert answer(p) == (0, 0) and gg.v.hold == ("ghcb", gg.gpa)
    gg.v.sipi()
    p = GhcbPage(gg.vm.read(gg.gpa, PAGE, encrypted=False))
    assert answer(p) == (0, 1), "INIT-SIPI: SwExitInfo2 = 1"
    assert gg.v.run().reason == "hlt", "continues after its VMGEXIT"


def test_ghcb_outside_every_memslot_fails_the_run() -> None:
    gg = GhcbGuest()
    gg.v.regs["rbx"] = UNBACKED
    ex = gg.v.run()
    assert ex.reason == "invalid" and "outside every memslot" in ex.detail


# ---- the UEFI stand-in's #VC handler and AP reset hold ---------------------------------------
def firmware(asm: str) -> tuple[UefiStandIn, int]:
    vm = VM(MemoryController(16 << 20), cpuid=CpuidModel(cbit=CBIT, sev_es=True), name="fw")
    u = UefiStandIn(vm, ram_size=16 << 20, seed=3)
    code = assemble(asm)
    fn = u.allocate_pages(1, EFI_LOADER_CODE)
    vm.write(fn, code)
    return u, fn


def test_stand_in_serves_vc_as_ovmf_does() -> None:
    """CPUID, OUT, RDMSR and VMMCALL in firmware context: each a #VC the stand-in serves
    through its GHCB (shared, registered in the GHCB MSR). For VMMCALL the host sees RAX and
    CPL only, as from OVMF's handler: the hypercall's arguments do not reach it."""
    u, fn = firmware(f"""
        mov $0x8000001f, %eax
        xor %ecx, %ecx
        cpuid
        mov %rax, %r8
        mov %rbx, %r9
        mov $0x402, %dx
        mov $0x5a, %al
        out %al, %dx
        mov ${MSR_KVM_MIGRATION_CONTROL}, %ecx
        rdmsr
        mov %rax, %r10
        mov $12, %eax
        mov $0x100000, %ebx
        mov $1, %ecx
        xor %edx, %edx
        vmmcall
        mov %rax, %r11
        mov $0x3c, %eax
        ret
    """)
    vm = u.vm
    vm.msr_read = lambda msr: 9
    vm.hypercall_log.calls.clear()
    rax, ex = u.call(fn)
    assert rax == 0x3C, str(ex)
    r = u.vcpu.regs
    assert (r["r8"], r["r9"]) == vm.cpuid.query(0x8000001F)[:2] and r["r8"] & 1 << 3
    assert vm.debug_log == b"Z" and r["r10"] == 9 and r["r11"] == 0
    assert u.vc_count == 4
    log = vm.ghcb.log[-4:]
    assert [e.request for e in log] == ["CPUID", "IOIO", "MSR", "VMMCALL"]
    assert all(e.msr == u.ghcb for e in log)
    assert set(log[3].inputs) == {"cpl", "rax", "sw_exit_code", "sw_exit_info1",
                                  "sw_exit_info2"}
    assert vm.hypercall_log.calls == [(12, 0, 0, 0, 0)], "OVMF passes RAX only"


def test_stand_in_host_injected_gp_and_unserved_vc() -> None:
    """The host answers an unknown WRMSR with a #GP, which the firmware raises: its IDT has
    only the #VC gate, so that is a triple fault. A #VC it cannot serve (MMIO) ends the guest
    with a termination request, as OVMF does."""
    u, fn = firmware("mov $0x1234, %ecx\nxor %eax, %eax\nxor %edx, %edx\nwrmsr\nret")
    rax, ex = u.call(fn)
    assert rax is None and ex.fault is not None
    assert (ex.fault.kind, ex.fault.delivery) == ("#GP", "IDT gate 13 not present")
    assert ex.fault.disasm == "wrmsr"
    u, fn = firmware("movabs $0x7fff00000000, %rax\nmov (%rax), %rax\nret")
    u.guest.map(0x7FFF00000000, 0x40000000, PAGE, writable=True, executable=False)
    rax, ex = u.call(fn)
    assert ex.reason == "terminate" and u.vm.ghcb.log[-1].request == "TERM_REQ"


def test_ap_hold_code_is_the_assembled_text() -> None:
    assert assemble(AP_HOLD_ASM) == AP_HOLD_CODE


def test_firmware_ap_hold_enters_the_jump_table() -> None:
    """A migration target's firmware waits in the AP reset hold; woken, it asks the host for
    the AP jump table and enters its entry with RDI = the table. No table: termination."""
    u, fn = firmware("mov %rdi, %r12\nhlt")
    jt = u.allocate_pages(1, EFI_LOADER_CODE)
    u.vm.write(jt, fn.to_bytes(8, "little"))
    assert u.park_for_incoming().reason == "reset_hold"
    u.vm.ghcb.ap_jump_table = jt
    u.vcpu.sipi()
    ex = u.vcpu.run(10_000)
    assert ex.reason == "hlt" and u.vcpu.regs["r12"] == jt
    assert [e.request for e in u.vm.ghcb.log[-2:]] == ["AP_RESET_HOLD_REQ", "AP_JUMP_TABLE"]
    u, fn = firmware("hlt")
    u.park_for_incoming()
    u.vcpu.sipi()
    assert u.vcpu.run(10_000).reason == "terminate", "no jump table registered"
