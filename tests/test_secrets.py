"""The transport key is found in an SEV secret area laid out as OVMF/Linux define it, through
the UEFI configuration tables; every length and count there is bounded, and each bound has a
test in which it is the only thing between a malformed area and a read past its end (the area
ends at a PROT_NONE page: an over-read is a SIGSEGV)."""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest

from helperfw.codegen.pipeline import build
from helperfw.native import NativeImage
from helperfw.runtime import secrets
from helperfw.runtime.efi import (
    CONFIDENTIAL_COMPUTING_SECRET_GUID,
    SECRET_TABLE_HEADER_GUID,
    EfiSystemTable,
    guid_bytes,
)
from helperfw.runtime.protocol import E_NO_KEY, OK

KEY = bytes(range(0x40, 0x60))
OTHER = guid_bytes("736869e5-84f0-4973-92ec-06879ce3da0b")  # e.g. a disk passphrase entry


def area(entries: list[tuple[bytes, bytes]], hdr_guid: bytes | None = None,
         total: int | None = None) -> bytes:
    body = b"".join(g + struct.pack("<I", 20 + len(d)) + d for g, d in entries)
    length = 20 + len(body) if total is None else total
    return (hdr_guid or guid_bytes(SECRET_TABLE_HEADER_GUID)) + struct.pack("<I", length) + body


PAGE = 4096


@pytest.fixture(scope="module")
def img() -> NativeImage:
    return NativeImage(build([secrets.mh_test_secret_area_key]).image)


@pytest.fixture(scope="module")
def ftimg() -> NativeImage:
    return NativeImage(build([secrets.mh_test_secret_find_key]).image)


def run(img: NativeImage, data: bytes) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(data, len(data))
    out = ctypes.create_string_buffer(32)
    r = img.call("mh_test_secret_area_key", ctypes.addressof(buf), len(data),
                 ctypes.addressof(out), restype=ctypes.c_int32)
    return r, out.raw


KEY_GUID = guid_bytes(secrets.KEY_ENTRY_GUID)


def test_finds_key_after_other_entries(img):
    r, out = run(img, area([(OTHER, b"passphrase\0"), (KEY_GUID, KEY)]))
    assert r == OK.value and out == KEY


@pytest.mark.parametrize("data", [
    area([(OTHER, b"x" * 32)]),  # no key entry
    area([(KEY_GUID, KEY[:16])]),  # wrong key length
    area([(KEY_GUID, KEY)], hdr_guid=OTHER),  # not a secret area
    area([(OTHER, b"abc"), (KEY_GUID, KEY)], total=40),  # key lies past the declared length
    area([(KEY_GUID, KEY)])[:30],  # truncated area
    guid_bytes(SECRET_TABLE_HEADER_GUID) + struct.pack("<I", 200) + OTHER + struct.pack("<I", 3)
    + b"\0" * 40,  # entry length smaller than its own header: must not loop or over-read
], ids=["absent", "short", "bad-header", "past-end", "truncated", "bad-entry-len"])
def test_refuses_malformed_areas(img, data):
    r, out = run(img, data)
    assert r == E_NO_KEY.value
    assert out == b"\0" * 32  # nothing copied


