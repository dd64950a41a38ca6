"""`helperfw inspect` and `helperfw disasm` on the hand-assembled sample image."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from helperfw.cli import build_parser, main
from ovmf_glue.pe import package_pe, write_symbol_map
from ovmf_glue.sample import DESCRIPTOR, sample_image


@pytest.fixture(scope="module")
def efi(tmp_path_factory: pytest.TempPathFactory) -> Path:
    image = sample_image()
    path = tmp_path_factory.mktemp("cli") / "MigrationHelper.efi"
    path.write_bytes(package_pe(image, entry="efi_main"))
    write_symbol_map(image, path.with_suffix(".map"))
    return path


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = main(list(argv), out=out)
    return status, out.getvalue()


def test_inspect_shows_headers_sections_relocs_symbols_descriptor(efi: Path) -> None:
    status, text = run("inspect", str(efi))
    assert status == 0
    assert "IMAGE_FILE_MACHINE_AMD64" in text
    assert "12 IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER" in text
    assert "entry point      0x1000" in text
    assert "checksum" in text and "(ok)" in text
    lines = text.splitlines()
    assert any(line.split()[:2] == [".text", "0x1000"] and line.endswith("r-x") for line in lines)
    assert any(line.split()[0] == ".data" and line.endswith("rw-") for line in lines)
    assert "  0x00003000 DIR64" in lines
    assert any(line.split()[-1] == "efi_main" and "func" in line for line in lines)
    assert "descriptor (mh_descriptor, 16 bytes at 0x2000):" in text
    assert DESCRIPTOR[:8].hex(" ") in text


def test_inspect_without_map_still_prints_headers(efi: Path, tmp_path: Path) -> None:
    lone = tmp_path / "Lone.efi"
    lone.write_bytes(efi.read_bytes())
    status, text = run("inspect", str(lone))
    assert status == 0 and "symbols: (no map at" in text and "DIR64" in text


def test_disasm_names_call_targets(efi: Path) -> None:
    status, text = run("disasm", "efi_main", "--image", str(efi))
    assert status == 0
    assert text.startswith("efi_main (0x80 bytes at 0x1000, section .text):")
    assert "<puts+0x0>" in text
    assert "outb" not in text  # only the requested function
    assert "retq" in text and "bytes of int3" in text
    status, text = run("disasm", "puts", "--image", str(efi), "--syntax", "intel")
    assert status == 0 and "out dx, al" in text


def test_disasm_errors(efi: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("disasm", "nope", "--image", str(efi))[0] == 1
    assert "no symbol 'nope'" in capsys.readouterr().err
    assert run("disasm", "msg", "--image", str(efi))[0] == 1
    assert "not a function" in capsys.readouterr().err
    assert run("disasm", "efi_main", "--image", str(efi.with_name("missing.efi")))[0] == 1
    assert "missing.efi: not found" in capsys.readouterr().err


def test_subcommands_registered() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"inspect", "disasm", "migrate", "map"} <= set(sub.choices)  # type: ignore[attr-defined]


def test_runs_as_a_program(efi: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "helperfw.cli", "inspect", str(efi)],
        check=False,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert "mh_descriptor" in proc.stdout
