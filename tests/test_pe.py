"""PE32+ packaging: what EDK2's loader and the launch measurement need from the file."""

from __future__ import annotations

import dataclasses

import lief
import pefile
import pytest

from helperfw.codegen.image import LinkedImage, Section, Symbol
from ovmf_glue.pe import (
    DEBUG_SECTION,
    PackagingError,
    map_path_for,
    package_pe,
    read_symbol_map,
    write_symbol_map,
)
from ovmf_glue.pe_format import (
    CODEVIEW_SIGNATURE_RSDS,
    DEBUG_DIRECTORY_ENTRY,
    IMAGE_DEBUG_TYPE_CODEVIEW,
    IMAGE_DIRECTORY_ENTRY_DEBUG,
    IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE,
    IMAGE_DLLCHARACTERISTICS_NX_COMPAT,
    IMAGE_FILE_EXECUTABLE_IMAGE,
    IMAGE_FILE_LARGE_ADDRESS_AWARE,
    IMAGE_FILE_MACHINE_AMD64,
    IMAGE_FILE_RELOCS_STRIPPED,
    IMAGE_REL_BASED_ABSOLUTE,
    IMAGE_REL_BASED_DIR64,
    IMAGE_SCN_MEM_EXECUTE,
    IMAGE_SCN_MEM_WRITE,
    IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER,
    PE32_PLUS_MAGIC,
)
from ovmf_glue.sample import DATA_RVA, MSG_OFF, RODATA_RVA, TEXT_RVA, sample_image


@pytest.fixture(scope="module")
def image() -> LinkedImage:
    return sample_image()


@pytest.fixture(scope="module")
def raw(image: LinkedImage) -> bytes:
    return package_pe(image, entry="efi_main")


@pytest.fixture(scope="module")
def pe(raw: bytes) -> pefile.PE:
    return pefile.PE(data=raw)


def test_headers_pefile(pe: pefile.PE, image: LinkedImage) -> None:
    fh, oh = pe.FILE_HEADER, pe.OPTIONAL_HEADER
    assert fh.Machine == IMAGE_FILE_MACHINE_AMD64
    assert oh.Magic == PE32_PLUS_MAGIC
    assert oh.Subsystem == IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER
    assert fh.Characteristics & IMAGE_FILE_EXECUTABLE_IMAGE
    assert fh.Characteristics & IMAGE_FILE_LARGE_ADDRESS_AWARE
    assert not fh.Characteristics & IMAGE_FILE_RELOCS_STRIPPED
    assert fh.TimeDateStamp == 0
    assert oh.SectionAlignment == 0x1000
    assert oh.FileAlignment in (0x200, 0x1000)
    assert oh.DllCharacteristics & IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE
    assert oh.DllCharacteristics & IMAGE_DLLCHARACTERISTICS_NX_COMPAT
    assert oh.AddressOfEntryPoint == image.symbol("efi_main").rva
    assert oh.ImageBase == 0
    text = image.section(".text")
    assert oh.BaseOfCode == text.rva
    assert oh.SizeOfCode == pe.sections[0].SizeOfRawData > 0
    assert oh.SizeOfInitializedData > 0
    assert oh.SizeOfUninitializedData >= image.section(".bss").vsize
    last = max(s.VirtualAddress + s.Misc_VirtualSize for s in pe.sections)
    assert oh.SizeOfImage == (last + 0xFFF) & ~0xFFF
    assert oh.SizeOfImage >= image.size
    assert oh.CheckSum == pe.generate_checksum() != 0


def test_sections_keep_link_rvas_and_wx(pe: pefile.PE, image: LinkedImage) -> None:
    by_name = {s.Name.rstrip(b"\0").decode(): s for s in pe.sections}
    for sec in image.sections:
        got = by_name[sec.name]
        assert got.VirtualAddress == sec.rva
        # only the read-only data grows, by the debug record appended after it
        assert got.Misc_VirtualSize == sec.vsize or sec.name == ".rodata"
        assert got.get_data()[: len(sec.data)] == sec.data
        assert bool(got.Characteristics & IMAGE_SCN_MEM_EXECUTE) == ("x" in sec.perms)
        assert bool(got.Characteristics & IMAGE_SCN_MEM_WRITE) == ("w" in sec.perms)
    for s in pe.sections:
        both = IMAGE_SCN_MEM_WRITE | IMAGE_SCN_MEM_EXECUTE
        assert s.Characteristics & both != both
        assert s.VirtualAddress % 0x1000 == 0


