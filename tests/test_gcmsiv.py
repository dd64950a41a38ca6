"""AES-256 and AES-256-GCM-SIV firmware code (helperfw/runtime/aes.py, gcmsiv*.py), run natively.

Every AEAD test runs on both paths: "base" (128-bit AES-NI/PCLMULQDQ, the only one under
emulation) and "wide" (VAES/VPCLMULQDQ kernels for whole 256-byte groups; skipped, saying why,
on a CPU without them). On a VAES CPU the "base" runs are the forced baseline.

Known answers: FIPS-197 and RFC 8452's AES-256 vectors (appendix C.2, with the record keys they
list, and the C.3 counter-wrap cases); differential tests against `cryptography`'s AESGCMSIV in
both directions on every length 0..300, around each multiple of 256 up to 4 KiB (where the wide
kernels hand over to the baseline) and 4096, with empty, envelope-sized and random AADs; tamper
tests (a failed open leaves the destination untouched and wipes the scratch); aliasing; and the
single-fetch rule of seal (what is encrypted is what was hashed).
"""

from __future__ import annotations

import ctypes
import functools
import random

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from helperfw.codegen.pipeline import build
from helperfw.intrinsics import x86
from helperfw.native import NativeImage
from helperfw.runtime import aes, gcmsiv, gcmsiv_keys
from helperfw.runtime.gcmsiv_wide import WIDE_OFF, WIDE_ON
from tests.host_cpu import needs_wide

# every length up to 300, then both sides of each 256-byte group boundary up to a page
LENGTHS = sorted({*range(301), *(g + d for g in range(512, 4097, 256) for d in (-17, -1, 0, 1, 16)
                                 if g + d <= 4096)})
A = ctypes.addressof
PATHS = {"base": WIDE_OFF.value, "wide": WIDE_ON.value}


def buf(data: bytes | int):
    n = data if isinstance(data, int) else len(data)
    b = (ctypes.c_uint8 * max(1, n))()
    if not isinstance(data, int):
        ctypes.memmove(b, data, n)
    return b


MKEY = (0x0123456789ABCDEF, 0xFEDCBA9876543210)  # the staging-mask key the wrappers set


@functools.cache
def mask(block_id: int, serial: int = 1) -> bytes:
    """The mask of block `block_id` (x86.mask, the interpreter's model of mask_block) under
    MKEY; serial 1 is a wrapper's one record (mask_key restarts the serial, mask_next adds 1)."""
    return x86.mask(MKEY[0] | (MKEY[1] << 64), serial, block_id).to_bytes(16, "little")