# -- the bounds that are the only thing between a malformed area and an over-read -------------
class Guarded:
    """`data` placed so that its last byte is the last readable one: the next page is
    PROT_NONE, so a read past the end is a SIGSEGV, not a silently wrong answer."""

    def __init__(self, data: bytes) -> None:
        n = -(-len(data) // PAGE) * PAGE
        self.map = mmap.mmap(-1, n + PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(base + n, PAGE, 0) == 0
        self.addr = base + n - len(data)
        ctypes.memmove(self.addr, data, len(data))


def run_guarded(img: NativeImage, data: bytes, size: int | None = None) -> tuple[int, bytes]:
    g = Guarded(data)
    out = ctypes.create_string_buffer(32)
    r = img.call("mh_test_secret_area_key", g.addr, len(data) if size is None else size,
                 ctypes.addressof(out), restype=ctypes.c_int32)
    return r, out.raw


def entry(guid: bytes, data: bytes, length: int | None = None) -> bytes:
    return guid + struct.pack("<I", 20 + len(data) if length is None else length) + data


HDR = guid_bytes(SECRET_TABLE_HEADER_GUID)


@pytest.mark.parametrize("cut", [21, 31, 51])
def test_key_entry_running_past_the_area_is_refused(img, cut):
    """The area ends inside the key entry (its header says 52 bytes, the header of the area
    claims them too): only the entry-length bound stops a read past the area's end."""
    body = entry(KEY_GUID, KEY)[:cut]
    r, out = run_guarded(img, HDR + struct.pack("<I", 20 + 52) + body)
    assert r == E_NO_KEY.value and out == bytes(32)


def test_entry_length_beyond_the_area_is_refused(img):
    """An entry before the key claims more than is left; its own length must not be
    trusted to reach the key (which lies inside the area, after a gap)."""
    area = HDR + struct.pack("<I", 200) + entry(OTHER, b"x" * 8, length=0xFFFFFFF0)
    area += entry(KEY_GUID, KEY)
    r, out = run_guarded(img, area + bytes(200 - len(area)))
    assert r == E_NO_KEY.value and out == bytes(32)


def test_key_entry_ending_exactly_at_the_area_end_is_found(img):
    area = HDR + struct.pack("<I", 20 + 23 + 52) + entry(OTHER, b"abc") + entry(KEY_GUID, KEY)
    r, out = run_guarded(img, area)
    assert r == OK.value and out == KEY
    r, out = run_guarded(img, area, size=len(area) - 1)  # one byte short: refused
    assert r == E_NO_KEY.value and out == bytes(32)


@pytest.mark.parametrize("length", [0, 1, 19])
def test_entry_shorter_than_its_header_stops_the_walk(img, length):
    """A length that would not move the walk forward (0) or into its own header: refused,
    never an endless loop over the same bytes."""
    area = HDR + struct.pack("<I", 400) + entry(OTHER, bytes(8), length=length)
    area += entry(KEY_GUID, KEY)
    r, out = run_guarded(img, area + bytes(400 - len(area)))
    assert r == E_NO_KEY.value and out == bytes(32)


@pytest.mark.parametrize("size", [0, 19, 20])
def test_area_too_small_for_anything(img, size):
    r, out = run_guarded(img, (HDR + struct.pack("<I", 72) + entry(KEY_GUID, KEY))[:max(size, 1)],
                         size=size)
    assert r == E_NO_KEY.value and out == bytes(32)


def test_many_entries_before_the_key(img):
    """A long walk (1000 entries) still finds the key, and only inside the area."""
    body = b"".join(entry(OTHER, bytes([i % 251]) * (i % 7)) for i in range(1000))
    body += entry(KEY_GUID, KEY)
    r, out = run_guarded(img, HDR + struct.pack("<I", 20 + len(body)) + body)
    assert r == OK.value and out == KEY


def test_null_area_is_refused(img):
    out = ctypes.create_string_buffer(32)
    r = img.call("mh_test_secret_area_key", 0, 100, ctypes.addressof(out),
                 restype=ctypes.c_int32)
    assert r == E_NO_KEY.value and out.raw == bytes(32)


# -- the way there: the UEFI configuration tables ----------------------------------------------
class SystemTable:
    """An EFI_SYSTEM_TABLE whose configuration table array ends at a guard page, with the
    launch-secret location at index `at` (None: absent) pointing at `area`."""

    def __init__(self, area: bytes | None, n: int, at: int | None, *, claimed: int | None = None,
                 vendor: int | None = None) -> None:
        self.keep = []
        cfg = bytearray()
        loc = None
        if area is not None:
            self.area = ctypes.create_string_buffer(area, len(area))
            loc = ctypes.create_string_buffer(struct.pack("<QQ", ctypes.addressof(self.area),
                                                          len(area)), 16)
            self.keep.append(loc)
        for i in range(n):
            if i == at:
                ptr = ctypes.addressof(loc) if vendor is None else vendor
                cfg += guid_bytes(CONFIDENTIAL_COMPUTING_SECRET_GUID) + struct.pack("<Q", ptr)
            else:
                cfg += OTHER + struct.pack("<Q", 0x1000 + i)
        self.tables = Guarded(bytes(cfg) or bytes(8))
        st = bytearray(EfiSystemTable.size)
        struct.pack_into("<QQ", st, EfiSystemTable.offset("NumberOfTableEntries"),
                         n if claimed is None else claimed, self.tables.addr)
        self.buf = ctypes.create_string_buffer(bytes(st), len(st))

    def find_key(self, img) -> tuple[int, bytes]:
        out = ctypes.create_string_buffer(32)
        r = img.call("mh_test_secret_find_key", ctypes.addressof(self.buf),
                     ctypes.addressof(out), restype=ctypes.c_int32)
        return r, out.raw


MAX = secrets.MAX_CONFIG_TABLES


@pytest.mark.parametrize("n,at,want", [(3, 2, True), (MAX, MAX - 1, True), (3, None, False),
                                       (1, 0, True), (MAX + 1, MAX, "unreachable")])
def test_config_tables_walk(ftimg, n, at, want):
    """The secret area is found through its configuration table wherever it sits among the
    first MAX_CONFIG_TABLES; a table beyond them is never looked at (bounded walk)."""
    stbl = SystemTable(area([(OTHER, b"x"), (KEY_GUID, KEY)]), n, at)
    r, out = stbl.find_key(ftimg)
    if want is True:
        assert r == OK.value and out == KEY
    else:
        assert r == E_NO_KEY.value and out == bytes(32)


def test_config_table_count_is_bounded(ftimg):
    """A NumberOfTableEntries far beyond the array (the array ends at a guard page after
    MAX_CONFIG_TABLES entries): the walk stops at MAX_CONFIG_TABLES, never reads past."""
    stbl = SystemTable(area([(KEY_GUID, KEY)]), MAX, None, claimed=2**64 - 1)
    assert stbl.find_key(ftimg) == (E_NO_KEY.value, bytes(32))


def test_null_secret_location_is_refused(ftimg):
    stbl = SystemTable(area([(KEY_GUID, KEY)]), 2, 1, vendor=0)
    assert stbl.find_key(ftimg) == (E_NO_KEY.value, bytes(32))
