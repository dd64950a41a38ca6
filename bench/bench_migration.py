"""Live-migration throughput under emulation, per option: pages/s, mirror exits per page, rounds.

Why: the point of the mailbox design is one VM exit per batch, not per page, and a helper that
keeps up with pre-copy; this puts numbers on both for each address-space option with the built
image (run `python build.py` first). Each run migrates a guest that keeps dirtying memory.
Run: python bench/bench_migration.py [--mem 64M] [--cbit 47] [--transport tcp]
"""

from __future__ import annotations

import argparse
import json
import time

from emulate.migration import MigrationParams, migrate
from helperfw.cli import parse_size
from helperfw.runtime.protocol import OPTION_NAMES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mem", type=parse_size, default=parse_size("64M"))
    ap.add_argument("--cbit", type=int, default=47)
    ap.add_argument("--transport", default="tcp")
    args = ap.parse_args()
    rows = []
    print(f"{'option':<9} {'pages':>7} {'pages/s':>8} {'exits/page':>10} {'rounds':>6} "
          f"{'MiB wire':>8} {'wall s':>7}")
    for opt, name in OPTION_NAMES.items():
        t = time.perf_counter()
        r = migrate(MigrationParams(mem=args.mem, option=opt, cbit=args.cbit,
                                    transport=args.transport, verify=False))
        wall = time.perf_counter() - t
        row = {"option": name, "pages": r.pages, "pages_per_s": round(r.pages_per_s),
               "exits_per_page": round(r.exits_per_page, 4), "rounds": len(r.rounds),
               "wire_mib": round(r.bytes_on_wire / (1 << 20), 1), "wall_s": round(wall, 1)}
        rows.append(row)
        print(f"{name:<9} {r.pages:>7} {row['pages_per_s']:>8} {row['exits_per_page']:>10} "
              f"{row['rounds']:>6} {row['wire_mib']:>8} {row['wall_s']:>7}")
    print(json.dumps({"bench": "migration", "mem": args.mem, "cbit": args.cbit,
                      "transport": args.transport, "runs": rows}))


if __name__ == "__main__":
    main()