def stage_ids(n: int) -> list[int]:
    """Seal's stage: block i of the page has id i."""
    return list(range((n + 15) // 16))


def scratch_ids(page: int, n: int) -> list[int]:
    """Open's scratch: the block at offset o is meant for page + o; its id is the address of
    its 128-byte group + its index there (mask8's ids), a lone block's its own address."""
    whole = n & ~127
    return [page + (o & ~127) + ((o & 127) >> 4) if o < whole else page + o
            for o in range(0, n, 16)]


def masked(data: bytes, ids: list[int], serial: int = 1) -> bytes:
    """data with block i XORed with the mask of ids[i] (a partial last block: its bytes)."""
    return bytes(b ^ mask(ids[i >> 4], serial)[i & 15] for i, b in enumerate(data))


class Siv:
    """ctypes buffers around the image's C-ABI test wrappers (keeps every buffer alive), on one
    path (gcmsiv_wide.WIDE_*). Every seal checks that the stage holds the page masked exactly as
    the baseline's mask_block would (so either path can unmask it)."""

    def __init__(self, img: NativeImage, path: int = WIDE_OFF.value) -> None:
        self.img, self.path = img, path
        self.mkey = (ctypes.c_uint64 * 2)(*MKEY)

    def round_keys(self, key: bytes) -> list[bytes]:
        k, o = buf(key), buf(aes.Aes256Key.size)
        self.img.call("mh_test_aes256_expand", A(k), A(o))
        return list(aes.Aes256Key.parse(bytes(o)).rk)

    def derive(self, key: bytes, nonce: bytes) -> tuple[bytes, bytes]:
        """(record authentication key H, record encryption key's first two round keys)."""
        k, n, o = buf(key), buf(nonce), buf(gcmsiv.SivKeys.size)
        self.img.call("mh_test_siv_derive", A(k), A(n), A(o), self.path)
        keys = gcmsiv.SivKeys.parse(bytes(o))
        return keys.h[15], keys.enc.rk[0] + keys.enc.rk[1]

    def seal(self, key: bytes, nonce: bytes, pt: bytes, aad: bytes, *,
             in_place: bool = False) -> bytes:
        k, i, a, p = buf(key), buf(nonce), buf(aad), buf(pt)
        stage = p if in_place else buf(len(pt))
        c, t = (p, buf(16)) if in_place else (buf(len(pt)), buf(16))
        self.img.call("mh_test_siv_seal", A(k), A(i), A(a), len(aad), A(p), A(stage), A(c),
                      len(pt), A(t), self.path, A(self.mkey))
        if not in_place:  # the stage holds the page masked: no plaintext block waits there
            assert bytes(stage)[: len(pt)] == masked(pt, stage_ids(len(pt)))
        return bytes(c)[: len(pt)] + bytes(t)

    def open_raw(self, key: bytes, nonce: bytes, ct_tag: bytes, aad: bytes, fill: int = 0xA5
                 ) -> tuple[int, ctypes.Array, ctypes.Array]:
        """(result, out buffer, scratch buffer) after siv_open; out/scratch start filled with
        fill. result is gcmsiv.SIV_OK / SIV_AUTH / SIV_CHANGED."""
        ct, tag = ct_tag[:-16], ct_tag[-16:]
        n = len(ct)
        k, i, a, c, t = (buf(x) for x in (key, nonce, aad, ct, tag))
        out, scratch = buf(bytes([fill]) * n), buf(bytes([fill]) * n)
        r = self.img.call("mh_test_siv_open", A(k), A(i), A(a), len(aad), A(c), A(out), n, A(t),
                          A(scratch), self.path, A(self.mkey))
        return r, out, scratch

    def open(self, key: bytes, nonce: bytes, ct_tag: bytes, aad: bytes,
             fill: int = 0xA5) -> tuple[int, bytes, bytes]:
        """open_raw's buffers as bytes."""
        n = len(ct_tag) - 16
        r, out, scratch = self.open_raw(key, nonce, ct_tag, aad, fill)
        return r, bytes(out)[:n], bytes(scratch)[:n]


@pytest.fixture(scope="module")
def image() -> NativeImage:
    return NativeImage(build(gcmsiv.TEST_FUNCTIONS).image)


@pytest.fixture(scope="module", params=[pytest.param("base"), pytest.param("wide", marks=needs_wide)])
def siv(request, image: NativeImage) -> Siv:
    return Siv(image, PATHS[request.param])


# -- AES-256 ----------------------------------------------------------------------------------


def _py_key_schedule(key: bytes) -> list[bytes]:
    """FIPS-197 §5.2 key expansion for Nk = 8, written from the standard (S-box from GF(2^8)
    inversion and the affine map)."""

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
        w.append([a ^ b for a, b in zip(w[i - 8], t, strict=True)])
    return [b"".join(bytes(x) for x in w[4 * r:4 * r + 4]) for r in range(15)]


def test_key_schedule_matches_fips197(siv: Siv) -> None:
    key = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
    rks = siv.round_keys(key)
    assert rks == _py_key_schedule(key)
    assert rks[14] == bytes.fromhex("fe4890d1e6188d0b046df344706c631e")  # FIPS-197 A.3 w56..59


# -- RFC 8452 known answers (AEAD_AES_256_GCM_SIV) ---------------------------------------------

K1 = "01" + "00" * 31
N1 = "03" + "00" * 11
# (key, nonce, aad, plaintext, result = ciphertext ‖ tag) from RFC 8452 appendix C.2 and C.3
RFC8452 = [
    (K1, N1, "", "", "07f5f4169bbf55a8400cd47ea6fd400f"),
    (K1, N1, "", "0100000000000000", "c2ef328e5c71c83b843122130f7364b761e0b97427e3df28"),
    (K1, N1, "", "010000000000000000000000",
     "9aab2aeb3faa0a34aea8e2b18ca50da9ae6559e48fd10f6e5c9ca17e"),
    (K1, N1, "", "01" + "00" * 15, "85a01b63025ba19b7fd3ddfc033b3e76c9eac6fa700942702e90862383c6c366"),
    (K1, N1, "", "01" + "00" * 15 + "02" + "00" * 15,
     ("4a6a9db4c8c6549201b9edb53006cba821ec9cf850948a7c86c68ac7539d027f"
     "e819e63abcd020b006a976397632eb5d")),
    (K1, N1, "", "".join(f"{i:02x}" + "00" * 15 for i in (1, 2, 3, 4)),
     ("c2d5160a1f8683834910acdafc41fbb1632d4a353e8b905ec9a5499ac34f96c7"
     "e1049eb080883891a4db8caaa1f99dd004d80487540735234e3744512c6f90ce"
     "112864c269fc0d9d88c61fa47e39aa08")),
    (K1, N1, "01", "0200000000000000", "1de22967237a813291213f267e3b452f02d01ae33e4ec854"),
    (K1, N1, "01", "".join(f"{i:02x}" + "00" * 15 for i in (2, 3, 4, 5)),
     ("67fd45e126bfb9a79930c43aad2d36967d3f0e4d217c1e551f59727870beefc9"
     "8cb933a8fce9de887b1e40799988db1fc3f91880ed405b2dd298318858467c89"
     "5bde0285037c5de81e5b570a049b62a0")),
    (K1, N1, "010000000000000000000000", "02000000", "22b3f4cd1835e517741dfddccfa07fa4661b74cf"),
    (K1, N1, "01" + "00" * 15 + "0200", "03" + "00" * 15 + "04000000",
     "43dd0163cdb48f9fe3212bf61b201976067f342bb879ad976d8242acc188ab59cabfe307"),
    ("e66021d5eb8e4f4066d4adb9c33560e4f46e44bb3da0015c94f7088736864200",
     "e0eaf5284d884a0e77d31646", "", "", "169fbb2fbf389a995f6390af22228a62"),
    ("bae8e37fc83441b16034566b7a806c46bb91c3c5aedb64a6c590bc84d1a5e269",
     "e4b47801afc0577e34699b9e", "4fbdc66f14", "671fdd",
     "0eaccb93da9bb81333aee0c785b240d319719d"),
    ("3c535de192eaed3822a2fbbe2ca9dfc88255e14a661b8aa82cc54236093bbc23",
     "688089e55540db1872504e1c",
     "734320ccc9d9bbbb19cb81b2af4ecbc3e72834321f7aa0f70b7282b4f33df23f167541",
     "ced532ce4159b035277d4dfbb7db62968b13cd4eec",
     "626660c26ea6612fb17ad91e8e767639edd6c9faee9d6c7029675b89eaf4ba1ded1a286594"),
    # C.3: the tag's counter starts at 0xffffffff and must wrap in 32 bits
    ("00" * 32, "00" * 12, "", "00" * 16 + "4db923dc793ee6497c76dcc03a98e108",
     ("f3f80f2cf0cb2dd9c5984fcda908456cc537703b5ba70324a6793a7bf218d3ea"
     "ffffffff000000000000000000000000")),
    ("00" * 32, "00" * 12, "", "eb3640277c7ffd1303c7a542d02d3e4c" + "00" * 8,
     "18ce4f0b8cb4d0cac65fea8f79257b20888e53e72299e56dffffffff000000000000000000000000"),
]


@pytest.mark.parametrize(("key", "nonce", "aad", "pt", "result"), RFC8452,
                         ids=[f"c{i}" for i in range(len(RFC8452))])
def test_rfc8452_vectors(siv: Siv, key: str, nonce: str, aad: str, pt: str, result: str) -> None:
    k, n, a, p, r = (bytes.fromhex(x) for x in (key, nonce, aad, pt, result))
    assert AESGCMSIV(k).encrypt(n, p, a) == r  # the reference agrees with the RFC
    assert siv.seal(k, n, p, a) == r
    res, out, _ = siv.open(k, n, r, a)
    assert res == gcmsiv.SIV_OK and out == p


def test_rfc8452_record_keys(siv: Siv) -> None:
    """The derived keys themselves (RFC 8452 C.2 lists them): H and the encryption key."""
    h, enc = siv.derive(bytes.fromhex(K1), bytes.fromhex(N1))
    assert h.hex() == "b5d3c529dfafac43136d2d11be284d7f"
    assert enc.hex() == "b914f4742be9e1d7a2f84addbf96dec3456e3c6c05ecc157cdbf0700fedad222"
    h, enc = siv.derive(bytes.fromhex(
        "e66021d5eb8e4f4066d4adb9c33560e4f46e44bb3da0015c94f7088736864200"),
        bytes.fromhex("e0eaf5284d884a0e77d31646"))
    assert h.hex() == "e40d26f82774aa27f47b047b608b9585"
    assert enc.hex() == "7c7c3d9a542cef53dde0e6de9b5800400f82e73ec5f7ee41b7ba8dcb9ba078c3"


# -- differential -----------------------------------------------------------------------------


def _aad(rng: random.Random, kind: str) -> bytes:
    return {"none": b"", "envelope48": rng.randbytes(48),
            "random": rng.randbytes(rng.randrange(0, 300))}[kind]


@pytest.mark.parametrize("aad_kind", ["none", "envelope48", "random"])
def test_seal_matches_cryptography(siv: Siv, aad_kind: str) -> None:
    rng = random.Random(f"seal-{aad_kind}")
    for n in LENGTHS:
        key, nonce, pt, aad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n), _aad(
            rng, aad_kind)
        got = siv.seal(key, nonce, pt, aad)
        assert got == AESGCMSIV(key).encrypt(nonce, pt, aad), (n, len(aad))


@pytest.mark.parametrize("aad_kind", ["none", "envelope48", "random"])
def test_open_matches_cryptography(siv: Siv, aad_kind: str) -> None:
    rng = random.Random(f"open-{aad_kind}")
    for n in LENGTHS:
        key, nonce, pt, aad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n), _aad(
            rng, aad_kind)
        r, out, scratch = siv.open(key, nonce, AESGCMSIV(key).encrypt(nonce, pt, aad), aad)
        assert r == gcmsiv.SIV_OK and out == pt, (n, len(aad))
        # the scratch held the plaintext masked, never as it is
        assert all(scratch[i:i + 16] != pt[i:i + 16] for i in range(0, n - 15, 16))


