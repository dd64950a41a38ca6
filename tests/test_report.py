"""`helperfw migrate --report`: the timeline the migration records, the numbers the report shows,
and the report files. One short migration (32 MiB over loopback TCP, so the downtime is
measured) is shared by every test here."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from emulate.migration import MigrationParams, migrate
from emulate.timeline import (
    DESTINATION,
    FINAL_SENT,
    FINISH_BEGIN,
    FINISHED,
    PRIVATE,
    SOURCE,
    STOPPED,
    Timeline,
    downtime_phases,
    summarize,
    throughput,
)
from helperfw.plots.report import slug
from tests.firmware import efi_path

MEM = 32 << 20


@pytest.fixture(scope="module")
def result():
    p = MigrationParams(mem=MEM, image=efi_path(), transport="tcp", seed=3)
    res = migrate(p)
    assert res.verification is not None and res.verification.ok
    return res


@pytest.fixture(scope="module")
def data(result):
    return summarize(result)


def test_timeline_accounts_for_every_page(result) -> None:
    tl = result.timeline
    for side in (SOURCE, DESTINATION):
        batches = [b for b in tl.batches if b.side == side]
        assert sum(b.pages for b in batches) == result.pages
        assert sum(b.pages for b in batches if b.kind == PRIVATE) == result.private_pages
        for r in result.rounds:
            assert sum(b.pages for b in batches if b.round == r.round) == r.pages
        assert all(tl.t0 <= b.start <= b.end for b in batches)
    assert tl.events[STOPPED] <= tl.events[FINAL_SENT] <= tl.events[FINISH_BEGIN] <= tl.events[
        FINISHED]


def test_report_numbers_equal_the_result(result, data) -> None:
    assert [(r.round, r.pages, r.private, r.shared, r.dirtied, r.guest_touches, r.final)
            for r in data.rounds] == [(r.round, r.pages, r.private, r.shared, r.dirty_after,
                                       r.guest_touches, r.final) for r in result.rounds]
    # exits per round add up to the result's totals (set-up: SEND_BEGIN / RECV_BEGIN)
    assert data.setup_exits[0] + sum(r.src_exits for r in data.rounds) == result.src_exits
    assert data.setup_exits[1] + sum(r.dst_exits for r in data.rounds) == result.dst_exits
    assert sum(r.guest_exits for r in data.rounds) == result.guest_exits
    assert all(r.src_exits >= -(-r.private // 64) for r in data.rounds)  # one exit per batch
    t = data.totals
    assert (t["pages"], t["private pages"], t["shared pages"]) == (
        result.pages, result.private_pages, result.shared_pages)
    assert (t["source mirror exits"], t["destination mirror exits"], t["source guest exits"]) == (
        result.src_exits, result.dst_exits, result.guest_exits)
    assert t["exits/page"] == round(result.exits_per_page, 4)
    assert t["pages/s"] == round(result.pages_per_s, 1)
    assert (t["bytes on the wire"], t["records"], t["epochs"]) == (
        result.bytes_on_wire, result.records, result.epochs)
    assert data.downtime == result.downtime
    assert sum(p.seconds for p in data.phases) == pytest.approx(result.downtime, abs=1e-9)
    assert data.verification == result.verification.summary() and data.verified is True
    for side in (SOURCE, DESTINATION):  # the throughput series integrates to the pages moved
        moved = sum(v * data.bin_seconds for _t, v in data.throughput[side])
        assert moved == pytest.approx(result.pages, rel=1e-6)


class _Cells(HTMLParser):
    """id -> text of every element with an id."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, str] = {}
        self._open: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._open.append(dict(attrs).get("id"))

    def handle_endtag(self, tag: str) -> None:
        if self._open:
            self._open.pop()

    def handle_data(self, text: str) -> None:
        for i in self._open:
            if i:
                self.cells[i] = self.cells.get(i, "") + text


