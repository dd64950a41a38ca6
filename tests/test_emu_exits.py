"""Exits handled in Python: vmmcall (KVM ABI, MAP_GPA_RANGE), MSRs, hlt, debug port and port
reads, rdrand (seeded per VM, with injected errata), instruction budget, #UD, handler-requested
stops; the per-VM exit table (an entry swapped for a #VC, faults delivered in the guest);
MSR_AMD64_SEV per VM; the SEV-ES guard on the host's register access."""

from __future__ import annotations

import pytest

from emulate.cpuid import CpuidModel
from emulate.exits import ExitHandler, Insn
from emulate.faults import BudgetExhausted, GuestFault
from emulate.flat import FlatGuest
from emulate.machine import VM, RegisterAccessDenied, VCpu
from emulate.memctl import MemoryController
from helperfw.codegen.emit import assemble
from helperfw.runtime.platform import (
    KVM_HC_MAP_GPA_RANGE,
    MSR_KVM_MIGRATION_CONTROL,
    SVM_EXIT_CPUID,
)

SEED = 424242


def guest(asm: str, *, seed: int = SEED, cbit: int = 47) -> tuple[VM, VCpu]:
    vm = VM(MemoryController(4 << 20), cpuid=CpuidModel(cbit=cbit), rdrand_seed=seed)
    g = FlatGuest(vm, ram_size=4 << 20)
    return vm, g.vcpu(g.place(assemble(asm)))


def test_vmmcall_map_gpa_range_default_log() -> None:
    vm, v = guest("""
        mov $12, %eax
        movabs $0x100000, %rbx
        mov $16, %ecx
        mov $0x10, %edx
        vmmcall
        mov %rax, %r12
        mov $12, %eax
        mov $0x200000, %ebx
        mov $1, %ecx
        mov $1, %edx
        vmmcall
        mov $99, %eax
        vmmcall
        mov %rax, %r13
        hlt
    """)
    assert v.run().reason == "hlt"
    assert vm.hypercall_log.map_gpa_ranges == [(0x100000, 16, True, 0), (0x200000, 1, False, 1)]
    assert v.get("r12") == 0
    assert v.get("r13") == (-1000) & (2**64 - 1)  # -KVM_ENOSYS


def test_hypercall_handler_args_result_and_stop() -> None:
    vm, v = guest("""
        mov $7, %eax
        mov $1, %ebx
        mov $2, %ecx
        mov $3, %edx
        mov $4, %esi
        vmmcall
        mov %rax, %r12
        hlt
    """)
    seen = []

    def handler(vcpu: VCpu, nr: int, a0: int, a1: int, a2: int, a3: int) -> int:
        seen.append((nr, a0, a1, a2, a3))
        vcpu.request_stop("mailbox")
        return 0xABC

    vm.hypercall = handler
    ex = v.run()
    assert (ex.reason, ex.detail) == ("stop", "mailbox")
    assert seen == [(7, 1, 2, 3, 4)]
    assert v.get("rax") == 0xABC
    assert v.run().reason == "hlt", "resumes after the vmmcall"
    assert v.get("r12") == 0xABC
    assert KVM_HC_MAP_GPA_RANGE == 12


def test_migration_control_msr_through_host_callback() -> None:
    vm, v = guest(f"""
        mov ${MSR_KVM_MIGRATION_CONTROL}, %ecx
        mov $1, %eax
        xor %edx, %edx
        wrmsr
        xor %eax, %eax
        rdmsr
        mov %rax, %r12
        mov $0xc0010131, %ecx
        rdmsr
        mov %rax, %r13
        hlt
    """)
    writes = []
    vm.msr_write = lambda msr, val: writes.append((msr, val))
    vm.msr_read = lambda msr: 0x77
    assert v.run().reason == "hlt"
    assert writes == [(MSR_KVM_MIGRATION_CONTROL, 1)]
    assert v.get("r12") == 0x77
    assert v.get("r13") & 1, "MSR_AMD64_SEV reports SEV enabled"


