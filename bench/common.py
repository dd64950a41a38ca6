"""Shared pieces of the benchmarks: best-of timing, machine facts, table and JSON output.

The bench_*.py scripts and run.py import this as a sibling module (`python bench/X.py` puts
bench/ first on sys.path; `ensure_paths()` also adds the repository root for build.py).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_FLAGS = ("aes", "pclmulqdq", "avx", "avx2", "vaes", "vpclmulqdq", "avx512f", "hypervisor")


def ensure_paths() -> None:
    """Make `import build` (the repository's build.py) and the bench modules importable."""
    for p in (str(ROOT), str(ROOT / "bench")):
        if p not in sys.path:
            sys.path.insert(0, p)


def best(fn: Callable[[int], object], reps: int, rounds: int = 30) -> float:
    """Best seconds per item over `rounds` rounds of `fn(reps)` (the host is shared: take the
    minimum, which is the run least disturbed by other work, not an average)."""
    out = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn(reps)
        out = min(out, (time.perf_counter() - t) / reps)
    return out


def machine() -> dict:
    """The facts a reader needs to compare figures: CPU model, cores, relevant flags, versions."""
    info: dict[str, object] = {"cpu": platform.processor() or platform.machine(),
                               "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        fields.setdefault(k.strip(), v.strip())
    if fields:
        info["cpu"] = fields.get("model name", info["cpu"])
        info["family_model_stepping"] = (f"{fields.get('cpu family')}/{fields.get('model')}/"
                                         f"{fields.get('stepping')}")
        info["cores_per_socket"] = int(fields.get("cpu cores", "0") or 0)
        info["mhz"] = float(fields.get("cpu MHz", "0") or 0)
        flags = set(fields.get("flags", "").split())
        info["flags"] = [f for f in CPU_FLAGS if f in flags]
    info["kernel"] = platform.release()
    if hasattr(os, "getloadavg"):  # other work on a shared host moves every figure
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    info["python"] = platform.python_version()
    try:
        import helperfw  # noqa: F401  (before llvmlite: it configures llvmlite's IR layer)
    except ImportError:
        pass
    try:
        import llvmlite
        import llvmlite.binding as llvm
        info["llvmlite"] = llvmlite.__version__
        info["llvm"] = ".".join(map(str, llvm.llvm_version_info))
    except ImportError:
        pass
    try:
        import unicorn
        info["unicorn"] = unicorn.__version__
    except ImportError:
        pass
    try:
        import cryptography
        from cryptography.hazmat.backends.openssl import backend
        info["cryptography"] = cryptography.__version__
        info["openssl"] = backend.openssl_version_text()
    except ImportError:
        pass
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], title: str = "") -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title] if title else []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3f}" if abs(v) >= 0.1 or not v else f"{v:.4f}"
    return str(v)


def json_line(bench: str, **fields: object) -> str:
    """The one machine-readable line a benchmark prints last."""
    return json.dumps({"bench": bench, **fields}, separators=(",", ":"), sort_keys=False)