def test_in_place(siv: Siv) -> None:
    """stage == pt == ct on seal, scratch == out on open."""
    rng = random.Random(3)
    for n in (0, 1, 15, 16, 17, 127, 128, 129, 255, 256, 257, 300, 1000, 4096):
        key, nonce, pt, aad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n), rng.randbytes(48)
        ref = AESGCMSIV(key).encrypt(nonce, pt, aad)
        assert siv.seal(key, nonce, pt, aad, in_place=True) == ref
        k, i, a, data, t = buf(key), buf(nonce), buf(aad), buf(ref[:n]), buf(ref[n:])
        ok = siv.img.call("mh_test_siv_open", A(k), A(i), A(a), 48, A(data), A(data), n, A(t),
                          A(data), siv.path, A(siv.mkey))
        assert ok == gcmsiv.SIV_OK and bytes(data)[:n] == pt


GUARD = 32  # bytes after each output buffer that must stay as they were


def _guarded(data: bytes | int) -> ctypes.Array:
    """A buffer with GUARD bytes of 0x5A after its n bytes."""
    n = data if isinstance(data, int) else len(data)
    b = buf(bytes(data if not isinstance(data, int) else n) + b"\x5a" * GUARD)
    return b


def _untouched_after(b: ctypes.Array, n: int) -> bool:
    return bytes(b)[n : n + GUARD] == b"\x5a" * GUARD