def test_base_relocations(pe: pefile.PE, image: LinkedImage) -> None:
    entries = [
        (e.rva, e.type) for block in pe.DIRECTORY_ENTRY_BASERELOC for e in block.entries if e.type
    ]
    assert entries == [(r, IMAGE_REL_BASED_DIR64) for r in sorted(image.relocs)]
    assert pe.get_qword_at_rva(DATA_RVA) == TEXT_RVA + MSG_OFF
    relocated = pefile.PE(data=pe.__data__)
    relocated.relocate_image(0x7700_0000)
    assert relocated.get_qword_at_rva(DATA_RVA) == 0x7700_0000 + TEXT_RVA + MSG_OFF


def test_lief_reads_it_back(raw: bytes, image: LinkedImage) -> None:
    b = lief.PE.parse(list(raw))
    assert b is not None
    assert b.header.machine == lief.PE.Header.MACHINE_TYPES.AMD64
    assert b.optional_header.subsystem == lief.PE.OptionalHeader.SUBSYSTEM.EFI_RUNTIME_DRIVER
    assert b.optional_header.addressof_entrypoint == image.symbol("efi_main").rva
    assert b.has_relocations
    got = [
        rel.virtual_address + e.position
        for rel in b.relocations
        for e in rel.entries
        if e.type == lief.PE.RelocationEntry.BASE_TYPES.DIR64
    ]
    assert got == sorted(image.relocs)
    assert {s.name: s.virtual_address for s in b.sections if s.name != ".reloc"} == {
        s.name: s.rva for s in image.sections
    }


def test_reproducible(image: LinkedImage, raw: bytes) -> None:
    assert package_pe(sample_image(), entry="efi_main") == raw
    assert package_pe(image, entry="efi_main") == raw


def test_image_base_biases_pointers(image: LinkedImage) -> None:
    pe = pefile.PE(data=package_pe(image, entry="efi_main", image_base=0x1_0000_0000))
    assert pe.OPTIONAL_HEADER.ImageBase == 0x1_0000_0000
    assert pe.get_qword_at_rva(DATA_RVA) == 0x1_0000_0000 + TEXT_RVA + MSG_OFF


def test_rejects_bad_images(image: LinkedImage) -> None:
    with pytest.raises(KeyError):
        package_pe(image, entry="nope")
    with pytest.raises(PackagingError, match="not in an executable section"):
        package_pe(image, entry="msg_ptr")
    wx = dataclasses.replace(
        image, sections=(*image.sections[:-1], Section(".bss", 0x4000, b"", 0x2000, "rwx"))
    )
    with pytest.raises(PackagingError, match="permissions"):
        package_pe(wx, entry="efi_main")
    with pytest.raises(PackagingError, match="not inside initialised data"):
        package_pe(dataclasses.replace(image, relocs=(0x4000,)), entry="efi_main")
    with pytest.raises(PackagingError, match="patches code"):
        package_pe(dataclasses.replace(image, relocs=(0x1000,)), entry="efi_main")


def test_symbol_map_round_trip(image: LinkedImage, tmp_path) -> None:
    efi = tmp_path / "MigrationHelper.efi"
    write_symbol_map(image, map_path_for(efi))
    assert map_path_for(efi).name == "MigrationHelper.map"
    assert read_symbol_map(map_path_for(efi)) == image.symbols
    first = map_path_for(efi).read_bytes()
    write_symbol_map(image, map_path_for(efi))
    assert map_path_for(efi).read_bytes() == first


def test_single_section_without_relocations() -> None:
    """Position-independent code alone still gets a (no-op) .reloc and an intact section; with
    no read-only data to follow, the debug record gets its own section."""
    code = bytes.fromhex("31c0c3")  # xor eax, eax; ret
    image = LinkedImage(
        (Section(".text", 0x1000, code, len(code), "rx"),),
        (),
        {"efi_main": Symbol("efi_main", 0x1000, 3, ".text", "func")},
        entry="efi_main",
    )
    pe = pefile.PE(data=package_pe(image, entry="efi_main"))
    names = [s.Name.rstrip(b"\0").decode() for s in pe.sections]
    assert names == [".text", DEBUG_SECTION, ".reloc"]
    assert pe.sections[0].get_data()[:3] == code
    assert all(
        e.type == IMAGE_REL_BASED_ABSOLUTE for b in pe.DIRECTORY_ENTRY_BASERELOC for e in b.entries
    )


