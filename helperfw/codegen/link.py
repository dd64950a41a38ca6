"""x86-64 ELF relocatable object → LinkedImage (sections, resolved relocations, symbol map).

The object is compiled PIC with hidden visibility, so code reaches code and data PC-relatively
and the only load-time fix-ups are absolute u64 pointers in data (R_X86_64_64), which become base
relocations. Any reference the image does not itself define (memset, memcpy, __chkstk, a GOT
slot) fails the link: the firmware must be self-contained.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import lief

from .image import FIRST_SECTION_RVA, PAGE, LinkedImage, Section, Symbol

R = lief.ELF.Relocation.TYPE
# Output sections in image order; input sections are classified by their flags.
OUTPUT_ORDER = (".text", ".rodata", ".data", ".bss")
PERMS = {".text": "rx", ".rodata": "r", ".data": "rw", ".bss": "rw"}


class LinkError(Exception):
    pass


def _classify(sec: lief.ELF.Section) -> str | None:
    F = lief.ELF.Section.FLAGS
    if not sec.has(F.ALLOC) or sec.name.startswith(".eh_frame"):
        return None
    if sec.type == lief.ELF.Section.TYPE.NOBITS:
        return ".bss"
    if sec.has(F.EXECINSTR):
        return ".text"
    if sec.has(F.WRITE):
        return ".data"
    return ".rodata"


def _align(v: int, a: int) -> int:
    return (v + a - 1) // a * a


@dataclass
class _Link:
    """One link in progress: the object's sections, then what each step adds."""

    sections: list[lief.ELF.Section]
    # 1. collect: input index -> (output section, offset in it); output bytes and sizes
    placed: dict[int, tuple[str, int]] = field(default_factory=dict)
    contents: dict[str, bytearray] = field(
        default_factory=lambda: {n: bytearray() for n in OUTPUT_ORDER})
    sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTPUT_ORDER, 0))
    # 2. lay out: output section -> RVA; the symbols the linker defines
    base: dict[str, int] = field(default_factory=dict)
    linker_defined: dict[str, int] = field(default_factory=dict)

    def sec_rva(self, shndx: int) -> int:
        """The RVA where input section `shndx` starts."""
        if shndx not in self.placed:
            raise LinkError(f"reference into discarded section {self.sections[shndx].name}")
        out, off = self.placed[shndx]
        return self.base[out] + off


def link(obj: bytes, entry: str | None = None) -> LinkedImage:
    """Link one relocatable object into an image at base 0: collect its sections, lay them out,
    build the symbol table, then resolve and apply its relocations."""
    elf = lief.ELF.parse(list(obj))
    if elf is None:
        raise LinkError("not an ELF object")
    lk = _Link(list(elf.sections))
    _collect(lk)
    _lay_out(lk)
    symbols = _symbol_table(lk, elf)
    abs_relocs = _relocate(lk, elf)
    out_sections = tuple(
        Section(n, lk.base[n], bytes(lk.contents[n]) if n != ".bss" else b"", lk.sizes[n],
                PERMS[n])
        for n in OUTPUT_ORDER if n in lk.base
    )
    if entry is not None and entry not in symbols:
        raise LinkError(f"entry symbol {entry!r} is not defined")
    return LinkedImage(out_sections, tuple(sorted(abs_relocs)), symbols, entry)


def _collect(lk: _Link) -> None:
    """Step 1: append each allocated input section to its output section, aligned."""
    for idx, sec in enumerate(lk.sections):
        out = _classify(sec)
        if out is None or sec.size == 0:
            continue
        off = _align(lk.sizes[out], max(sec.alignment, 1))
        lk.placed[idx] = (out, off)
        lk.sizes[out] = off + sec.size
        if out != ".bss":
            buf = lk.contents[out]
            buf.extend(b"\0" * (off - len(buf)))
            buf.extend(bytes(sec.content))


def _lay_out(lk: _Link) -> None:
    """Step 2: output sections page by page from FIRST_SECTION_RVA, and the symbols that
    bound them (for the firmware's own use, e.g. its region list): `__image_start/_end` and
    `__<section>_start/_end`; an empty section gets start == end where it would have been."""
    rva = FIRST_SECTION_RVA
    for name in OUTPUT_ORDER:
        if lk.sizes[name]:
            lk.base[name] = rva
            rva = _align(rva + lk.sizes[name], PAGE)
    lk.linker_defined = {"__image_start": 0, "__image_end": rva}
    cursor = FIRST_SECTION_RVA
    for name in OUTPUT_ORDER:
        tag = name.lstrip(".")
        start = lk.base.get(name, cursor)
        end = _align(start + lk.sizes[name], PAGE)
        lk.linker_defined[f"__{tag}_start"], lk.linker_defined[f"__{tag}_end"] = start, end
        cursor = end


