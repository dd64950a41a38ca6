"""AES-256 / AES-256-GCM firmware code (helperfw/runtime/aesgcm.py), run natively.

Known answers (FIPS-197, McGrew-Viega GCM test cases 13-16; every vector is also recomputed with
`cryptography`), differential tests against `cryptography`'s AESGCM in both directions, tamper
tests (a failed open must leave the destination untouched) and aliasing.
"""

from __future__ import annotations

import ctypes
import os
import random

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from helperfw.codegen.pipeline import build
from helperfw.native import NativeImage
from helperfw.runtime import aesgcm

LENGTHS = [*range(301), 4096]


class Gcm:
    """ctypes buffers around the image's C-ABI test wrappers (keeps every buffer alive)."""

    def __init__(self, img: NativeImage) -> None:
        self.img = img

    @staticmethod
    def buf(data: bytes | int):
        n = data if isinstance(data, int) else len(data)
        b = (ctypes.c_uint8 * max(1, n))()
        if not isinstance(data, int):
            ctypes.memmove(b, data, n)
        return b

    def aes(self, key: bytes, block: bytes) -> bytes:
        k, i, o = self.buf(key), self.buf(block), self.buf(16)
        self.img.call("mh_test_aes256_encrypt", *map(ctypes.addressof, (k, i, o)))
        return bytes(o)

    def round_keys(self, key: bytes) -> list[bytes]:
        k, o = self.buf(key), self.buf(aesgcm.Aes256Key.size)
        self.img.call("mh_test_aes256_expand", ctypes.addressof(k), ctypes.addressof(o))
        return list(aesgcm.Aes256Key.parse(bytes(o)).rk)

    def seal(self, key: bytes, iv: bytes, pt: bytes, aad: bytes) -> bytes:
        k, i, a, p = self.buf(key), self.buf(iv), self.buf(aad), self.buf(pt)
        c, t = self.buf(len(pt)), self.buf(16)
        A = ctypes.addressof
        self.img.call("mh_test_gcm_seal", A(k), A(i), A(a), len(aad), A(p), A(c), len(pt), A(t))
        return bytes(c)[: len(pt)] + bytes(t)

    def open(self, key: bytes, iv: bytes, ct_tag: bytes, aad: bytes,
             fill: int = 0xA5) -> tuple[bool, bytes, bytes]:
        """(ok, out buffer, scratch buffer) after gcm_open; out/scratch start filled with `fill`."""
        ct, tag = ct_tag[:-16], ct_tag[-16:]
        n = len(ct)
        k, i, a, c, t = (self.buf(x) for x in (key, iv, aad, ct, tag))
        out, scratch = self.buf(bytes([fill]) * n), self.buf(bytes([fill]) * n)
        A = ctypes.addressof
        ok = self.img.call("mh_test_gcm_open", A(k), A(i), A(a), len(aad), A(c), A(out), n,
                           A(t), A(scratch))
        return bool(ok), bytes(out)[:n], bytes(scratch)[:n]


@pytest.fixture(scope="module")
def gcm() -> Gcm:
    return Gcm(NativeImage(build(aesgcm.TEST_FUNCTIONS).image))


def _ecb(key: bytes, block: bytes) -> bytes:
    return Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(block)


