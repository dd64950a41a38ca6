"""The real helper image (build.py output) loads, relocates and runs its self-test in the UEFI
stand-in, with and without SEV, for C-bit 47 and 51; the symbol map names fault addresses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from emulate.cpuid import CpuidModel
from emulate.machine import VM
from emulate.memctl import MemoryController
from emulate.uefi import UefiStandIn

ROOT = Path(__file__).resolve().parents[1]
SEED = 99_991


@pytest.fixture(scope="module")
def helper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fw")
    subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(out)], check=True,
                   cwd=ROOT, capture_output=True)
    return out / "MigrationHelper.efi"


@pytest.mark.parametrize("sev,cbit", [(False, 47), (True, 47), (True, 51)])
def test_helper_image_selftest(helper: Path, sev: bool, cbit: int) -> None:
    print("seed", SEED)
    vm = VM(MemoryController(64 << 20), cpuid=CpuidModel(sev=sev, cbit=cbit))
    u = UefiStandIn(vm, seed=SEED + cbit)
    r = u.start_image(helper)  # reads the link map build.py wrote beside the image
    assert r.ok, (r.exit, r.conout)
    assert b"selftest passed" in r.debug_log
    assert "selftest passed" in r.conout
    if sev:
        assert f"C-bit 0x{cbit:016x}".encode() in r.debug_log
    assert u.vcpu.symbolize(r.image.entry).startswith("efi_main")


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
