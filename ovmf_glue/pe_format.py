"""PE/COFF facts, declared once: the packager, the emulator's loader and `helperfw inspect` import
them from here.

Values are from the Microsoft PE Format specification (the sections named in the comments); the
UEFI specification (§2.1.1) fixes the machine type and the EFI subsystems. Plain integers and
`struct.Struct` layouts, so every reader can use them without lief or pefile.
"""

from __future__ import annotations

import struct

# COFF file header: Machine ("Machine Types") and Characteristics.
IMAGE_FILE_MACHINE_I386 = 0x014C
IMAGE_FILE_MACHINE_AMD64 = 0x8664
IMAGE_FILE_RELOCS_STRIPPED = 0x0001
IMAGE_FILE_EXECUTABLE_IMAGE = 0x0002
IMAGE_FILE_LARGE_ADDRESS_AWARE = 0x0020

# Headers, as a reader walks them ("MS-DOS Stub", "COFF File Header", "Optional Header",
# "Section Table"): the DOS header's e_lfanew points at "PE\0\0", the COFF header follows, then
# the optional header (its fixed part, then NumberOfRvaAndSizes data directories), then the
# section headers.
DOS_HEADER_SIZE = 0x40
DOS_MAGIC = b"MZ"
DOS_E_LFANEW = 0x3C  # u32: file offset of the PE signature
PE_SIGNATURE = b"PE\0\0"
COFF_FILE_HEADER = struct.Struct("<HHIIIHH")
COFF_FIELDS = ("Machine", "NumberOfSections", "TimeDateStamp", "PointerToSymbolTable",
               "NumberOfSymbols", "SizeOfOptionalHeader", "Characteristics")
OPTIONAL_HEADER64 = struct.Struct("<HBBIIIIIQIIHHHHHHIIIIHHQQQQII")  # up to the directories
OPTIONAL64_FIELDS = (
    "Magic", "MajorLinkerVersion", "MinorLinkerVersion", "SizeOfCode", "SizeOfInitializedData",
    "SizeOfUninitializedData", "AddressOfEntryPoint", "BaseOfCode", "ImageBase",
    "SectionAlignment", "FileAlignment", "MajorOperatingSystemVersion",
    "MinorOperatingSystemVersion", "MajorImageVersion", "MinorImageVersion",
    "MajorSubsystemVersion", "MinorSubsystemVersion", "Win32VersionValue", "SizeOfImage",
    "SizeOfHeaders", "CheckSum", "Subsystem", "DllCharacteristics", "SizeOfStackReserve",
    "SizeOfStackCommit", "SizeOfHeapReserve", "SizeOfHeapCommit", "LoaderFlags",
    "NumberOfRvaAndSizes")
DATA_DIRECTORY = struct.Struct("<II")  # VirtualAddress, Size
MAX_DATA_DIRECTORIES = 16
SECTION_HEADER = struct.Struct("<8sIIIIIIHHI")
SECTION_FIELDS = ("Name", "VirtualSize", "VirtualAddress", "SizeOfRawData", "PointerToRawData",
                  "PointerToRelocations", "PointerToLinenumbers", "NumberOfRelocations",
                  "NumberOfLinenumbers", "Characteristics")
assert (COFF_FILE_HEADER.size, OPTIONAL_HEADER64.size, SECTION_HEADER.size) == (20, 112, 40)
assert len(COFF_FIELDS) == len(COFF_FILE_HEADER.unpack(bytes(20)))
assert len(OPTIONAL64_FIELDS) == len(OPTIONAL_HEADER64.unpack(bytes(112)))
assert len(SECTION_FIELDS) == len(SECTION_HEADER.unpack(bytes(40)))


def unpack_fields(layout: struct.Struct, names: tuple[str, ...], data: bytes,
                  offset: int) -> dict[str, int | bytes]:
    """One header at `offset` as a field-name -> value dict (struct.error if `data` is short)."""
    return dict(zip(names, layout.unpack_from(data, offset), strict=True))


# Optional header: Magic, Subsystem ("Windows Subsystem"), DllCharacteristics.
PE32_PLUS_MAGIC = 0x20B
IMAGE_SUBSYSTEM_EFI_APPLICATION = 10
IMAGE_SUBSYSTEM_EFI_BOOT_SERVICE_DRIVER = 11
IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER = 12
IMAGE_DLLCHARACTERISTICS_HIGH_ENTROPY_VA = 0x0020
IMAGE_DLLCHARACTERISTICS_DYNAMIC_BASE = 0x0040
IMAGE_DLLCHARACTERISTICS_NX_COMPAT = 0x0100

# Optional header data directories ("Optional Header Data Directories"): their indexes.
IMAGE_DIRECTORY_ENTRY_BASERELOC = 5
IMAGE_DIRECTORY_ENTRY_DEBUG = 6

# Section flags ("Section Flags").
IMAGE_SCN_CNT_CODE = 0x0000_0020
IMAGE_SCN_CNT_INITIALIZED_DATA = 0x0000_0040
IMAGE_SCN_CNT_UNINITIALIZED_DATA = 0x0000_0080
IMAGE_SCN_MEM_DISCARDABLE = 0x0200_0000
IMAGE_SCN_MEM_EXECUTE = 0x2000_0000
IMAGE_SCN_MEM_READ = 0x4000_0000
IMAGE_SCN_MEM_WRITE = 0x8000_0000

# Base relocation types ("Base Relocation Types"): the top 4 bits of each 16-bit entry.
IMAGE_REL_BASED_ABSOLUTE = 0  # padding, no fix-up
IMAGE_REL_BASED_HIGHLOW = 3
IMAGE_REL_BASED_DIR64 = 10
BASE_RELOCATION_BLOCK = struct.Struct("<II")  # PageRVA, SizeOfBlock (header included)
BASE_RELOCATION_ENTRY = struct.Struct("<H")  # type << 12 | offset in the page
RELOC_TYPE_SHIFT = 12
RELOC_OFFSET_MASK = (1 << RELOC_TYPE_SHIFT) - 1
RELOC_TYPE_NAMES = {
    IMAGE_REL_BASED_ABSOLUTE: "ABSOLUTE",
    IMAGE_REL_BASED_HIGHLOW: "HIGHLOW",
    IMAGE_REL_BASED_DIR64: "DIR64",
}

# Debug directory ("The .debug Section"): one entry per debug record; type 2 is CodeView, whose
# "RSDS" record (signature, GUID, age, NUL-terminated PDB path) carries no timestamp. EDK2's
# PE/COFF loader prints the PDB path's file name (with ".efi") as the driver's name.
IMAGE_DEBUG_TYPE_CODEVIEW = 2
CODEVIEW_SIGNATURE_RSDS = b"RSDS"
# Characteristics, TimeDateStamp, MajorVersion, MinorVersion, Type, SizeOfData,
# AddressOfRawData, PointerToRawData
DEBUG_DIRECTORY_ENTRY = struct.Struct("<IIHHIIII")
DEBUG_ENTRY_POINTER_TO_RAW_DATA = 24  # offset of PointerToRawData inside DEBUG_DIRECTORY_ENTRY
CODEVIEW_RSDS = struct.Struct("<4s16sI")  # signature, GUID, age; the path follows
