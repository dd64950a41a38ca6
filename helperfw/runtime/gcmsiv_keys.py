"""What both AES-256-GCM-SIV paths share: a record's keys and the POLYVAL field arithmetic.

The baseline (gcmsiv.py, 128-bit AES-NI/PCLMULQDQ) and the wide kernels (gcmsiv_wide.py,
VAES/VPCLMULQDQ on ymm) read the same `SivKeys`, which gcmsiv.py's `siv_derive` fills per record.

POLYVAL arithmetic (RFC 8452 §3): a 16-byte block read little-endian is the polynomial, bit i =
coefficient of x^i, so blocks need no byte swap. The field is GF(2)[x]/P, P = x^128 + x^127 +
x^126 + x^121 + 1, and POLYVAL's product is dot(a, b) = a·b·x^-128. A carry-less product
D = D1·x^128 + D0 reduces to D1 + D0·x^-128; since x^-64 ≡ x^64 + x^63 + x^62 + x^57 (mod P),
one step L·x^-64 = swap64(L) ^ clmul(L.lo, 0xC200000000000000) and two steps give D0·x^-128
(`reduce`). n blocks are absorbed with one reduction: S' = dot(S ^ X1, Hn) ^ ... ^ dot(Xn, H1),
where Hk = H^k·x^(-128(k-1)) are the "dot powers" (dot(Ha, Hb) = H(a+b)), kept highest first in
`SivKeys.h` so that a 32-byte load of h[2i] pairs the powers two adjacent blocks need.
"""

from __future__ import annotations

from helperfw import (
    Array,
    function,
    pclmulqdq,
    pshufd,
    struct,
    u32,
    v128,
    v128_bsl,
    v128_bsr,
    v128_make,
)

from .aes import Aes256Key

SIV_BLOCKS = 8  # blocks per POLYVAL reduction and per AES group in the baseline
WIDE_BLOCKS = 16  # the same in the wide kernels: 8 ymm registers, two blocks each
SIV_TAG_LEN = 16
SIV_NONCE_LEN = 12
POLYVAL_C = 0xC200000000000000  # x^63 + x^62 + x^57: one Montgomery step (module docstring)
MSB = 0x8000000000000000  # bit 127 of a block: bit 63 of its high qword
LOW32 = 0xFFFFFFFF


@struct
class SivKeys:
    """Per-record keys derived from (K_s, nonce): the encryption key schedule, the dot powers
    of the authentication key highest first (h[WIDE_BLOCKS - k] = H^k: the baseline fills
    h[8..15] = H^8..H^1, the wide path all sixteen) with their Karatsuba halves hk[i] =
    lo(h[i]) ^ hi(h[i]) in both qwords, and the path of this record (nonzero: wide kernels)."""

    enc: Aes256Key
    h: Array[v128, 16]
    hk: Array[v128, 16]
    wide: u32


@function
def reduce(lo: v128, mid: v128, hi: v128) -> v128:
    """(hi·x^128 ^ mid·x^64 ^ lo) · x^-128 mod P."""
    d0 = lo ^ v128_bsl(mid, 8)
    d1 = hi ^ v128_bsr(mid, 8)
    c = v128_make(POLYVAL_C, POLYVAL_C)
    t = pshufd(d0, 0x4E) ^ pclmulqdq(d0, c, 0x00)
    t = pshufd(t, 0x4E) ^ pclmulqdq(t, c, 0x00)
    return d1 ^ t


@function
def dot(a: v128, b: v128) -> v128:
    """POLYVAL's product a·b·x^-128."""
    mid = pclmulqdq(a, b, 0x01) ^ pclmulqdq(a, b, 0x10)
    return reduce(pclmulqdq(a, b, 0x00), mid, pclmulqdq(a, b, 0x11))


@function
def karatsuba_half(h: v128) -> v128:
    """lo(h) ^ hi(h) in both qwords: the middle product of x·h is then one PCLMULQDQ."""
    return h ^ pshufd(h, 0x4E)