@pytest.mark.parametrize("n", [*range(50), 127, 129, 143, 255, 4079, 4095, 4096])
def test_every_write_stays_inside_its_buffer(siv: Siv, n: int) -> None:
    """Seal's stage, ciphertext and tag, open's output and scratch: nothing is written past the
    n bytes (or the 16-byte tag), whatever the length of the last partial block."""
    rng = random.Random(n)
    key, nonce, pt, aad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n), rng.randbytes(48)
    k, i, a, p = buf(key), buf(nonce), buf(aad), buf(pt)
    stage, c, t = _guarded(n), _guarded(n), _guarded(16)
    siv.img.call("mh_test_siv_seal", A(k), A(i), A(a), len(aad), A(p), A(stage), A(c), n, A(t),
                 siv.path, A(siv.mkey))
    assert bytes(c)[:n] + bytes(t)[:16] == AESGCMSIV(key).encrypt(nonce, pt, aad)
    assert _untouched_after(stage, n) and _untouched_after(c, n) and _untouched_after(t, 16)
    out, scratch, ct, tag = _guarded(n), _guarded(n), buf(bytes(c)[:n]), buf(bytes(t)[:16])
    r = siv.img.call("mh_test_siv_open", A(k), A(i), A(a), len(aad), A(ct), A(out), n, A(tag),
                     A(scratch), siv.path, A(siv.mkey))
    assert r == gcmsiv.SIV_OK and bytes(out)[:n] == pt
    assert _untouched_after(out, n) and _untouched_after(scratch, n)


