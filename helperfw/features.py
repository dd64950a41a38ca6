"""x86 target features: the firmware's baseline, and what a function may add with
`@function(features="+avx2,+vaes,+vpclmulqdq")`.

One table for the whole tool chain: codegen/emit.py builds the target machine from `BASE`/`OFF`
and spells each function's LLVM "target-features" with `target_string`; the front end
(helperfw/frontend.py) refuses a wide type or intrinsic in a function whose features (closed
under `IMPLIES`) lack what the type or intrinsic declares. The firmware's default has no AVX:
UEFI and the mirror vCPU promise nothing about the AVX state (XCR0), so only code chosen at run
time, after CPUID and XGETBV said yes, may use it.
"""

from __future__ import annotations

from collections.abc import Iterable

# Every function: SSE up to 4.1 plus AES-NI/PCLMULQDQ (the image runs on any x86-64 with AES-NI).
BASE = ("sse2", "ssse3", "sse4.1", "aes", "pclmul")
OFF = ("avx", "avx2", "avx512f")  # off unless a function asks for them

# The features a function may add, and what each implies (LLVM's X86.td: vaes needs AVX2 and
# AES, vpclmulqdq needs AVX and PCLMUL, avx2 needs AVX).
IMPLIES: dict[str, tuple[str, ...]] = {
    "avx": (),
    "avx2": ("avx",),
    "vaes": ("avx2", "aes"),
    "vpclmulqdq": ("avx", "pclmul"),
}


def parse(spec: str) -> frozenset[str]:
    """`"+avx2,+vaes"` -> {"avx2", "vaes"}; ValueError (one line) for anything else."""
    out = set()
    for item in (s.strip() for s in spec.split(",")):
        if not item.startswith("+"):
            raise ValueError(f"target feature {item!r}: a function can only add features, "
                             f"spelled '+name'")
        name = item[1:]
        if name not in IMPLIES:
            raise ValueError(f"unknown target feature {name!r}; known: "
                             f"{', '.join('+' + k for k in IMPLIES)}")
        out.add(name)
    return frozenset(out)


def closure(names: Iterable[str]) -> frozenset[str]:
    """The features `names` give a function, the baseline's included."""
    out, todo = set(BASE), list(names)
    while todo:
        n = todo.pop()
        if n not in out:
            out.add(n)
            todo.extend(IMPLIES.get(n, ()))
    return frozenset(out)


def target_string(extra: Iterable[str] = ()) -> str:
    """LLVM's "target-features" for the baseline plus `extra` (and what they imply), in a fixed
    order: the baseline's, then the added ones sorted, then what stays off."""
    on = closure(extra)
    added = sorted(on - set(BASE))
    return ",".join([*(f"+{f}" for f in BASE), *(f"+{f}" for f in added),
                     *(f"-{f}" for f in OFF if f not in on)])