def test_html_report_shows_the_numbers(result, data) -> None:
    pytest.importorskip("matplotlib")
    from helperfw.plots.report import report_bytes

    page = report_bytes(data, Path("r.html")).decode()
    # self-contained: no scripts, no style sheets or images fetched from anywhere
    assert "<script" not in page and "<link" not in page and "url(http" not in page
    assert re.findall(r'(?:src|href)="(?!#)[^"]*"', page) == []
    cells = _Cells()
    cells.feed(page)
    c = cells.cells
    for k, v in data.totals.items():
        assert c[f"total-{slug(k)}"] == str(v)
    for r in result.rounds:
        assert c[f"round-{r.round}-pages-sent"] == str(r.pages)
        assert c[f"round-{r.round}-dirtied"] == str(r.dirty_after)
    assert c["verification"].startswith("Verification PASS")
    for name in ("rounds", "throughput", "exits", "downtime"):
        assert f'id="chart-{name}"' in page
    svgs = re.findall(r"<svg.*?</svg>", page, re.DOTALL)
    assert len(svgs) == 4
    ids = re.findall(r' id="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "inline SVGs must not share element ids"
    for r in result.rounds:  # the charts' value labels
        assert re.search(rf'id="value-round-{r.round}-pages">\s*<text[^>]*>{r.pages}</text>',
                         page)
    assert report_bytes(data, Path("r.html")) == page.encode()


def test_svg_report_is_one_reproducible_picture(data) -> None:
    pytest.importorskip("matplotlib")
    from helperfw.plots.report import report_bytes

    svg = report_bytes(data, Path("r.svg"))
    root = ET.fromstring(svg)
    ids = {el.get("id") for el in root.iter() if el.get("id")}
    assert {"verification", "throughput-source", "throughput-destination", "phase-0"} <= ids
    assert b"<dc:date>" not in svg and report_bytes(data, Path("r.svg")) == svg


def test_cli_writes_the_report(result, tmp_path: Path, monkeypatch) -> None:
    """The CLI wiring (checks, summary lines, report file), with the shared migration's result
    standing in for a second run."""
    pytest.importorskip("matplotlib")
    import emulate.migration
    from helperfw.cli import main

    monkeypatch.setattr(emulate.migration, "migrate", lambda p, progress=None: result)
    out = io.StringIO()
    path = tmp_path / "report.html"
    assert main(["migrate", "--mem", "32M", "--image", str(efi_path()), "--no-progress",
                 "--report", str(path)], out=out) == 0
    assert f"report: {path}" in out.getvalue()
    assert "verification: PASS" in out.getvalue()
    assert path.read_text().startswith("<!DOCTYPE html>")


# -- the recorder and the phases on made-up timelines ---------------------------------------------
def _clock(times: list[float]):
    it = iter(times)
    return lambda: next(it)


def test_phases_tile_the_downtime_with_a_concurrent_transport() -> None:
    tl = Timeline(clock=_clock([10.0, 11.0, 11.25, 11.5, 11.75]))
    tl.start()
    for name in (STOPPED, FINAL_SENT):
        tl.event(name)
    tl.events[FINISH_BEGIN] = 11.5
    tl.clock = _clock([11.75])
    tl.event(FINISHED)
    phases = downtime_phases(tl, concurrent=True)
    assert [p.seconds for p in phases] == [0.25, 0.25, 0.25]
    assert phases[0].start == 1.0


def test_sequential_transport_measures_the_destination_from_its_last_round() -> None:
    tl = Timeline(clock=_clock([0.0, 1.0, 1.5, 1.75, 2.0]))
    tl.start()
    tl.event(STOPPED)
    tl.event(FINAL_SENT)
    tl.round(DESTINATION, 1, False, 2)
    tl.round(DESTINATION, 2, True, 3)
    tl.events[FINISH_BEGIN] = 3.0
    tl.clock = _clock([3.25])
    tl.event(FINISHED)
    assert [p.seconds for p in downtime_phases(tl, concurrent=False)] == [0.5, 1.0, 0.25]


def test_throughput_spreads_a_batch_over_its_bins() -> None:
    tl = Timeline(clock=_clock([0.0, 0.5, 1.5]))
    tl.start()
    tl.round(SOURCE, 1, False, 0)
    tl.batch(SOURCE, PRIVATE, 100, start=0.5)  # ends at 1.5: half in bin 0, half in bin 1
    series = throughput(tl.batches, SOURCE, 0.0, 2.0, 2)
    assert series == ((0.0, 50.0), (1.0, 50.0))
    assert tl.batches[0].round == 1