def _py_key_schedule(key: bytes) -> list[bytes]:
    """FIPS-197 §5.2 key expansion for Nk = 8, written from the standard (S-box via ECB probe
    is not possible, so the S-box is derived from GF(2^8) inversion + affine map)."""

    def gmul(a: int, b: int) -> int:
        r = 0
        while b:
            if b & 1:
                r ^= a
            a = ((a << 1) ^ (0x11B if a & 0x80 else 0)) & 0xFF
            b >>= 1
        return r

    def sbox(x: int) -> int:
        inv = next((y for y in range(1, 256) if gmul(x, y) == 1), 0) if x else 0
        s = inv
        for i in range(1, 5):
            s ^= ((inv << i) | (inv >> (8 - i))) & 0xFF
        return s ^ 0x63

    w = [list(key[4 * i:4 * i + 4]) for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = list(w[i - 1])
        if i % 8 == 0:
            t = [sbox(b) for b in t[1:] + t[:1]]
            t[0] ^= rcon
            rcon = gmul(rcon, 2)
        elif i % 8 == 4:
            t = [sbox(b) for b in t]
        w.append([a ^ b for a, b in zip(w[i - 8], t)])
    return [b"".join(bytes(x) for x in w[4 * r:4 * r + 4]) for r in range(15)]


# -- AES-256 ----------------------------------------------------------------------------------


def test_fips197_c3(gcm: Gcm) -> None:
    key = bytes(range(32))
    pt = bytes.fromhex("00112233445566778899aabbccddeeff")
    want = bytes.fromhex("8ea2b7ca516745bfeafc49904b496089")
    assert _ecb(key, pt) == want
    assert gcm.aes(key, pt) == want


def test_key_schedule_matches_fips197(gcm: Gcm) -> None:
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    rks = gcm.round_keys(key)
    assert rks == _py_key_schedule(key)
    assert rks[14] == bytes.fromhex("fe4890d1e6188d0b046df344706c631e")  # FIPS-197 A.3 w56..59


def test_aes_random_vs_cryptography(gcm: Gcm) -> None:
    rng = random.Random(1)
    for _ in range(50):
        key, blk = rng.randbytes(32), rng.randbytes(16)
        assert gcm.aes(key, blk) == _ecb(key, blk)


# -- GCM known answers ------------------------------------------------------------------------

K15 = bytes.fromhex("feffe9928665731c6d6a8f9467308308" * 2)
IV15 = bytes.fromhex("cafebabefacedbaddecaf888")
P15 = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
A16 = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")

# McGrew-Viega, "The Galois/Counter Mode of Operation", AES-256 test cases 13-16 (96-bit IVs).
MV_CASES = [
    ("tc13", bytes(32), bytes(12), b"", b"", "530f8afbc74536b9a963b4f1c4cb738b"),
    ("tc14", bytes(32), bytes(12), bytes(16), b"", "d0d1c8a799996bf0265b98b5d48ab919"),
    ("tc15", K15, IV15, P15, b"", "b094dac5d93471bdec1a502270e3cc6c"),
    ("tc16", K15, IV15, P15[:60], A16, "76fc6ece0f4e1768cddf8853bb2d551b"),
]


@pytest.mark.parametrize(("name", "key", "iv", "pt", "aad", "tag"), MV_CASES,
                         ids=[c[0] for c in MV_CASES])
def test_gcm_known_answers(gcm: Gcm, name, key, iv, pt, aad, tag) -> None:
    ref = AESGCM(key).encrypt(iv, pt, aad)
    assert ref[-16:].hex() == tag
    assert gcm.seal(key, iv, pt, aad) == ref
    ok, out, _ = gcm.open(key, iv, ref, aad)
    assert ok and out == pt


def test_tc14_ciphertext(gcm: Gcm) -> None:
    ct = gcm.seal(bytes(32), bytes(12), bytes(16), b"")
    assert ct[:16].hex() == "cea7403d4d606b6e074ec5d3baf39d18"


# -- differential -----------------------------------------------------------------------------


@pytest.mark.parametrize("aad_kind", ["none", "envelope48", "random"])
def test_seal_matches_cryptography(gcm: Gcm, aad_kind: str) -> None:
    rng = random.Random(hash(aad_kind) & 0xFFFF)
    for n in LENGTHS:
        key, iv, pt = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n)
        aad = {"none": b"", "envelope48": rng.randbytes(48),
               "random": rng.randbytes(rng.randrange(0, 300))}[aad_kind]
        got = gcm.seal(key, iv, pt, aad)
        assert got == AESGCM(key).encrypt(iv, pt, aad), (n, len(aad))
        assert AESGCM(key).decrypt(iv, got, aad) == pt


