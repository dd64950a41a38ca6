"""EDK2 integration files, checked by EDK2's own parsers: the snippets go into a platform shaped
like OvmfPkgX64/AmdSevX64 exactly where docs/INTEGRATION.md says, and BaseTools (PyPI
`edk2-basetools`, the code `build` and GenFds run) and edk2-pytool-library must then see the real
DXEFV with the module in it, the binary rule applied to it, and nothing replaced. The C header
compiles.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from edk2toollib.uefi.edk2.parsers.dsc_parser import DscParser
from edk2toollib.uefi.edk2.parsers.fdf_parser import FdfParser
from edk2toollib.uefi.edk2.path_utilities import Edk2Path

from ovmf_glue.edk2 import (
    DSC_INC,
    EFI_NAME,
    FDF_FV_INC,
    FDF_RULE_INC,
    INF_DIR,
    INF_PATH,
    MIGRATION_HELPER_FILE_GUID,
    RULE_SECTION,
    fdf_fv_snippet,
    guid_c_initializer,
    header_text,
    write_integration_files,
)
from ovmf_glue.pe import package_pe
from ovmf_glue.sample import sample_image

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).resolve().parent / "edk2_platform"
VIEW = Path(__file__).resolve().parent / "edk2_view.py"
DOCS = ROOT / "docs" / "INTEGRATION.md"
FV_INCLUDE = f"!include {INF_DIR}/{FDF_FV_INC}"
RULE_INCLUDE = f"!include {INF_DIR}/{FDF_RULE_INC}"
DSC_INCLUDE = f"!include {INF_DIR}/{DSC_INC}"
BASE_RULES = [
    "RULE.COMMON.DXE_CORE", "RULE.COMMON.DXE_DRIVER", "RULE.COMMON.DXE_RUNTIME_DRIVER",
    "RULE.COMMON.UEFI_APPLICATION", "RULE.COMMON.UEFI_APPLICATION.BINARY",
    "RULE.COMMON.UEFI_DRIVER", "RULE.COMMON.UEFI_DRIVER.BINARY",
]  # fmt: skip
APRIORI = ["MdeModulePkg/Universal/DevicePathDxe/DevicePathDxe.inf", "OvmfPkg/AmdSevDxe/AmdSevDxe.inf"]


@dataclass(frozen=True)
class Platform:
    """One fixture platform: its files, and what a correct integration must leave in it."""

    dsc: str
    fdf: str
    anchor: str  # the documented FDF line the FV snippet's !include follows
    components: tuple[str, ...]  # the DSC's own X64 components, in order (helper excluded)
    dxefv: tuple[str, ...]  # DXEFV's INF lines as the build sees them, helper included


PLATFORMS = {
    "OvmfPkgX64": Platform(
        "OvmfPkg/OvmfPkgX64.dsc", "OvmfPkg/OvmfPkgX64.fdf", "INF  OvmfPkg/IoMmuDxe/IoMmuDxe.inf",
        ("MdeModulePkg/Core/Dxe/DxeMain.inf",
         "MdeModulePkg/Universal/ReportStatusCodeRouter/RuntimeDxe/ReportStatusCodeRouterRuntimeDxe.inf",
         "MdeModulePkg/Core/RuntimeDxe/RuntimeDxe.inf", "UefiCpuPkg/CpuDxe/CpuDxe.inf",
         "OvmfPkg/AmdSevDxe/AmdSevDxe.inf", "OvmfPkg/IoMmuDxe/IoMmuDxe.inf",
         "ShellPkg/Application/Shell/Shell.inf"),
        ("MdeModulePkg/Core/Dxe/DxeMain.inf",
         "MdeModulePkg/Universal/ReportStatusCodeRouter/RuntimeDxe/ReportStatusCodeRouterRuntimeDxe.inf",
         "MdeModulePkg/Core/RuntimeDxe/RuntimeDxe.inf", "UefiCpuPkg/CpuDxe/CpuDxe.inf",
         "OvmfPkg/AmdSevDxe/AmdSevDxe.inf", "OvmfPkg/IoMmuDxe/IoMmuDxe.inf", INF_PATH,
         "ShellPkg/Application/Shell/Shell.inf"),
    ),
    "AmdSevX64": Platform(
        "OvmfPkg/AmdSev/AmdSevX64.dsc", "OvmfPkg/AmdSev/AmdSevX64.fdf",
        "INF OvmfPkg/AmdSev/SecretDxe/SecretDxe.inf",
        ("MdeModulePkg/Core/Dxe/DxeMain.inf", "MdeModulePkg/Core/RuntimeDxe/RuntimeDxe.inf",
         "UefiCpuPkg/CpuDxe/CpuDxe.inf", "OvmfPkg/AmdSev/SecretDxe/SecretDxe.inf",
         "OvmfPkg/AmdSev/Grub/Grub.inf", "OvmfPkg/AmdSevDxe/AmdSevDxe.inf",
         "MdeModulePkg/Universal/Variable/RuntimeDxe/VariableRuntimeDxe.inf"),
        ("MdeModulePkg/Core/Dxe/DxeMain.inf", "MdeModulePkg/Core/RuntimeDxe/RuntimeDxe.inf",
         "UefiCpuPkg/CpuDxe/CpuDxe.inf", "OvmfPkg/AmdSev/SecretDxe/SecretDxe.inf", INF_PATH,
         "OvmfPkg/AmdSev/Grub/Grub.inf", "OvmfPkg/AmdSevDxe/AmdSevDxe.inf",
         "MdeModulePkg/Universal/Variable/RuntimeDxe/VariableRuntimeDxe.inf"),
    ),
}  # fmt: skip


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


def _stub_inf(path: Path) -> None:
    """A minimal INF for a fixture module the platform lists (the DSC parser checks they exist)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    guid = uuid.uuid5(MIGRATION_HELPER_FILE_GUID, path.as_posix())
    path.write_text(
        f"[Defines]\n  INF_VERSION = 0x00010005\n  BASE_NAME = {path.stem}\n"
        f"  FILE_GUID = {guid}\n  MODULE_TYPE = DXE_DRIVER\n"
    )