def _debug_entry(pe: pefile.PE):
    """The image's one debug directory entry, read by pefile."""
    assert len(pe.DIRECTORY_ENTRY_DEBUG) == 1
    return pe.DIRECTORY_ENTRY_DEBUG[0]


def test_debug_directory_names_the_image(pe: pefile.PE, raw: bytes, image: LinkedImage) -> None:
    """EDK2's DEBUG log prints the CodeView path's file name: it must say MigrationHelper.efi."""
    d = pe.OPTIONAL_HEADER.DATA_DIRECTORY[IMAGE_DIRECTORY_ENTRY_DEBUG]
    assert d.Size == DEBUG_DIRECTORY_ENTRY.size
    dbg = _debug_entry(pe)
    assert dbg.struct.Type == IMAGE_DEBUG_TYPE_CODEVIEW
    assert dbg.struct.TimeDateStamp == 0
    assert dbg.entry.CvSignature == CODEVIEW_SIGNATURE_RSDS
    assert dbg.entry.PdbFileName == b"MigrationHelper.efi\0"
    assert dbg.entry.Age == 1
    # the loader finds both the entry and the record through a section (RVA -> file offset)
    rodata = next(s for s in pe.sections if s.Name.rstrip(b"\0") == b".rodata")
    end = rodata.VirtualAddress + rodata.Misc_VirtualSize
    assert RODATA_RVA + image.section(".rodata").vsize <= d.VirtualAddress
    assert dbg.struct.AddressOfRawData + dbg.struct.SizeOfData == end
    assert dbg.struct.PointerToRawData == pe.get_offset_from_rva(dbg.struct.AddressOfRawData)
    assert raw[dbg.struct.PointerToRawData :].startswith(b"RSDS")
    assert not rodata.Characteristics & (IMAGE_SCN_MEM_WRITE | IMAGE_SCN_MEM_EXECUTE)


def test_debug_record_follows_content(image: LinkedImage, pe: pefile.PE) -> None:
    """The CodeView GUID is a build id: same bytes, same GUID; other code, other GUID."""
    guid = _debug_entry(pe).entry.Signature_String
    text = image.section(".text")
    patched = Section(".text", text.rva, text.data[:-1] + b"\x90", text.vsize, text.perms)
    other = dataclasses.replace(image, sections=(patched, *image.sections[1:]))
    changed = pefile.PE(data=package_pe(other, entry="efi_main"))
    assert _debug_entry(changed).entry.Signature_String != guid
    renamed = pefile.PE(data=package_pe(image, entry="efi_main", name="Other.efi"))
    assert _debug_entry(renamed).entry.PdbFileName == b"Other.efi\0"
    with pytest.raises(PackagingError, match="image name"):
        package_pe(image, entry="efi_main", name="")


def test_debug_record_gets_own_section_when_rodata_page_is_full(image: LinkedImage) -> None:
    """A read-only section that ends at its page's end leaves no room: the record then goes into
    a read-only section of its own after the image, and no link RVA moves."""
    full = Section(".rodata", RODATA_RVA, bytes(range(256)) * 16, 0x1000, "r")
    crowded = dataclasses.replace(
        image, sections=tuple(full if s.name == ".rodata" else s for s in image.sections)
    )
    pe = pefile.PE(data=package_pe(crowded, entry="efi_main"))
    names = [s.Name.rstrip(b"\0").decode() for s in pe.sections]
    assert names == [".text", ".rodata", ".data", ".bss", DEBUG_SECTION, ".reloc"]
    own = pe.sections[names.index(DEBUG_SECTION)]
    assert own.VirtualAddress == crowded.size
    assert not own.Characteristics & (IMAGE_SCN_MEM_WRITE | IMAGE_SCN_MEM_EXECUTE)
    assert pe.OPTIONAL_HEADER.DATA_DIRECTORY[IMAGE_DIRECTORY_ENTRY_DEBUG].VirtualAddress == (
        own.VirtualAddress
    )
    assert _debug_entry(pe).entry.PdbFileName == b"MigrationHelper.efi\0"
    rodata = pe.sections[names.index(".rodata")]
    assert rodata.Misc_VirtualSize == 0x1000 and rodata.get_data()[:0x1000] == full.data