def test_unknown_msr_is_gp_report() -> None:
    _, v = guest("""
        mov $0x12345678, %ecx
        mov $5, %eax
        xor %edx, %edx
        nop
        wrmsr
        mov $1, %r12
        hlt
    """)
    ex = v.run()
    assert ex.reason == "fault" and ex.fault is not None
    assert ex.fault.kind == "#GP" and "0x12345678" in ex.fault.reason
    assert ex.fault.disasm == "wrmsr"
    assert v.get("r12") == 0, "no instruction after the faulting wrmsr ran"
    assert v.get("rip") == ex.fault.rip


def test_debug_port_and_hlt() -> None:
    vm, v = guest("""
        mov $0x402, %dx
        lea msg(%rip), %rsi
        mov $5, %ecx
        rep outsb
        mov $0x21, %al
        out %al, %dx
        mov $0x80, %dx
        out %al, %dx
        hlt
    msg:
        .ascii "hello"
    """)
    ex = v.run()
    assert ex.reason == "hlt"
    assert bytes(vm.debug_log) == b"hello!"
    assert vm.io_log == [(0x80, 1, 0x21)]


def test_rdrand_deterministic_and_seedable() -> None:
    asm = """
        rdrand %rax
        setc %bl
        rdrand %ecx
        rdrand %r9
        hlt
    """
    outs = []
    for seed in (SEED, SEED, SEED + 1):
        _, v = guest(asm, seed=seed)
        assert v.run().reason == "hlt"
        assert v.get("rbx") & 0xFF == 1, "CF set"
        assert v.get("rcx") >> 32 == 0
        outs.append((v.get("rax"), v.get("rcx"), v.get("r9")))
    assert outs[0] == outs[1] != outs[2]


def test_budget_exhausted_reports_rip() -> None:
    _, v = guest("""
        xor %eax, %eax
    1:  inc %rax
        jmp 1b
    """)
    ex = v.run(budget=10_000)
    assert ex.reason == "budget"
    start = v.get("rip")
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        v.run_to_hlt(budget=1000)
    assert v.get("rip") in (start, start + 3)
    assert 4000 < v.get("rax") < 6000


def test_invalid_instruction_and_int3() -> None:
    _, v = guest("ud2\nhlt")
    ex = v.run()
    assert ex.fault is not None and ex.fault.kind == "#UD" and ex.fault.disasm == "ud2"
    _, v = guest("nop\nint3\nhlt")
    with pytest.raises(GuestFault, match="vector 3"):
        v.run_to_hlt()


def test_msr_callback_can_stop_the_run() -> None:
    vm, v = guest(f"""
        mov ${MSR_KVM_MIGRATION_CONTROL}, %ecx
        mov $1, %eax
        xor %edx, %edx
        wrmsr
        mov $5, %r12
        hlt
    """)
    vm.msr_write = lambda msr, val: v.request_stop(f"migration control {val}")
    ex = v.run()
    assert (ex.reason, ex.detail) == ("stop", "migration control 1")
    assert v.get("r12") == 0
    assert v.run().reason == "hlt" and v.get("r12") == 5


# ---- RDRAND: per-VM streams and the AMD errata a test can inject -------------------------------
RDRAND4 = """
    rdrand %rax
    setc %bl
    rdrand %rcx
    setc %bh
    rdrand %r9
    setc %r12b
    rdrand %r10d
    setc %r13b
    hlt
"""


def rdrand4(vm: VM, v: VCpu) -> list[tuple[int, int]]:
    """(value, CF) of the four RDRANDs of RDRAND4."""
    assert v.run().reason == "hlt"
    r = v.regs
    return [(r["rax"], r["rbx"] & 1), (r["rcx"], r["rbx"] >> 8 & 1), (r["r9"], r["r12"] & 1),
            (r["r10"], r["r13"] & 1)]


