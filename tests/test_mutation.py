"""Mutation testing of the helper's security-relevant DSL code (tests/mutation), in CI.

Every run: the mutants are generated from the sources as they are (ids unique, every splice
valid Python with the line count kept, only its own function changed), every mutant
tests/mutation/equivalent.txt lists still exists and says why it is equivalent, and a small
sample of mutants (MH_MUTATION_SAMPLE, default 3, spread over the modules, seed
MH_MUTATION_SEED, drawn from the mutants a native test group faces first, so that the sample
costs seconds of the suite's time, not minutes) is built and run against the tests that
matter: each must be killed.

MH_MUTATION_FULL=1 runs every mutant instead (hours: 4-6 mutants a minute on two shared
cores) and requires the score docs/SECURITY.md reports: at least 95% of the non-equivalent mutants of each of
session.py, secrets.py, pagetables.py and the AEAD code (gcmsiv*.py, aes.py, memops.py) killed.
`python -m tests.mutation` is the same run from the command line, with a report.
"""

from __future__ import annotations

import ast
import os
import time

import pytest

from tests.mutation.groups import GROUPS
from tests.mutation.mutants import MODULES, OPERATORS, all_mutants, by_id
from tests.mutation.runner import (
    Runner,
    cpu_jobs,
    native_first,
    read_equivalent,
    report,
    sample,
    score,
)

FULL = os.environ.get("MH_MUTATION_FULL") == "1"
SAMPLE = int(os.environ.get("MH_MUTATION_SAMPLE", "3"))
SEED = int(os.environ.get("MH_MUTATION_SEED", "16"))
AEAD = ("gcmsiv", "gcmsiv_keys", "gcmsiv_wide", "aes", "memops")
GOAL = 95.0
# Sampled runs measure no baseline: generous limits (a mutant that hangs a test is killed by
# the limit, only later)
SAMPLE_TIMEOUTS = {g.name: (300.0 if g.emulator else 120.0) for g in GROUPS}


@pytest.fixture(scope="module")
def mutants():
    return all_mutants()


def test_mutants_are_generated_from_the_sources(mutants):
    ids = by_id(mutants)
    assert {m.module for m in mutants} == set(MODULES)
    assert {m.operator for m in mutants} == set(OPERATORS)
    sources = {m.path: m.path.read_text() for m in mutants}
    trees = {p: ast.parse(t) for p, t in sources.items()}
    for m in mutants[:: max(1, len(mutants) // 40)]:  # a spread, every run; all: below
        _check_splice(m, sources[m.path], trees[m.path])
    print(len(ids), "mutants")


@pytest.mark.skipif(not FULL, reason="every splice: MH_MUTATION_FULL=1")
def test_every_splice_changes_only_its_function(mutants):
    sources = {m.path: m.path.read_text() for m in mutants}
    trees = {p: ast.parse(t) for p, t in sources.items()}
    for m in mutants:
        _check_splice(m, sources[m.path], trees[m.path])


def _check_splice(m, source: str, tree: ast.Module) -> None:
    new = m.mutated_source(source)
    assert new.count("\n") == source.count("\n"), m.id
    before = {f.name: ast.dump(f) for f in tree.body if isinstance(f, ast.FunctionDef)}
    after = {f.name: ast.dump(f) for f in ast.parse(new).body if isinstance(f, ast.FunctionDef)}
    changed = [n for n in before if before[n] != after[n]]
    assert changed == [m.function], (m.id, changed)


def test_equivalent_mutants_exist_and_say_why(mutants):
    ids = by_id(mutants)
    eq = read_equivalent()
    stale = [k for k in eq if k not in ids]
    assert not stale, f"equivalent.txt names mutants that no longer exist: {stale}"
    assert all(len(r) > 40 for r in eq.values()), "every equivalent mutant needs its reason"


def test_mutants_are_killed(mutants):
    t0 = time.perf_counter()
    eq = read_equivalent()
    if FULL:
        r = Runner(cpu_jobs(), log=lambda s: print(s, flush=True))
        chosen = mutants
        r.baseline(r.groups_for(chosen))
    else:
        r = Runner(1, log=lambda s: print(s, flush=True), timeouts=dict(SAMPLE_TIMEOUTS))
        chosen = sample(native_first(r, mutants), SAMPLE, SEED, eq)
    results = r.run(chosen, eq)
    print(report(results, time.perf_counter() - t0))
    bad = [(x.verdict, x.mutant.id) for x in results
           if x.verdict not in ("killed", "invalid", "equivalent", "unreached")]
    if not FULL:
        assert not bad, f"mutants not killed (replay: python -m tests.mutation --id ID): {bad}"
        return
    s = score(results)
    for group in ("session", "secrets", "pagetables"):
        assert s[group]["score"] >= GOAL, (group, s[group])
    killed = sum(s[m]["killed"] for m in AEAD)
    counted = sum(s[m]["killed"] + s[m]["survived"] + s[m]["error"] for m in AEAD)
    assert 100.0 * killed / counted >= GOAL, ("AEAD", killed, counted)
