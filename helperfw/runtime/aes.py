"""AES-256 (FIPS-197) with AES-NI: key expansion, one block, and 8 blocks in flight.

The AEAD (gcmsiv.py) and the session key schedule (session.py) build on these. Eight blocks in
flight hide AESENC's latency (4 cycles, 2 per cycle on current cores); the 8-wide helpers take
the state as an array the compiler keeps in registers after inlining.
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    aesenc,
    aesenclast,
    aeskeygenassist,
    function,
    pshufd,
    struct,
    u8,
    v128,
    v128_bsl,
    v128_load,
)

AES256_ROUNDS = 14


@struct
class Aes256Key:
    """AES-256 encryption key schedule: 15 round keys as loaded by movdqu."""

    rk: Array[v128, 15]


@function
def _ks_mix(a: v128, t: v128) -> v128:
    """a0 ^ (a0<<32) ^ (a0<<64) ^ (a0<<96), then ^ t: the running XOR of a round-key's words."""
    a = a ^ v128_bsl(a, 4)
    a = a ^ v128_bsl(a, 4)
    a = a ^ v128_bsl(a, 4)
    return a ^ t


@function
def _ks_even(prev2: v128, t: v128) -> v128:
    """Round key 2i from 2i-2 and the RotWord/SubWord/Rcon word of 2i-1 (aeskeygenassist)."""
    return _ks_mix(prev2, pshufd(t, 0xFF))


@function
def _ks_odd(prev2: v128, prev1: v128) -> v128:
    """Round key 2i+1 from 2i-1 and SubWord (no rotation, no rcon) of round key 2i."""
    return _ks_mix(prev2, pshufd(aeskeygenassist(prev1, 0), 0xAA))


@function(noinline=True)  # per record and per session: one copy keeps the image small
def aes256_expand_v(k0: v128, k1: v128, out: Ptr[Aes256Key]) -> None:
    """Key expansion of the 32-byte key k0 ‖ k1 (held in registers) into 15 round keys."""
    out.rk[0] = k0
    out.rk[1] = k1
    k2 = _ks_even(k0, aeskeygenassist(k1, 0x01))
    k3 = _ks_odd(k1, k2)
    k4 = _ks_even(k2, aeskeygenassist(k3, 0x02))
    k5 = _ks_odd(k3, k4)
    k6 = _ks_even(k4, aeskeygenassist(k5, 0x04))
    k7 = _ks_odd(k5, k6)
    k8 = _ks_even(k6, aeskeygenassist(k7, 0x08))
    k9 = _ks_odd(k7, k8)
    k10 = _ks_even(k8, aeskeygenassist(k9, 0x10))
    k11 = _ks_odd(k9, k10)
    k12 = _ks_even(k10, aeskeygenassist(k11, 0x20))
    k13 = _ks_odd(k11, k12)
    k14 = _ks_even(k12, aeskeygenassist(k13, 0x40))
    out.rk[2] = k2
    out.rk[3] = k3
    out.rk[4] = k4
    out.rk[5] = k5
    out.rk[6] = k6
    out.rk[7] = k7
    out.rk[8] = k8
    out.rk[9] = k9
    out.rk[10] = k10
    out.rk[11] = k11
    out.rk[12] = k12
    out.rk[13] = k13
    out.rk[14] = k14


@function
def aes256_expand(key: Ptr[u8], out: Ptr[Aes256Key]) -> None:
    """Key expansion of the 32 bytes at `key`."""
    aes256_expand_v(v128_load(key), v128_load(key + 16), out)


@function
def aes256_block(k: Ptr[Aes256Key], x: v128) -> v128:
    """Encrypt one block held in a register."""
    x = x ^ k.rk[0]
    for r in range(1, AES256_ROUNDS):
        x = aesenc(x, k.rk[r])
    return aesenclast(x, k.rk[AES256_ROUNDS])


@function
def round8(s: Ptr[v128], k: v128) -> None:
    """One middle round on the 8 states s[0..7]."""
    s[0] = aesenc(s[0], k)
    s[1] = aesenc(s[1], k)
    s[2] = aesenc(s[2], k)
    s[3] = aesenc(s[3], k)
    s[4] = aesenc(s[4], k)
    s[5] = aesenc(s[5], k)
    s[6] = aesenc(s[6], k)
    s[7] = aesenc(s[7], k)


@function
def last8(s: Ptr[v128], k: v128) -> None:
    """The final round on the 8 states s[0..7]."""
    s[0] = aesenclast(s[0], k)
    s[1] = aesenclast(s[1], k)
    s[2] = aesenclast(s[2], k)
    s[3] = aesenclast(s[3], k)
    s[4] = aesenclast(s[4], k)
    s[5] = aesenclast(s[5], k)
    s[6] = aesenclast(s[6], k)
    s[7] = aesenclast(s[7], k)


@function
def aes256_8(k: Ptr[Aes256Key], s: Ptr[v128]) -> None:
    """Encrypt the 8 blocks s[0..7] in place (round key 0 already applied by the caller)."""
    for r in range(1, AES256_ROUNDS):
        round8(s, k.rk[r])
    last8(s, k.rk[AES256_ROUNDS])