def make_workspace(root: Path) -> Path:
    """The fixture tree plus what docs/INTEGRATION.md says to copy into OvmfPkg/MigrationHelper."""
    shutil.copytree(FIXTURE, root)
    write_integration_files(root / INF_DIR, structs=[FakeStruct()], constants=CONSTANTS)
    (root / INF_DIR / EFI_NAME).write_bytes(package_pe(sample_image(), entry="efi_main"))
    modules = {m for p in PLATFORMS.values() for m in (*p.components, *p.dxefv)} | set(APRIORI)
    for inf in modules - {INF_PATH}:
        _stub_inf(root / inf)
    return root


def basetools_view(ws: Path, platform: Platform) -> dict:
    """BaseTools' view of the platform (tests/edk2_view.py in a fresh interpreter)."""
    r = subprocess.run(
        [sys.executable, str(VIEW), str(ws), platform.dsc, platform.fdf, INF_PATH],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0, f"BaseTools refused {platform.fdf}:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("edk2") / "ws")


@pytest.fixture(scope="module", params=sorted(PLATFORMS))
def platform(request: pytest.FixtureRequest) -> Platform:
    return PLATFORMS[request.param]


@pytest.fixture(scope="module")
def view(workspace: Path, platform: Platform) -> dict:
    return basetools_view(workspace, platform)


def test_fixture_includes_the_snippets_where_the_docs_say(platform: Platform) -> None:
    """The fixture follows the docs literally: each !include line, after the documented anchor
    or as the last line, appears in docs/INTEGRATION.md exactly so."""
    docs = [line.strip() for line in DOCS.read_text().splitlines()]  # code blocks are indented
    docs_pairs = set(pairwise(docs))
    fdf = (FIXTURE / platform.fdf).read_text().splitlines()
    dsc = (FIXTURE / platform.dsc).read_text().splitlines()
    assert fdf[fdf.index(FV_INCLUDE) - 1] == platform.anchor
    assert (platform.anchor, FV_INCLUDE) in docs_pairs
    assert fdf[-1] == RULE_INCLUDE and RULE_INCLUDE in docs
    assert dsc[-1] == DSC_INCLUDE and DSC_INCLUDE in docs
    assert f"`{platform.fdf}`:" in docs and f"`{platform.dsc}`" in " ".join(docs)


def test_dxefv_keeps_its_modules_and_gains_the_helper(view: dict, platform: Platform) -> None:
    """Nothing replaced: DXEFV is the platform's volume with the helper where it was included,
    still inside FVMAIN_COMPACT in the FD, and the APRIORI list is untouched."""
    dxefv = view["fvs"]["DXEFV"]
    assert [e["inf"] for e in dxefv] == list(platform.dxefv)
    assert [e["rule_override"] for e in dxefv if e["inf"] == INF_PATH] == ["BINARY"]
    assert all(e["rule_override"] is None for e in dxefv if e["inf"] != INF_PATH)
    assert sorted(view["fvs"]) == ["DXEFV", "FVMAIN_COMPACT"]
    assert view["fvs"]["FVMAIN_COMPACT"] == [{"file": "FV_IMAGE"}]
    assert view["fds"] == {"OVMF": [["FVMAIN_COMPACT"]]}
    assert [e["inf"] for e in view["apriori"]] == APRIORI


def test_binary_rule_is_applied_and_takes_the_efi(view: dict) -> None:
    """GenFds picks the .BINARY rule for the module; its PE32 section takes MigrationHelper.efi
    from the INF's [Binaries]; no DXE_DEPEX section; the platform's own rules are all kept."""
    m = view["module"]
    assert m["rule"] == RULE_SECTION.upper() == "RULE.COMMON.DXE_RUNTIME_DRIVER.BINARY"
    assert (m["ffs_type"], m["name_guid"]) == ("DRIVER", "$(NAMED_GUID)")
    assert [(s["type"], s["ext"], s["optional"]) for s in m["sections"]] == [
        ("PE32", ".efi", False), ("UI", None, True), ("VERSION", None, True)]
    assert m["sections"][0]["files"] == [f"{INF_DIR}/{EFI_NAME}"]
    assert view["rules"] == sorted([*BASE_RULES, RULE_SECTION.upper()])


def test_dsc_lists_the_module_for_x64(view: dict, platform: Platform) -> None:
    assert view["components"] == [*platform.components, INF_PATH]
    assert view["module"]["arch"] == "X64"


def test_inf_is_a_binary_runtime_driver_without_pretend_depex(view: dict) -> None:
    """No [Depex]: BaseTools ignores one in a binary module, so the file must not carry one."""
    m = view["module"]
    assert (m["base_name"], m["module_type"], m["version"]) == (
        "MigrationHelper", "DXE_RUNTIME_DRIVER", "0.1")
    assert uuid.UUID(m["guid"]) == MIGRATION_HELPER_FILE_GUID
    assert m["binaries"] == [["PE32", f"{INF_DIR}/{EFI_NAME}"]]
    assert m["sources"] == []
    assert m["depex_written"] == "" and m["depex_used"] == []


def test_pytool_library_agrees(workspace: Path, platform: Platform) -> None:
    """edk2-pytool-library (what Tianocore's stuart CI runs) sees the same DXEFV and components."""
    paths = Edk2Path(str(workspace), [])
    fdf = FdfParser().SetEdk2Path(paths)
    fdf.ParseFile(platform.fdf)
    # its list reads the APRIORI block's lines too, and keeps each statement's options
    assert [e.split()[-1] for e in fdf.FVs["DXEFV"]["Infs"]] == [*APRIORI, *platform.dxefv]
    assert f"RuleOverride = BINARY {INF_PATH}" in fdf.FVs["DXEFV"]["Infs"]
    dsc = DscParser().SetEdk2Path(paths)
    dsc.SetInputVars({"TARGET": "DEBUG", "ARCH": "X64", "TOOL_CHAIN_TAG": "GCC"})
    dsc.ParseFile(platform.dsc)
    assert sorted(dsc.GetMods()) == sorted([*platform.components, INF_PATH])


def test_a_snippet_with_a_volume_header_replaces_the_volume(tmp_path: Path) -> None:
    """Why the FV snippet has no header (finding A): with `[FV.DXEFV]` in the included file,
    FdfParser starts a new volume of that name and the platform's DXEFV is gone."""
    ws = make_workspace(tmp_path / "ws")
    (ws / INF_DIR / FDF_FV_INC).write_text("[FV.DXEFV]\n" + fdf_fv_snippet())
    platform = PLATFORMS["AmdSevX64"]
    dxefv = basetools_view(ws, platform)["fvs"]["DXEFV"]
    assert [e["inf"] for e in dxefv] == list(platform.dxefv[platform.dxefv.index(INF_PATH) :])


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
        "MigrationHelper.rule.fdf.inc",
        "MigrationHelper.dsc.inc",
        "MigrationHelper.h",
    ]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
