"""Bit-exact Python models of the x86 SSE / AES-NI / PCLMULQDQ instructions and of their
256-bit VEX forms (AVX2, VAES, VPCLMULQDQ).

They are the reference interpreter's semantics of the vector intrinsics (see builtin.py, which
registers each with its LLVM lowering). A v128 is a Python int holding the register's 128 bits,
byte 0 of memory in bits 0..7 (movdqu's order); a v256 holds 256 bits, lane 0 (the low 128) first.
The 256-bit AES, carry-less multiply, shuffles and byte shifts act on each 128-bit lane alone,
exactly like their 128-bit forms. tests/test_dsl_differential.py holds them to the CPU, to
unicorn (128-bit only: it has no AVX) and to `cryptography`.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
MASK128 = (1 << 128) - 1
MASK256 = (1 << 256) - 1


def _gf_mul(a: int, b: int) -> int:
    """Multiply in GF(2^8) modulo the AES polynomial x^8 + x^4 + x^3 + x + 1."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a = (a << 1) ^ (0x11B if a & 0x80 else 0)
        b >>= 1
    return r


def _make_sbox() -> bytes:
    """FIPS-197 §5.1.1: multiplicative inverse in GF(2^8), then the affine map with 0x63."""
    inv = [0] * 256
    for a in range(1, 256):
        for b in range(1, 256):
            if _gf_mul(a, b) == 1:
                inv[a] = b
                break
    out = bytearray(256)
    for x in range(256):
        b = inv[x]
        s = b
        for k in range(1, 5):
            s ^= ((b << k) | (b >> (8 - k))) & 0xFF
        out[x] = s ^ 0x63
    return bytes(out)


SBOX = _make_sbox()


def _bytes16(v: int) -> bytearray:
    return bytearray(v.to_bytes(16, "little"))


def _int16(b: bytes | bytearray) -> int:
    return int.from_bytes(b, "little")


def _shift_sub(v: int) -> bytearray:
    """ShiftRows then SubBytes on an AES state held like an XMM register (byte 4c+r = row r,
    column c)."""
    s = _bytes16(v)
    return bytearray(SBOX[s[r + 4 * ((c + r) % 4)]] for c in range(4) for r in range(4))


def _xtime(b: int) -> int:
    return ((b << 1) ^ (0x1B if b & 0x80 else 0)) & 0xFF


def aesenc(state: int, round_key: int) -> int:
    """AESENC: ShiftRows, SubBytes, MixColumns, then XOR the round key."""
    s = _shift_sub(state)
    out = bytearray(16)
    for c in range(4):
        a = s[4 * c: 4 * c + 4]
        for r in range(4):
            out[4 * c + r] = (_xtime(a[r]) ^ _xtime(a[(r + 1) % 4]) ^ a[(r + 1) % 4]
                              ^ a[(r + 2) % 4] ^ a[(r + 3) % 4])
    return _int16(out) ^ round_key


def aesenclast(state: int, round_key: int) -> int:
    """AESENCLAST: ShiftRows, SubBytes, XOR the round key (no MixColumns)."""
    return _int16(_shift_sub(state)) ^ round_key


def aeskeygenassist(v: int, rcon: int) -> int:
    """AESKEYGENASSIST: SubWord of dwords 1 and 3, each also rotated right 8 and XORed with
    rcon."""

    def subword(w: int) -> int:
        return _int16(bytes(SBOX[b] for b in w.to_bytes(4, "little")))

    def rot(w: int) -> int:
        return ((w >> 8) | (w << 24)) & 0xFFFFFFFF

    x1, x3 = subword((v >> 32) & 0xFFFFFFFF), subword((v >> 96) & 0xFFFFFFFF)
    dw = (x1, rot(x1) ^ rcon, x3, rot(x3) ^ rcon)
    return sum(d << (32 * i) for i, d in enumerate(dw))


