"""The interpreter's platform: what it cannot compute (privileged instructions, link-time
addresses) it asks an `Env`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..intrinsics.registry import INTRINSICS, AskEnv
from .errors import InterpError


def _idle(*args: Any) -> None:
    return None


class Env:
    """The platform, asked through one method per platform intrinsic, named after it and taking
    its operands: `cpuid(leaf, subleaf) -> (a, b, c, d)`, `rdmsr(msr)`, `wrmsr(msr, value)`,
    `vmmcall(nr, a0, a1, a2, a3)`, `rdrand64() -> (value, ok)`, `inb(port)`, `outb(port, value)`,
    `efi_call(fnptr, *args)`, `symbol_addr(name)`, `func_addr(fn)`... (every registry entry
    whose semantics are `ask_env()`; results are wrapped to the intrinsic's result types).

    Override the methods a test needs; the defaults model nothing and raise, except the hints
    and fences (`ask_env(idle=True)`), which have no architectural effect on a single thread."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        ask = next((e.evaluate for e in INTRINSICS.values()
                    if isinstance(e.evaluate, AskEnv) and e.evaluate.method == name), None)
        if ask is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        if ask.idle:
            return _idle

        def unmodelled(*args: Any) -> Any:
            raise InterpError(f"{name}: the interpreter's Env models no {name}; override it")
        return unmodelled
