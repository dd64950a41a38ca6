"""LinkedImage → PE32+ EFI runtime driver, built with lief.

The PE file is what OVMF loads and what the guest owner measures, so it must be (1) acceptable to
EDK2's PE/COFF loader (AMD64, subsystem EFI_RUNTIME_DRIVER, page-aligned sections because runtime
images are remapped page by page at SetVirtualAddressMap, DIR64 base relocations) and (2)
byte-for-byte reproducible (no timestamp, deterministic checksum).

Section RVAs are copied verbatim from the LinkedImage, so every symbol RVA in the link map is also
an RVA in the PE file; the emulator and `helperfw inspect` rely on that. The one addition is a
CodeView debug record appended to the read-only data (see `_debug_blob`), which names the image for
EDK2's load log.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Iterable, Sequence

import lief
import pefile

from helperfw.codegen.image import PAGE, LinkedImage, Section
from ovmf_glue.edk2 import EFI_NAME
from ovmf_glue.linkmap import (  # noqa: F401  (the map format lives there; re-exported for callers)
    MAP_FORMAT,
    map_path_for,
    read_symbol_map,
    write_symbol_map,
)
from ovmf_glue.pe_format import (
    CODEVIEW_RSDS,
    CODEVIEW_SIGNATURE_RSDS,
    DEBUG_DIRECTORY_ENTRY,
    DEBUG_ENTRY_POINTER_TO_RAW_DATA,
    IMAGE_DEBUG_TYPE_CODEVIEW,
    IMAGE_DIRECTORY_ENTRY_DEBUG,
    IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE,
    IMAGE_DLLCHARACTERISTICS_HIGH_ENTROPY_VA,
    IMAGE_DLLCHARACTERISTICS_NX_COMPAT,
    IMAGE_FILE_EXECUTABLE_IMAGE,
    IMAGE_FILE_LARGE_ADDRESS_AWARE,
    IMAGE_FILE_MACHINE_AMD64,
    IMAGE_SCN_CNT_CODE,
    IMAGE_SCN_CNT_INITIALIZED_DATA,
    IMAGE_SCN_CNT_UNINITIALIZED_DATA,
    IMAGE_SCN_MEM_EXECUTE,
    IMAGE_SCN_MEM_READ,
    IMAGE_SCN_MEM_WRITE,
    IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER,
)

SECTION_ALIGNMENT = PAGE  # EDK2 requires 4 KiB alignment for runtime drivers on X64
FILE_ALIGNMENT = 0x200
DEBUG_SECTION = ".rdata"  # holds the debug record when no read-only section has room for it
CODEVIEW_AGE = 1

# DYNAMIC_BASE: the image is relocatable (it is, fully); NX_COMPAT: data pages may be mapped NX
# (newer EDK2 only applies its NX memory-protection policy to images that say so).
DLL_CHARACTERISTICS = (
    IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE
    | IMAGE_DLLCHARACTERISTICS_HIGH_ENTROPY_VA
    | IMAGE_DLLCHARACTERISTICS_NX_COMPAT
)
FILE_CHARACTERISTICS = IMAGE_FILE_EXECUTABLE_IMAGE | IMAGE_FILE_LARGE_ADDRESS_AWARE


class PackagingError(ValueError):
    """The LinkedImage cannot be turned into a valid EFI runtime driver."""


def _characteristics(sec: Section) -> int:
    """Section flags from the linker's permission string; refuses W+X outright."""
    if sec.perms == "rx":
        return IMAGE_SCN_CNT_CODE | IMAGE_SCN_MEM_READ | IMAGE_SCN_MEM_EXECUTE
    if sec.perms == "r":
        return IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ
    if sec.perms == "rw":
        kind = IMAGE_SCN_CNT_INITIALIZED_DATA if sec.data else IMAGE_SCN_CNT_UNINITIALIZED_DATA
        return kind | IMAGE_SCN_MEM_READ | IMAGE_SCN_MEM_WRITE
    raise PackagingError(f"section {sec.name}: unsupported permissions {sec.perms!r}")


