"""The transport key is found in an SEV secret area laid out as OVMF/Linux define it."""

from __future__ import annotations

import ctypes
import struct

import pytest

from helperfw.codegen.pipeline import build
from helperfw.native import NativeImage
from helperfw.runtime import secrets
from helperfw.runtime.efi import SECRET_TABLE_HEADER_GUID, guid_bytes
from helperfw.runtime.protocol import E_NO_KEY, OK

KEY = bytes(range(0x40, 0x60))
OTHER = guid_bytes("736869e5-84f0-4973-92ec-06879ce3da0b")  # e.g. a disk passphrase entry


def area(entries: list[tuple[bytes, bytes]], hdr_guid: bytes | None = None,
         total: int | None = None) -> bytes:
    body = b"".join(g + struct.pack("<I", 20 + len(d)) + d for g, d in entries)
    length = 20 + len(body) if total is None else total
    return (hdr_guid or guid_bytes(SECRET_TABLE_HEADER_GUID)) + struct.pack("<I", length) + body


@pytest.fixture(scope="module")
def img() -> NativeImage:
    return NativeImage(build([secrets.mh_test_secret_area_key]).image)


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