def test_rdrand_stuck_constant_with_cf_set() -> None:
    vm, v = guest(RDRAND4)
    vm.rdrand.stuck()  # all ones, CF=1, as the errata parts return
    assert rdrand4(vm, v) == [(2**64 - 1, 1)] * 3 + [(2**32 - 1, 1)]


def test_rdrand_fails_n_times_then_recovers() -> None:
    vm, v = guest(RDRAND4)
    vm.rdrand.fail(times=2)
    out = rdrand4(vm, v)
    assert out[:2] == [(0, 0), (0, 0)], "CF=0 and a zeroed destination"
    assert out[2][1] == out[3][1] == 1 and out[2][0] not in (0, out[3][0])


def test_rdrand_fails_always() -> None:
    vm, v = guest(RDRAND4)
    vm.rdrand.fail()
    assert rdrand4(vm, v) == [(0, 0)] * 4


def test_rdrand_repeats_the_previous_value() -> None:
    vm, v = guest(RDRAND4)
    first = vm.rdrand.draw(64)[0]
    vm.rdrand.repeat(times=2)
    out = rdrand4(vm, v)
    assert out[:2] == [(first, 1), (first, 1)]
    assert out[2][0] != first and out[3][0] != first & 0xFFFFFFFF, "healed after two draws"


def test_mirror_rdrand_is_its_own_seeded_stream() -> None:
    def streams(seed: int) -> tuple[list[int], list[int]]:
        main = VM(MemoryController(4 << 20), rdrand_seed=seed, name="main")
        mirror = VM(main.mc, mirror_of=main, name="mirror")
        return ([main.rdrand.draw(64)[0] for _ in range(4)],
                [mirror.rdrand.draw(64)[0] for _ in range(4)])

    main, mirror = streams(SEED)
    assert mirror != main, "not a copy of the main VM's stream"
    assert streams(SEED) == (main, mirror), "replayable from the seed"
    assert streams(SEED + 1)[1] != mirror, "the mirror's stream follows the seed too"


# ---- MSR_AMD64_SEV per VM, independent of CPUID ----------------------------------------------
SEV_PROBE = """
    mov $0x8000001f, %eax
    xor %ecx, %ecx
    cpuid
    mov %rax, %r12
    mov $0xc0010131, %ecx
    rdmsr
    mov %rax, %r13
    hlt
"""


# the same under SEV-ES, where CPUID is a #VC: leaf 0x8000001F EAX by the GHCB MSR protocol
SEV_ES_PROBE = """
    mov $0xc0010130, %ecx
    mov $0x4, %eax
    mov $0x8000001f, %edx
    wrmsr
    rep vmmcall
    rdmsr
    mov %rdx, %r12
    mov $0xc0010131, %ecx
    rdmsr
    mov %rax, %r13
    hlt
"""


@pytest.mark.parametrize("kw,msr", [({}, 1), ({"sev_status": 0}, 0), ({"sev_es": True}, 3)])
def test_sev_status_msr_is_configured_per_vm(kw: dict, msr: int) -> None:
    vm = VM(MemoryController(4 << 20), cpuid=CpuidModel(sev=True), **kw)
    g = FlatGuest(vm, ram_size=4 << 20)
    v = g.vcpu(g.place(assemble(SEV_ES_PROBE if vm.sev_es else SEV_PROBE)))
    assert v.run().reason == "hlt"
    assert v.regs["r12"] & 2, "CPUID reports SEV in every case"
    assert v.regs["r13"] == msr
    mirror = VM(vm.mc, mirror_of=vm)
    assert (mirror.sev_status, mirror.sev_es) == (vm.sev_status, vm.sev_es), "a mirror inherits"


