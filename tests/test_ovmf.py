"""Real OVMF (Debian's `ovmf` under qemu-system-x86_64 -accel tcg) loads the packaged image.

Outside CI these tests skip when qemu or OVMF is missing; with CI set they must run, so a broken
CI image fails loudly instead of silently skipping the only test against EDK2's real loader.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pefile
import pytest

from ovmf_glue.edk2 import EFI_NAME
from ovmf_glue.ovmf_run import LIST_IMAGES, BootResult, boot_efi, missing_requirements
from ovmf_glue.pe import package_pe
from ovmf_glue.pe_format import IMAGE_DIRECTORY_ENTRY_BASERELOC, IMAGE_FILE_MACHINE_I386
from ovmf_glue.sample import BANNER, RELOC_BAD, RELOC_OK, sample_image

BOOT_TIMEOUT = 45.0  # measured ~5.5 s per boot on TCG; generous for slow CI runners

_missing = missing_requirements()
if _missing and not os.environ.get("CI"):
    pytest.skip(f"real-OVMF tests need qemu and OVMF: {_missing}", allow_module_level=True)


@pytest.fixture(scope="module")
def good_efi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert _missing is None, f"CI is set but {_missing}"
    path = tmp_path_factory.mktemp("efi") / "MigrationHelper.efi"
    path.write_bytes(package_pe(sample_image(), entry="efi_main"))
    return path


def _describe(r: BootResult) -> str:
    return (
        f"load line: {r.load_line!r}\ndebug log:\n{r.debug_log}\nconsole tail:\n{r.console[-1500:]}"
    )


def test_ovmf_loads_relocates_and_runs_image(good_efi: Path) -> None:
    r = boot_efi(good_efi, timeout=BOOT_TIMEOUT, after_load=(LIST_IMAGES,))
    assert not r.timed_out, _describe(r)
    assert r.loaded, _describe(r)
    assert r.load_line is not None and "MigrationHelper.efi" in r.load_line
    assert r.loaded_at is not None and r.loaded_at % 0x1000 == 0 and r.loaded_at != 0
    # ImageBase is 0, so running the entry at all proves OVMF relocated the image; the entry
    # then checks the one DIR64 fixup itself.
    assert BANNER in r.debug_log, _describe(r)
    assert RELOC_OK in r.debug_log and RELOC_BAD not in r.debug_log, _describe(r)
    # it returned EFI_SUCCESS, so it stays loaded; EDK2's loader read the CodeView record's name
    assert (f"\\{EFI_NAME}", EFI_NAME) in r.resident_images(), _describe(r)
    assert r.returncode == 0  # `reset -s` powered the VM off


def _bad_machine(raw: bytes) -> bytes:
    pe = pefile.PE(data=raw, fast_load=True)
    pe.FILE_HEADER.Machine = IMAGE_FILE_MACHINE_I386  # an X64 OVMF will not run it
    return bytes(pe.write())


def _truncated(raw: bytes) -> bytes:
    return raw[:0x300]  # headers only, no section data


def _bad_relocation(raw: bytes) -> bytes:
    pe = pefile.PE(data=raw, fast_load=True)
    rva = pe.OPTIONAL_HEADER.DATA_DIRECTORY[IMAGE_DIRECTORY_ENTRY_BASERELOC].VirtualAddress
    off = pe.get_offset_from_rva(rva) + 8  # first entry after the block header
    out = bytearray(raw)
    struct.pack_into("<H", out, off, 0xF000)  # type 15: not a relocation type EDK2 knows
    return bytes(out)


@pytest.mark.parametrize("corrupt", [_bad_machine, _truncated, _bad_relocation])
def test_ovmf_refuses_corrupted_image(corrupt, good_efi: Path, tmp_path: Path) -> None:
    bad = tmp_path / "MigrationHelper.efi"
    bad.write_bytes(corrupt(good_efi.read_bytes()))
    r = boot_efi(bad, timeout=BOOT_TIMEOUT)
    assert not r.timed_out, _describe(r)
    assert r.load_line is not None, _describe(r)
    assert not r.loaded, _describe(r)
    assert "Success" not in r.load_line
    assert BANNER not in r.debug_log, _describe(r)