def test_layouts() -> None:
    assert aes.Aes256Key.size == 15 * 16
    assert gcmsiv.SivKeys.size == (15 + 16 + 16 + 1) * 16  # + the path flag, padded
    assert gcmsiv_keys.SivKeys.offset("h") % 16 == 0 and gcmsiv_keys.SivKeys.offset("hk") % 16 == 0


# -- tampering --------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 16, 33, 300, 1000, 4096])
@pytest.mark.parametrize("where", ["ct", "tag", "aad", "nonce"])
def test_tamper_rejected_and_output_untouched(siv: Siv, n: int, where: str) -> None:
    rng = random.Random(n * 31 + len(where))
    key, nonce, pt, aad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n), rng.randbytes(48)
    sealed = AESGCMSIV(key).encrypt(nonce, pt, aad)
    for _ in range(5):
        s, a, nn = bytearray(sealed), bytearray(aad), bytearray(nonce)
        if where == "ct" and n:
            s[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif where == "aad" or (where == "ct" and not n):
            a[rng.randrange(len(a))] ^= 1 << rng.randrange(8)
        elif where == "nonce":
            nn[rng.randrange(12)] ^= 1 << rng.randrange(8)
        else:
            s[n + rng.randrange(16)] ^= 1 << rng.randrange(8)
        with pytest.raises(InvalidTag):
            AESGCMSIV(key).decrypt(bytes(nn), bytes(s), bytes(a))
        r, out, scratch = siv.open(key, bytes(nn), bytes(s), bytes(a), fill=0xA5)
        assert r == gcmsiv.SIV_AUTH
        assert out == b"\xa5" * n  # a failed record never modifies the destination
        assert scratch == bytes(n)  # and the unauthenticated plaintext is wiped
    r, out, _ = siv.open(key, nonce, sealed, aad)
    assert r == gcmsiv.SIV_OK and out == pt


def test_wrong_key_rejected(siv: Siv) -> None:
    rng = random.Random(5)
    key, nonce, pt, aad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(4096), rng.randbytes(48)
    sealed = AESGCMSIV(key).encrypt(nonce, pt, aad)
    assert siv.open(bytes(32), nonce, sealed, aad)[0] == gcmsiv.SIV_AUTH


def test_repeated_nonce_reveals_only_equality(siv: Siv) -> None:
    """The property the protocol relies on when a host rolls the helper's memory back: under one
    (key, nonce), two different pages get different tags, hence different keystreams (no XOR of
    the ciphertexts equals the XOR of the plaintexts), while identical inputs give identical
    records. With GCM the XOR would match exactly."""
    rng = random.Random(9)
    key, nonce, aad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(48)
    p1, p2 = rng.randbytes(4096), rng.randbytes(4096)
    r1, r2 = siv.seal(key, nonce, p1, aad), siv.seal(key, nonce, p2, aad)
    assert r1[-16:] != r2[-16:]
    x_ct = bytes(a ^ b for a, b in zip(r1[:4096], r2[:4096], strict=True))
    x_pt = bytes(a ^ b for a, b in zip(p1, p2, strict=True))
    assert all(x_ct[i:i + 16] != x_pt[i:i + 16] for i in range(0, 4096, 16))
    assert siv.seal(key, nonce, p1, aad) == r1


# -- memory discipline: masks, the bound page, the copy-out's check (gcmsiv.py's docstring) ------
# On the wide path these are the only tests of it that run on hardware: the emulator's hostile
# tests (test_hostile_rollback.py) run the baseline (unicorn has no AVX).

MASK_LENGTHS = [16, 100, 128, 255, 256, 257, 511, 512, 1000, 4095, 4096]


def _envelope_aad(rng: random.Random, ram_addr: int) -> bytes:
    """48 AAD bytes shaped like an envelope's: the u64 at offset 8 is the record's ram_addr."""
    aad = bytearray(rng.randbytes(48))
    aad[8:16] = ram_addr.to_bytes(8, "little")
    return bytes(aad)


@pytest.mark.parametrize("n", MASK_LENGTHS)
def test_stage_holds_the_page_masked(siv: Siv, n: int) -> None:
    """After a seal, the stage holds each block XORed with the mask of its block index
    (x86.mask under the wrappers' key, serial 1): exactly the baseline's masks on both paths,
    and no plaintext block anywhere in it. (Siv.seal checks the same on every seal.)"""
    rng = random.Random(f"stage-{n}")
    key, nonce, pt = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n)
    k, i, a, p, stage, c, t = (buf(x) for x in (key, nonce, b"\0" * 48, pt, n, n, 16))
    siv.img.call("mh_test_siv_seal", A(k), A(i), A(a), 48, A(p), A(stage), A(c), n, A(t),
                 siv.path, A(siv.mkey))
    st = bytes(stage)[:n]
    assert st == masked(pt, stage_ids(n))
    blocks = {pt[j:j + 16] for j in range(0, n - 15, 16)}
    assert not any(st[j:j + 16] in blocks for j in range(n - 15))


