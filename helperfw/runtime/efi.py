"""UEFI ABI the driver uses, declared once (UEFI Specification 2.10, chapter 4 and 7).

The helper reads these tables at load; the emulator's UEFI stand-in builds them from the same
declarations. Function-pointer members are plain u64: they are called with `efi_call` (EFIAPI).
"""

from __future__ import annotations

import uuid

from helperfw import Array, const, struct, u32, u64
from helperfw.types import u8

GUID_SIZE = 16  # EFI_GUID: 128 bits, the first three fields little-endian


@struct
class EfiTableHeader:
    Signature: u64
    Revision: u32
    HeaderSize: u32
    CRC32: u32
    Reserved: u32


@struct
class EfiSystemTable:
    Hdr: EfiTableHeader
    FirmwareVendor: u64
    FirmwareRevision: u32
    ConsoleInHandle: u64
    ConIn: u64
    ConsoleOutHandle: u64
    ConOut: u64
    StandardErrorHandle: u64
    StdErr: u64
    RuntimeServices: u64
    BootServices: u64
    NumberOfTableEntries: u64
    ConfigurationTable: u64


@struct
class EfiBootServices:
    Hdr: EfiTableHeader
    RaiseTPL: u64
    RestoreTPL: u64
    AllocatePages: u64
    FreePages: u64
    GetMemoryMap: u64
    AllocatePool: u64
    FreePool: u64
    CreateEvent: u64
    SetTimer: u64
    WaitForEvent: u64
    SignalEvent: u64
    CloseEvent: u64
    CheckEvent: u64
    InstallProtocolInterface: u64
    ReinstallProtocolInterface: u64
    UninstallProtocolInterface: u64
    HandleProtocol: u64
    Reserved: u64
    RegisterProtocolNotify: u64
    LocateHandle: u64
    LocateDevicePath: u64
    InstallConfigurationTable: u64
    LoadImage: u64
    StartImage: u64
    Exit: u64
    UnloadImage: u64
    ExitBootServices: u64
    GetNextMonotonicCount: u64
    Stall: u64
    SetWatchdogTimer: u64
    ConnectController: u64
    DisconnectController: u64
    OpenProtocol: u64
    CloseProtocol: u64
    OpenProtocolInformation: u64
    ProtocolsPerHandle: u64
    LocateHandleBuffer: u64
    LocateProtocol: u64
    InstallMultipleProtocolInterfaces: u64
    UninstallMultipleProtocolInterfaces: u64
    CalculateCrc32: u64
    CopyMem: u64
    SetMem: u64
    CreateEventEx: u64


@struct
class EfiConfigurationTable:
    VendorGuid: Array[u8, GUID_SIZE]
    VendorTable: u64


@struct
class EfiSimpleTextOutput:
    Reset: u64
    OutputString: u64
    TestString: u64
    QueryMode: u64
    SetMode: u64
    SetAttribute: u64
    ClearScreen: u64
    SetCursorPosition: u64
    EnableCursor: u64
    Mode: u64


# EFI_SYSTEM_TABLE.Hdr.Signature: "IBI SYST"; EFI_BOOT_SERVICES: "BOOTSERV"
EFI_SYSTEM_TABLE_SIGNATURE = 0x5453595320494249
EFI_BOOT_SERVICES_SIGNATURE = 0x56524553544F4F42

# EFI_ALLOCATE_TYPE and EFI_MEMORY_TYPE (UEFI 2.10 §7.2)
ALLOCATE_ANY_PAGES = 0
ALLOCATE_MAX_ADDRESS = 1
ALLOCATE_ADDRESS = 2
EFI_RESERVED_MEMORY_TYPE = 0
EFI_LOADER_CODE = 1
EFI_LOADER_DATA = 2
EFI_BOOT_SERVICES_CODE = 3
EFI_BOOT_SERVICES_DATA = 4
EFI_RUNTIME_SERVICES_CODE = 5
EFI_RUNTIME_SERVICES_DATA = 6

# EFI_STATUS: errors have the top bit set (UEFI 2.10 Appendix D)
EFI_ERROR_BIT = 1 << 63
EFI_SUCCESS = const(u64, 0)
EFI_LOAD_ERROR = const(u64, EFI_ERROR_BIT | 1)
EFI_INVALID_PARAMETER = const(u64, EFI_ERROR_BIT | 2)
EFI_UNSUPPORTED = const(u64, EFI_ERROR_BIT | 3)
EFI_BUFFER_TOO_SMALL = const(u64, EFI_ERROR_BIT | 5)
EFI_OUT_OF_RESOURCES = const(u64, EFI_ERROR_BIT | 9)
EFI_NOT_FOUND = const(u64, EFI_ERROR_BIT | 14)


def guid_bytes(text: str) -> bytes:
    """EFI_GUID in memory: the first three fields little-endian (uuid's bytes_le)."""
    return uuid.UUID(text).bytes_le


# SEV launch secret area (OVMF: OvmfPkg/Include/Guid/ConfidentialComputingSecret.h and the
# secret-table layout in linux drivers/virt/coco/efi_secret).
CONFIDENTIAL_COMPUTING_SECRET_GUID = "adf956ad-e98c-484c-ae11-b51c7d336447"
SECRET_TABLE_HEADER_GUID = "1e74f542-71dd-4d66-963e-ef4287ff173b"


@struct
class CcSecretLocation:
    """The config table's VendorTable points at this: where the secret area is."""

    Base: u64
    Size: u64


@struct(packed=True)
class SecretTableHeader:
    Guid: Array[u8, GUID_SIZE]
    Len: u32  # total length of the area, this header included


@struct(packed=True)
class SecretEntryHeader:
    Guid: Array[u8, GUID_SIZE]
    Len: u32  # length of the entry, this 20-byte header included