@pytest.mark.parametrize("aad_kind", ["none", "envelope48", "random"])
def test_open_matches_cryptography(gcm: Gcm, aad_kind: str) -> None:
    rng = random.Random(7 + len(aad_kind))
    for n in LENGTHS:
        key, iv, pt = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n)
        aad = {"none": b"", "envelope48": rng.randbytes(48),
               "random": rng.randbytes(rng.randrange(0, 300))}[aad_kind]
        ok, out, scratch = gcm.open(key, iv, AESGCM(key).encrypt(iv, pt, aad), aad)
        assert ok and out == pt and scratch == pt, (n, len(aad))


def test_ctx_api_and_in_place(gcm: Gcm) -> None:
    """gcm_init once + many seals/opens on the same context; pt == ct and scratch == out."""
    A = ctypes.addressof
    rng = random.Random(3)
    key = rng.randbytes(32)
    ctx = Gcm.buf(aesgcm.GcmCtx.size)
    k = Gcm.buf(key)
    gcm.img.call("mh_test_gcm_init", A(ctx), A(k))
    for n in (0, 1, 15, 16, 17, 127, 128, 129, 1000, 4096):
        iv, pt, aad = rng.randbytes(12), rng.randbytes(n), rng.randbytes(48)
        data, i, a, t = Gcm.buf(pt), Gcm.buf(iv), Gcm.buf(aad), Gcm.buf(16)
        gcm.img.call("mh_test_gcm_seal_ctx", A(ctx), A(i), A(a), 48, A(data), A(data), n, A(t))
        ref = AESGCM(key).encrypt(iv, pt, aad)
        assert bytes(data)[:n] + bytes(t) == ref
        ok = gcm.img.call("mh_test_gcm_open_ctx", A(ctx), A(i), A(a), 48, A(data), A(data), n,
                          A(t), A(data))
        assert ok == 1 and bytes(data)[:n] == pt


def test_ctx_layout() -> None:
    assert aesgcm.Aes256Key.size == 15 * 16
    assert aesgcm.GcmCtx.size == 31 * 16
    assert aesgcm.GcmCtx.offset("h") == 15 * 16


# -- tampering --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 16, 33, 300, 4096])
@pytest.mark.parametrize("where", ["ct", "tag", "aad"])
def test_tamper_rejected_and_output_untouched(gcm: Gcm, n: int, where: str) -> None:
    rng = random.Random(n * 31 + len(where))
    key, iv, pt, aad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n), rng.randbytes(48)
    sealed = bytearray(AESGCM(key).encrypt(iv, pt, aad))
    aad2 = bytearray(aad)
    for _ in range(5):
        s, a = bytearray(sealed), bytearray(aad2)
        if where == "ct" and n:
            i = rng.randrange(n)
            s[i] ^= 1 << rng.randrange(8)
        elif where == "aad" or (where == "ct" and not n):
            i = rng.randrange(len(a))
            a[i] ^= 1 << rng.randrange(8)
        else:
            i = n + rng.randrange(16)
            s[i] ^= 1 << rng.randrange(8)
        with pytest.raises(InvalidTag):
            AESGCM(key).decrypt(iv, bytes(s), bytes(a))
        ok, out, scratch = gcm.open(key, iv, bytes(s), bytes(a), fill=0xA5)
        assert not ok
        assert out == b"\xa5" * n  # a failed record never modifies the destination
        assert scratch == bytes(n)  # and the unauthenticated plaintext is wiped
    # the untampered record still opens
    ok, out, _ = gcm.open(key, iv, bytes(sealed), aad)
    assert ok and out == pt


def test_wrong_key_or_iv_rejected(gcm: Gcm) -> None:
    key, iv, pt, aad = os.urandom(32), os.urandom(12), os.urandom(4096), os.urandom(48)
    sealed = AESGCM(key).encrypt(iv, pt, aad)
    assert not gcm.open(bytes(32), iv, sealed, aad)[0]
    assert not gcm.open(key, bytes(12), sealed, aad)[0]
