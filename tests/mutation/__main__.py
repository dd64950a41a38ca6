"""python -m tests.mutation: generate the helper's mutants, run the tests that matter, score.

    python -m tests.mutation --list                      # the mutants, by id
    python -m tests.mutation                             # all of them (MH_MUTATION_FULL's set)
    python -m tests.mutation --module secrets -j 2       # one module, two workers
    python -m tests.mutation --sample 4 --seed 1         # what CI runs on every push
    python -m tests.mutation --id 'session.open_one:guard: if env.ram_addr != ram_addr -> if False'
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.mutation.groups import GROUPS
from tests.mutation.mutants import MODULES, OPERATORS, all_mutants, by_id
from tests.mutation.runner import (
    Runner,
    cpu_jobs,
    native_first,
    read_equivalent,
    read_journal,
    report,
    sample,
    select,
    write_json,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutation",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print the mutants' ids and stop")
    ap.add_argument("--module", action="append", choices=MODULES)
    ap.add_argument("--function", action="append")
    ap.add_argument("--operator", action="append", choices=OPERATORS)
    ap.add_argument("--id", action="append", help="one mutant by id (repeatable)")
    ap.add_argument("--first", action="append", choices=MODULES, default=[],
                    help="run this module's mutants before the others (repeatable, in order)")
    ap.add_argument("--sample", type=int, help="run only this many, spread over the modules")
    ap.add_argument("--seed", type=int, default=16, help="for --sample")
    ap.add_argument("-j", "--jobs", type=int, default=cpu_jobs())
    ap.add_argument("--native", action="store_true",
                    help="native groups only (and the double-fetch detector for re-reads)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the unmutated run that sets each group's timeout")
    ap.add_argument("--timeouts", metavar="NATIVE,EMU",
                    help="with --no-baseline: per-group limits in seconds (default 600,600)")
    ap.add_argument("--skip-equivalent", action="store_true",
                    help="report the mutants equivalent.txt lists without running them")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--journal", type=Path,
                    help="append each result here as it comes (one JSON line)")
    ap.add_argument("--resume", type=Path,
                    help="a journal of an earlier run: its killed and invalid mutants are "
                    "taken from it (tests only get added: a kill stays a kill), the rest rerun")
    a = ap.parse_args(argv)
    mutants = select(all_mutants(), modules=a.module, functions=a.function,
                     operators=a.operator, ids=a.id)
    if a.id and len(mutants) != len(set(a.id)):
        known = by_id(all_mutants())
        missing = [i for i in a.id if i not in known]
        print(f"unknown mutant id: {missing[0]!r}", file=sys.stderr)
        return 2
    equivalent = read_equivalent()
    timeouts = None
    if a.timeouts:
        native_s, emu_s = (float(x) for x in a.timeouts.split(","))
        timeouts = {g.name: emu_s if g.emulator else native_s for g in GROUPS}
    r = Runner(a.jobs, log=lambda s: print(s, flush=True), native=a.native,
               journal=a.journal, timeouts=timeouts)
    if a.sample:  # as CI draws it
        mutants = sample(native_first(r, mutants), a.sample, a.seed, equivalent)
    if a.list:
        for m in mutants:
            print(m.id)
        print(f"{len(mutants)} mutants", file=sys.stderr)
        return 0
    if a.first:
        mutants.sort(key=lambda m: a.first.index(m.module) if m.module in a.first
                     else len(a.first))
    t0 = time.perf_counter()
    earlier = []
    if a.resume:
        earlier = [x for x in read_journal(a.resume, mutants)
                   if x.verdict in ("killed", "invalid")]
        done = {x.mutant.id for x in earlier}
        mutants = [m for m in mutants if m.id not in done]
        print(f"{len(earlier)} results taken from {a.resume}, {len(mutants)} to run")
    r.skip_equivalent = a.skip_equivalent
    if not a.no_baseline and mutants:
        r.baseline(r.groups_for(mutants))
    results = earlier + r.run(mutants, equivalent)
    dt = time.perf_counter() - t0
    print(report(results, dt))
    if a.json:
        write_json(results, a.json, dt)
    return 0 if all(x.verdict in ("killed", "equivalent", "invalid", "unreached")
                    for x in results) else 1


if __name__ == "__main__":
    sys.exit(main())
