"""x86-64 ELF relocatable object → LinkedImage (sections, resolved relocations, symbol map).

The object is compiled PIC with hidden visibility, so code reaches code and data PC-relatively
and the only load-time fix-ups are absolute u64 pointers in data (R_X86_64_64), which become base
relocations. Any reference the image does not itself define (memset, memcpy, __chkstk, a GOT
slot) fails the link: the firmware must be self-contained.
"""

from __future__ import annotations

import struct

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


def link(obj: bytes, entry: str | None = None) -> LinkedImage:
    elf = lief.ELF.parse(list(obj))
    if elf is None:
        raise LinkError("not an ELF object")
    sections = list(elf.sections)
    # 1. place input sections into output sections
    placed: dict[int, tuple[str, int]] = {}  # input index -> (output name, offset in output)
    contents: dict[str, bytearray] = {n: bytearray() for n in OUTPUT_ORDER}
    sizes: dict[str, int] = dict.fromkeys(OUTPUT_ORDER, 0)
    for idx, sec in enumerate(sections):
        out = _classify(sec)
        if out is None or sec.size == 0:
            continue
        off = _align(sizes[out], max(sec.alignment, 1))
        placed[idx] = (out, off)
        sizes[out] = off + sec.size
        if out != ".bss":
            buf = contents[out]
            buf.extend(b"\0" * (off - len(buf)))
            buf.extend(bytes(sec.content))
    # 2. lay out output sections page by page
    base: dict[str, int] = {}
    rva = FIRST_SECTION_RVA
    for name in OUTPUT_ORDER:
        if sizes[name]:
            base[name] = rva
            rva = _align(rva + sizes[name], PAGE)
    image_end = rva
    # 3. symbols
    # Section bounds for the firmware's own use (e.g. its region list); an empty section gets
    # start == end at the point where it would have been.
    linker_defined = {"__image_start": 0, "__image_end": image_end}
    cursor = FIRST_SECTION_RVA
    for name in OUTPUT_ORDER:
        tag = name.lstrip(".")
        start = base.get(name, cursor)
        end = _align(start + sizes[name], PAGE)
        linker_defined[f"__{tag}_start"], linker_defined[f"__{tag}_end"] = start, end
        cursor = end

    def sec_rva(shndx: int) -> int:
        if shndx not in placed:
            raise LinkError(f"reference into discarded section {sections[shndx].name}")
        out, off = placed[shndx]
        return base[out] + off

    symbols: dict[str, Symbol] = {}
    for sym in elf.symtab_symbols:
        if sym.shndx in placed and sym.name and sym.type in (
            lief.ELF.Symbol.TYPE.FUNC, lief.ELF.Symbol.TYPE.OBJECT
        ):
            out, _ = placed[sym.shndx]
            symbols[sym.name] = Symbol(
                sym.name, sec_rva(sym.shndx) + sym.value, sym.size, out,
                "func" if sym.type == lief.ELF.Symbol.TYPE.FUNC else "object",
            )

    def resolve(sym: lief.ELF.Symbol) -> int:
        if sym.type == lief.ELF.Symbol.TYPE.SECTION:
            return sec_rva(sym.shndx)
        if sym.shndx == 0:  # undefined
            if sym.name in linker_defined:
                return linker_defined[sym.name]
            raise LinkError(f"undefined symbol {sym.name!r}")
        if sym.shndx >= 0xFF00:
            raise LinkError(f"unsupported special symbol {sym.name!r}")
        return sec_rva(sym.shndx) + sym.value

    # 4. relocations
    undefined = sorted(
        {s.name for s in elf.symtab_symbols if s.shndx == 0 and s.name
         and s.name not in linker_defined}
    )
    if undefined:
        raise LinkError(f"image references undefined symbols: {', '.join(undefined)}")
    abs_relocs: list[int] = []
    for rel in elf.relocations:
        target = rel.section
        if target is None:
            continue
        tidx = sections.index(target) if target in sections else _index_of(sections, target)
        if tidx not in placed:
            continue  # relocation inside a discarded section (e.g. .eh_frame)
        out, off = placed[tidx]
        where = off + rel.address  # offset inside the output section
        p = base[out] + where
        s = resolve(rel.symbol)
        a = rel.addend
        buf = contents[out]
        if rel.type in (R.X86_64_PC32, R.X86_64_PLT32):
            v = s + a - p
            if not -(1 << 31) <= v < (1 << 31):
                raise LinkError(f"PC32 relocation out of range at {p:#x}")
            struct.pack_into("<i", buf, where, v)
        elif rel.type == R.X86_64_64:
            struct.pack_into("<Q", buf, where, (s + a) & 0xFFFFFFFFFFFFFFFF)
            abs_relocs.append(p)
        elif rel.type in (R.X86_64_REX_GOTPCRELX, R.X86_64_GOTPCRELX, R.X86_64_GOTPCREL):
            # Relax `mov sym@GOTPCREL(%rip), %reg` to `lea sym(%rip), %reg` (the x86-64 psABI
            # relaxation): every symbol is inside the image, so no GOT is ever needed.
            if where < 2 or buf[where - 2] != 0x8B:
                raise LinkError(f"cannot relax GOT reference at {p:#x} (not a mov)")
            buf[where - 2] = 0x8D
            v = s + a - p
            if not -(1 << 31) <= v < (1 << 31):
                raise LinkError(f"relaxed GOT reference out of range at {p:#x}")
            struct.pack_into("<i", buf, where, v)
        elif rel.type == R.X86_64_PC64:
            struct.pack_into("<q", buf, where, s + a - p)
        else:
            name = rel.symbol.name or "section"
            raise LinkError(f"unsupported relocation {rel.type.name} against {name} "
                            f"(the image must be position independent, with no GOT)")
    out_sections = tuple(
        Section(n, base[n], bytes(contents[n]) if n != ".bss" else b"", sizes[n], PERMS[n])
        for n in OUTPUT_ORDER if n in base
    )
    if entry is not None and entry not in symbols:
        raise LinkError(f"entry symbol {entry!r} is not defined")
    return LinkedImage(out_sections, tuple(sorted(abs_relocs)), symbols, entry)


def _index_of(sections: list, target: lief.ELF.Section) -> int:
    for i, s in enumerate(sections):
        if s.name == target.name and s.offset == target.offset and s.size == target.size:
            return i
    raise LinkError(f"relocation targets unknown section {target.name}")
