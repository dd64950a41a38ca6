"""The migration report (`helperfw migrate --report PATH`), drawn from `emulate.timeline.ReportData`.

Four charts: pages sent per round against pages dirtied while it ran (does pre-copy converge?),
throughput over time on each side, VM exits per page per round, and where the stop-and-copy
time went; plus the totals and the verification result. As HTML (one self-contained file: the
charts are inline SVG, no scripts, no external files) or as one SVG with the same content.
"""

from __future__ import annotations

import html
import re
import textwrap
from pathlib import Path

from emulate.timeline import DESTINATION, SOURCE, ReportData
from helperfw.plots import COLORS, new_figure, render, svg_fragment

FONT = 10.5  # points = SVG px: what a browser shows at natural size
REPORT_FORMATS = (".html", ".htm", ".svg")
PASS_COLOR, FAIL_COLOR = "#1a7f37", "#b2182b"


def report_format(path: Path) -> str:
    """'html' or 'svg' from the file name; ValueError for anything else."""
    suffix = path.suffix.lower()
    if suffix not in REPORT_FORMATS:
        raise ValueError(f"{path}: report must end in {', '.join(REPORT_FORMATS)}")
    return "svg" if suffix == ".svg" else "html"


def slug(text: str) -> str:
    """An id fragment: 'pages/s' -> 'pages-s'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _round_names(d: ReportData) -> list[str]:
    return [f"{r.round}\n{'stop-and-copy' if r.final else 'pre-copy'}" for r in d.rounds]


def _style(ax, title: str) -> None:
    ax.set_title(title, fontsize=FONT + 1.5, loc="left")
    ax.tick_params(labelsize=FONT)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", color="#e0e0e0", linewidth=0.6)
    ax.set_axisbelow(True)


def _value(ax, x: float, y: float, text: str, gid: str, **kw: object) -> None:
    t = ax.text(x, y, text, ha="center", va="bottom", fontsize=FONT - 1, **kw)
    t.set_gid(gid)


# -- the charts ------------------------------------------------------------------------------------
def chart_rounds(ax, d: ReportData) -> None:
    """Pages sent per round (private sealed + shared raw) next to pages dirtied while it ran."""
    xs = range(len(d.rounds))
    w = 0.38
    priv = [r.private for r in d.rounds]
    shared = [r.shared for r in d.rounds]
    dirt = [r.dirtied for r in d.rounds]
    b1 = ax.bar([x - w / 2 for x in xs], priv, w, color=COLORS["source"],
                label="sent: private (sealed by the helper)")
    b2 = ax.bar([x - w / 2 for x in xs], shared, w, bottom=priv, color="#56B4E9",
                label="sent: shared (raw)")
    b3 = ax.bar([x + w / 2 for x in xs], dirt, w, color=COLORS["destination"],
                label="dirtied while the round ran")
    for r, p1, p2, p3, x in zip(d.rounds, b1, b2, b3, xs, strict=True):
        p1.set_gid(f"bar-round-{r.round}-private")
        p2.set_gid(f"bar-round-{r.round}-shared")
        p3.set_gid(f"bar-round-{r.round}-dirtied")
        _value(ax, x - w / 2, r.pages * 1.08, f"{r.pages}", f"value-round-{r.round}-pages")
        _value(ax, x + w / 2, max(r.dirtied, 1) * 1.08, f"{r.dirtied}",
               f"value-round-{r.round}-dirtied")
    ax.set_yscale("log")
    ax.set_ylim(0.8, max(r.pages for r in d.rounds) * 4)
    ax.set_xticks(list(xs), _round_names(d))
    ax.set_ylabel("pages (log scale)", fontsize=FONT)
    ax.legend(fontsize=FONT - 1, frameon=False, loc="upper right")
    _style(ax, "Pages sent per round vs pages dirtied")


def chart_throughput(ax, d: ReportData) -> None:
    """Pages per second over time on each side, with round starts and the stop-and-copy."""
    for side, name in ((SOURCE, "source: sealed + sent"), (DESTINATION, "destination: installed")):
        pts = d.throughput[side]
        xs = [t for t, _ in pts] + [pts[-1][0] + d.bin_seconds]
        ys = [v for _, v in pts] + [pts[-1][1]]
        (line,) = ax.step(xs, ys, where="post", color=COLORS[side], linewidth=1.3, label=name)
        line.set_gid(f"throughput-{side}")
    top = max(v for pts in d.throughput.values() for _, v in pts) or 1.0
    for t, rnd in d.round_starts:
        ax.axvline(t, color="#555555", linewidth=0.6, linestyle=(0, (1, 2)))
        ax.annotate(f"round {rnd}", (t, top * 1.22), xytext=(2, -2), textcoords="offset points",
                    fontsize=FONT - 1.5, color="#555555", ha="left", va="top", rotation=90)
    label = "downtime" if d.downtime is not None else "stop-and-copy work"
    for i, ph in enumerate(d.phases):  # contiguous with tcp; apart with a sequential transport
        span = ax.axvspan(ph.start, ph.start + ph.seconds, color="#cccccc", alpha=0.6,
                          linewidth=0, label=label if i == 0 else None)
        span.set_gid(f"throughput-phase-{i}")
    ax.set_ylim(0, top * 1.25)
    ax.set_xlim(0, d.bin_seconds * len(d.throughput[SOURCE]))
    ax.set_xlabel("seconds since the migration started", fontsize=FONT)
    ax.set_ylabel("pages/s", fontsize=FONT)
    ax.legend(fontsize=FONT - 1, frameon=False, loc="upper center", ncol=3,
              bbox_to_anchor=(0.5, -0.16))
    _style(ax, "Throughput over time")


def chart_exits(ax, d: ReportData) -> None:
    """Mirror VM exits per private page (source and destination helpers, one per batch) and
    source guest exits per page sent (dirty-log write faults and scheduling slices)."""
    xs = range(len(d.rounds))
    w = 0.38
    src = [r.src_exits / max(r.private, 1) for r in d.rounds]
    dst = [r.dst_exits / max(r.private, 1) for r in d.rounds]
    guest = [r.guest_exits_per_page for r in d.rounds]
    ax.bar([x - w / 2 for x in xs], src, w, color=COLORS["source"],
           label="source mirror exits / private page")
    ax.bar([x - w / 2 for x in xs], dst, w, bottom=src, color=COLORS["destination"],
           label="destination mirror exits / private page")
    ax.bar([x + w / 2 for x in xs], guest, w, color=COLORS["guest-exits"],
           label="source guest exits / page sent")
    for r, x in zip(d.rounds, xs, strict=True):
        _value(ax, x - w / 2, r.mirror_exits_per_page, f"{r.mirror_exits_per_page:.4f}",
               f"value-round-{r.round}-mirror-exits-per-page")
        _value(ax, x + w / 2, r.guest_exits_per_page, f"{r.guest_exits_per_page:.3f}",
               f"value-round-{r.round}-guest-exits-per-page")
    total = float(d.totals["exits/page"])
    ax.axhline(total, color="black", linewidth=0.8, linestyle=(0, (4, 2)),
               label=f"whole migration: {total:.4f} mirror exits / private page")
    top = max([*src, *(a + b for a, b in zip(src, dst, strict=True)), *guest, total])
    ax.set_ylim(0, top * 1.75)
    ax.set_xticks(list(xs), _round_names(d))
    ax.set_ylabel("exits per page", fontsize=FONT)
    ax.legend(fontsize=FONT - 1, frameon=False, loc="upper right")
    _style(ax, "VM exits per page")


def chart_downtime(ax, d: ReportData) -> None:
    """The stop-and-copy phases as one horizontal bar, each labelled in milliseconds."""
    left = 0.0
    colors = [COLORS[SOURCE], COLORS[DESTINATION], "#E69F00"]
    for i, (ph, color) in enumerate(zip(d.phases, colors, strict=False)):
        ms = ph.seconds * 1000
        (bar,) = ax.barh([0], [ms], left=left, color=color, height=0.5,
                         label=f"{ph.name}: {ms:.1f} ms")
        bar.set_gid(f"phase-{i}")
        left += ms
    if d.downtime is not None:
        title = f"Downtime {d.downtime * 1000:.1f} ms: where it went"
    else:
        title = f"Stop-and-copy work: {left:.1f} ms (sequential transport)"
    if not d.phases:
        ax.text(0.5, 0.5, "no stop-and-copy phases recorded", ha="center", transform=ax.transAxes)
    ax.set_yticks([])
    ax.set_xlim(0, max(left, 1e-3) * 1.02)
    ax.set_ylim(-0.5, 1.6)
    ax.set_xlabel("milliseconds from the source guest's stop" if d.downtime is not None
                  else "milliseconds of work on each side", fontsize=FONT)
    ax.legend(fontsize=FONT - 1, frameon=False, loc="upper left", ncol=1)
    _style(ax, title)
    ax.grid(axis="x", color="#e0e0e0", linewidth=0.6)


CHARTS = (
    ("rounds", chart_rounds, ("Does pre-copy converge? Each round resends what the guest dirtied "
     "during the previous one; stop-and-copy sends the rest with the guest stopped.")),
    ("throughput", chart_throughput, ("Pages per second in bins of equal width; each batch's "
     "pages are spread over its duration.")),
    ("exits", chart_exits, ("The helpers exit once per batch (HLT), not per page; the guest exits "
     "on its first write to a page after each dirty-log fetch.")),
    ("downtime", chart_downtime, ("From the source guest's stop to the destination's successful "
     "RECV_FINISH. With a sequential transport (memory, file) the destination starts only when "
     "the source is done, so the same phases are shown as work, not as a downtime.")),
)


def chart_svg(name: str, d: ReportData) -> bytes:
    """One chart as an SVG document (salted with its name, so several inline into one page)."""
    fn = {n: f for n, f, _ in CHARTS}[name]
    fig = new_figure(7.2, 2.4 if name == "downtime" else 3.6)
    ax = fig.add_subplot()
    fn(ax, d)
    fig.tight_layout()
    return render(fig, "svg", salt=f"helperfw-report-{name}")


def verdict_text(d: ReportData) -> str:
    """'Verification PASS: ...' (the summary starts with PASS or FAIL) or 'not run'."""
    return "Verification " + ("not run" if d.verified is None else d.verification)


# -- HTML ------------------------------------------------------------------------------------------
_CSS = """
body { font-family: 'DejaVu Sans', Verdana, sans-serif; margin: 2em auto; max-width: 62em;
       color: #222; }
h1 { font-size: 1.35em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } td.k { text-align: left; }
.verdict { padding: 0.6em 1em; border-radius: 4px; color: white; }
.caption { color: #555; font-size: 0.9em; }
figure { margin: 0.5em 0; } svg { max-width: 100%; height: auto; }
"""


def _row(cells: list[str], tag: str = "td", ids: list[str] | None = None) -> str:
    out = []
    for i, c in enumerate(cells):
        attr = f' id="{ids[i]}"' if ids and ids[i] else ""
        cls = ' class="k"' if i == 0 and tag == "td" else ""
        out.append(f"<{tag}{attr}{cls}>{html.escape(c)}</{tag}>")
    return "<tr>" + "".join(out) + "</tr>"


def rounds_table(d: ReportData) -> str:
    head = ["round", "kind", "pages sent", "private", "shared", "dirtied", "guest writes",
            "seconds", "source mirror exits", "destination mirror exits", "source guest exits"]
    keys = [slug(h) for h in head]
    rows = [_row(head, "th")]
    for r in d.rounds:
        cells = [str(r.round), "stop-and-copy" if r.final else "pre-copy", str(r.pages),
                 str(r.private), str(r.shared), str(r.dirtied), str(r.guest_touches),
                 f"{r.seconds:.3f}", str(r.src_exits), str(r.dst_exits), str(r.guest_exits)]
        rows.append(_row(cells, ids=[f"round-{r.round}-{k}" for k in keys]))
    rows.append(_row(["session set-up", "SEND_BEGIN / RECV_BEGIN", "", "", "", "", "", "",
                      str(d.setup_exits[0]), str(d.setup_exits[1]), ""],
                     ids=[""] * 8 + ["setup-source-mirror-exits", "setup-destination-mirror-exits",
                                     ""]))
    return "<table>" + "".join(rows) + "</table>"


def totals_table(d: ReportData) -> str:
    rows = [_row([k, str(v)], ids=["", f"total-{slug(k)}"]) for k, v in d.totals.items()]
    return "<table>" + "".join(rows) + "</table>"


def phases_table(d: ReportData) -> str:
    rows = [_row(["phase", "side", "ms"], "th")]
    for i, ph in enumerate(d.phases):
        rows.append(_row([ph.name, ph.side, f"{ph.seconds * 1000:.1f}"],
                         ids=["", "", f"phase-{i}-ms"]))
    return "<table>" + "".join(rows) + "</table>"


def report_html(d: ReportData) -> str:
    """The whole report as one self-contained HTML page."""
    color = PASS_COLOR if d.verified else FAIL_COLOR
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(d.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(d.title)}</h1>",
        (f'<p class="verdict" id="verification" style="background:{color}">'
        f"{html.escape(verdict_text(d))}</p>"),
        "<h2>Totals</h2>", totals_table(d),
    ]
    for name, _fn, caption in CHARTS:
        parts += [f'<figure id="chart-{name}">', svg_fragment(chart_svg(name, d), f"{name}-"),
                  f'<figcaption class="caption">{html.escape(caption)}</figcaption></figure>']
        if name == "rounds":
            parts += ["<h2>Rounds</h2>", rounds_table(d)]
        if name == "downtime" and d.phases:
            parts += [phases_table(d)]
    parts += [('<p class="caption">Written by <code>helperfw migrate --report</code> from the '
              "migration's own timeline (emulate/timeline.py).</p>"), "</body></html>", ""]
    return "\n".join(parts)


# -- one SVG ---------------------------------------------------------------------------------------
def report_figure(d: ReportData):
    """All four charts and the totals in one figure."""
    fig = new_figure(14, 10.5)
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 0.45], hspace=0.42, wspace=0.22,
                            left=0.06, right=0.98, top=0.93, bottom=0.02)
    for (_name, fn, _c), cell in zip(CHARTS, [grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]],
                                     strict=True):
        fn(fig.add_subplot(cell), d)
    fig.suptitle(d.title, fontsize=FONT + 4, x=0.06, ha="left")
    text = fig.add_subplot(grid[2, :])
    text.axis("off")
    t = text.text(0, 1, "\n".join(textwrap.wrap(verdict_text(d), 125)),
                  va="top", fontsize=FONT + 0.5, weight="bold",
                  color=PASS_COLOR if d.verified else FAIL_COLOR, transform=text.transAxes)
    t.set_gid("verification")
    items = [f"{k}: {v}" for k, v in d.totals.items()]
    cols = 4
    per = -(-len(items) // cols)
    for c in range(cols):
        text.text(c / cols, 0.7, "\n".join(items[c * per:(c + 1) * per]), va="top",
                  fontsize=FONT, family="DejaVu Sans Mono", transform=text.transAxes)
    return fig


def report_bytes(d: ReportData, path: Path) -> bytes:
    """The report as HTML or SVG, chosen by `path`'s extension."""
    if report_format(path) == "svg":
        return render(report_figure(d), "svg", salt="helperfw-report")
    return report_html(d).encode()