def _check_layout(image: LinkedImage) -> None:
    """Reject images whose layout would not survive a PE round trip unchanged."""
    prev_end = 0
    for sec in sorted(image.sections, key=lambda s: s.rva):
        if sec.rva % SECTION_ALIGNMENT or sec.rva < PAGE:
            raise PackagingError(f"section {sec.name} at {sec.rva:#x} is not page aligned")
        if sec.rva < prev_end:
            raise PackagingError(f"section {sec.name} at {sec.rva:#x} overlaps its predecessor")
        if len(sec.data) > sec.vsize:
            raise PackagingError(f"section {sec.name}: {len(sec.data)} bytes exceed vsize")
        if len(sec.name.encode()) > 8:
            raise PackagingError(f"section name {sec.name!r} longer than 8 bytes")
        prev_end = sec.end


def _patched_sections(image: LinkedImage, image_base: int) -> tuple[Section, ...]:
    """The sections with `image_base` added to every relocated u64 (the PE preferred base)."""
    out = {s.name: bytearray(s.data) for s in image.sections}
    for rva in image.relocs:
        sec = next(
            (s for s in image.sections if s.rva <= rva and rva + 8 <= s.rva + len(s.data)), None
        )
        if sec is None:
            raise PackagingError(f"relocation at {rva:#x} is not inside initialised data")
        if "x" in sec.perms:
            raise PackagingError(f"relocation at {rva:#x} patches code in {sec.name}")
        off = rva - sec.rva
        (val,) = struct.unpack_from("<Q", out[sec.name], off)
        struct.pack_into("<Q", out[sec.name], off, (val + image_base) & 0xFFFF_FFFF_FFFF_FFFF)
    return tuple(dataclasses.replace(s, data=bytes(out[s.name])) for s in image.sections)


def build_id(sections: Iterable[Section], name: str) -> bytes:
    """The CodeView GUID: 16 bytes of SHA-256 over the sections and the name.

    It ties a debug record (and so a symbol map) to exactly this code and data, as a PDB GUID
    does, without a clock or a random number, so the build stays reproducible."""
    h = hashlib.sha256(name.encode())
    for s in sorted(sections, key=lambda s: s.rva):
        h.update(struct.pack("<8sIII", s.name.encode(), s.rva, s.vsize, len(s.data)))
        h.update(s.perms.encode() + b"\0" + s.data)
    return h.digest()[:16]  # a GUID's 16 bytes


def _debug_blob(rva: int, guid: bytes, name: str) -> bytes:
    """One debug directory entry followed by its CodeView RSDS record, laid out at `rva`.

    TimeDateStamp stays 0; PointerToRawData is filled in once the file layout is known."""
    record = CODEVIEW_RSDS.pack(CODEVIEW_SIGNATURE_RSDS, guid, CODEVIEW_AGE) + name.encode() + b"\0"
    entry = DEBUG_DIRECTORY_ENTRY.pack(
        0, 0, 0, 0, IMAGE_DEBUG_TYPE_CODEVIEW, len(record), rva + DEBUG_DIRECTORY_ENTRY.size, 0
    )
    return entry + record


def _add_debug_record(sections: Sequence[Section], name: str) -> tuple[tuple[Section, ...], int]:
    """The sections with the debug record added, and the record's RVA.

    EDK2's loader only reads a debug directory that lies inside a section. The record goes after
    the last read-only data section when that section's last page has room (no RVA moves, and the
    file usually stays the same size); otherwise into a read-only section of its own after the
    image."""
    ordered = sorted(sections, key=lambda s: s.rva)
    guid = build_id(ordered, name)
    size = len(_debug_blob(0, guid, name))
    for i in reversed(range(len(ordered))):
        sec = ordered[i]
        if sec.perms != "r":
            continue
        at = _align(sec.vsize, 4)
        limit = ordered[i + 1].rva if i + 1 < len(ordered) else _align(sec.end, PAGE)
        if sec.rva + at + size > limit:
            break
        data = sec.data.ljust(at, b"\0") + _debug_blob(sec.rva + at, guid, name)
        ordered[i] = dataclasses.replace(sec, data=data, vsize=len(data))
        return tuple(ordered), sec.rva + at
    rva = _align(max(s.end for s in ordered), PAGE)
    blob = _debug_blob(rva, guid, name)
    return (*ordered, Section(DEBUG_SECTION, rva, blob, len(blob), "r")), rva


