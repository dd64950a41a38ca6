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