def test_port_in_reads_the_vm_port_model() -> None:
    vm, v = guest("""
        in $0x61, %al
        mov %rax, %r12
        mov $0x510, %dx
        in %dx, %ax
        mov %rax, %r13
        hlt
    """)
    v.regs["rax"] = 0
    reads = []

    def port_read(port: int, size: int) -> int:
        reads.append((port, size))
        return 0xBEEF if port == 0x510 else 0xFF

    vm.port_read = port_read
    assert v.run().reason == "hlt"
    assert (v.regs["r12"], v.regs["r13"] & 0xFFFF) == (0xFF, 0xBEEF)
    assert reads == [(0x61, 1), (0x510, 2)]
    _, v = guest("in $0x61, %al\nhlt")
    v.regs["rax"] = 0
    assert v.run().reason == "hlt" and v.regs["rax"] == 0xFF, "no device: the bus floats high"


# ---- the exit table: one entry per kind, swappable per VM -------------------------------------
def test_exit_entry_swapped_for_a_vc_raises_before_the_instruction() -> None:
    """What an SEV-ES VM does with a non-automatic exit: #VC (error code = the SVM exit code)
    instead of a host exit. Without an IDT that ends the run at the CPUID, nothing after it ran."""
    vm, v = guest("""
        mov $0x8000001f, %eax
        cpuid
        mov $1, %r12
        hlt
    """)
    entry = vm.exits["cpuid"]

    def raise_vc(vcpu: VCpu, insn: Insn) -> int | None:
        return vcpu.raise_fault("#VC", insn.addr, "CPUID under SEV-ES",
                                error_code=entry.svm_exit_code)

    vm.exits["cpuid"] = ExitHandler("cpuid", entry.svm_exit_code, raise_vc)
    ex = v.run()
    assert ex.fault is not None and ex.fault.kind == "#VC"
    assert ex.fault.error_code == SVM_EXIT_CPUID and ex.fault.disasm == "cpuid"
    assert v.regs["rip"] == ex.fault.rip and v.regs["r12"] == 0
    assert v.regs["rax"] == 0x8000001F, "the CPUID never executed"
    assert "error_code=0x72" in str(ex.fault)
    assert vm.exits["hlt"].automatic and not entry.automatic
    _, other = guest("mov $0x8000001f, %eax\ncpuid\nhlt")
    assert other.run().reason == "hlt", "the table is per VM"


def test_fault_entry_can_deliver_in_the_guest() -> None:
    """The "fault" entry decides: end the run (default) or continue in the guest (a handler
    address), for faults raised in a hook (#UD) and after emulation stopped (#PF)."""
    vm, v = guest("""
        lea 1f(%rip), %r14
        lea 2f(%rip), %r15
        ud2
    1:  mov $1, %r12
        movabs $0x7fff00000000, %rax
        mov (%rax), %rax
    2:  mov $2, %r13
        hlt
    """)
    seen = []

    def deliver(vcpu: VCpu, fault: GuestFault) -> int:
        seen.append(fault.kind)
        return vcpu.regs["r14" if fault.kind == "#UD" else "r15"]

    vm.exits["fault"] = ExitHandler("fault", None, deliver)
    assert v.run().reason == "hlt"
    assert seen == ["#UD", "#PF"] and (v.regs["r12"], v.regs["r13"]) == (1, 2)


# ---- SEV-ES: the host API cannot reach a launched vCPU's registers ---------------------------
@pytest.mark.parametrize("sev_es", [False, True])
def test_host_register_access_after_launch(sev_es: bool) -> None:
    vm = VM(MemoryController(4 << 20), sev_es=sev_es, name="es" if sev_es else "sev")
    g = FlatGuest(vm, ram_size=4 << 20)
    v = g.vcpu(g.place(assemble("mov $7, %r12\nhlt")))
    v.set("r12", 1)  # before launch: the host builds the initial state (the VMSA)
    assert v.get("r12") == 1
    assert v.run().reason == "hlt"
    assert v.regs["r12"] == 7, "the CPU itself always sees its registers"
    if not sev_es:
        assert v.get("r12") == 7
        v.set("r12", 8)
        return
    with pytest.raises(RegisterAccessDenied, match="es vCPU 0 is an SEV-ES vCPU.*cannot read r12"):
        v.get("r12")
    with pytest.raises(RegisterAccessDenied, match="cannot write rip"):
        v.set("rip", 0)