def _reloc_blocks(relocs: Iterable[int], first_page: int = PAGE) -> list[lief.PE.Relocation]:
    """One base-relocation block per 4 KiB page, entries sorted, as the PE format requires.

    An image without pointers still gets one block holding a single ABSOLUTE (no-op) entry: the
    .reloc section then always exists, which says "relocatable" to every loader, and it avoids a
    lief 1.0 layout bug that writes a lone section's data over the section table."""
    if not relocs:
        block = lief.PE.Relocation()
        block.virtual_address = first_page
        entry = lief.PE.RelocationEntry()
        entry.position = 0
        entry.type = lief.PE.RelocationEntry.BASE_TYPES.ABS
        block.add_entry(entry)
        return [block]
    pages: dict[int, list[int]] = {}
    for rva in sorted(set(relocs)):
        pages.setdefault(rva & ~(PAGE - 1), []).append(rva & (PAGE - 1))
    blocks = []
    for page, offsets in sorted(pages.items()):
        block = lief.PE.Relocation()
        block.virtual_address = page
        for off in offsets:
            entry = lief.PE.RelocationEntry()
            entry.position = off
            entry.type = lief.PE.RelocationEntry.BASE_TYPES.DIR64
            block.add_entry(entry)
        blocks.append(block)
    return blocks


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def _finish_headers(raw: bytes, sections: Sequence[Section], debug_rva: int) -> bytes:
    """Fix the header fields lief leaves at defaults, point the debug directory at its record,
    then the checksum (over the final bytes)."""
    pe = pefile.PE(data=raw, fast_load=True)
    oh = pe.OPTIONAL_HEADER
    code = [s for s in pe.sections if s.Characteristics & IMAGE_SCN_CNT_CODE]
    idata = [s for s in pe.sections if s.Characteristics & IMAGE_SCN_CNT_INITIALIZED_DATA]
    udata = [s for s in pe.sections if s.Characteristics & IMAGE_SCN_CNT_UNINITIALIZED_DATA]
    oh.SizeOfCode = sum(s.SizeOfRawData for s in code)
    oh.SizeOfInitializedData = sum(s.SizeOfRawData for s in idata)
    oh.SizeOfUninitializedData = sum(_align(s.Misc_VirtualSize, FILE_ALIGNMENT) for s in udata)
    oh.BaseOfCode = min((s.VirtualAddress for s in code), default=0)
    pe.FILE_HEADER.TimeDateStamp = 0
    for s in pe.sections:
        if s.SizeOfRawData == 0:
            s.PointerToRawData = 0  # nothing to read from the file for .bss
    last = max(s.VirtualAddress + s.Misc_VirtualSize for s in pe.sections)
    oh.SizeOfImage = _align(max(last, *(s.end for s in sections)), SECTION_ALIGNMENT)
    debug_dir = oh.DATA_DIRECTORY[IMAGE_DIRECTORY_ENTRY_DEBUG]
    debug_dir.VirtualAddress, debug_dir.Size = debug_rva, DEBUG_DIRECTORY_ENTRY.size
    oh.CheckSum = 0
    data = bytearray(pe.write())
    record_rva = debug_rva + DEBUG_DIRECTORY_ENTRY.size
    struct.pack_into(
        "<I",
        data,
        pe.get_offset_from_rva(debug_rva) + DEBUG_ENTRY_POINTER_TO_RAW_DATA,
        pe.get_offset_from_rva(record_rva),
    )
    pe = pefile.PE(data=bytes(data), fast_load=True)
    pe.OPTIONAL_HEADER.CheckSum = pe.generate_checksum()
    return bytes(pe.write())


