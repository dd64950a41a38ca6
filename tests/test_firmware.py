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

from ovmf_glue.edk2 import EFI_NAME
from ovmf_glue.ovmf_run import LIST_IMAGES, boot_efi, missing_requirements
from ovmf_glue.pe_format import (
    CODEVIEW_SIGNATURE_RSDS,
    IMAGE_FILE_MACHINE_AMD64,
    IMAGE_SCN_MEM_EXECUTE,
    IMAGE_SCN_MEM_WRITE,
    IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER,
    PE32_PLUS_MAGIC,
)

ROOT = Path(__file__).resolve().parent.parent
BANNER = "MigrationHelper: loaded (protocol v2)"
SELFTEST_LINES = [
    BANNER,
    "MigrationHelper: selftest AES-256-GCM-SIV known answers ok",
    "MigrationHelper: selftest page tables ok",
    "MigrationHelper: selftest passed",
    "MigrationHelper: SEV not active, returning EFI_UNSUPPORTED (driver unloads)",
]
NO_AESNI_LINE = "MigrationHelper: CPU lacks AES-NI/PCLMULQDQ, returning EFI_UNSUPPORTED (driver unloads)"
OUTPUTS = ("MigrationHelper.efi", "MigrationHelper.map", "MigrationHelper.inf",
           "MigrationHelper.fdf.inc", "MigrationHelper.rule.fdf.inc", "MigrationHelper.dsc.inc",
           "MigrationHelper.h")


@pytest.fixture(scope="module")
def built(firmware) -> Path:
    """The directory the session's firmware build wrote (tests/firmware.py)."""
    return firmware.efi.parent


def test_build_emits_all_files_with_digests(firmware):
    out = firmware.efi.parent
    efi = firmware.efi.read_bytes()
    assert efi == firmware.pe and len(efi) < 32 << 10
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    assert firmware.sha256 == hashlib.sha256(efi).hexdigest()
    assert firmware.sha384 == hashlib.sha384(efi).hexdigest()


def test_build_is_reproducible(firmware, tmp_path):
    """build.py in a process of its own, with another hash seed (set and dict order must not
    reach the image), writes the same bytes as the session's build and prints their digests."""
    env = dict(os.environ, PYTHONHASHSEED="4242")
    r = subprocess.run([sys.executable, str(ROOT / "build.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
                       env=env)
    assert r.returncode == 0, r.stderr
    out = firmware.efi.parent
    for name in OUTPUTS:
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert f"SHA-256 {firmware.sha256}" in r.stdout
    assert f"SHA-384 {firmware.sha384}" in r.stdout
    assert f"{len(firmware.pe)} bytes" in r.stdout


def test_image_is_a_wx_clean_runtime_driver(built):
    out = built
    pe = pefile.PE(str(out / "MigrationHelper.efi"))
    assert pe.FILE_HEADER.Machine == IMAGE_FILE_MACHINE_AMD64
    assert pe.OPTIONAL_HEADER.Magic == PE32_PLUS_MAGIC
    assert pe.OPTIONAL_HEADER.Subsystem == IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER
    for s in pe.sections:
        c = s.Characteristics
        assert not (c & IMAGE_SCN_MEM_EXECUTE and c & IMAGE_SCN_MEM_WRITE), s.Name
    # the debug directory names the driver for EDK2's load log, with no timestamp
    (debug,) = pe.DIRECTORY_ENTRY_DEBUG
    assert debug.struct.TimeDateStamp == 0 and debug.entry.CvSignature == CODEVIEW_SIGNATURE_RSDS
    assert debug.entry.PdbFileName.rstrip(b"\0").decode() == EFI_NAME
    binary = lief.PE.parse(str(out / "MigrationHelper.efi"))
    assert binary.entrypoint - binary.imagebase == pe.OPTIONAL_HEADER.AddressOfEntryPoint
    # the header compiles: C authors can include it as is
    r = subprocess.run(["gcc", "-std=c11", "-Werror", "-fsyntax-only", "-x", "c",
                        str(out / "MigrationHelper.h")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


_missing = missing_requirements()


needs_ovmf = pytest.mark.skipif(bool(_missing) and not os.environ.get("CI"),
                                reason=f"real-OVMF boot needs qemu and OVMF: {_missing}")


def _detail(r) -> str:
    return f"load line: {r.load_line!r}\ndebug log:\n{r.debug_log}\n{r.console[-1500:]}"


@needs_ovmf
def test_real_ovmf_selftests_the_firmware_then_unloads_it_without_sev(built):
    """Without SEV the driver proves it works, returns EFI_UNSUPPORTED, and OVMF unloads it:
    the shell's `load` reports the status, and no loaded image is left with its name."""
    assert _missing is None, f"CI is set but {_missing}"
    out = built
    r = boot_efi(out / "MigrationHelper.efi", timeout=60, after_load=(LIST_IMAGES,))
    assert r.load_line == f"Image 'FS0:\\{EFI_NAME}' error in StartImage: Unsupported", _detail(r)
    log = r.debug_log.splitlines()
    for line in SELFTEST_LINES:
        assert line in log, _detail(r)
        assert line in r.console, _detail(r)  # ConOut too, not only the debug port
    images = r.resident_images()
    assert images, _detail(r)  # the shell did list the loaded images
    assert not [i for i in images if EFI_NAME in i[0] or i[1] == EFI_NAME], images


@needs_ovmf
def test_real_ovmf_without_aesni_unloads_the_firmware(built):
    """A CPU without AES-NI: the driver says so and returns EFI_UNSUPPORTED before any crypto."""
    assert _missing is None, f"CI is set but {_missing}"
    out = built
    r = boot_efi(out / "MigrationHelper.efi", timeout=60, cpu="max,aes=off")
    assert r.load_status == "Unsupported", _detail(r)
    assert r.debug_log.splitlines() == [BANNER, NO_AESNI_LINE], _detail(r)


def test_inspect_decodes_the_descriptor(built):
    out = built
    r = subprocess.run([sys.executable, "-m", "helperfw.cli", "inspect",
                        str(out / "MigrationHelper.efi")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    from helperfw.runtime.protocol import MH_CONFIG_GUID
    from helperfw.runtime.secrets import KEY_ENTRY_GUID

    assert "protocol version 2, default option shift, 64 slots" in r.stdout
    assert KEY_ENTRY_GUID in r.stdout and MH_CONFIG_GUID in r.stdout
    assert "efi_main" in r.stdout and "mh_entry" in r.stdout