@pytest.mark.parametrize("n", MASK_LENGTHS)
def test_scratch_holds_the_plaintext_masked_for_its_address(siv: Siv, n: int) -> None:
    """After an open, the scratch holds the plaintext masked with the ids of the addresses the
    blocks are meant for (the bound page = base + the AAD's ram_addr; mask8's numbering), on both
    paths the same; no plaintext block is left in it."""
    rng = random.Random(f"scratch-{n}")
    key, nonce, pt = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n)
    aad = _envelope_aad(rng, 0x12345000)
    r, out, scratch = siv.open_raw(key, nonce, AESGCMSIV(key).encrypt(nonce, pt, aad), aad)
    assert r == gcmsiv.SIV_OK and bytes(out)[:n] == pt
    sc = bytes(scratch)[:n]
    assert sc == masked(pt, scratch_ids(A(out), n))
    blocks = {pt[j:j + 16] for j in range(0, n - 15, 16)}
    assert not any(sc[j:j + 16] in blocks for j in range(n - 15))


def test_the_page_is_base_plus_the_aads_ram_addr(siv: Siv) -> None:
    """siv_seal/siv_open take no page pointer: the page is base + the ram_addr in the AAD block
    the tag covers. Seal reads exactly that page (a page beside it is not what the record
    carries) and open writes exactly that page (the pages around it, the ciphertext and the
    tag stay as they were)."""
    rng = random.Random(11)
    key, nonce = rng.randbytes(32), rng.randbytes(12)
    region = buf(rng.randbytes(3 * 4096))
    before = bytes(region)
    ram_addr = 0x7654000
    aad = _envelope_aad(rng, ram_addr)
    base = A(region) + 4096 - ram_addr  # base + ram_addr = the middle page
    k, i, a, stage, c, t = (buf(x) for x in (key, nonce, aad, 4096, 4096, 16))
    # the seal wrapper takes `pt` only to compute base = pt - ram_addr: give it the middle page
    siv.img.call("mh_test_siv_seal", A(k), A(i), A(a), 48, base + ram_addr, A(stage), A(c),
                 4096, A(t), siv.path, A(siv.mkey))
    record = bytes(c) + bytes(t)
    assert AESGCMSIV(key).decrypt(nonce, record, aad) == before[4096:8192]
    assert bytes(region) == before  # seal only reads
    # open another page's content into the middle page; its neighbours stay untouched
    new = rng.randbytes(4096)
    ct = AESGCMSIV(key).encrypt(nonce, new, aad)
    c2, t2, scratch = buf(ct[:4096]), buf(ct[4096:]), buf(4096)
    r = siv.img.call("mh_test_siv_open", A(k), A(i), A(a), 48, A(c2), A(region) + 4096, 4096,
                     A(t2), A(scratch), siv.path, A(siv.mkey))
    assert r == gcmsiv.SIV_OK
    got = bytes(region)
    assert got[:4096] == before[:4096] and got[8192:] == before[8192:] and got[4096:8192] == new
    assert bytes(c2) + bytes(t2) == ct


