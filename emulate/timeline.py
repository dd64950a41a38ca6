"""What a migration did when, on each side: the data behind `helperfw migrate --report`.

`Timeline` is a recorder the migration driver (`emulate.migration`) calls at a few points: each
batch of pages either side moved (with its start and end), the start of every round on each side
with that side's exit counters, and the instants that bound the downtime (the source guest
stops, the last dirty pages are out, the destination starts and ends RECV_FINISH). Times are
`time.perf_counter()` values; the same instants become `Migration.stopped_at` and
`Destination.finished_at`, so the downtime phases add up to `MigrationResult.downtime` exactly.

`summarize(result)` turns a finished migration into `ReportData`: plain numbers per round, a
throughput series per side, the downtime phases and the verification outcome. It has no
plotting dependency; `helperfw.plots.report` draws it and the tests check it against the
`MigrationResult`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from emulate.stream import END, FINISH, PRIVATE_PAGES, ROUND, SHARED_PAGES
from helperfw.runtime.protocol import OPTION_NAMES

if TYPE_CHECKING:
    from emulate.migration import MigrationResult

SOURCE, DESTINATION = "source", "destination"
PRIVATE, SHARED = "private", "shared"
# instants (Timeline.events keys)
STOPPED = "stopped"  # source guest stopped: stop-and-copy begins
FINAL_SENT = "final-sent"  # source: the last dirty pages are sealed and written
SOURCE_END = "source-end"  # source: CPU state, finish token and END written
FINISH_BEGIN = "finish-begin"  # destination: FINISH record read, RECV_FINISH starts
FINISHED = "finished"  # destination: RECV_FINISH succeeded


@dataclass(frozen=True)
class Batch:
    """One batch of pages one side moved: sealed or opened by its helper (private), or copied
    raw (shared)."""

    side: str
    kind: str
    round: int
    pages: int
    start: float
    end: float


@dataclass(frozen=True)
class RoundMark:
    """A side starts a round (or closes the session, round 0) with these exit counts so far."""

    side: str
    round: int
    final: bool
    t: float
    mirror_exits: int  # the side's HelperChannel.exits
    guest_exits: int = 0  # source: dirty-log write faults + guest slices since logging began


@dataclass
class Timeline:
    """The recorder. Every method is cheap (an append); safe to call from the destination's
    thread while the source runs (list.append and dict stores are atomic)."""

    clock: Callable[[], float] = time.perf_counter
    t0: float = 0.0
    batches: list[Batch] = field(default_factory=list)
    marks: list[RoundMark] = field(default_factory=list)
    events: dict[str, float] = field(default_factory=dict)
    _round: dict[str, int] = field(default_factory=lambda: {SOURCE: 0, DESTINATION: 0})

    def start(self) -> float:
        """The migration starts now (time 0 of the report)."""
        self.t0 = self.clock()
        return self.t0

    def now(self) -> float:
        return self.clock()

    def event(self, name: str) -> float:
        """Record the instant `name`; returns it (the caller may keep the same value)."""
        t = self.events[name] = self.clock()
        return t

    def round(self, side: str, rnd: int, final: bool, mirror_exits: int,
              guest_exits: int = 0) -> None:
        self._round[side] = rnd
        self.marks.append(RoundMark(side, rnd, final, self.clock(), mirror_exits, guest_exits))

    def close(self, side: str, mirror_exits: int, guest_exits: int = 0) -> None:
        """The side's session is over: the last counters (round 0 marks the end)."""
        self.marks.append(RoundMark(side, 0, True, self.clock(), mirror_exits, guest_exits))

    def batch(self, side: str, kind: str, pages: int, start: float) -> None:
        """A batch of `pages` that began at `start` ends now."""
        self.batches.append(Batch(side, kind, self._round[side], pages, start, self.clock()))

    def received(self, kind: int, body: Any, start: float, mirror_exits: int) -> None:
        """The destination handled one stream record (read at `start`): note what it means."""
        if kind == ROUND:
            self.round(DESTINATION, int(body.round), bool(body.final), mirror_exits)
        elif kind in (PRIVATE_PAGES, SHARED_PAGES):
            self.batch(DESTINATION, PRIVATE if kind == PRIVATE_PAGES else SHARED,
                       len(body.pages), start)
        elif kind == FINISH:
            self.events[FINISH_BEGIN] = start
        elif kind == END:
            self.close(DESTINATION, mirror_exits)


# -- the report's numbers --------------------------------------------------------------------------
@dataclass(frozen=True)
class RoundRow:
    round: int
    final: bool
    pages: int
    private: int
    shared: int
    dirtied: int  # pages dirtied while the round ran (the next round's work)
    guest_touches: int
    seconds: float
    src_exits: int  # mirror exits of the source helper in this round
    dst_exits: int
    guest_exits: int  # source guest exits in this round

    @property
    def mirror_exits_per_page(self) -> float:
        return (self.src_exits + self.dst_exits) / max(self.private, 1)

    @property
    def guest_exits_per_page(self) -> float:
        return self.guest_exits / max(self.pages, 1)


@dataclass(frozen=True)
class Phase:
    name: str
    side: str
    start: float  # seconds since the migration began
    seconds: float


