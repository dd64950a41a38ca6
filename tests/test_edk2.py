"""EDK2 integration files: the .inf parses as a binary DXE runtime module, the header compiles."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from ovmf_glue.edk2 import (
    INF_PATH,
    MIGRATION_HELPER_FILE_GUID,
    dsc_snippet,
    fdf_snippet,
    guid_c_initializer,
    header_text,
    inf_text,
    write_integration_files,
)


class FakeStruct:
    """Stands in for a DSL @struct: the header only needs c_decl()."""

    def c_decl(self) -> str:
        return """\
typedef struct {
  uint64_t ram_addr;
  uint32_t flags;
  int32_t status;
} MhBatchEntry;
_Static_assert(sizeof(MhBatchEntry) == 16, "MhBatchEntry size");
_Static_assert(offsetof(MhBatchEntry, status) == 12, "MhBatchEntry.status offset");
"""


CONSTANTS = [
    ("MH_PROTOCOL_VERSION", 1, "uint32_t"),
    ("MH_SLOTS", 64, "uint32_t"),
    ("MH_RAM_BASE", 1 << 32, "uint64_t"),
    ("MH_E_RANGE", -3, "int32_t"),
    ("MH_I64_MIN", -(2**63), "int64_t"),
]


def _inf_sections(text: str) -> configparser.ConfigParser:
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    cp = configparser.ConfigParser(allow_no_value=True, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(body)
    return cp


def test_inf_is_binary_runtime_driver() -> None:
    cp = _inf_sections(inf_text("1.2"))
    d = cp["Defines"]
    assert d["BASE_NAME"] == "MigrationHelper"
    assert d["MODULE_TYPE"] == "DXE_RUNTIME_DRIVER"
    assert uuid.UUID(d["FILE_GUID"]) == MIGRATION_HELPER_FILE_GUID
    assert d["VERSION_STRING"] == "1.2"
    assert int(d["INF_VERSION"], 16) >= 0x00010005
    assert list(cp["Binaries.X64"]) == ["PE32|MigrationHelper.efi|*"]
    assert list(cp["Depex"]) == ["TRUE"]
    assert "Sources" not in cp


def test_snippets_reference_the_inf() -> None:
    fdf = fdf_snippet()
    assert "[FV.DXEFV]" in fdf and f"INF  RuleOverride = BINARY {INF_PATH}" in fdf
    assert "[Rule.Common.DXE_RUNTIME_DRIVER.BINARY]" in fdf and "|.efi" in fdf
    assert INF_PATH == "OvmfPkg/MigrationHelper/MigrationHelper.inf"
    assert INF_PATH in dsc_snippet() and "[Components.X64]" in dsc_snippet()


def test_guid_initializer_matches_efi_guid_layout() -> None:
    g = uuid.UUID("adf956ad-e98c-484c-ae11-b51c7d336447")
    assert guid_c_initializer(g) == (
        "{0xadf956ad, 0xe98c, 0x484c, {0xae, 0x11, 0xb5, 0x1c, 0x7d, 0x33, 0x64, 0x47}}"
    )


def test_header_rejects_bad_constants() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        header_text(constants=[("X", 256, "uint8_t")])
    with pytest.raises(ValueError, match="C type"):
        header_text(constants=[("X", 1, "UINT64")])
    with pytest.raises(ValueError, match="identifier"):
        header_text(constants=[("1X", 1, "uint8_t")])
    with pytest.raises(ValueError, match="duplicate"):
        header_text(constants=[("X", 1, "uint8_t"), ("X", 2, "uint8_t")])


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_header_compiles_and_values_match(tmp_path: Path) -> None:
    write_integration_files(tmp_path, structs=[FakeStruct()], constants=CONSTANTS)
    header = (tmp_path / "MigrationHelper.h").read_text()
    assert header.count("#ifndef MIGRATION_HELPER_H_") == 1
    prog = tmp_path / "check.c"
    # Included twice to prove the guard; prints every constant and the struct size.
    prog.write_text(
        '#include "MigrationHelper.h"\n#include "MigrationHelper.h"\n#include <stdio.h>\n'
        "int main(void) {\n"
        + "".join(f'  printf("%lld\\n", (long long){name});\n' for name, _, _ in CONSTANTS)
        + '  printf("%zu\\n", sizeof(MhBatchEntry));\n  return 0;\n}\n'
    )
    exe = tmp_path / "check"
    subprocess.run(
        ["gcc", "-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-o", str(exe), str(prog)],
        check=True,
        capture_output=True,
        text=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split()
    want = [str(v if v < 2**63 else v - 2**64) for _, v, _ in CONSTANTS] + ["16"]
    assert out == want


def test_integration_files_are_reproducible(tmp_path: Path) -> None:
    a = write_integration_files(tmp_path / "a", structs=[FakeStruct()], constants=CONSTANTS)
    b = write_integration_files(tmp_path / "b", structs=[FakeStruct()], constants=CONSTANTS)
    assert [p.name for p in a] == [
        "MigrationHelper.inf",
        "MigrationHelper.fdf.inc",
        "MigrationHelper.dsc.inc",
        "MigrationHelper.h",
    ]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