def clmul64(a: int, b: int) -> int:
    """Carry-less (GF(2)[x]) product of two 64-bit values: up to 127 bits."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        b >>= 1
    return r


def pclmulqdq(a: int, b: int, imm: int) -> int:
    """PCLMULQDQ: imm bit 0 picks a's quadword, bit 4 picks b's."""
    qa = (a >> (64 if imm & 0x01 else 0)) & MASK64
    qb = (b >> (64 if imm & 0x10 else 0)) & MASK64
    return clmul64(qa, qb)


def pshufb(v: int, mask: int) -> int:
    """PSHUFB: byte i = 0 if mask[i] has bit 7 set, else v[mask[i] & 15]."""
    s, m = _bytes16(v), _bytes16(mask)
    return _int16(bytes(0 if k & 0x80 else s[k & 15] for k in m))


def pshufd(v: int, imm: int) -> int:
    """PSHUFD: dword i = v's dword (imm >> 2i) & 3."""
    d = [(v >> (32 * i)) & 0xFFFFFFFF for i in range(4)]
    return sum(d[(imm >> (2 * i)) & 3] << (32 * i) for i in range(4))


def lane_shift(v: int, n: int, left: bool, bits: int = 128) -> int:
    """PSLLQ/PSRLQ (VPSLLQ/VPSRLQ for bits=256) by an immediate: each 64-bit lane alone."""
    out = 0
    for i in range(bits // 64):
        q = (v >> (64 * i)) & MASK64
        out |= (((q << n) if left else (q >> n)) & MASK64) << (64 * i)
    return out


def byte_shift(v: int, n: int, left: bool) -> int:
    """PSLLDQ/PSRLDQ: the whole register shifted by n bytes, zeros shifted in."""
    return ((v << (8 * n)) if left else (v >> (8 * n))) & MASK128


# -- 256-bit forms: each 128-bit lane alone -----------------------------------------------------

def lanes(v: int) -> tuple[int, int]:
    """The two 128-bit lanes of a v256, lane 0 (memory bytes 0..15) first."""
    return v & MASK128, (v >> 128) & MASK128


def join(lo: int, hi: int) -> int:
    """A v256 from its lanes (vinserti128)."""
    return (lo & MASK128) | ((hi & MASK128) << 128)


def per_lane(fn, *vectors: int, imm: int | None = None) -> int:
    """A 128-bit instruction's model applied to each lane of its v256 operands (VEX.256)."""
    out = []
    for ops in zip(*(lanes(v) for v in vectors)):
        out.append(fn(*ops) if imm is None else fn(*ops, imm))
    return join(*out)


def vaesenc256(state: int, round_key: int) -> int:
    return per_lane(aesenc, state, round_key)


def vaesenclast256(state: int, round_key: int) -> int:
    return per_lane(aesenclast, state, round_key)


def vpclmulqdq256(a: int, b: int, imm: int) -> int:
    return per_lane(pclmulqdq, a, b, imm=imm)


def vpshufb256(v: int, mask: int) -> int:
    return per_lane(pshufb, v, mask)


def vpshufd256(v: int, imm: int) -> int:
    return per_lane(pshufd, v, imm=imm)


def byte_shift256(v: int, n: int, left: bool) -> int:
    """VPSLLDQ/VPSRLDQ: each 128-bit lane shifted by n bytes alone (nothing crosses lanes)."""
    lo, hi = lanes(v)
    return join(byte_shift(lo, n, left), byte_shift(hi, n, left))


def add32(a: int, b: int, bits: int) -> int:
    """PADDD/VPADDD: each 32-bit lane added alone, wrapping mod 2^32 (no carry between lanes)."""
    out = 0
    for i in range(bits // 32):
        d = (((a >> (32 * i)) & 0xFFFFFFFF) + ((b >> (32 * i)) & 0xFFFFFFFF)) & 0xFFFFFFFF
        out |= d << (32 * i)
    return out


# -- the staging masks (builtin.py's mask_block, mask8, mask8_256) --------------------------------

def mask(key: int, serial: int, block_id: int) -> int:
    """M = AESENC(K ^ (id ‖ serial), K): the mask mask_block XORs into a block, for the key K
    (mm6 low, mm7 high), the serial (mm5) and the block's id (all modulo their widths)."""
    w = (block_id & MASK64) | ((serial & MASK64) << 64)
    return aesenc(w ^ key, key)