def _symbol_table(lk: _Link, elf: lief.ELF.Binary) -> dict[str, Symbol]:
    """Step 3: every named function and object the image defines, at its RVA."""
    symbols: dict[str, Symbol] = {}
    for sym in elf.symtab_symbols:
        if sym.shndx in lk.placed and sym.name and sym.type in (
            lief.ELF.Symbol.TYPE.FUNC, lief.ELF.Symbol.TYPE.OBJECT
        ):
            out, _ = lk.placed[sym.shndx]
            symbols[sym.name] = Symbol(
                sym.name, lk.sec_rva(sym.shndx) + sym.value, sym.size, out,
                "func" if sym.type == lief.ELF.Symbol.TYPE.FUNC else "object",
            )
    return symbols


def _relocate(lk: _Link, elf: lief.ELF.Binary) -> list[int]:
    """Step 4: refuse undefined symbols, then patch every relocation in a kept section; the
    RVAs of absolute pointers (base relocations for the loader)."""
    undefined = sorted(
        {s.name for s in elf.symtab_symbols if s.shndx == 0 and s.name
         and s.name not in lk.linker_defined}
    )
    if undefined:
        raise LinkError(f"image references undefined symbols: {', '.join(undefined)}")
    abs_relocs: list[int] = []
    for rel in elf.relocations:
        target = rel.section
        if target is None:
            continue
        tidx = lk.sections.index(target) if target in lk.sections else _index_of(
            lk.sections, target)
        if tidx not in lk.placed:
            continue  # relocation inside a discarded section (e.g. .eh_frame)
        out, off = lk.placed[tidx]
        where = off + rel.address  # offset inside the output section
        p = lk.base[out] + where
        if _patch(rel, lk.contents[out], where, p, _resolve(lk, rel.symbol) + rel.addend):
            abs_relocs.append(p)
    return abs_relocs


def _resolve(lk: _Link, sym: lief.ELF.Symbol) -> int:
    """A relocation's symbol as an RVA: a section, a linker-defined bound or a definition."""
    if sym.type == lief.ELF.Symbol.TYPE.SECTION:
        return lk.sec_rva(sym.shndx)
    if sym.shndx == 0:  # undefined
        if sym.name in lk.linker_defined:
            return lk.linker_defined[sym.name]
        raise LinkError(f"undefined symbol {sym.name!r}")
    if sym.shndx >= 0xFF00:
        raise LinkError(f"unsupported special symbol {sym.name!r}")
    return lk.sec_rva(sym.shndx) + sym.value


def _patch(rel: lief.ELF.Relocation, buf: bytearray, where: int, p: int, value: int) -> bool:
    """Write relocation `rel` (target RVA `value` = S + A) at `where` (RVA `p`); True for an
    absolute pointer the loader must rebase."""
    if rel.type in (R.X86_64_PC32, R.X86_64_PLT32):
        _put_pc32(buf, where, value - p, p, "PC32 relocation")
    elif rel.type == R.X86_64_64:
        struct.pack_into("<Q", buf, where, value & 0xFFFFFFFFFFFFFFFF)
        return True
    elif rel.type in (R.X86_64_REX_GOTPCRELX, R.X86_64_GOTPCRELX, R.X86_64_GOTPCREL):
        # Relax `mov sym@GOTPCREL(%rip), %reg` to `lea sym(%rip), %reg` (the x86-64 psABI
        # relaxation): every symbol is inside the image, so no GOT is ever needed.
        if where < 2 or buf[where - 2] != 0x8B:
            raise LinkError(f"cannot relax GOT reference at {p:#x} (not a mov)")
        buf[where - 2] = 0x8D
        _put_pc32(buf, where, value - p, p, "relaxed GOT reference")
    elif rel.type == R.X86_64_PC64:
        struct.pack_into("<q", buf, where, value - p)
    else:
        name = rel.symbol.name or "section"
        raise LinkError(f"unsupported relocation {rel.type.name} against {name} "
                        f"(the image must be position independent, with no GOT)")
    return False


def _put_pc32(buf: bytearray, where: int, v: int, p: int, what: str) -> None:
    if not -(1 << 31) <= v < (1 << 31):
        raise LinkError(f"{what} out of range at {p:#x}")
    struct.pack_into("<i", buf, where, v)


def _index_of(sections: list, target: lief.ELF.Section) -> int:
    for i, s in enumerate(sections):
        if s.name == target.name and s.offset == target.offset and s.size == target.size:
            return i
    raise LinkError(f"relocation targets unknown section {target.name}")
