"""Bad input on the command line: one clear line on stderr and a non-zero status, never a
traceback, for every subcommand and every kind of input (files, sizes, names, paths)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from helperfw.cli import main
from ovmf_glue.pe import package_pe, write_symbol_map
from ovmf_glue.sample import sample_image
from tests.firmware import efi_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real image, a file that is not a PE, a PE that is not the helper, and an image whose
    symbol map is garbage."""
    d = tmp_path_factory.mktemp("bad-input")
    not_pe = d / "notes.efi"
    not_pe.write_text("hello\n")
    other = d / "Other.efi"
    image = sample_image()
    other.write_bytes(package_pe(image, entry="efi_main"))
    write_symbol_map(image, other.with_suffix(".map"))
    bad_map = d / "BadMap.efi"
    bad_map.write_bytes(efi_path().read_bytes())
    bad_map.with_suffix(".map").write_text("{not json")
    return {"good": efi_path(), "not_pe": not_pe, "other": other, "bad_map": bad_map,
            "missing": d / "missing.efi", "dir": d, "nodir": d / "no" / "such"}


CASES = {
    # (argv with {placeholders}, a fragment the message must contain)
    "no command": ([], "required: command"),
    "unknown command": (["frobnicate"], "invalid choice"),
    "inspect missing": (["inspect", "{missing}"], "not found"),
    "inspect directory": (["inspect", "{dir}"], "not a file"),
    "inspect not a PE": (["inspect", "{not_pe}"], "cannot read PE image"),
    "inspect garbage map": (["inspect", "{bad_map}"], "bad symbol map"),
    "inspect missing map": (["inspect", "{good}", "--map", "{missing}"], "not found"),
    "inspect map not JSON": (["inspect", "{good}", "--map", "{not_pe}"], "bad symbol map"),
    "disasm missing image": (["disasm", "efi_main", "--image", "{missing}"], "not found"),
    "disasm not a PE": (["disasm", "efi_main", "--image", "{not_pe}"], "cannot read PE"),
    "disasm unknown function": (["disasm", "nope", "--image", "{good}"], "no symbol 'nope'"),
    "disasm bad syntax": (["disasm", "x", "--image", "{good}", "--syntax", "nasm"],
                          "invalid choice"),
    "disasm missing map": (["disasm", "efi_main", "--image", "{good}", "--map", "{missing}"],
                           "not found"),
    "migrate missing image": (["migrate", "--image", "{missing}"], "not found"),
    "migrate not a PE": (["migrate", "--image", "{not_pe}"], "not a PE32+ image"),
    "migrate PE that is not the helper": (["migrate", "--mem", "32M", "--image", "{other}"],
                                          "did not announce"),
    "migrate garbage map": (["migrate", "--image", "{bad_map}"], "bad symbol map"),
    "migrate mem not a size": (["migrate", "--mem", "lots"], "not a size"),
    "migrate mem not a multiple": (["migrate", "--mem", "33M"], "multiple of 16 MiB"),
    "migrate mem zero": (["migrate", "--mem", "0"], "must be positive"),
    "migrate mem too big": (["migrate", "--mem", "1T"], "not a size"),
    "migrate mem over the cap": (["migrate", "--mem", "8G"], "at most 4G"),
    "migrate bad option": (["migrate", "--option", "mirror"], "invalid choice"),
    "migrate bad cbit": (["migrate", "--cbit", "48"], "invalid choice"),
    "migrate negative seed": (["migrate", "--seed", "-1"], "less than 0"),
    "migrate zero rounds": (["migrate", "--max-rounds", "0"], "less than 1"),
    "migrate rounds not a number": (["migrate", "--max-rounds", "many"], "not an integer"),
    "migrate negative converge": (["migrate", "--converge", "-5"], "less than 0"),
    "migrate unknown transport": (["migrate", "--transport", "carrier-pigeon"],
                                  "unknown transport"),
    "migrate file in a missing dir": (["migrate", "--transport", "file:{nodir}/x"],
                                      "does not exist"),
    "migrate file that is a dir": (["migrate", "--transport", "file:{dir}"], "cannot write"),
    "migrate tcp bad port": (["migrate", "--transport", "tcp:127.0.0.1:http"],
                             "expected tcp:HOST:PORT"),
    "migrate tcp not loopback": (["migrate", "--transport", "tcp:192.0.2.1:7000"],
                                 "not a loopback"),
    "migrate report bad extension": (["migrate", "--image", "{good}", "--report", "{dir}/r.pdf"],
                                     "must end in .html"),
    "migrate report missing dir": (["migrate", "--image", "{good}", "--report",
                                    "{nodir}/r.html"], "does not exist"),
    "migrate report unwritable": (["migrate", "--image", "{good}", "--report",
                                   "/proc/r.html"], "cannot write"),
    "map missing image": (["map", "--image", "{missing}"], "not found"),
    "map not a PE": (["map", "--image", "{not_pe}"], "not a PE32+ image"),
    "map PE that is not the helper": (["map", "--mem", "32M", "--image", "{other}"],
                                      "did not announce"),
    "map garbage map": (["map", "--image", "{bad_map}"], "bad symbol map"),
    "map bad mem": (["map", "--mem", "12M"], "at least 32 MiB"),
    "map bad option": (["map", "--option", "both"], "invalid choice"),
    "map negative seed": (["map", "--seed", "-2"], "less than 0"),
    "map bad cbit": (["map", "--cbit", "40"], "invalid choice"),
    "map all and option": (["map", "--all", "--option", "shift"], "not allowed with"),
    "map shift-high without shift": (["map", "--image", "{good}", "--shift-high"],
                                     "shift option only"),
    "map output bad extension": (["map", "--image", "{good}", "-o", "{dir}/m.pdf"],
                                 "must end in .svg"),
    "map output missing dir": (["map", "--image", "{good}", "-o", "{nodir}/m.svg"],
                               "does not exist"),
    "map output is a dir": (["map", "--image", "{good}", "-o", "{dir}/"], "must end in"),
    "map output unwritable": (["map", "--image", "{good}", "-o", "/proc/m.svg"],
                              "cannot write"),
}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        status = main(argv, out=io.StringIO())
    except SystemExit as exc:  # argparse's errors
        status = exc.code  # type: ignore[assignment]
    return int(status or 0), capsys.readouterr().err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line(case: str, files: dict[str, Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    argv, fragment = CASES[case]
    argv = [a.format(**files) for a in argv]
    if argv and argv[0] == "migrate":
        argv.append("--no-progress")
    status, err = run_cli(argv, capsys)
    assert status != 0, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("helperfw") and "Traceback" not in err
    assert fragment in err, err


def test_missing_matplotlib_is_one_line(files: dict[str, Path], monkeypatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    for argv in (["map", "--image", str(files["good"]), "-o", str(files["dir"] / "m.svg")],
                 ["migrate", "--image", str(files["good"]), "--no-progress", "--report",
                  str(files["dir"] / "r.html")]):
        status, err = run_cli(argv, capsys)
        assert status == 1 and err.count("\n") == 1
        assert "needs matplotlib" in err and "pip install -e '.[plot]'" in err
    assert not (files["dir"] / "m.svg").exists()  # nothing written, nothing booted


def test_map_without_matplotlib_still_prints_the_table(files: dict[str, Path], monkeypatch,
                                                       capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = io.StringIO()
    assert main(["map", "--mem", "32M", "--image", str(files["good"])], out=out) == 0
    assert "virtual (the helper's page tables, walked)" in out.getvalue()


@pytest.mark.parametrize("argv", [["migrate", "--image", "{not_pe}"],
                                  ["migrate", "--image", "{good}", "--mem", "32M",
                                   "--transport", "file:{nodir}/x"]],
                         ids=["not-a-pe", "missing-dir"])
def test_as_a_program(argv: list[str], files: dict[str, Path]) -> None:
    """The two reports from the issue, run the way a user runs them."""
    proc = subprocess.run([sys.executable, "-m", "helperfw.cli",
                           *(a.format(**files) for a in argv), "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
