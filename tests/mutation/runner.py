"""Run mutants against the tests that matter and score the result.

For each mutant: splice it into a private copy of the tree, compile the DSL roots of the first
test group (a mutant that does not compile is *invalid* and not counted), then run the groups
whose roots reach the mutated function (tests.mutation.groups) until one fails: *killed* (a test
failed, a native test crashed, or a group overran its time: a hang is seen too). A mutant that
passes every group *survived*, unless tests/mutation/equivalent.txt lists it as *equivalent*,
with the reason no test can tell it from the original.

A mutant of a function no group's roots reach (not in the helper's image: ghcb.py serves the
emulator's guest workload too) is *unreached* and not counted either.

Score = killed / (mutants - invalid - equivalent - unreached), per module and in total.
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.mutation.groups import BY_NAME, GROUPS, plan, reach
from tests.mutation.mutants import MODULES, Mutant
from tests.mutation.workspace import ROOT, Workspace

EQUIVALENT = Path(__file__).with_name("equivalent.txt")
KILLED = ("fail", "crash", "timeout")
DEFAULT_TIMEOUT = 600.0  # per group when no baseline was measured


def read_equivalent(path: Path = EQUIVALENT) -> dict[str, str]:
    """id -> reason. Format: the mutant's id on a line of its own, its reason on the indented
    lines that follow; `#` starts a comment line."""
    out: dict[str, str] = {}
    cur = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if line[0].isspace():
            if cur is None:
                raise ValueError(f"{path.name}: reason without a mutant: {line.strip()!r}")
            out[cur] = (out[cur] + " " + line.strip()).strip()
        else:
            cur = line.strip()
            out[cur] = ""
    return out


@dataclass
class Result:
    mutant: Mutant
    verdict: str  # killed | survived | invalid | equivalent | unreached | error
    by: str = ""  # group (and how) that killed it
    detail: str = ""
    runs: list = field(default_factory=list)
    seconds: float = 0.0


class Worker:
    """One tests.mutation.worker process in its own workspace."""

    def __init__(self, log_dir: Path) -> None:
        self.ws = Workspace()
        self.log = log_dir / f"worker-{id(self)}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.mutation.worker"], cwd=self.ws.root,
            env=self.ws.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, job: dict) -> dict:
        assert self.proc.stdin and self.proc.stdout
        job = {**job, "log": str(self.log)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"mutation worker died; see {self.log}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.ws.remove()


class Runner:
    def __init__(self, jobs: int = 1, log=print, timeouts: dict[str, float] | None = None,
                 native: bool = False, journal: Path | None = None):
        self.jobs = max(1, jobs)
        self.native = native
        self.journal = journal  # one JSON line per result, written as they come
        self.skip_equivalent = False  # True: take equivalent.txt's word, do not run them
        self.log = log
        self.reaches = {g.name: reach(g) for g in GROUPS}
        self.timeouts = timeouts or {}
        self.log_dir = Path(tempfile.mkdtemp(prefix="mh-mutation-"))

    def groups_for(self, mutants: list[Mutant]) -> list[str]:
        """The groups these mutants will face, in GROUPS order."""
        used = {g.name for m in mutants
                for g in plan(m.module, m.function, m.operator, self.reaches, self.native)}
        return [g.name for g in GROUPS if g.name in used]

    def baseline(self, groups: list[str] | None = None) -> dict[str, float]:
        """Run the groups (all by default) on the unmutated tree: each must pass; 3x its time
        (+30 s) becomes its timeout (a mutant that makes a test hang is killed by it)."""
        names = groups if groups is not None else [g.name for g in GROUPS]
        w = Worker(self.log_dir)
        try:
            res = w.run({"id": "baseline", "file": "tests/mutation/__init__.py", "source": None,
                         "groups": [[g, DEFAULT_TIMEOUT] for g in names]})
        finally:
            w.close()
        for group, verdict, dt in res["runs"]:
            if verdict != "pass":
                raise RuntimeError(f"group {group} fails without any mutant ({verdict}): "
                                   f"{res.get('detail', '')}")
            self.timeouts[group] = 3 * dt + 30
            self.log(f"baseline {group}: {dt:.1f}s")
        return self.timeouts

    def job(self, m: Mutant) -> dict | None:
        groups = plan(m.module, m.function, m.operator, self.reaches, self.native)
        if not groups:
            return None
        return {"id": m.id, "file": str(m.path.relative_to(ROOT)), "source": m.mutated_source(),
                "check": groups[0].emulator,
                "groups": [[g.name, self.timeouts.get(g.name, DEFAULT_TIMEOUT)]
                           for g in groups]}

    def run(self, mutants: list[Mutant], equivalent: dict[str, str] | None = None
            ) -> list[Result]:
        equivalent = read_equivalent() if equivalent is None else equivalent
        todo: queue.Queue = queue.Queue()
        results: list[Result] = []
        lock = threading.Lock()
        for m in mutants:
            todo.put(m)
        total = len(mutants)

        def work() -> None:
            w = Worker(self.log_dir)
            try:
                while True:
                    try:
                        m = todo.get_nowait()
                    except queue.Empty:
                        return
                    r = self._one(w, m, equivalent)
                    with lock:
                        results.append(r)
                        if self.journal is not None:
                            with self.journal.open("a") as j:
                                j.write(json.dumps(_row(r)) + "\n")
                        self.log(f"[{len(results)}/{total}] {r.verdict:10} {r.by:24} "
                                 f"{r.seconds:5.1f}s  {m.id}")
            finally:
                w.close()

        threads = [threading.Thread(target=work) for _ in range(min(self.jobs, total))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        order = {m.id: i for i, m in enumerate(mutants)}
        return sorted(results, key=lambda r: order[r.mutant.id])

    def _one(self, w: Worker, m: Mutant, equivalent: dict[str, str]) -> Result:
        if self.skip_equivalent and m.id in equivalent:
            return Result(m, "equivalent", detail=equivalent[m.id])
        job = self.job(m)
        if job is None:  # e.g. a ghcb.py function only the emulator's guest workload uses
            return Result(m, "unreached", detail="not in the helper: no group's roots reach it")
        t0 = time.perf_counter()
        res = w.run(job)
        dt = time.perf_counter() - t0
        runs = res["runs"]
        last = runs[-1][1] if runs else "pass"
        if last == "invalid":
            return Result(m, "invalid", detail=res.get("detail", ""), runs=runs, seconds=dt)
        if last in KILLED:
            return Result(m, "killed", f"{runs[-1][0]} ({last})", res.get("detail", ""), runs,
                          dt)
        if last != "pass":
            return Result(m, "error", runs[-1][0], res.get("detail", ""), runs, dt)
        if m.id in equivalent:
            return Result(m, "equivalent", detail=equivalent[m.id], runs=runs, seconds=dt)
        return Result(m, "survived", runs=runs, seconds=dt)


def score(results: list[Result]) -> dict[str, dict[str, int | float]]:
    """Per module and in total: counts of each verdict and the score in percent."""
    out: dict[str, dict] = {}
    for key in [*MODULES, "total"]:
        rs = [r for r in results if key == "total" or r.mutant.module == key]
        c = Counter(r.verdict for r in rs)
        counted = c["killed"] + c["survived"] + c["error"]
        out[key] = {**{v: c[v] for v in ("killed", "survived", "equivalent", "invalid",
                                         "unreached", "error")},
                    "mutants": len(rs),
                    "score": round(100.0 * c["killed"] / counted, 1) if counted else 100.0}
    return out


def report(results: list[Result], seconds: float) -> str:
    s = score(results)
    head = (f"{'module':12} {'mutants':>7} {'killed':>6} {'survived':>8} {'equiv':>5} "
            f"{'invalid':>7} {'unreach':>7} {'error':>5} {'score':>6}")
    lines = [head]
    for k, v in s.items():
        if v["mutants"]:
            lines.append(f"{k:12} {v['mutants']:7} {v['killed']:6} {v['survived']:8} "
                         f"{v['equivalent']:5} {v['invalid']:7} {v['unreached']:7} "
                         f"{v['error']:5} "
                         f"{v['score']:5.1f}%")
    by = Counter(r.by.split(" ")[0] for r in results if r.verdict == "killed")
    lines.append("killed by: " + ", ".join(f"{g}={n}" for g, n in by.most_common()))
    lines.append(f"wall time: {seconds / 60:.1f} min")
    for r in results:
        if r.verdict in ("survived", "error"):
            lines.append(f"{r.verdict.upper()}: {r.mutant.id}" + (
                f"  [{r.detail}]" if r.detail else ""))
    return "\n".join(lines)


def select(mutants: list[Mutant], *, modules=None, functions=None, operators=None,
           ids=None) -> list[Mutant]:
    out = mutants
    if modules:
        out = [m for m in out if m.module in modules]
    if functions:
        out = [m for m in out if m.function in functions]
    if operators:
        out = [m for m in out if m.operator in operators]
    if ids:
        out = [m for m in out if m.id in ids]
    return out


def sample(mutants: list[Mutant], n: int, seed: int, equivalent: dict[str, str]
           ) -> list[Mutant]:
    """n mutants spread over the modules (one per module in turn), none of them listed as
    equivalent."""
    rng = random.Random(seed)
    pool = {mod: [m for m in mutants if m.module == mod and m.id not in equivalent]
            for mod in MODULES}
    order = [mod for mod in MODULES if pool[mod]]
    rng.shuffle(order)
    out = []
    while len(out) < n and any(pool.values()):
        for mod in order:
            if pool[mod] and len(out) < n:
                out.append(pool[mod].pop(rng.randrange(len(pool[mod]))))
    return out


def native_first(r: Runner, mutants: list[Mutant]) -> list[Mutant]:
    """The CI sample's pool: mutants whose first test group is native (seconds, not minutes of
    emulator), so the sample stays within the suite's time budget. Such a mutant still faces
    the emulator groups after them if the native ones let it through."""
    return [m for m in mutants
            if (p := plan(m.module, m.function, m.operator, r.reaches)) and not p[0].emulator]


def _row(r: Result) -> dict:
    return {"id": r.mutant.id, "verdict": r.verdict, "by": r.by, "detail": r.detail,
            "runs": r.runs, "seconds": round(r.seconds, 2)}


def write_json(results: list[Result], path: Path, seconds: float) -> None:
    path.write_text(json.dumps({"seconds": round(seconds, 1), "score": score(results),
                                "results": [_row(r) for r in results]}, indent=1))


def read_journal(path: Path, mutants: list[Mutant]) -> list[Result]:
    """Results recorded by an earlier run (--journal), for the mutants still generated."""
    known = {m.id: m for m in mutants}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if row["id"] in known:
                out[row["id"]] = Result(known[row["id"]], row["verdict"], row["by"],
                                        row["detail"], row["runs"], row["seconds"])
    return list(out.values())


def cpu_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


_ = BY_NAME
