"""What EDK2's own BaseTools make of a platform: run as a script, print it as JSON.

    python tests/edk2_view.py WORKSPACE PLATFORM.dsc PLATFORM.fdf MODULE.inf

Uses BaseTools' Python code from PyPI (`edk2-basetools`) the way `build` and GenFds do: the
WorkspaceDatabase parses the DSC (components for X64) and the INFs, FdfParser parses the FDF with
its `!include`s, and for MODULE.inf GenFds' own FfsInfStatement resolves the module and picks the
rule it would apply, and Section.GetFileList finds the files each rule section would take. Only
the C tools (GenSec, GenFfs, GenFv) are not run. BaseTools keeps its state in module globals, so
tests run this in a fresh interpreter per platform.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

TARGET, TOOLCHAIN, ARCH = "DEBUG", "GCC", "X64"


def _setup(ws: Path) -> None:
    """The global state `build` and GenFds set before parsing (WORKSPACE, defines, logger)."""
    from edk2basetools.Common import EdkLogger, GlobalData
    from edk2basetools.Common.Misc import DirCache
    from edk2basetools.Common.MultipleWorkspace import MultipleWorkspace

    os.environ["WORKSPACE"] = str(ws)
    EdkLogger.Initialize()
    EdkLogger.SetLevel(EdkLogger.QUIET)
    MultipleWorkspace.setWs(str(ws), "")
    GlobalData.gWorkspace = str(ws)
    GlobalData.gAllFiles = DirCache(str(ws))
    GlobalData.gGlobalDefines.update(
        {"WORKSPACE": str(ws), "TARGET": TARGET, "TOOLCHAIN": TOOLCHAIN,
         "TOOL_CHAIN_TAG": TOOLCHAIN, "ARCH": ARCH}
    )  # fmt: skip


def _rel(ws: Path, path: object) -> str:
    return Path(str(path)).resolve().relative_to(ws).as_posix()


def _ffs(item: object) -> dict:
    """One entry of an FV: an INF statement (path, RuleOverride) or a FILE statement."""
    inf = getattr(item, "InfFileName", None)
    if inf is not None:
        return {"inf": inf, "rule_override": item.Rule}  # type: ignore[attr-defined]
    return {"file": getattr(item, "FvFileType", type(item).__name__)}


def _module(ws: Path, db: object, fdf: object, inf_path: str) -> dict | None:
    """GenFds' view of one module of DXEFV: its INF data and the rule it would apply."""
    from edk2basetools.Common.Misc import PathClass
    from edk2basetools.GenFds.Section import Section

    fv = fdf.Profile.FvDict.get("DXEFV")  # type: ignore[attr-defined]
    ffs = next((f for f in getattr(fv, "FfsList", [])
                if getattr(f, "InfFileName", None) == inf_path), None)
    if ffs is None:
        return None
    ffs.__InfParse__()
    rule = ffs.__GetRule__()
    rules = fdf.Profile.RuleDict  # type: ignore[attr-defined]
    sections = []
    for sec in rule.SectionList:
        files = []
        if sec.FileExtension is not None:
            found, _ = Section.GetFileList(ffs, sec.FileType, sec.FileExtension, {})
            files = [_rel(ws, f) for f in found]
        sections.append({"type": sec.SectionType, "ext": sec.FileExtension,
                         "optional": bool(sec.Optional), "files": files})
    inf = db.BuildObject[PathClass(inf_path, str(ws)), ARCH, TARGET, TOOLCHAIN]  # type: ignore
    return {
        # [Depex] as written in the INF, and what BaseTools turns into a DXE_DEPEX section
        "depex_written": " ".join(e.strip() for e in inf.DepexExpression[ARCH, inf.ModuleType]),
        "depex_used": inf.Depex[ARCH, inf.ModuleType],
        "base_name": ffs.BaseName, "guid": str(ffs.ModuleGuid).lower(),
        "module_type": ffs.ModuleType, "arch": ffs.CurrentArch, "version": ffs.VersionString,
        "binaries": [[b.Type, _rel(ws, b.Path)] for b in ffs.BinFileList],
        "sources": [str(s) for s in ffs.SourceFileList],
        "rule": next(name for name, r in rules.items() if r is rule),
        "ffs_type": rule.FvFileType, "name_guid": rule.NameGuid, "sections": sections,
    }  # fmt: skip


def view(ws: Path, dsc: str, fdf_path: str, inf_path: str) -> dict:
    """Parse the platform as build + GenFds would and describe the result."""
    from edk2basetools.Common.Misc import PathClass
    from edk2basetools.GenFds.FdfParser import FdfParser
    from edk2basetools.GenFds.GenFdsGlobalVariable import GenFdsGlobalVariable as G
    from edk2basetools.Workspace.WorkspaceDatabase import WorkspaceDatabase

    _setup(ws)
    platform_file = PathClass(dsc, str(ws))
    db = WorkspaceDatabase()
    platform = db.BuildObject[platform_file, ARCH, TARGET, TOOLCHAIN]
    components = [_rel(ws, m) for m in platform.Modules]
    G.WorkSpace, G.WorkSpaceDir, G.ActivePlatform = db, str(ws), platform_file
    G.TargetName, G.ToolChainTag, G.ArchList = TARGET, TOOLCHAIN, [ARCH]
    G.OutputDirDict = {ARCH: str(ws / "Build" / f"{TARGET}_{TOOLCHAIN}")}
    fdf = FdfParser(str(ws / fdf_path))
    fdf.ParseFile()
    G.FdfParser = fdf
    profile = fdf.Profile
    return {
        "components": components,
        "fds": {name: [r.RegionDataList for r in fd.RegionList]
                for name, fd in profile.FdDict.items()},
        "fvs": {name: [_ffs(f) for f in fv.FfsList] for name, fv in profile.FvDict.items()},
        "apriori": [_ffs(f) for a in profile.FvDict["DXEFV"].AprioriSectionList
                    for f in a.FfsList] if "DXEFV" in profile.FvDict else [],
        "rules": sorted(profile.RuleDict),
        "module": _module(ws, db, fdf, inf_path),
    }  # fmt: skip


if __name__ == "__main__":
    workspace, dsc_file, fdf_file, inf_file = sys.argv[1:5]
    print(json.dumps(view(Path(workspace).resolve(), dsc_file, fdf_file, inf_file)))
