"""What the CPU running the tests has. Native runs of the wide code (AVX2, VAES, VPCLMULQDQ)
need all three, with the AVX state enabled by the OS; elsewhere those tests skip, saying why.

Linux lists `avx`/`avx2` in /proc/cpuinfo only when it enabled the AVX state (XCR0), so the
flags are the same question the helper asks with CPUID and XGETBV (runtime/gcmsiv_wide.py's
cpu_wide_ok, which tests/test_gcmsiv_wide.py holds to this).
"""

from __future__ import annotations

from pathlib import Path

import pytest

WIDE_FLAGS = ("avx2", "vaes", "vpclmulqdq")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


HAS_WIDE = set(WIDE_FLAGS) <= cpu_flags()
needs_wide = pytest.mark.skipif(
    not HAS_WIDE, reason="this CPU lacks AVX2, VAES or VPCLMULQDQ (or the OS left AVX off): "
    "native runs of the wide code are skipped; the interpreter's models are still tested")
