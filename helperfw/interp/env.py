"""The interpreter's platform: what it cannot compute (privileged instructions, link-time
addresses) it asks an `Env`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..intrinsics import x86
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


class MmxMasks(Env):
    """The staging-mask registers as compiled code leaves them to MMX (runtime/gcmsiv.py):
    mm4 the bound page, mm5 the serial, mm6:mm7 the key. `mask_block`, `mask8` and
    `mask8_256` are x86.mask over them, so the interpreter runs the AEAD on either path with
    the masks the CPU computes. Combine with another Env by inheritance for the rest of the
    platform."""

    def __init__(self) -> None:
        self.mm = [0] * 8

    def mask_key(self, lo: int, hi: int) -> None:
        self.mm[6], self.mm[7], self.mm[5] = lo, hi, 0

    def mask_next(self) -> None:
        self.mm[5] = (self.mm[5] + 1) & x86.MASK64

    def bind_page(self, va: int) -> None:
        self.mm[4] = va

    def bound_page(self) -> int:
        return self.mm[4]

    def _m(self, block_id: int) -> int:
        return x86.mask(self.mm[6] | (self.mm[7] << 64), self.mm[5], block_id)

    def mask_block(self, x: int, block_id: int) -> int:
        return x ^ self._m(block_id)

    def mask8(self, *vals: int) -> list[int]:
        return [x ^ self._m(vals[8] + j) for j, x in enumerate(vals[:8])]

    def mask8_256(self, *vals: int) -> list[int]:
        ident = vals[4]
        return [y ^ x86.join(self._m(ident + 2 * j), self._m(ident + 2 * j + 1))
                for j, y in enumerate(vals[:4])]
