"""A private copy of the repository in which a mutant's source is spliced.

The compiler reads every DSL function from its source file, and several tests build the firmware
in a subprocess (build.py), so a mutant is tested by writing it into a copy of the tree and
running there; the repository itself is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.mutation.mutants import Mutant

ROOT = Path(__file__).resolve().parents[2]
COPIED = ("helperfw", "emulate", "ovmf_glue", "tests", "build.py", "pyproject.toml")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")


class Workspace:
    """A copy of the sources under `root`; `apply(m)` writes a mutant in, `restore()` undoes
    it. Line counts are kept, so line numbers (and Python's view of them) do not move."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="mh-mutant-"))
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, self.root / name, ignore=_IGNORE, dirs_exist_ok=True)
            else:
                shutil.copy2(src, self.root / name)
        self._applied: tuple[Path, str] | None = None

    def path_of(self, m: Mutant) -> Path:
        return self.root / m.path.relative_to(ROOT)

    def apply(self, m: Mutant) -> None:
        self.restore()
        target = self.path_of(m)
        original = target.read_text()
        target.write_text(m.mutated_source(original))
        self._applied = (target, original)

    def restore(self) -> None:
        if self._applied is not None:
            path, text = self._applied
            path.write_text(text)
            self._applied = None

    def env(self) -> dict[str, str]:
        """Environment for a process that must import this copy, not the repository."""
        e = dict(os.environ)
        e["PYTHONPATH"] = str(self.root)
        e["PYTHONDONTWRITEBYTECODE"] = "1"
        return e

    def build_firmware(self, out: Path) -> Path:
        """build.py in the copy (with whatever mutant is applied); returns the .efi."""
        r = subprocess.run([sys.executable, "build.py", "--out", str(out)], check=False,
                           cwd=self.root, env=self.env(), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"mutant build failed: {r.stderr.strip().splitlines()[-1:]}")
        return out / "MigrationHelper.efi"

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def mutant_firmware(m: Mutant) -> Path:
    """The firmware built with one mutant applied (in a temporary copy of the tree)."""
    ws = Workspace()
    try:
        ws.apply(m)
        return ws.build_firmware(Path(tempfile.mkdtemp(prefix="mh-mutant-out-")))
    finally:
        ws.remove()