def _lief_build(
    sections: Sequence[Section], relocs: Iterable[int], entry_rva: int, image_base: int
) -> bytes:
    """The lief part: sections at their link RVAs, base relocations, EFI header fields."""
    binary = lief.PE.Factory.create(lief.PE.PE_TYPE.PE32_PLUS).get()
    for sec in sorted(sections, key=lambda s: s.rva):
        if sec.vsize == 0:
            continue
        pes = lief.PE.Section(sec.name)
        pes.content = list(sec.data)
        pes.virtual_address = sec.rva
        pes.virtual_size = sec.vsize
        pes.characteristics = _characteristics(sec)
        added = binary.add_section(pes)
        if added.virtual_address != sec.rva:
            raise PackagingError(f"lief moved {sec.name} to {added.virtual_address:#x}")
    for block in _reloc_blocks(relocs, min(s.rva for s in sections)):
        binary.add_relocation(block)

    hdr = binary.header
    hdr.machine = lief.PE.Header.MACHINE_TYPES(IMAGE_FILE_MACHINE_AMD64)
    hdr.characteristics = FILE_CHARACTERISTICS
    hdr.time_date_stamps = 0
    oh = binary.optional_header
    oh.imagebase = image_base
    oh.addressof_entrypoint = entry_rva
    oh.subsystem = lief.PE.OptionalHeader.SUBSYSTEM(IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER)
    oh.dll_characteristics = DLL_CHARACTERISTICS
    oh.section_alignment = SECTION_ALIGNMENT
    oh.file_alignment = FILE_ALIGNMENT
    oh.major_subsystem_version = 0
    oh.minor_subsystem_version = 0
    oh.major_operating_system_version = 0
    oh.minor_operating_system_version = 0
    oh.major_linker_version = 0
    oh.minor_linker_version = 0

    config = lief.PE.Builder.config_t()
    config.relocations = True
    config.imports = False
    config.exports = False
    config.resources = False
    config.tls = False
    config.debug = False
    config.load_configuration = False
    config.overlay = False
    return bytes(binary.write_to_bytes(config))


def package_pe(
    image: LinkedImage, *, entry: str, image_base: int = 0, name: str = EFI_NAME
) -> bytes:
    """Build the PE32+ EFI runtime driver for `image`, entered at symbol `entry`.

    `image_base` is the preferred load address written to the header; relocated pointers are
    biased by it so the file is correct even if a loader skips relocation at that base. `name`
    goes into the CodeView record, where EDK2's DEBUG log reads the driver's name."""
    if image_base % 0x10000:
        raise PackagingError(f"image base {image_base:#x} must be 64 KiB aligned")
    if not name or "\0" in name or not name.isascii():
        raise PackagingError(f"image name {name!r} must be non-empty ASCII without NUL")
    _check_layout(image)
    sym = image.symbol(entry)
    text = next((s for s in image.sections if s.rva <= sym.rva < s.end), None)
    if text is None or "x" not in text.perms:
        raise PackagingError(f"entry {entry!r} at {sym.rva:#x} is not in an executable section")
    sections, debug_rva = _add_debug_record(_patched_sections(image, image_base), name)

    # lief 1.0 logs "Section not found for RVA 0x0" (at ERROR) from Factory.get() while the
    # binary has no sections yet; harmless, and _verify() checks the result independently.
    with lief.logging.level_scope(lief.logging.LEVEL.CRITICAL):
        raw = _lief_build(sections, image.relocs, sym.rva, image_base)
    out = _finish_headers(raw, sections, debug_rva)
    _verify(out, sections, debug_rva)
    return out


def _verify(raw: bytes, sections: Sequence[Section], debug_rva: int) -> None:
    """Re-read the file and check every section landed where the link put it, byte for byte, and
    the debug entry points at its record in the file.

    Cheap insurance: lief's layout code has had bugs, and a silently shifted section would only
    show up as a crash inside OVMF."""
    pe = pefile.PE(data=raw, fast_load=True)
    found = {s.Name.rstrip(b"\0").decode(): s for s in pe.sections}
    for sec in sections:
        if sec.vsize == 0:
            continue
        got = found.get(sec.name)
        if got is None or got.VirtualAddress != sec.rva or got.Misc_VirtualSize != sec.vsize:
            raise PackagingError(f"lief wrote section {sec.name} wrongly")
        want = bytearray(sec.data)
        if sec.rva <= debug_rva < sec.rva + len(sec.data):
            at = debug_rva - sec.rva
            record_offset = got.PointerToRawData + at + DEBUG_DIRECTORY_ENTRY.size
            struct.pack_into("<I", want, at + DEBUG_ENTRY_POINTER_TO_RAW_DATA, record_offset)
        data = raw[got.PointerToRawData : got.PointerToRawData + len(sec.data)] if sec.data else b""
        if got.SizeOfRawData < len(sec.data) or data != want:
            raise PackagingError(f"lief wrote the contents of {sec.name} wrongly")
