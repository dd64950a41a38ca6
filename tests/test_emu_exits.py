"""Exits handled in Python: vmmcall (KVM ABI, MAP_GPA_RANGE), MSRs, hlt, debug port, rdrand,
instruction budget, #UD, handler-requested stops."""

from __future__ import annotations

import pytest

from emulate.cpuid import CpuidModel
from emulate.faults import BudgetExhausted, GuestFault
from emulate.flat import FlatGuest
from emulate.machine import KVM_HC_MAP_GPA_RANGE, MSR_KVM_MIGRATION_CONTROL, VM, VCpu
from emulate.memctl import MemoryController
from helperfw.codegen.emit import assemble

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
