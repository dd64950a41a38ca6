"""The interpreter proper: runs prepared DSL functions over a Memory, with an Env.

`Interpreter` is also the `Machine` the registry's intrinsic semantics are given
(helperfw/intrinsics/registry.py): `env`, typed `read`/`write` and `trap`.
"""

from __future__ import annotations

from typing import Any

from ..dsl import Function, Static
from ..types import Type, void
from .env import Env
from .errors import InterpError, Trap
from .memory import Memory, reader, wrapper, writer
from .preparer import RETURN, Frame, Prepared, Preparer, store

STACK_TOP = 0x7FFF_0000_0000  # default regions; any free addresses would do
STACK_SIZE = 1 << 20
STATIC_BASE = 0x6000_0000_0000


class Interpreter:
    """Runs DSL functions over a `Memory` (its own by default) with an `Env` for the platform."""

    def __init__(self, memory: Memory | None = None, env: Env | None = None, *,
                 stack_top: int = STACK_TOP, stack_size: int = STACK_SIZE,
                 static_base: int = STATIC_BASE) -> None:
        self.memory = memory if memory is not None else Memory()
        self.env = env if env is not None else Env()
        self.memory.map(stack_top - stack_size, stack_size)
        self.stack_limit = stack_top - stack_size
        self.sp = stack_top
        self._static_next = static_base
        self._statics: dict[int, tuple[Static, int]] = {}
        self._prepared: dict[Function, Prepared] = {}

    # -- public -----------------------------------------------------------------------------
    def call(self, fn: Function, *args: int) -> int | None:
        """Run `fn` with Python ints (each wrapped to its parameter's type, like a C call
        truncates a register); returns the typed result (signed types as negative ints),
        or None for a void function."""
        p = self.prepare(fn)
        if len(args) != len(p.params):
            raise TypeError(f"{fn.name} takes {len(p.params)} arguments, got {len(args)}")
        return self._invoke(p, [wrapper(t)(a) for a, (_, t) in zip(args, p.params)])

    def static_addr(self, s: Static) -> int:
        """Where static `s` lives in this interpreter's memory (allocated on first use)."""
        key = id(s)
        if key not in self._statics:
            addr = (self._static_next + s.align - 1) // s.align * s.align
            size = max(s.type.size, 1)
            buf = self.memory.map(addr, size, readonly=s.readonly)
            if s.init is not None:
                buf[:] = s.init
            self._statics[key] = (s, addr)
            self._static_next = (addr + size + 15) // 16 * 16
        return self._statics[key][1]

    def read_static(self, s: Static) -> bytes:
        return self.memory.read(self.static_addr(s), s.type.size)

    def prepare(self, fn: Function) -> Prepared:
        if fn not in self._prepared:
            self._prepared[fn] = Preparer(self, fn).prepare()
        return self._prepared[fn]

    # -- calls ------------------------------------------------------------------------------
    def _invoke(self, p: Prepared, args: list[Any]) -> Any:
        old_sp = self.sp
        base = (old_sp - p.frame_size) & ~15
        if base - 16 < self.stack_limit:
            raise InterpError(f"stack overflow calling {p.fn.name}")
        self.sp = base - 16  # the return-address slot a real call would use
        try:
            if p.frame_size:
                self.memory.write(base, bytes(p.frame_size))
            fr = Frame(p.nregs, base)
            for slot, a in zip(p.param_slots, args):
                store(self.memory, slot)(fr, a)
            r = p.body(fr)
            if r == RETURN:
                return fr.ret
            if p.ret is not void:
                raise InterpError(f"{p.fn.name} fell off its end")
            return None
        finally:
            self.sp = old_sp


    # -- the Machine protocol (what intrinsic semantics may use) ----------------------------
    def read(self, t: Type, addr: int) -> Any:
        return reader(self.memory, t)(addr)

    def write(self, t: Type, addr: int, value: Any) -> None:
        writer(self.memory, t)(addr, value)

    def trap(self, where: str) -> None:
        raise Trap(f"{where}: trap()")
