"""The interpreter's memory: flat, little-endian, explicit, made of mapped regions.

Pointers are plain ints. Tests can map their own bytearray at a chosen address, so the program's
side effects land in the caller's buffer. Values of DSL types are held as Python ints the way
`wrapper` says (signed types as negative ints, bools as 0/1, v128/v256 as a 128/256-bit int); `reader`
and `writer` move them in and out of memory in that form.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Any

from ..types import BoolType, IntType, PtrType, Type, VecType
from .errors import InterpError, MemoryFault

MASK64 = (1 << 64) - 1
MASK128 = (1 << 128) - 1


class Memory:
    """A flat little-endian address space made of mapped regions (nothing else is accessible).

    `map(addr, size)` creates zeroed memory; `map(addr, buffer)` maps a caller's bytearray (or
    writable memoryview) in place, so writes by the program are visible in that buffer."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[tuple[int, int, Any, bool]] = []  # (start, end, buffer, readonly)
        self._last: tuple[int, int, Any, bool] = (0, 0, b"", True)

    def map(self, addr: int, size_or_buffer: int | bytearray | memoryview,
            readonly: bool = False) -> Any:
        buf = (bytearray(size_or_buffer) if isinstance(size_or_buffer, int)
               else size_or_buffer)
        end = addr + len(buf)
        if addr < 0 or end > 1 << 64 or len(buf) == 0:
            raise ValueError(f"bad region {addr:#x}+{len(buf):#x}")
        i = bisect.bisect_right(self._starts, addr)
        if (i > 0 and self._regions[i - 1][1] > addr) or (
                i < len(self._starts) and self._starts[i] < end):
            raise ValueError(f"region {addr:#x}..{end:#x} overlaps a mapped region")
        self._starts.insert(i, addr)
        self._regions.insert(i, (addr, end, buf, readonly))
        return buf

    def unmap(self, addr: int) -> None:
        i = self._starts.index(addr)
        del self._starts[i], self._regions[i]
        self._last = (0, 0, b"", True)

    def _region(self, addr: int, size: int, kind: str) -> tuple[int, int, Any, bool]:
        r = self._last
        if r[0] <= addr and addr + size <= r[1]:
            return r
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr + size <= r[1]:
                self._last = r
                return r
        raise MemoryFault(addr, size, kind)

    def read(self, addr: int, size: int) -> bytes:
        start, _, buf, _ = self._region(addr, size, "read")
        return bytes(buf[addr - start: addr - start + size])

    def write(self, addr: int, data: bytes) -> None:
        start, _, buf, ro = self._region(addr, len(data), "write")
        if ro:
            raise MemoryFault(addr, len(data), "write to read-only")
        buf[addr - start: addr - start + len(data)] = data

    def read_int(self, addr: int, size: int) -> int:
        start, _, buf, _ = self._region(addr, size, "read")
        o = addr - start
        return int.from_bytes(buf[o: o + size], "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        start, _, buf, ro = self._region(addr, size, "write")
        if ro:
            raise MemoryFault(addr, size, "write to read-only")
        o = addr - start
        buf[o: o + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def wrapper(t: Type) -> Callable[[Any], Any]:
    """How the interpreter holds a value of type `t`: a function that brings any Python int
    (a call argument, a platform model's answer) into that form."""
    if isinstance(t, IntType):
        return t.wrap
    if isinstance(t, PtrType):
        return lambda v: int(v) & MASK64
    if isinstance(t, BoolType):
        return lambda v: int(bool(v))
    if isinstance(t, VecType):
        mask = t.mask
        return lambda v: int(v) & mask
    raise InterpError(f"cannot hold a {t} in a register")


def reader(mem: Memory, t: Type) -> Callable[[int], Any]:
    rd = mem.read_int
    if isinstance(t, IntType):
        size, wrap = t.size, t.wrap
        if t.signed:
            return lambda a: wrap(rd(a, size))
        return lambda a: rd(a, size)
    if isinstance(t, PtrType):
        return lambda a: rd(a, 8)
    if isinstance(t, BoolType):
        return lambda a: rd(a, 1) & 1  # an i1 load: only bit 0 is the value
    if isinstance(t, VecType):
        vsize = t.size
        return lambda a: rd(a, vsize)
    raise InterpError(f"cannot load a {t}")


def writer(mem: Memory, t: Type) -> Callable[[int, Any], None]:
    wr = mem.write_int
    if not t.is_scalar:
        raise InterpError(f"cannot store a {t}")
    size = t.size
    return lambda a, v: wr(a, size, v)