def _open_rewound(siv: Siv, key: bytes, nonce: bytes, aad: bytes, record: bytes, out,
                  old: bytes, serial: int, path: int | None = None, check: int = 1) -> int:
    """mh_test_siv_open_rewound: open `record` into `out`, the scratch replaced by `old` between
    the tag check and the copy-out (the host writing back an older ciphertext of it); check=0
    skips the copy-out's hash comparison (a control)."""
    n = len(record) - 16
    k, i, a, c, t, scratch, o = (buf(x) for x in (key, nonce, aad, record[:n], record[n:],
                                                  n, old))
    return siv.img.call("mh_test_siv_open_rewound", A(k), A(i), A(a), len(aad), A(c), A(out),
                        n, A(t), A(scratch), siv.path if path is None else path, A(siv.mkey),
                        A(o), serial, check)


def _seal_rewound(siv: Siv, key: bytes, nonce: bytes, aad: bytes, pt: bytes, old: bytes | None,
                  serial: int) -> tuple[bytes, bytes]:
    """(record, stage) of mh_test_siv_seal_rewound: `pt` sealed under `serial`, the stage
    replaced by `old` between the hash pass and the CTR pass (None: by its own content, no
    rewind)."""
    n = len(pt)
    k, i, a, p, stage, c, t = (buf(x) for x in (key, nonce, aad, pt, n, n, 16))
    o = buf(old if old is not None else masked(pt, stage_ids(n), serial))
    siv.img.call("mh_test_siv_seal_rewound", A(k), A(i), A(a), len(aad), A(p), A(stage), A(c),
                 n, A(t), siv.path, A(siv.mkey), A(o), serial)
    return bytes(c)[:n] + bytes(t), bytes(stage)[:n]


@pytest.mark.parametrize("serial", [2, 1], ids=["next-serial", "serial-rolled-back"])
def test_stage_rewound_between_the_passes_gives_noise(siv: Siv, serial: int) -> None:
    """test_hostile_rollback's stage rewind on this path: one nonce three times (a rolled-back
    source context): page Y (secret), page X (known), then X again with the stage written back,
    between the hash and the CTR pass, to what it held for Y. The third record is what the CTR
    pass makes of Y's masked stage under X's keystream; XORed with the second and X it gives
    Y's stage unmasked with this record's masks. Their serial (mm5) has moved on, which no
    memory rollback can undo: noise, not one block of Y. The control (`serial-rolled-back`:
    the masks repeated, as if mm5 were in memory) recovers all of Y, so the test can fail."""
    rng = random.Random(f"stage-rewind-{siv.path}")
    key, nonce = rng.randbytes(32), rng.randbytes(12)
    aad = _envelope_aad(rng, 0x5000)
    page_x, page_y = rng.randbytes(4096), rng.randbytes(4096)
    _, stage_y = _seal_rewound(siv, key, nonce, aad, page_y, None, 1)
    rec_x, _ = _seal_rewound(siv, key, nonce, aad, page_x, None, 1)
    assert stage_y == masked(page_y, stage_ids(4096))
    assert rec_x == AESGCMSIV(key).encrypt(nonce, page_x, aad)  # the wrapper seals genuinely
    rec_x2, _ = _seal_rewound(siv, key, nonce, aad, page_x, stage_y, serial)
    assert rec_x2[4096:] == rec_x[4096:] and rec_x2 != rec_x  # X's tag; the rewind landed
    guess = bytes(a ^ b ^ c for a, b, c in zip(rec_x2, rec_x, page_x))
    leaked = [j for j in range(0, 4096, 16) if guess[j:j + 16] == page_y[j:j + 16]]
    assert len(leaked) == (256 if serial == 1 else 0), f"{len(leaked)} blocks of Y recovered"


