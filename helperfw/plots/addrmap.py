"""Drawing of the mirror's address spaces (`helperfw map`), from an `emulate.addrmap.AddressMap`.

One panel per boot: the guest-physical space (the mirror's memslots) on the left, the virtual
space (the helper's page tables) on the right, and between them one band per page-table run
joining each VA range to the GPAs it translates to. Addresses grow upwards.

The scale: the addresses that matter span 4 KiB regions and 2^52-byte limits, so the vertical
axis is piecewise. Every address where something starts or ends (a span, a marker) is a break
point; each interval between two break points is drawn linearly, with a height that grows with
the logarithm of its size (`interval_height`). Small regions stay visible, huge gaps stay
bounded, and order and nesting are exact. Each label carries the exact address and size.
"""

from __future__ import annotations

import bisect
import itertools
import math
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass

from emulate.addrmap import (
    GUEST,
    OTHER,
    WINDOW,
    AddressMap,
    Marker,
    Span,
    human_size,
    page_summary,
)
from helperfw.plots import COLORS, new_figure
from helperfw.runtime.platform import PAGE_SIZE

PAGE = PAGE_SIZE  # the granule every range is drawn in
LOG_WEIGHT = 0.35  # interval height = 1 + LOG_WEIGHT * log2(size / 4 KiB)
# Sizes are in inches at 72 points per inch, the unit of an SVG: a browser shows the picture
# at this size, so labels are 10 px.
S = 10 / 7  # everything below was laid out for 7-point labels
FONT = 7.0 * S  # points, labels
LINE = 0.165 * S  # inches between label baselines
PANEL_W = 8.9 * S  # inches per panel
# x positions inside a panel, in inches from its left edge
X_GPA = (3.05 * S, 3.6 * S)
X_VA = (4.7 * S, 5.25 * S)
GAP_FILL = "#f0f0f0"
MARK_COLOR = "#b2182b"


@dataclass(frozen=True)
class Scale:
    """The piecewise axis: break points and the cumulative height at each."""

    points: tuple[int, ...]
    heights: tuple[float, ...]  # heights[i] = y of points[i]

    @property
    def top(self) -> float:
        return self.heights[-1]

    def y(self, addr: int) -> float:
        """Height of `addr`: linear inside its interval."""
        i = bisect.bisect_right(self.points, addr) - 1
        i = max(0, min(i, len(self.points) - 2))
        lo, hi = self.points[i], self.points[i + 1]
        frac = (addr - lo) / (hi - lo)
        return self.heights[i] + frac * (self.heights[i + 1] - self.heights[i])


def interval_height(size: int) -> float:
    """Drawn height of an interval of `size` bytes (1 for 4 KiB, +LOG_WEIGHT per doubling)."""
    return 1.0 + LOG_WEIGHT * math.log2(max(size, PAGE) / PAGE)


def scale_for(m: AddressMap) -> Scale:
    """Break points: 0, every span edge (both spaces) and every marker."""
    pts = {0}
    for s in (*m.gpa, *m.va):
        pts |= {s.start, s.end}
    pts |= {mk.addr for mk in m.markers}
    points = sorted(pts)
    heights = [0.0]
    for lo, hi in itertools.pairwise(points):
        heights.append(heights[-1] + interval_height(hi - lo))
    return Scale(tuple(points), tuple(heights))


# -- labels --------------------------------------------------------------------------------------
def _short(s: Span) -> str:
    if s.kind == WINDOW:
        return "RAM " + s.label.split(": ", 1)[1].split(",", 1)[0]
    if s.kind == GUEST:
        return "guest RAM 1:1"
    if s.kind == OTHER:
        return "unexplained mapping"
    return s.kind


def gpa_label(s: Span, m: AddressMap) -> str:
    """Two lines: what and how big (and whose DRAM), then where."""
    first = f"{_short(s)} · {human_size(s.size)}"
    if s.backing != "guest DRAM":
        first += f" · {s.backing}"
    if s.kind == WINDOW:
        first += f" · ram_addr {s.start - m.ram_base:#x}"
    return f"{first}\nGPA {s.start:#x}"


def va_label(s: Span) -> str:
    """Two lines: what, size, permissions, C-bit; then the VA, its GPA and the page sizes."""
    first = f"{_short(s)} · {human_size(s.size)} · {s.perms} · C={int(bool(s.encrypted))}"
    if not s.backed:
        first += " · no memslot"
    target = "same GPA" if s.gpa == s.start else f"GPA {s.gpa:#x}"
    return f"{first}\nVA {s.start:#x} → {target} · {page_summary(s.pages)}"


def marker_text(marks: list[Marker]) -> str:
    """One line per marker; a long one breaks before its parenthesis or after its colon."""
    out = []
    for mk in marks:
        text = mk.label
        if len(text) > 44:
            cut = text.find(" (") if " (" in text else text.find(": ") + 1
            text = text[:cut] + "\n   " + text[cut:].strip()
        out.append(text)
    return "\n".join(out)


