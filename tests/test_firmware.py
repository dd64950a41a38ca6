"""The real firmware: build.py's output is reproducible, valid, and real OVMF runs it.

The OVMF boot skips only when qemu/OVMF are absent and CI is unset (see test_ovmf.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import lief
import pefile
import pytest

from ovmf_glue.ovmf_run import boot_efi, missing_requirements

ROOT = Path(__file__).resolve().parent.parent
SELFTEST_LINES = [
    "MigrationHelper: loaded (protocol v2)",
    "MigrationHelper: selftest AES-256-GCM-SIV known answers ok",
    "MigrationHelper: selftest page tables ok",
    "MigrationHelper: selftest passed",
    "MigrationHelper: SEV not active, helper stays inactive",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("out")
    r = subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def test_build_emits_all_files_and_prints_digests(built):
    out, stdout = built
    efi = (out / "MigrationHelper.efi").read_bytes()
    for name in ("MigrationHelper.inf", "MigrationHelper.h", "MigrationHelper.fdf.inc",
                 "MigrationHelper.dsc.inc", "MigrationHelper.map"):
        assert (out / name).stat().st_size > 0, name
    assert f"SHA-256 {hashlib.sha256(efi).hexdigest()}" in stdout
    assert f"SHA-384 {hashlib.sha384(efi).hexdigest()}" in stdout
    assert f"{len(efi)} bytes" in stdout


def test_build_is_reproducible(built, tmp_path):
    out, _ = built
    r = subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    for name in ("MigrationHelper.efi", "MigrationHelper.h", "MigrationHelper.inf"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_image_is_a_wx_clean_runtime_driver(built):
    out, _ = built
    pe = pefile.PE(str(out / "MigrationHelper.efi"))
    assert pe.FILE_HEADER.Machine == 0x8664
    assert pe.OPTIONAL_HEADER.Magic == 0x20B
    assert pe.OPTIONAL_HEADER.Subsystem == 12  # EFI_RUNTIME_DRIVER
    for s in pe.sections:
        c = s.Characteristics
        assert not (c & 0x20000000 and c & 0x80000000), s.Name  # never X and W
    binary = lief.PE.parse(str(out / "MigrationHelper.efi"))
    assert binary.entrypoint - binary.imagebase == pe.OPTIONAL_HEADER.AddressOfEntryPoint
    # the header compiles: C authors can include it as is
    r = subprocess.run(["gcc", "-std=c11", "-Werror", "-fsyntax-only", "-x", "c",
                        str(out / "MigrationHelper.h")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


_missing = missing_requirements()


@pytest.mark.skipif(bool(_missing) and not os.environ.get("CI"),
                    reason=f"real-OVMF boot needs qemu and OVMF: {_missing}")
def test_real_ovmf_loads_and_selftests_the_firmware(built):
    assert _missing is None, f"CI is set but {_missing}"
    out, _ = built
    r = boot_efi(out / "MigrationHelper.efi", timeout=60)
    detail = f"load line: {r.load_line!r}\ndebug log:\n{r.debug_log}\n{r.console[-1500:]}"
    assert r.load_status == "Success", detail
    log = r.debug_log.splitlines()
    for line in SELFTEST_LINES:
        assert line in log, detail
        assert line in r.console, detail  # ConOut too, not only the debug port


def test_inspect_decodes_the_descriptor(built):
    out, _ = built
    r = subprocess.run([sys.executable, "-m", "helperfw.cli", "inspect",
                        str(out / "MigrationHelper.efi")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    from helperfw.runtime.protocol import MH_CONFIG_GUID
    from helperfw.runtime.secrets import KEY_ENTRY_GUID

    assert "protocol version 2, default option shift, 64 slots" in r.stdout
    assert KEY_ENTRY_GUID in r.stdout and MH_CONFIG_GUID in r.stdout
    assert "efi_main" in r.stdout and "mh_entry" in r.stdout