@pytest.mark.parametrize("serial", [1, 2], ids=["same-serial", "next-serial"])
def test_scratch_rewound_before_the_copy_out_installs_nothing(siv: Siv, serial: int) -> None:
    """The destination's scratch written back, between B's tag check and its copy-out, to what
    it held for record A (opened just before into the same page): the copy-out unmasks it with
    B's masks (ids = the addresses stored to, B's serial) and hashes what it stores; that is not
    B's verified hash, so the page is zeroed and the result is SIV_CHANGED. With the serial
    repeated (a rolled-back helper) the masks match and A's plaintext is what is unmasked: the
    hash alone catches it. Without the check: noise (next serial) or page A (same serial)
    installed at B with SIV_OK; without the masks and the check: page A."""
    rng = random.Random(f"rewind-{serial}")
    key = rng.randbytes(32)
    aad = _envelope_aad(rng, 0x200000)
    page_a, page_b = rng.randbytes(4096), rng.randbytes(4096)
    na, nb = rng.randbytes(12), rng.randbytes(12)
    rec_a, rec_b = (AESGCMSIV(key).encrypt(nn, p, aad) for nn, p in ((na, page_a), (nb, page_b)))
    out = buf(4096)
    k, i, a, c, t, scratch_a = (buf(x) for x in (key, na, aad, rec_a[:4096], rec_a[4096:], 4096))
    assert siv.img.call("mh_test_siv_open", A(k), A(i), A(a), 48, A(c), A(out), 4096, A(t),
                        A(scratch_a), siv.path, A(siv.mkey)) == gcmsiv.SIV_OK
    assert bytes(out) == page_a
    old = bytes(scratch_a)  # A's masked plaintext, serial 1, ids of this page
    r = _open_rewound(siv, key, nb, aad, rec_b, out, old, serial)
    got = bytes(out)
    assert not [j for j in range(0, 4096, 16) if got[j:j + 16] == page_a[j:j + 16]]
    assert (r, got) == (gcmsiv.SIV_CHANGED, bytes(4096))
    # the control: without the copy-out's check the same rewind installs with SIV_OK what the
    # masks make of A's scratch: A itself under a repeated serial, noise under the next one
    r = _open_rewound(siv, key, nb, aad, rec_b, out, old, serial, check=0)
    got = bytes(out)
    a_blocks = len([j for j in range(0, 4096, 16) if got[j:j + 16] == page_a[j:j + 16]])
    assert (r, a_blocks) == (gcmsiv.SIV_OK, 256 if serial == 1 else 0)
    assert got != page_b
    # the same wrapper with B's own scratch (no rewind) installs B: the refusal above is the
    # rewind's doing
    r = _open_rewound(siv, key, nb, aad, rec_b, out, masked(page_b, scratch_ids(A(out), 4096)), 1)
    assert (r, bytes(out)) == (gcmsiv.SIV_OK, page_b)


@needs_wide
@pytest.mark.parametrize("n", [256, 300, 4096])
@pytest.mark.parametrize("first, then", [("wide", "base"), ("base", "wide")])
def test_either_path_unmasks_the_others_scratch(image: NativeImage, first: str, then: str,
                                                n: int) -> None:
    """A record decrypted into the scratch by one path and copied out by the other (the rewound
    wrapper, given the first path's scratch as it was, under the same serial) installs the
    page: the wide masks are the baseline's, block for block, so a record could even change
    path between its passes."""
    rng = random.Random(f"cross-{first}-{n}")
    key, nonce, pt = rng.randbytes(32), rng.randbytes(12), rng.randbytes(n)
    aad = _envelope_aad(rng, 0x3000)
    record = AESGCMSIV(key).encrypt(nonce, pt, aad)
    a, b = Siv(image, PATHS[first]), Siv(image, PATHS[then])
    r, out, scratch = a.open_raw(key, nonce, record, aad)
    assert r == gcmsiv.SIV_OK
    ctypes.memset(out, 0, n)
    assert _open_rewound(b, key, nonce, aad, record, out, bytes(scratch)[:n], 1) == gcmsiv.SIV_OK
    assert bytes(out)[:n] == pt
