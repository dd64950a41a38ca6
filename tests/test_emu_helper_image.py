"""The real helper image (build.py output) loads, relocates and runs its self-test in the UEFI
stand-in, with and without SEV, for C-bit 47 and 51; the symbol map names fault addresses."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulate.cpuid import CpuidModel
from emulate.machine import VM
from emulate.memctl import MemoryController
from emulate.uefi import EFI_SUCCESS, EFI_UNSUPPORTED, UefiStandIn
from helperfw.runtime import secrets
from helperfw.runtime.platform import CPUID_1_ECX_AESNI, CPUID_FEATURES_LEAF

SEED = 99_991


@pytest.fixture(scope="module")
def helper(firmware) -> Path:
    return firmware.efi


@pytest.mark.parametrize("sev,cbit", [(False, 47), (True, 47), (True, 51)])
def test_helper_image_selftest(helper: Path, sev: bool, cbit: int) -> None:
    print("seed", SEED)
    vm = VM(MemoryController(64 << 20), cpuid=CpuidModel(sev=sev, cbit=cbit))
    u = UefiStandIn(vm, seed=SEED + cbit)
    u.install_launch_secret([(secrets.KEY_ENTRY_GUID, bytes(range(32)))])
    r = u.start_image(helper)  # reads the link map build.py wrote beside the image
    # without SEV the driver returns EFI_UNSUPPORTED so that OVMF unloads it
    assert r.status == (EFI_SUCCESS if sev else EFI_UNSUPPORTED), (r.exit, r.conout)
    assert b"selftest passed" in r.debug_log
    assert "selftest passed" in r.conout
    if sev:
        assert f"C-bit 0x{cbit:016x}".encode() in r.debug_log
    assert u.vcpu.symbolize(r.image.entry).startswith("efi_main")


def test_sev_without_a_transport_key_is_unsupported(helper: Path) -> None:
    """SEV on but no key in the launch-secret area: nothing to serve, so the driver says so,
    announces nothing and returns EFI_UNSUPPORTED (OVMF unloads it, its memory is freed)."""
    vm = VM(MemoryController(64 << 20), cpuid=CpuidModel(sev=True, cbit=47))
    calls = []
    vm.hypercall = lambda *a: calls.append(a) or 0
    r = UefiStandIn(vm, seed=SEED).start_image(helper)
    assert r.status == EFI_UNSUPPORTED, (r.exit, r.conout)
    assert b"no transport key in the SEV secret area" in r.debug_log
    assert not calls


@pytest.mark.parametrize("sev_status", [0, 1])
def test_sev_needs_cpuid_and_the_sev_status_msr(helper: Path, sev_status: int) -> None:
    """As OVMF decides it: CPUID 0x8000001F reporting SEV is not enough, MSR_AMD64_SEV bit 0
    must say SEV is on for this guest, else the driver stays inactive and announces nothing."""
    vm = VM(MemoryController(64 << 20), cpuid=CpuidModel(sev=True, cbit=47),
            sev_status=sev_status)
    u = UefiStandIn(vm, seed=SEED)
    u.start_image(helper)
    active = b"SEV active" in vm.debug_log
    assert active == bool(sev_status)
    assert (b"SEV not active" in vm.debug_log) == (not sev_status)


def test_helper_image_without_aesni_is_unsupported(helper: Path) -> None:
    """CPUID leaf 1 without AES-NI: the driver says so and returns EFI_UNSUPPORTED."""
    model = CpuidModel(sev=True)
    eax, ebx, ecx, edx = model.query(CPUID_FEATURES_LEAF)
    model.overrides[(CPUID_FEATURES_LEAF, 0)] = (eax, ebx, ecx & ~CPUID_1_ECX_AESNI, edx)
    r = UefiStandIn(VM(MemoryController(64 << 20), cpuid=model), seed=SEED).start_image(helper)
    assert r.status == EFI_UNSUPPORTED, (r.exit, r.conout)
    assert b"CPU lacks AES-NI/PCLMULQDQ, returning EFI_UNSUPPORTED" in r.debug_log
    assert b"selftest" not in r.debug_log
