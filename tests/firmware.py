"""The firmware the tests run: built once per test process, from the sources of this checkout,
into a temporary directory (never the repository's `out/`, which may be stale or belong to a
developer's own build).

Tests take it from the session-scoped `firmware` fixture (tests/conftest.py); helpers that are
not fixtures themselves (tests/mirror_host.py) call `firmware()` directly, which returns the
same build.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from helperfw.build import FirmwareBuild, build_firmware


@functools.cache
def firmware() -> FirmwareBuild:
    """The one build of this process (image, map, EDK2 files, digests); removed at exit."""
    out = Path(tempfile.mkdtemp(prefix="mh-fw-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return build_firmware(out)


def efi_path() -> Path:
    """MigrationHelper.efi of that build (its .map lies beside it)."""
    return firmware().efi