def spread(targets: list[float], sizes: list[float], lo: float, hi: float) -> list[float]:
    """Centres near `targets` (ascending) for labels `sizes` tall, not overlapping, inside
    [lo, hi] where they fit."""
    ys: list[float] = []
    for t, h in zip(targets, sizes, strict=True):
        floor = lo + h / 2 if not ys else ys[-1] + (sizes[len(ys) - 1] + h) / 2
        ys.append(max(t, floor))
    if ys and ys[-1] + sizes[-1] / 2 > hi:
        ys[-1] = hi - sizes[-1] / 2
        for i in range(len(ys) - 2, -1, -1):
            ys[i] = min(ys[i], ys[i + 1] - (sizes[i] + sizes[i + 1]) / 2)
    return ys


# -- one panel -------------------------------------------------------------------------------------
def _gaps(spans: Iterable[Span], top: int) -> list[tuple[int, int]]:
    out, cursor = [], 0
    for s in sorted(spans, key=lambda s: s.start):
        if s.start > cursor:
            out.append((cursor, s.start))
        cursor = max(cursor, s.end)
    if cursor < top:
        out.append((cursor, top))
    return out


def draw_panel(ax, m: AddressMap, prefix: str, height_in: float) -> None:
    """Both spaces of one map on `ax` (x in inches, y in scale units)."""
    from matplotlib.patches import Polygon, Rectangle

    sc = scale_for(m)
    top_addr = sc.points[-1]
    ax.set_xlim(0, PANEL_W)
    ax.set_ylim(-0.5, sc.top + 0.5)
    ax.axis("off")
    units_per_in = (sc.top + 1.0) / height_in

    def bar(x: tuple[float, float], lo: int, hi: int, **kw: object) -> Rectangle:
        y0, y1 = sc.y(lo), sc.y(hi)
        r = Rectangle((x[0], y0), x[1] - x[0], y1 - y0, **kw)  # type: ignore[arg-type]
        ax.add_patch(r)
        return r

    for space, x, spans in (("gpa", X_GPA, m.gpa), ("va", X_VA, m.va)):
        for lo, hi in _gaps(spans, top_addr):
            bar(x, lo, hi, facecolor=GAP_FILL, edgecolor="#c8c8c8", linewidth=0.4)
            if sc.y(hi) - sc.y(lo) > 1.2:
                ax.text(sum(x) / 2, (sc.y(lo) + sc.y(hi)) / 2, human_size(hi - lo),
                        ha="center", va="center", fontsize=FONT - 1, color="#777777",
                        style="italic")
    for s in m.gpa:
        r = bar(X_GPA, s.start, s.end, facecolor=COLORS[s.kind], edgecolor="black",
                linewidth=0.4, hatch="xx" if s.backing != "guest DRAM" else None)
        r.set_gid(f"{prefix}{s.ident}")
    for s in m.va:
        r = bar(X_VA, s.start, s.end, facecolor=COLORS[s.kind], edgecolor="black",
                linewidth=0.4, alpha=1.0 if s.backed else 0.35,
                hatch=None if s.encrypted else "////")
        r.set_gid(f"{prefix}{s.ident}")
        g0, g1 = s.gpa or 0, (s.gpa or 0) + s.size
        band = Polygon([(X_GPA[1], sc.y(g0)), (X_VA[0], sc.y(s.start)), (X_VA[0], sc.y(s.end)),
                        (X_GPA[1], sc.y(g1))], closed=True, facecolor=COLORS[s.kind],
                       alpha=0.22 if s.backed else 0.08, edgecolor="none")
        band.set_gid(f"{prefix}translate-{s.ident}")
        ax.add_patch(band)
    _draw_markers(ax, m, sc, prefix)
    line = LINE * units_per_in
    left = [(sc.y((s.start + s.end) // 2), gpa_label(s, m), "black", f"{prefix}label-{s.ident}")
            for s in m.gpa]
    right = [(sc.y((s.start + s.end) // 2), va_label(s), "black", f"{prefix}label-{s.ident}")
             for s in m.va]
    for side, marks in _marker_groups(m).items():
        item = (sc.y(marks[0].addr), marker_text(marks), MARK_COLOR,
                f"{prefix}label-marker-{marks[0].addr:x}-{side}")
        (left if side.startswith("gpa") else right).append(item)
    _labels(ax, left, X_GPA[0], -1, line, sc.top)
    _labels(ax, right, X_VA[1], +1, line, sc.top)
    head = sc.top + 0.4
    ax.text(sum(X_GPA) / 2, head, "guest-physical\n(mirror memslots)", ha="center", va="bottom",
            fontsize=FONT, weight="bold")
    ax.text(sum(X_VA) / 2, head, "virtual\n(helper page tables)", ha="center", va="bottom",
            fontsize=FONT, weight="bold")


def _marker_groups(m: AddressMap) -> dict[str, list[Marker]]:
    """Markers by label side: GPA-only ones on the left, the rest on the right; markers at one
    address share one label."""
    out: dict[str, dict[int, list[Marker]]] = {"gpa": {}, "va": {}}
    for mk in m.markers:
        side = "gpa" if mk.spaces == ("gpa",) else "va"
        out[side].setdefault(mk.addr, []).append(mk)
    return {f"{side}-{addr:x}": marks for side, d in out.items() for addr, marks in d.items()}


def _draw_markers(ax, m: AddressMap, sc: Scale, prefix: str) -> None:
    for mk in m.markers:
        x0 = X_GPA[0] - 0.12 * S if "gpa" in mk.spaces else X_VA[0]
        x1 = X_VA[1] + 0.12 * S if "va" in mk.spaces else X_GPA[1]
        y = sc.y(mk.addr)
        (line,) = ax.plot([x0, x1], [y, y], color=MARK_COLOR, linewidth=0.9,
                          linestyle=(0, (4, 2)))
        line.set_gid(f"{prefix}marker-{mk.key}")


def _labels(ax, items: list[tuple[float, str, str, str]], x_edge: float, direction: int,
            line: float, top: float) -> None:
    """Texts beside a bar, spread apart, each joined to its target height by a leader line."""
    items = sorted(items, key=lambda it: it[0])
    sizes = [line * (it[1].count("\n") + 1.35) for it in items]
    ys = spread([it[0] for it in items], sizes, 0.0, top)
    x_elbow = x_edge + direction * 0.18 * S
    x_text = x_edge + direction * 0.3 * S
    for (target, text, color, gid), y in zip(items, ys, strict=True):
        ax.plot([x_edge, x_elbow, x_text - direction * 0.04 * S], [target, y, y], color="#888888",
                linewidth=0.4)
        t = ax.text(x_text, y, text, ha="left" if direction > 0 else "right", va="center",
                    fontsize=FONT, color=color)
        t.set_gid(gid)


# -- the figure ------------------------------------------------------------------------------------
def _legend(fig, ncol: int) -> None:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=COLORS[k], edgecolor="black", linewidth=0.4, label=t) for k, t in (
        ("code", "code (.text)"), ("rodata", "rodata"),
        ("data", "data: context, stack, page tables"), ("mailbox", "mailbox (host-visible)"),
        ("window", "RAM window: ram_addr r at ram_base + r"),
        ("guest", "guest memory, 1:1 (shift)"))]
    handles += [
        Patch(facecolor="white", edgecolor="black", hatch="////", label="C=0: shared, no C-bit"),
        Patch(facecolor="white", edgecolor="black", hatch="xx",
              label="mirror-only copy (isolated)"),
        Patch(facecolor=COLORS["guest"], alpha=0.35, edgecolor="black",
              label="mapped, no memslot behind it"),
        Patch(facecolor=GAP_FILL, edgecolor="#c8c8c8", label="nothing mapped (size written in)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=FONT, frameon=False,
               bbox_to_anchor=(0.5, 0.42 * S / fig.get_figheight()))


def panel_height(m: AddressMap) -> float:
    """Inches of axis a map needs so its labels fit without overlapping."""
    groups = _marker_groups(m)
    lines = {side: sum(len(v) + 0.35 for k, v in groups.items() if k.startswith(side))
             for side in ("gpa", "va")}
    left = 2.35 * len(m.gpa) + lines["gpa"]
    right = 2.35 * len(m.va) + lines["va"]
    return max(6.0 * S, LINE * (max(left, right) + 4))


def draw_maps(maps: list[AddressMap]):
    """One figure with a panel per map, side by side."""
    axis_h = max(panel_height(m) for m in maps)
    head = 0.75 * S
    foot = (1.15 if len(maps) > 1 else 1.45) * S
    fig = new_figure(PANEL_W * len(maps), axis_h + head + foot)
    h = fig.get_figheight()
    for i, m in enumerate(maps):
        ax = fig.add_axes((i / len(maps), foot / h, 1 / len(maps), axis_h / h))
        prefix = f"{m.option_name}-c{m.cbit}-" if len(maps) > 1 else ""
        draw_panel(ax, m, prefix, axis_h)
        ax.set_title(f"option {m.title}: ram_addr 0 at {m.ram_base:#x}, window "
                     f"{human_size(m.window_size)} of {human_size(m.ram_max)} allowed",
                     fontsize=FONT + 2, pad=28 * S)
    _legend(fig, 5 if len(maps) > 1 else 3)
    note = ("Addresses grow upwards. The axis is piecewise: each interval between two marked "
            "addresses is linear inside and drawn with height 1 + "
            f"{LOG_WEIGHT}·log2(size / 4 KiB), so 4 KiB regions stay visible next to 2^52-byte "
            "limits. Bands join each virtual range to the GPAs its page-table entries point at. "
            "Read from the booted helper: BootInfo, the mirror's memslots, its page tables.")
    width = int(fig.get_figwidth() * 17 / S)  # characters per line at this font size
    fig.text(0.5, 0.01, "\n".join(textwrap.wrap(note, width)), ha="center", va="bottom",
             fontsize=FONT - 0.5, color="#444444")
    return fig
