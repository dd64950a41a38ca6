"""The linked image: the one data structure every later stage consumes.

The linker (link.py) produces it; the PE packager (ovmf_glue), the emulator's loaders and the
native runner read it. Addresses are RVAs: the image is linked at base 0 with the first section at
``FIRST_SECTION_RVA`` so a PE header page fits in front. Absolute 64-bit pointers in the image hold
the target's RVA and are listed in ``relocs``; a loader adds its base to each.
"""

from __future__ import annotations

import bisect
import functools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

PAGE = 0x1000  # section alignment: the x86-64 page, so each section gets its own permissions
FIRST_SECTION_RVA = 0x1000  # room for the PE headers at RVA 0


@dataclass(frozen=True)
class Section:
    name: str  # ".text", ".rodata", ".data" or ".bss"
    rva: int  # page aligned
    data: bytes  # initialised bytes; len(data) <= vsize (b"" for .bss)
    vsize: int
    perms: str  # "rx", "r" or "rw": never both writable and executable

    @property
    def end(self) -> int:
        return self.rva + self.vsize


@dataclass(frozen=True)
class Symbol:
    name: str
    rva: int
    size: int
    section: str
    kind: str  # "func" or "object"


class SymbolTable:
    """Symbols by RVA: the one symbolizer for fault reports, disassembly and `helperfw inspect`.

    A symbol covers [rva, rva + max(size, 1)); where symbols overlap, the one starting last wins
    (an object inside a larger one, an alias). Lookup is a bisection plus a walk back bounded by
    the largest symbol, so crash dumps and per-instruction disassembly stay cheap."""

    def __init__(self, symbols: Iterable[Symbol]) -> None:
        self._syms = sorted(symbols, key=lambda s: (s.rva, s.name))
        self._rvas = [s.rva for s in self._syms]
        self._span = max((max(s.size, 1) for s in self._syms), default=1)

    def lookup(self, rva: int) -> Symbol | None:
        """The symbol covering `rva`, or None."""
        i = bisect.bisect_right(self._rvas, rva) - 1
        while i >= 0 and self._syms[i].rva + self._span > rva:
            s = self._syms[i]
            if rva < s.rva + max(s.size, 1):
                return s
            i -= 1
        return None

    def symbolize(self, rva: int) -> str | None:
        """'name+0xoff' for an RVA inside a symbol, else None."""
        s = self.lookup(rva)
        return f"{s.name}+{rva - s.rva:#x}" if s else None


@dataclass(frozen=True)
class LinkedImage:
    sections: tuple[Section, ...]
    relocs: tuple[int, ...]  # RVAs of u64 fields holding an RVA; add the load base to each
    symbols: dict[str, Symbol] = field(hash=False)
    entry: str | None = None  # name of the EFI entry symbol, if any

    @property
    def size(self) -> int:
        """Size of the loaded image (SizeOfImage), page aligned."""
        end = max(s.end for s in self.sections)
        return (end + PAGE - 1) & ~(PAGE - 1)

    def section(self, name: str) -> Section:
        for s in self.sections:
            if s.name == name:
                return s
        raise KeyError(name)

    def symbol(self, name: str) -> Symbol:
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"no symbol {name!r} in image") from None

    @functools.cached_property
    def symbol_table(self) -> SymbolTable:
        return SymbolTable(self.symbols.values())

    def symbolize(self, rva: int) -> str:
        """'name+0xoff' for an RVA inside a function or object, else hex."""
        return self.symbol_table.symbolize(rva) or f"{rva:#x}"

    def flat(self, base: int = 0) -> bytearray:
        """The image as loaded at `base` (headers page zero, bss zero, relocations applied)."""
        img = bytearray(self.size)
        for s in self.sections:
            img[s.rva : s.rva + len(s.data)] = s.data
        if base:
            for r in self.relocs:
                (v,) = struct.unpack_from("<Q", img, r)
                struct.pack_into("<Q", img, r, (v + base) & 0xFFFFFFFFFFFFFFFF)
        return img