@dataclass(frozen=True)
class ReportData:
    title: str
    rounds: tuple[RoundRow, ...]
    setup_exits: tuple[int, int]  # (source, destination) exits outside every round
    throughput: dict[str, tuple[tuple[float, float], ...]]  # side -> ((bin start, pages/s)...)
    bin_seconds: float
    phases: tuple[Phase, ...]
    round_starts: tuple[tuple[float, int], ...]  # (seconds, round) where the source began each
    downtime: float | None  # MigrationResult.downtime (concurrent transports only)
    totals: dict[str, float | int | str]
    verification: str
    verified: bool | None


def _exit_deltas(marks: list[RoundMark], side: str) -> tuple[int, dict[int, tuple[int, int]]]:
    """(exits before the first round, {round: (mirror exits, guest exits)}) of one side."""
    ms = [m for m in marks if m.side == side]
    rounds = {}
    for a, b in itertools.pairwise(ms):
        rounds[a.round] = (b.mirror_exits - a.mirror_exits, b.guest_exits - a.guest_exits)
    return (ms[0].mirror_exits if ms else 0), rounds


def throughput(batches: list[Batch], side: str, t0: float, span: float,
               bins: int) -> tuple[tuple[float, float], ...]:
    """Pages per second of one side in `bins` equal bins over [t0, t0 + span]: each batch's
    pages are spread evenly over its duration, so the series integrates to the pages moved."""
    width = span / bins
    acc = [0.0] * bins
    for b in batches:
        if b.side != side:
            continue
        lo, hi = b.start - t0, max(b.end - t0, b.start - t0 + 1e-9)
        rate = b.pages / (hi - lo)
        first, last = int(lo // width), min(int(hi // width), bins - 1)
        for i in range(max(first, 0), last + 1):
            overlap = min(hi, (i + 1) * width) - max(lo, i * width)
            if overlap > 0:
                acc[i] += rate * overlap
    return tuple((i * width, acc[i] / width) for i in range(bins))


def downtime_phases(tl: Timeline, concurrent: bool) -> tuple[Phase, ...]:
    """Where the stop-and-copy time went. With a concurrent transport (tcp) the three phases
    tile [guest stopped, RECV_FINISH done], which is the downtime. With a sequential one
    (memory, file) the destination only starts once the source is done, so its part is
    measured from its last round's start instead: the same work, not a downtime."""
    e = dict(tl.events)
    if not all(k in e for k in (STOPPED, FINAL_SENT, FINISH_BEGIN, FINISHED)):
        return ()
    middle = FINAL_SENT
    if not concurrent:
        final = [m.t for m in tl.marks if m.side == DESTINATION and m.final and m.round]
        if not final:
            return ()
        e[middle := "destination-final-round"] = max(final)
    steps = [(SOURCE, "source seals and sends the last dirty pages", STOPPED, FINAL_SENT),
             (DESTINATION, "destination installs the last pages, checks the tokens",
              middle, FINISH_BEGIN),
             (DESTINATION, "destination RECV_FINISH", FINISH_BEGIN, FINISHED)]
    return tuple(Phase(name, side, e[a] - tl.t0, e[b] - e[a]) for side, name, a, b in steps)


def summarize(res: MigrationResult, bins: int = 60) -> ReportData:
    """The report's numbers from a finished migration (its `timeline` must be set)."""
    tl = res.timeline
    if tl is None:
        raise ValueError("the migration recorded no timeline")
    src_setup, src = _exit_deltas(tl.marks, SOURCE)
    dst_setup, dst = _exit_deltas(tl.marks, DESTINATION)
    rows = tuple(RoundRow(r.round, r.final, r.pages, r.private, r.shared, r.dirty_after,
                          r.guest_touches, r.seconds, src.get(r.round, (0, 0))[0],
                          dst.get(r.round, (0, 0))[0], src.get(r.round, (0, 0))[1])
                 for r in res.rounds)
    # HELLO is the first exit on each side and not part of the migration (see MigrationResult)
    setup = (src_setup - 1, dst_setup - 1)
    end = max([b.end for b in tl.batches] + list(tl.events.values()) + [tl.t0 + 1e-3])
    span = end - tl.t0
    series = {side: throughput(tl.batches, side, tl.t0, span, bins)
              for side in (SOURCE, DESTINATION)}
    p = res.params
    v = res.verification
    totals: dict[str, float | int | str] = {
        "option": OPTION_NAMES[p.option], "C-bit": p.cbit, "guest RAM (MiB)": p.mem >> 20,
        "transport": p.transport, "seed": p.seed,
        "pages": res.pages, "private pages": res.private_pages, "shared pages": res.shared_pages,
        "seconds": round(res.seconds, 3), "pages/s": round(res.pages_per_s, 1),
        "source mirror exits": res.src_exits, "destination mirror exits": res.dst_exits,
        "exits/page": round(res.exits_per_page, 4), "source guest exits": res.guest_exits,
        "rounds": len(res.rounds), "records": res.records, "epochs": res.epochs,
        "bytes on the wire": res.bytes_on_wire,
    }
    if res.downtime is not None:
        totals["downtime (ms)"] = round(res.downtime * 1000, 1)
    title = (f"Live migration: {totals['guest RAM (MiB)']} MiB guest, option {totals['option']}, "
             f"C-bit {p.cbit}, transport {p.transport}, seed {p.seed}")
    phases = downtime_phases(tl, concurrent=res.downtime is not None)
    starts = tuple((m.t - tl.t0, m.round) for m in tl.marks if m.side == SOURCE and m.round)
    return ReportData(title, rows, setup, series, span / bins, phases, starts, res.downtime, totals,
                      "skipped" if v is None else v.summary(), None if v is None else v.ok)
