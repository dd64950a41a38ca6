"""python -m tests.mutation.identical: which mutants build the shipped image byte for byte.

    python -m tests.mutation.identical --journal J        # the journal's survivors
    python -m tests.mutation.identical --id ID [--id ID]  # these mutants

Why: a mutant whose MigrationHelper.efi is byte-identical to the original's cannot be told
apart by anything that runs the helper: LLVM proved it computes the same (a fast path that the
slow path would take too, an operand it folds, an out-of-bounds store to a local it drops as
undefined). Only the shipped image counts: the native tests' builds (other roots, other
inlining) may still differ. Each mutant is spliced into one private copy of the tree and built
there with build.py, as the emulator groups do. Prints one line per mutant, "identical" or
"differs", and the ids of the identical ones last (for tests/mutation/equivalent.txt).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

from tests.mutation.mutants import all_mutants, by_id
from tests.mutation.runner import read_equivalent, read_journal
from tests.mutation.workspace import Workspace

REASON = ("The firmware image built with this mutant is byte-identical to the original's\n"
          "    (python -m tests.mutation.identical): nothing that runs the helper can tell.")


def image_digest(ws: Workspace) -> str:
    out = Path(tempfile.mkdtemp(prefix="mh-identical-"))
    return hashlib.sha256(ws.build_firmware(out).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.mutation.identical",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--journal", type=Path, help="check the survivors of this journal")
    ap.add_argument("--id", action="append", default=[], help="one mutant by id (repeatable)")
    a = ap.parse_args(argv)
    mutants = all_mutants()
    known = by_id(mutants)
    ids = list(a.id)
    if a.journal:
        equivalent = read_equivalent()
        ids += [r.mutant.id for r in read_journal(a.journal, mutants)
                if r.verdict == "survived" and r.mutant.id not in equivalent]
    missing = [i for i in ids if i not in known]
    if missing:
        print(f"unknown mutant id: {missing[0]!r}", file=sys.stderr)
        return 2
    ws = Workspace()
    try:
        original = image_digest(ws)
        same = []
        for i in ids:
            ws.apply(known[i])
            try:
                verdict = "identical" if image_digest(ws) == original else "differs"
            except RuntimeError as e:  # not valid DSL: not equivalent to anything
                verdict = f"no image ({e})"
            finally:
                ws.restore()
            print(f"{verdict:10s} {i}", flush=True)
            if verdict == "identical":
                same.append(i)
    finally:
        ws.remove()
    print(f"\n{len(same)} of {len(ids)} build the original image:")
    for i in same:
        print(i)
    return 0


if __name__ == "__main__":
    sys.exit(main())
