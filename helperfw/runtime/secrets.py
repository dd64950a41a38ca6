"""The transport key: found in the SEV launch-secret area and copied into private memory.

The guest owner injects the area at launch (after attestation); OVMF publishes it as the
`CONFIDENTIAL_COMPUTING_SECRET_GUID` configuration table. The helper's key is the entry with
`KEY_ENTRY_GUID` and exactly 32 bytes of data. The area is private guest memory, so the key
never passes through anything the host can read.
"""

from __future__ import annotations

from helperfw import Array, Ptr, addr, function, i32, sizeof, static, u8, u64

from .efi import (
    CONFIDENTIAL_COMPUTING_SECRET_GUID,
    SECRET_TABLE_HEADER_GUID,
    CcSecretLocation,
    EfiConfigurationTable,
    EfiSystemTable,
    SecretEntryHeader,
    SecretTableHeader,
    guid_bytes,
)
from .memops import bytes_eq
from .protocol import E_NO_KEY, OK

# The migration helper's entry in the secret area (chosen for this project; see docs/PROTOCOL.md).
KEY_ENTRY_GUID = "e66efe44-7936-46d7-9a2b-21a91c216b38"
KEY_SIZE = 32
MAX_CONFIG_TABLES = 1024  # bound the walk: the system table is trusted, but keep loops finite

G_KEY = static(Array[u8, 16], guid_bytes(KEY_ENTRY_GUID), readonly=True)
G_CC_SECRET = static(Array[u8, 16], guid_bytes(CONFIDENTIAL_COMPUTING_SECRET_GUID), readonly=True)
G_SECRET_HDR = static(Array[u8, 16], guid_bytes(SECRET_TABLE_HEADER_GUID), readonly=True)


@function(small=True)
def guid_eq(a: Ptr[u8], b: Ptr[u8]) -> bool:
    return bytes_eq(a, b, 16)


@function(small=True)
def find_config_table(st: Ptr[EfiSystemTable], guid: Ptr[u8]) -> u64:
    """VendorTable of the UEFI configuration table with `guid`, or 0 (absent or null)."""
    n = min(st.NumberOfTableEntries, u64(MAX_CONFIG_TABLES))
    tables = Ptr[EfiConfigurationTable](st.ConfigurationTable)
    for i in range(n):
        if guid_eq(addr(tables[i].VendorGuid[0]), guid):
            return tables[i].VendorTable
    return 0


@function(small=True)
def secret_area_key(base: u64, size: u64, out: Ptr[u8]) -> i32:
    """Copy the helper's 32-byte key out of a secret area at `base` (`size` bytes)."""
    if base == 0 or size < sizeof(SecretTableHeader):
        return E_NO_KEY
    hdr = Ptr[SecretTableHeader](base)
    if not guid_eq(addr(hdr.Guid[0]), addr(G_SECRET_HDR[0])):
        return E_NO_KEY
    total = min(u64(hdr.Len), size)
    off: u64 = sizeof(SecretTableHeader)
    while off + sizeof(SecretEntryHeader) <= total:
        e = Ptr[SecretEntryHeader](base + off)
        length = u64(e.Len)
        if length < sizeof(SecretEntryHeader) or length > total - off:
            return E_NO_KEY  # malformed: stop rather than walk off the area
        if guid_eq(addr(e.Guid[0]), addr(G_KEY[0])):
            if length != sizeof(SecretEntryHeader) + KEY_SIZE:
                return E_NO_KEY
            src = Ptr[u8](base + off + sizeof(SecretEntryHeader))
            for i in range(KEY_SIZE):
                out[i] = src[i]
            return OK
        off += length
    return E_NO_KEY


@function(small=True)
def secret_find_key(st: Ptr[EfiSystemTable], out: Ptr[u8]) -> i32:
    """Find the secret area through the UEFI configuration tables and copy the key."""
    loc = Ptr[CcSecretLocation](find_config_table(st, addr(G_CC_SECRET[0])))
    if u64(loc) == 0:
        return E_NO_KEY
    return secret_area_key(loc.Base, loc.Size, out)


@function(abi="c")
def mh_test_secret_area_key(base: u64, size: u64, out: Ptr[u8]) -> i32:
    return secret_area_key(base, size, out)


@function(abi="c")
def mh_test_secret_find_key(st: Ptr[EfiSystemTable], out: Ptr[u8]) -> i32:
    return secret_find_key(st, out)
