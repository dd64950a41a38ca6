"""The firmware build as an importable function and its command line (`build.py --emit`)."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import llvmlite.binding as llvm
import pytest

from helperfw import DslError
from helperfw.build import build_firmware
from helperfw.codegen import emit, link

ROOT = Path(__file__).resolve().parent.parent


def _build_py():
    spec = importlib.util.spec_from_file_location("build_cli", ROOT / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_firmware(tmp_path_factory.mktemp("fw"), emit=("ll", "o"))


def test_build_firmware_returns_paths_and_digests(built):
    assert set(built.paths) == {"efi", "map", "inf", "h", "fdf.inc", "rule.fdf.inc", "dsc.inc", "ll", "opt.ll",
                                "o"}
    assert all(p.is_file() for p in built.paths.values())
    pe = built.efi.read_bytes()
    assert pe == built.pe and len(pe) < 32 * 1024
    assert built.sha256 == hashlib.sha256(pe).hexdigest()
    assert built.sha384 == hashlib.sha384(pe).hexdigest()


def test_emitted_intermediates_are_what_the_image_was_made_from(built):
    """The object links to the same image; both IR files are valid LLVM IR for our target."""
    obj = built.paths["o"].read_bytes()
    assert obj[:4] == b"\x7fELF"
    assert link.link(obj, entry="efi_main") == built.image
    for kind in ("ll", "opt.ll"):
        mod = emit.verify(built.paths[kind].read_text())
        assert mod.triple == emit.TRIPLE
        assert mod.get_function("efi_main") is not None
    assert isinstance(mod, llvm.ModuleRef)


def test_command_line_writes_what_the_function_builds(built, tmp_path, capsys, monkeypatch):
    """build.py is build_firmware's command line (the compile itself is reused: test_firmware
    checks that two real builds are byte-identical)."""
    monkeypatch.setattr("helperfw.build.compile_firmware", lambda: built.compiled)
    assert _build_py().main(["--out", str(tmp_path), "--emit", "o"]) == 0
    out = capsys.readouterr().out
    assert f"SHA-256 {built.sha256}" in out and f"SHA-384 {built.sha384}" in out
    assert (tmp_path / "MigrationHelper.o").read_bytes() == built.paths["o"].read_bytes()
    assert not (tmp_path / "MigrationHelper.ll").exists()
    for kind in ("efi", "map", "inf", "h", "fdf.inc", "rule.fdf.inc", "dsc.inc"):
        path = built.paths[kind]
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), kind


def test_dsl_error_in_the_firmware_is_reported_without_a_traceback(tmp_path, capsys,
                                                                  monkeypatch):
    def broken():
        raise DslError("helperfw/runtime/session.py", 42, "type mismatch: u32 and u64", 12)

    monkeypatch.setattr("helperfw.build.compile_firmware", broken)
    assert _build_py().main(["--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[0] == ("build.py: helperfw/runtime/session.py:42:12: type mismatch: "
                                   "u32 and u64")


def test_unknown_emit_kind_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as ei:
        _build_py().main(["--out", str(tmp_path), "--emit", "ll,asm"])
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "build.py: error: argument --emit: unknown emit kind 'asm'; choose from ll, o"
    assert not list(tmp_path.iterdir())


def test_unwritable_output_directory_is_one_clear_line(built, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("helperfw.build.compile_firmware", lambda: built.compiled)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    assert _build_py().main(["--out", str(blocker / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"build.py: cannot write {blocker / 'out'}: ")
