"""Pictures of the helper: the mirror's address spaces (`addrmap`) and a migration report
(`report`). Drawing needs matplotlib, an optional extra (`pip install -e '.[plot]'`); the data
they draw comes from plain modules (`emulate.addrmap`, `emulate.timeline`) that do not.

Output is byte-reproducible: no dates, a fixed SVG hash salt (so element ids are the same on
every run), no software version in the files, and the non-interactive Agg/SVG backends only
(no pyplot, so no display is ever touched).
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INSTALL_HINT = "pip install -e '.[plot]'"
FORMATS = {".svg": "svg", ".png": "png"}
PNG_DPI = 110
# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies
COLORS = {
    "code": "#D55E00", "rodata": "#E69F00", "data": "#0072B2", "mailbox": "#009E73",
    "window": "#CC79A7", "guest": "#A6BDDB", "other": "#999999",
    "source": "#0072B2", "destination": "#D55E00", "guest-exits": "#999999",
}


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed: the caller prints this as one line."""


def require_matplotlib() -> None:
    """Raise PlotUnavailable unless matplotlib can be imported (check before slow work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(f"drawing needs matplotlib, the optional 'plot' extra: "
                              f"{INSTALL_HINT}") from None


def format_for(path: Path) -> str:
    """'svg' or 'png' from the file name; ValueError for anything else."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: picture must end in {' or '.join(FORMATS)}")
    return fmt


def new_figure(width: float, height: float) -> Figure:
    """A figure bound to no GUI backend (pyplot is never imported)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def render(fig: Figure, fmt: str, *, salt: str = "helperfw") -> bytes:
    """The figure as SVG or PNG bytes, identical on every run with the same matplotlib.

    SVG keeps text as <text> elements (svg.fonttype 'none'): labels stay searchable, selectable
    and testable; `salt` seeds the ids matplotlib derives for clip paths and must differ between
    SVGs inlined into one HTML page."""
    import matplotlib

    buf = io.BytesIO()
    rc = {"svg.hashsalt": salt, "svg.fonttype": "none", "svg.image_inline": True}
    with matplotlib.rc_context(rc):
        if fmt == "svg":
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": "helperfw"})
        elif fmt == "png":
            fig.savefig(buf, format="png", dpi=PNG_DPI, metadata={"Software": None})
        else:
            raise ValueError(f"unknown picture format {fmt!r}")
    return buf.getvalue()


_AUTO_ID = re.compile(r'id="([A-Za-z][A-Za-z0-9.]*_\d+)"')


def svg_fragment(svg: bytes, prefix: str) -> str:
    """An SVG document as an element to inline into HTML: without its XML prologue, and with
    the ids matplotlib numbers per document ("axes_1", "patch_3") prefixed, so several SVGs in
    one page never share an id. Clip-path ids are already distinct (salted hashes) and ids we
    set ourselves (set_gid) use hyphens and stay as they are."""
    text = svg.decode()
    return _AUTO_ID.sub(rf'id="{prefix}\1"', text[text.index("<svg"):])
