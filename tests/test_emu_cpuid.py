"""CPUID as the guest sees it: SEV leaf, MAXPHYADDR, crypto features, KVM leaves."""

from __future__ import annotations

import pytest

from emulate.cpuid import CpuidModel
from emulate.flat import FlatGuest
from emulate.machine import VM
from emulate.memctl import MemoryController
from helperfw.codegen.emit import assemble


def guest_cpuid(model: CpuidModel, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    vm = VM(MemoryController(4 << 20), cpuid=model)
    g = FlatGuest(vm, ram_size=4 << 20)
    code = assemble(f"""
        mov ${leaf}, %eax
        mov ${subleaf}, %ecx
        cpuid
        mov %rax, %r8
        mov %rbx, %r9
        mov %rcx, %r10
        mov %rdx, %r11
        hlt
    """)
    v = g.vcpu(g.place(code))
    assert v.run().reason == "hlt"
    return tuple(v.get(r) for r in ("r8", "r9", "r10", "r11"))  # type: ignore[return-value]


@pytest.mark.parametrize("cbit,maxphy", [(47, 48), (51, 52)])
def test_sev_leaf_and_address_sizes(cbit: int, maxphy: int) -> None:
    m = CpuidModel(cbit=cbit, reduction=5)
    eax, ebx, _, _ = guest_cpuid(m, 0x8000001F)
    assert eax & 2, "SEV bit"
    assert ebx & 0x3F == cbit
    assert (ebx >> 6) & 0x3F == 5
    eax, *_ = guest_cpuid(m, 0x80000008)
    assert eax & 0xFF == maxphy
    assert guest_cpuid(m, 0x80000000)[0] >= 0x8000001F


def test_sev_off_reports_nothing() -> None:
    eax, ebx, _, _ = guest_cpuid(CpuidModel(sev=False), 0x8000001F)
    assert eax == ebx == 0


def test_crypto_features_and_kvm_leaves() -> None:
    m = CpuidModel()
    _, _, ecx, _ = guest_cpuid(m, 1)
    for bit in (1, 25, 30):
        assert ecx >> bit & 1, bit
    eax, ebx, ecx, edx = guest_cpuid(m, 0x40000000)
    sig = b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx))
    assert sig == b"KVMKVMKVM\0\0\0"
    assert eax >= 0x40000001
    assert guest_cpuid(m, 0x40000001)[0] >> 17 & 1


def test_aesni_and_pclmul_execute() -> None:
    """The firmware's AES-GCM-SIV relies on these instructions working, not just being reported."""
    vm = VM(MemoryController(4 << 20))
    g = FlatGuest(vm, ram_size=4 << 20)
    code = assemble("""
        pcmpeqb %xmm0, %xmm0
        pxor %xmm1, %xmm1
        aesenc %xmm1, %xmm0
        pclmulqdq $0, %xmm0, %xmm0
        movq %xmm0, %rax
        hlt
    """)
    v = g.vcpu(g.place(code))
    assert v.run().reason == "hlt"
    assert v.get("rax") != 0
