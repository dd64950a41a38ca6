"""Bit-exact Python models of the x86 SSE / AES-NI / PCLMULQDQ instructions.

They are the reference interpreter's semantics of the vector intrinsics (see builtin.py, which
registers each with its LLVM lowering). A v128 is a Python int holding the register's 128 bits,
byte 0 of memory in bits 0..7 (movdqu's order). tests/test_dsl_differential.py holds them to the
CPU, to unicorn and to `cryptography`.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
MASK128 = (1 << 128) - 1


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


def lane_shift(v: int, n: int, left: bool) -> int:
    """PSLLQ/PSRLQ by an immediate: each 64-bit lane shifted alone."""
    lanes = (v & MASK64, v >> 64)
    out = [((q << n) if left else (q >> n)) & MASK64 for q in lanes]
    return out[0] | (out[1] << 64)


def byte_shift(v: int, n: int, left: bool) -> int:
    """PSLLDQ/PSRLDQ: the whole register shifted by n bytes, zeros shifted in."""
    return ((v << (8 * n)) if left else (v >> (8 * n))) & MASK128
