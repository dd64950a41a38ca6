"""CPUID model for the emulated vCPU: an AMD EPYC-like part under KVM with SEV.

Why a model: unicorn's built-in CPUID has no SEV leaf and no KVM signature, and the helper derives
its C-bit position and address-space layout from CPUID (docs/PROTOCOL.md), so tests choose them here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Leaf numbers and bits: AMD APM vol. 3 appendix E, Intel SDM vol. 2A "CPUID",
# Linux Documentation/virt/kvm/x86/cpuid.rst.
# Deliberately independent of helperfw.runtime.platform: this model is the hardware the helper's
# CPUID parsing is tested against, so a wrong bit there fails a boot instead of agreeing with
# itself (as emulate/mmu.py is for the page-table builder).
LEAF_BASIC = 0x0
LEAF_FEATURES = 0x1
LEAF_EXT_MAX = 0x80000000
LEAF_EXT_FEATURES = 0x80000001
LEAF_ADDR_SIZES = 0x80000008
LEAF_SEV = 0x8000001F
LEAF_KVM_SIGNATURE = 0x40000000
LEAF_KVM_FEATURES = 0x40000001

ECX1_SSE3 = 1 << 0
ECX1_PCLMULQDQ = 1 << 1
ECX1_SSSE3 = 1 << 9
ECX1_SSE41 = 1 << 19
ECX1_SSE42 = 1 << 20
ECX1_AES = 1 << 25
ECX1_RDRAND = 1 << 30
ECX1_HYPERVISOR = 1 << 31
EDX1_BASE = 0x178BFBFF  # FPU..SSE2 as reported by contemporary x86-64 parts

EDX81_NX = 1 << 20
EDX81_PDPE1GB = 1 << 26
EDX81_LM = 1 << 29

EAX1F_SME = 1 << 0
EAX1F_SEV = 1 << 1
EAX1F_SEV_ES = 1 << 3

KVM_FEATURE_MIGRATION_CONTROL = 17  # Documentation/virt/kvm/x86/cpuid.rst
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"


def _regs_from_bytes(sig: bytes) -> tuple[int, int, int]:
    return tuple(int.from_bytes(sig[i : i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


@dataclass
class CpuidModel:
    """CPUID answers. `cbit`/`reduction` feed leaf 0x8000001F, which reports SEV-ES (EAX bit 3)
    when `sev_es`; MAXPHYADDR defaults to 48 when the C-bit is below 48, else 52 (what EPYC
    parts report). `overrides` replaces whole leaves."""

    sev: bool = True
    sev_es: bool = False
    cbit: int = 47
    reduction: int = 5
    maxphyaddr: int | None = None
    overrides: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.maxphyaddr is None:
            self.maxphyaddr = 48 if self.cbit < 48 else 52
        if not 32 <= self.cbit < 64:
            raise ValueError(f"C-bit {self.cbit} out of range")
        if self.sev_es and not self.sev:
            raise ValueError("SEV-ES needs SEV")

    @property
    def phys_bits(self) -> int:
        """Usable physical-address bits: MAXPHYADDR minus the SEV reduction when SEV is on."""
        assert self.maxphyaddr is not None
        return self.maxphyaddr - (self.reduction if self.sev else 0)

    def query(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """(eax, ebx, ecx, edx) for a leaf; unknown leaves read as zero like on hardware."""
        if (leaf, subleaf) in self.overrides:
            return self.overrides[(leaf, subleaf)]
        if (leaf, 0) in self.overrides and leaf not in (0x7, 0xD):
            return self.overrides[(leaf, 0)]
        if leaf == LEAF_BASIC:
            b, d, c = _regs_from_bytes(b"AuthenticAMD")
            return (0xD, b, c, d)
        if leaf == LEAF_FEATURES:
            ecx = (ECX1_SSE3 | ECX1_PCLMULQDQ | ECX1_SSSE3 | ECX1_SSE41 | ECX1_SSE42 | ECX1_AES
                   | ECX1_RDRAND | ECX1_HYPERVISOR)
            return (0x00A00F11, 0x00000800, ecx, EDX1_BASE)  # family 19h (Milan)
        if leaf == LEAF_KVM_SIGNATURE:
            b, c, d = _regs_from_bytes(KVM_SIGNATURE)
            return (LEAF_KVM_FEATURES, b, c, d)
        if leaf == LEAF_KVM_FEATURES:
            return (1 << KVM_FEATURE_MIGRATION_CONTROL, 0, 0, 0)
        if leaf == LEAF_EXT_MAX:
            return (LEAF_SEV, 0, 0, 0)
        if leaf == LEAF_EXT_FEATURES:
            return (0, 0, 1, EDX81_NX | EDX81_PDPE1GB | EDX81_LM)
        if leaf == LEAF_ADDR_SIZES:
            assert self.maxphyaddr is not None
            return (self.maxphyaddr | (48 << 8), 0, 0, 0)
        if leaf == LEAF_SEV:
            if not self.sev:
                return (0, 0, 0, 0)
            # EBX[5:0] C-bit, EBX[11:6] physical address reduction; ECX encrypted guests; EDX min ASID
            eax = EAX1F_SME | EAX1F_SEV | (EAX1F_SEV_ES if self.sev_es else 0)
            return (eax, self.cbit | (self.reduction << 6), 509, 1)
        return (0, 0, 0, 0)
