"""Load DSL source written by a test into a real file (so inspect finds it and errors carry a
real file:line:col)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from types import ModuleType


def load_module(tmp_path: Path, body: str, name: str = "snippet_mod") -> ModuleType:
    """`from helperfw import *` + `body`, written to tmp_path/<name>.py and imported."""
    path = tmp_path / f"{name}.py"
    path.write_text("from helperfw import *\n\n" + textwrap.dedent(body))
    spec = importlib.util.spec_from_file_location(f"snip_{abs(hash((str(path), body)))}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
