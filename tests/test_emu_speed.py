"""Guest code over C=1 pages runs at native unicorn speed (no per-access callback): a small
run of bench/bench_memctl.py's copy loop must reach half the plain-unicorn throughput."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_memctl.py"


def test_copy_loop_ratio() -> None:
    spec = importlib.util.spec_from_file_location("bench_memctl", BENCH)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n, reps = 1 << 20, 2
    plain = max(bench.bench_plain(n, reps) for _ in range(2))
    sev = max(bench.bench_sev(n, reps, 51) for _ in range(2))
    print(f"plain {plain:.1f} MB/s, C=1 {sev:.1f} MB/s, ratio {sev / plain:.2f}")
    assert sev / plain >= 0.5
