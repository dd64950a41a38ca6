"""AES-256 and AES-256-GCM (NIST SP 800-38D, 96-bit IV) in the DSL, with AES-NI and PCLMULQDQ.

Representation of GF(2^128) elements ("R form"): a 16-byte GCM block is byte-reversed (pshufb) into
a v128, so the register's 128-bit integer has bit j = coefficient of x^(127-j). In that form a
carry-less product of R(a) and R(b) is R256(a*b*x), one bit "too high"; instead of shifting every
product we store the hash key pre-multiplied by x^-1 (`GcmCtx.h[i] = R(H^(i+1) * x^-1 mod P)`), so
`clmul(R(a), h[i])` is exactly R256(a * H^(i+1)). `_reduce` folds a 256-bit product modulo
P = x^128 + x^7 + x^2 + x + 1 with two multiplications by 0xC200000000000000 (the R form of
x^7 + x^2 + x + 1 shifted into place).

Throughput design (4 KiB pages): the bulk loops run 8 counter blocks through the AES rounds at
once and hash 8 ciphertext blocks per reduction (Y' = (Y^C1)*H^8 ^ C2*H^7 ^ ... ^ C8*H), with
Karatsuba products (3 PCLMULQDQ per block, `GcmCtx.hk` holds lo^hi of each power). Seal is
stitched: the GHASH of group i-1 is interleaved with the AES rounds of group i. Counter blocks of
a group are derived from two scalar-built ones by XOR with constants (see `_ctr8`). Messages are
limited to 2^36 - 32 bytes by SP 800-38D; callers pass pages, so this is not checked here.

Open is single-fetch and verify-before-release: every ciphertext byte is read from `ct` exactly once
(the same loaded value feeds GHASH and the CTR decryption, so a host that rewrites shared memory
mid-call cannot get unauthenticated bytes decrypted), the plaintext goes to a caller-provided
private `scratch` buffer, the tag is compared in constant time, and only then is `scratch` copied to
`out`. On failure `out` is untouched and `scratch` is wiped. `scratch == out` is allowed when the
destination may be clobbered: the plaintext is then decrypted in place and wiped on failure.
"""

# DSL locals declared without a value (`buf: Array[u8, 16]`) look undefined to pyflakes.

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    aesenc,
    aesenclast,
    aeskeygenassist,
    bool_,
    function,
    pclmulqdq,
    pshufb,
    pshufd,
    struct,
    u8,
    u32,
    u64,
    v128,
    v128_bsl,
    v128_bsr,
    v128_hi,
    v128_lo,
    v128_load,
    v128_make,
    v128_shl64,
    v128_shr64,
    v128_store,
)

GCM_BLOCKS = 8  # blocks in flight in the bulk loops (and powers of H kept)
GCM_TAG_LEN = 16
GCM_IV_LEN = 12


@struct
class Aes256Key:
    """AES-256 encryption key schedule: 15 round keys as loaded by movdqu."""

    rk: Array[v128, 15]


@struct
class GcmCtx:
    """AES-256-GCM key state: round keys and H^1..H^8 in R form times x^-1 (see module doc)."""

    key: Aes256Key
    h: Array[v128, 8]
    hk: Array[v128, 8]  # Karatsuba: hk[i] = lo64(h[i]) ^ hi64(h[i]) in both lanes


# -- AES-256 ----------------------------------------------------------------------------------


@function
def _ks_mix(a: v128, t: v128) -> v128:
    """a0 ^ (a0<<32) ^ (a0<<64) ^ (a0<<96), then ^ t: the running XOR of a round-key's words."""
    a = a ^ v128_bsl(a, 4)
    a = a ^ v128_bsl(a, 4)
    a = a ^ v128_bsl(a, 4)
    return a ^ t


@function
def _ks_even(prev2: v128, prev1: v128, t: v128) -> v128:
    """Round key 2i from 2i-2 and the RotWord/SubWord/Rcon word of 2i-1 (aeskeygenassist)."""
    return _ks_mix(prev2, pshufd(t, 0xFF))


@function
def _ks_odd(prev2: v128, prev1: v128) -> v128:
    """Round key 2i+1 from 2i-1 and SubWord (no rotation, no rcon) of round key 2i."""
    return _ks_mix(prev2, pshufd(aeskeygenassist(prev1, 0), 0xAA))


@function
def aes256_expand(key: Ptr[u8], out: Ptr[Aes256Key]) -> None:
    """FIPS-197 key expansion of a 32-byte key into 15 round keys."""
    k0 = v128_load(key)
    k1 = v128_load(key + 16)
    out.rk[0] = k0
    out.rk[1] = k1
    k2 = _ks_even(k0, k1, aeskeygenassist(k1, 0x01))
    k3 = _ks_odd(k1, k2)
    k4 = _ks_even(k2, k3, aeskeygenassist(k3, 0x02))
    k5 = _ks_odd(k3, k4)
    k6 = _ks_even(k4, k5, aeskeygenassist(k5, 0x04))
    k7 = _ks_odd(k5, k6)
    k8 = _ks_even(k6, k7, aeskeygenassist(k7, 0x08))
    k9 = _ks_odd(k7, k8)
    k10 = _ks_even(k8, k9, aeskeygenassist(k9, 0x10))
    k11 = _ks_odd(k9, k10)
    k12 = _ks_even(k10, k11, aeskeygenassist(k11, 0x20))
    k13 = _ks_odd(k11, k12)
    k14 = _ks_even(k12, k13, aeskeygenassist(k13, 0x40))
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
def aes256_block(k: Ptr[Aes256Key], x: v128) -> v128:
    """Encrypt one block held in a register."""
    x = x ^ k.rk[0]
    for r in range(1, 14):
        x = aesenc(x, k.rk[r])
    return aesenclast(x, k.rk[14])


@function
def aes256_encrypt_block(k: Ptr[Aes256Key], inp: Ptr[u8], out: Ptr[u8]) -> None:
    """Encrypt the 16 bytes at `inp` into `out` (they may alias)."""
    v128_store(out, aes256_block(k, v128_load(inp)))


# -- GF(2^128) --------------------------------------------------------------------------------


@function
def _bswap_mask() -> v128:
    return v128_make(0x08090A0B0C0D0E0F, 0x0001020304050607)


@function
def _reduce(lo: v128, mid: v128, hi: v128) -> v128:
    """R form of (hi*2^128 ^ mid*2^64 ^ lo) mod P, the 256-bit value being an R256 product."""
    lo = lo ^ v128_bsl(mid, 8)
    hi = hi ^ v128_bsr(mid, 8)
    poly = v128_make(0xC200000000000000, 0xC200000000000000)
    # fold the low qword (coefficients x^255..x^192), then the next one (x^191..x^128)
    m = pshufd(lo, 0x4E) ^ pclmulqdq(lo, poly, 0x00)
    return hi ^ pshufd(m, 0x4E) ^ pclmulqdq(m, poly, 0x00)


@function
def _gmul(a: v128, h: v128) -> v128:
    """R(a) times a stored key power h: R(a * H^i)."""
    lo = pclmulqdq(a, h, 0x00)
    hi = pclmulqdq(a, h, 0x11)
    mid = pclmulqdq(a, h, 0x01) ^ pclmulqdq(a, h, 0x10)
    return _reduce(lo, mid, hi)


@function
def _ghash_blocks(ctx: Ptr[GcmCtx], y: v128, p: Ptr[u8], n: u64) -> v128:
    """Absorb n (1..8) full blocks at p into the hash state y with one reduction."""
    bswap = _bswap_mask()
    lo = v128_make(0, 0)
    mid = v128_make(0, 0)
    hi = v128_make(0, 0)
    x = y
    for j in range(n):
        x = x ^ pshufb(v128_load(p + j * 16), bswap)
        h = ctx.h[n - 1 - j]
        lo = lo ^ pclmulqdq(x, h, 0x00)
        hi = hi ^ pclmulqdq(x, h, 0x11)
        mid = mid ^ pclmulqdq(x, h, 0x01) ^ pclmulqdq(x, h, 0x10)
        x = v128_make(0, 0)
    return _reduce(lo, mid, hi)


@function
def _ghash(ctx: Ptr[GcmCtx], y: v128, p: Ptr[u8], n: u64) -> v128:
    """Absorb n bytes at p, zero-padding the last partial block (GHASH of AAD)."""
    off: u64 = 0
    while n - off >= 16:
        k = min((n - off) // 16, u64(GCM_BLOCKS))
        y = _ghash_blocks(ctx, y, p + off, k)
        off += k * 16
    if off < n:
        buf: Array[u8, 16]
        bp = addr(buf[0])
        _load_partial(bp, p + off, n - off)
        y = _gmul(y ^ pshufb(v128_load(bp), _bswap_mask()), ctx.h[0])
    return y


@function
def _load_partial(buf: Ptr[u8], p: Ptr[u8], n: u64) -> None:
    """buf[0:16] = p[0:n] || zeros (n < 16)."""
    v128_store(buf, v128_make(0, 0))
    for i in range(n):
        buf[i] = p[i]


@function
def gcm_init(ctx: Ptr[GcmCtx], key32: Ptr[u8]) -> None:
    """Expand the key and precompute H^1..H^8 (H = AES_K(0^128))."""
    aes256_expand(key32, addr(ctx.key))
    h = pshufb(aes256_block(addr(ctx.key), v128_make(0, 0)), _bswap_mask())
    # h * x^-1: shift the R form left by one bit; the bit shifted out (coefficient of x^0) comes
    # back as x^-1 = x^127 + x^6 + x + 1, whose R form is 0xC2000000_00000000_00000000_00000001
    carry = u64(0) - (v128_hi(h) >> 63)
    h = v128_shl64(h, 1) | v128_bsl(v128_shr64(h, 63), 8)
    h1 = h ^ v128_make(carry & 1, carry & 0xC200000000000000)
    ctx.h[0] = h1
    # H^(i+1) x^-1 = (H^i x^-1) * H: multiply R form by the stored H
    for i in range(1, GCM_BLOCKS):
        ctx.h[i] = _gmul(ctx.h[i - 1], h1)
    for i in range(GCM_BLOCKS):
        ctx.hk[i] = ctx.h[i] ^ pshufd(ctx.h[i], 0x4E)


# -- CTR + GHASH ------------------------------------------------------------------------------


@function
def _bswap32(c: u32) -> u64:
    x = u64(c)
    return ((x & 0xFF) << 24) | ((x & 0xFF00) << 8) | ((x >> 8) & 0xFF00) | (x >> 24)


@function
def _ctr_block(ivlo: u64, ivhi: u64, c: u32) -> v128:
    """Counter block IV || BE32(c)."""
    return v128_make(ivlo, ivhi | (_bswap32(c) << 32))


@function
def _lens_block(aad_len: u64, n: u64) -> v128:
    """R form of the final GHASH block BE64(bits(A)) || BE64(bits(C))."""
    return v128_make(n << 3, aad_len << 3)


@function
def _ctr8(s: Ptr[v128], k0: v128, ivlo: u64, ivhi: u64, c: u32) -> None:
    """s[0..7] = counter blocks c..c+7 whitened with round key 0, for c = 2 (mod 8).

    Then c+1..c+5 differ from c only in the low 3 bits of the last byte and c+7 from c+6 only
    in bit 0 (c+6 = 0 mod 8 takes any carry), so six blocks are one XOR with a constant."""
    b = _ctr_block(ivlo, ivhi, c) ^ k0
    e = _ctr_block(ivlo, ivhi, c + 6) ^ k0
    s[0] = b
    s[1] = b ^ v128_make(0, 0x01 << 56)  # 2 ^ 3
    s[2] = b ^ v128_make(0, 0x06 << 56)  # 2 ^ 4
    s[3] = b ^ v128_make(0, 0x07 << 56)  # 2 ^ 5
    s[4] = b ^ v128_make(0, 0x04 << 56)  # 2 ^ 6
    s[5] = b ^ v128_make(0, 0x05 << 56)  # 2 ^ 7
    s[6] = e
    s[7] = e ^ v128_make(0, 0x01 << 56)


@function
def _round8(s: Ptr[v128], k: v128) -> None:
    s[0] = aesenc(s[0], k)
    s[1] = aesenc(s[1], k)
    s[2] = aesenc(s[2], k)
    s[3] = aesenc(s[3], k)
    s[4] = aesenc(s[4], k)
    s[5] = aesenc(s[5], k)
    s[6] = aesenc(s[6], k)
    s[7] = aesenc(s[7], k)


@function
def _last8(s: Ptr[v128], k: v128, d: Ptr[v128], out: Ptr[u8]) -> None:
    """Final round, XOR with the data blocks d[0..7], store to out; s[j] = the output block."""
    s[0] = aesenclast(s[0], k) ^ d[0]
    s[1] = aesenclast(s[1], k) ^ d[1]
    s[2] = aesenclast(s[2], k) ^ d[2]
    s[3] = aesenclast(s[3], k) ^ d[3]
    s[4] = aesenclast(s[4], k) ^ d[4]
    s[5] = aesenclast(s[5], k) ^ d[5]
    s[6] = aesenclast(s[6], k) ^ d[6]
    s[7] = aesenclast(s[7], k) ^ d[7]
    v128_store(out, s[0])
    v128_store(out + 16, s[1])
    v128_store(out + 32, s[2])
    v128_store(out + 48, s[3])
    v128_store(out + 64, s[4])
    v128_store(out + 80, s[5])
    v128_store(out + 96, s[6])
    v128_store(out + 112, s[7])


@function
def _load8(d: Ptr[v128], p: Ptr[u8]) -> None:
    d[0] = v128_load(p)
    d[1] = v128_load(p + 16)
    d[2] = v128_load(p + 32)
    d[3] = v128_load(p + 48)
    d[4] = v128_load(p + 64)
    d[5] = v128_load(p + 80)
    d[6] = v128_load(p + 96)
    d[7] = v128_load(p + 112)


@function
def _mul_acc(acc: Ptr[v128], x: v128, h: v128, hk: v128) -> None:
    """acc += unreduced Karatsuba product of R(x) and a stored key power: acc[0] = lo,
    acc[2] = hi, acc[1] = (x.lo ^ x.hi)(h.lo ^ h.hi) (the middle term before lo/hi removal)."""
    acc[0] = acc[0] ^ pclmulqdq(x, h, 0x00)
    acc[2] = acc[2] ^ pclmulqdq(x, h, 0x11)
    acc[1] = acc[1] ^ pclmulqdq(pshufd(x, 0x4E) ^ x, hk, 0x00)


@function
def _mul_first(acc: Ptr[v128], x: v128, h: v128, hk: v128) -> None:
    acc[0] = pclmulqdq(x, h, 0x00)
    acc[2] = pclmulqdq(x, h, 0x11)
    acc[1] = pclmulqdq(pshufd(x, 0x4E) ^ x, hk, 0x00)


@function
def _reduce_k(acc: Ptr[v128]) -> v128:
    return _reduce(acc[0], acc[1] ^ acc[0] ^ acc[2], acc[2])


@function
def _hash8(ctx: Ptr[GcmCtx], y: v128, d: Ptr[v128]) -> v128:
    """Absorb the 8 blocks d[0..7] (as stored, not yet byte-reflected) with one reduction."""
    bswap = _bswap_mask()
    acc: Array[v128, 3]
    a = addr(acc[0])
    _mul_first(a, pshufb(d[0], bswap) ^ y, ctx.h[7], ctx.hk[7])
    _mul_acc(a, pshufb(d[1], bswap), ctx.h[6], ctx.hk[6])
    _mul_acc(a, pshufb(d[2], bswap), ctx.h[5], ctx.hk[5])
    _mul_acc(a, pshufb(d[3], bswap), ctx.h[4], ctx.hk[4])
    _mul_acc(a, pshufb(d[4], bswap), ctx.h[3], ctx.hk[3])
    _mul_acc(a, pshufb(d[5], bswap), ctx.h[2], ctx.hk[2])
    _mul_acc(a, pshufb(d[6], bswap), ctx.h[1], ctx.hk[1])
    _mul_acc(a, pshufb(d[7], bswap), ctx.h[0], ctx.hk[0])
    return _reduce_k(a)


@function
def _seal_bulk(ctx: Ptr[GcmCtx], ivlo: u64, ivhi: u64, y: v128, pt: Ptr[u8], ct: Ptr[u8],
               nblk8: u64) -> v128:
    """Encrypt nblk8 >= 1 groups of 8 blocks (counters from 2) and hash them into y.

    Stitched: while the AES rounds of group i run, GHASH absorbs the ciphertext of group i-1
    (kept in `g`), so both units stay busy and the hash never waits for the AES chain."""
    bswap = _bswap_mask()
    st: Array[v128, 8]
    g: Array[v128, 8]
    d: Array[v128, 8]
    acc: Array[v128, 3]
    s = addr(st[0])
    gp = addr(g[0])
    dp = addr(d[0])
    a = addr(acc[0])
    k = addr(ctx.key.rk[0])
    h = addr(ctx.h[0])
    hk = addr(ctx.hk[0])
    # group 0: AES only
    _ctr8(s, k[0], ivlo, ivhi, 2)
    for r in range(1, 14):
        _round8(s, k[r])
    _load8(dp, pt)
    _last8(s, k[14], dp, ct)
    for j in range(8):
        g[j] = st[j]
    c: u32 = 10
    i: u64 = 1
    while i < nblk8:
        off = i * 128
        _ctr8(s, k[0], ivlo, ivhi, c)
        _round8(s, k[1])
        _mul_first(a, pshufb(g[0], bswap) ^ y, h[7], hk[7])
        _round8(s, k[2])
        _mul_acc(a, pshufb(g[1], bswap), h[6], hk[6])
        _round8(s, k[3])
        _mul_acc(a, pshufb(g[2], bswap), h[5], hk[5])
        _round8(s, k[4])
        _mul_acc(a, pshufb(g[3], bswap), h[4], hk[4])
        _round8(s, k[5])
        _mul_acc(a, pshufb(g[4], bswap), h[3], hk[3])
        _round8(s, k[6])
        _mul_acc(a, pshufb(g[5], bswap), h[2], hk[2])
        _round8(s, k[7])
        _mul_acc(a, pshufb(g[6], bswap), h[1], hk[1])
        _round8(s, k[8])
        _mul_acc(a, pshufb(g[7], bswap), h[0], hk[0])
        _round8(s, k[9])
        y = _reduce_k(a)
        _round8(s, k[10])
        _round8(s, k[11])
        _round8(s, k[12])
        _round8(s, k[13])
        _load8(dp, pt + off)
        _last8(s, k[14], dp, ct + off)
        for j in range(8):
            g[j] = st[j]
        c += 8
        i += 1
    return _hash8(ctx, y, gp)


@function
def _open_bulk(ctx: Ptr[GcmCtx], ivlo: u64, ivhi: u64, y: v128, ct: Ptr[u8], pt: Ptr[u8],
               nblk8: u64) -> v128:
    """Decrypt nblk8 groups of 8 blocks, hashing each ciphertext block as loaded (once)."""
    bswap = _bswap_mask()
    st: Array[v128, 8]
    d: Array[v128, 8]
    acc: Array[v128, 3]
    s = addr(st[0])
    dp = addr(d[0])
    a = addr(acc[0])
    k = addr(ctx.key.rk[0])
    h = addr(ctx.h[0])
    hk = addr(ctx.hk[0])
    c: u32 = 2
    for i in range(nblk8):
        off = i * 128
        _load8(dp, ct + off)
        _ctr8(s, k[0], ivlo, ivhi, c)
        _round8(s, k[1])
        _mul_first(a, pshufb(d[0], bswap) ^ y, h[7], hk[7])
        _round8(s, k[2])
        _mul_acc(a, pshufb(d[1], bswap), h[6], hk[6])
        _round8(s, k[3])
        _mul_acc(a, pshufb(d[2], bswap), h[5], hk[5])
        _round8(s, k[4])
        _mul_acc(a, pshufb(d[3], bswap), h[4], hk[4])
        _round8(s, k[5])
        _mul_acc(a, pshufb(d[4], bswap), h[3], hk[3])
        _round8(s, k[6])
        _mul_acc(a, pshufb(d[5], bswap), h[2], hk[2])
        _round8(s, k[7])
        _mul_acc(a, pshufb(d[6], bswap), h[1], hk[1])
        _round8(s, k[8])
        _mul_acc(a, pshufb(d[7], bswap), h[0], hk[0])
        _round8(s, k[9])
        y = _reduce_k(a)
        _round8(s, k[10])
        _round8(s, k[11])
        _round8(s, k[12])
        _round8(s, k[13])
        _last8(s, k[14], dp, pt + off)
        c += 8
    return y


@function
def _gcm_crypt(ctx: Ptr[GcmCtx], iv12: Ptr[u8], aad: Ptr[u8], aad_len: u64, inp: Ptr[u8],
               out: Ptr[u8], n: u64, decrypt: bool_) -> v128:
    """CTR-crypt n bytes inp -> out and return the tag (E_K(J0) ^ GHASH). Every input byte is
    read once; GHASH runs over the ciphertext as held in registers (never re-read from `out`)."""
    bswap = _bswap_mask()
    ivlo = Ptr[u64](iv12)[0]
    ivhi = u64(Ptr[u32](iv12 + 8)[0])
    y = _ghash(ctx, v128_make(0, 0), aad, aad_len)
    nblk8 = n // 128
    if nblk8 != 0:
        if decrypt:
            y = _open_bulk(ctx, ivlo, ivhi, y, inp, out, nblk8)
        else:
            y = _seal_bulk(ctx, ivlo, ivhi, y, inp, out, nblk8)
    off = nblk8 * 128
    c = u32(2 + nblk8 * 8)
    # remaining full blocks, one at a time
    while n - off >= 16:
        d = v128_load(inp + off)
        e = aes256_block(addr(ctx.key), _ctr_block(ivlo, ivhi, c)) ^ d
        v128_store(out + off, e)
        if not decrypt:
            d = e
        y = _gmul(y ^ pshufb(d, bswap), ctx.h[0])
        c += 1
        off += 16
    # final partial block: through a private 16-byte buffer, zero padded for GHASH
    if off < n:
        rem = n - off
        buf: Array[u8, 16]
        bp = addr(buf[0])
        _load_partial(bp, inp + off, rem)
        d = v128_load(bp)
        e = aes256_block(addr(ctx.key), _ctr_block(ivlo, ivhi, c)) ^ d
        v128_store(bp, e)
        for i in range(rem):
            out[off + i] = buf[i]
        if not decrypt:
            v128_store(bp, v128_make(0, 0))
            for i in range(rem):
                buf[i] = out[off + i]
            d = v128_load(bp)
        y = _gmul(y ^ pshufb(d, bswap), ctx.h[0])
    y = _gmul(y ^ _lens_block(aad_len, n), ctx.h[0])
    j0 = aes256_block(addr(ctx.key), _ctr_block(ivlo, ivhi, 1))
    return pshufb(y, bswap) ^ j0


@function
def gcm_seal(ctx: Ptr[GcmCtx], iv12: Ptr[u8], aad: Ptr[u8], aad_len: u64, pt: Ptr[u8],
             ct: Ptr[u8], n: u64, tag16: Ptr[u8]) -> None:
    """Encrypt n bytes pt -> ct (may alias exactly) and write the 16-byte tag."""
    v128_store(tag16, _gcm_crypt(ctx, iv12, aad, aad_len, pt, ct, n, False))


@function(noinline=True)  # used for envelopes, tokens, the command and pages
def copy_mem(dst: Ptr[u8], src: Ptr[u8], n: u64) -> None:
    """Copy n bytes, 64 at a time (the image has no memcpy)."""
    off: u64 = 0
    while n - off >= 64:
        a = v128_load(src + off)
        b = v128_load(src + off + 16)
        c = v128_load(src + off + 32)
        d = v128_load(src + off + 48)
        v128_store(dst + off, a)
        v128_store(dst + off + 16, b)
        v128_store(dst + off + 32, c)
        v128_store(dst + off + 48, d)
        off += 64
    while off < n:
        dst[off] = src[off]
        off += 1


@function
def _wipe(dst: Ptr[u8], n: u64) -> None:
    z = v128_make(0, 0)
    off: u64 = 0
    while n - off >= 16:
        v128_store(dst + off, z)
        off += 16
    while off < n:
        dst[off] = 0
        off += 1


@function
def gcm_open(ctx: Ptr[GcmCtx], iv12: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
             out: Ptr[u8], n: u64, tag16: Ptr[u8], scratch: Ptr[u8]) -> bool_:
    """Decrypt n bytes ct into the private `scratch` (n bytes), check the tag in constant time,
    and only if it matches copy scratch -> out. On failure out is untouched, scratch is wiped and
    False is returned. scratch == out decrypts in place (out is then wiped on failure)."""
    t = _gcm_crypt(ctx, iv12, aad, aad_len, ct, scratch, n, True) ^ v128_load(tag16)
    diff = v128_lo(t) | v128_hi(t)
    if diff != 0:
        _wipe(scratch, n)
        return False
    if scratch != out:
        copy_mem(out, scratch, n)
    return True


# -- C-ABI wrappers for tests and benchmarks (native runs) -------------------------------------


@function(abi="c")
def mh_test_aes256_expand(key: Ptr[u8], out: Ptr[Aes256Key]) -> None:
    aes256_expand(key, out)


@function(abi="c")
def mh_test_aes256_encrypt(key: Ptr[u8], inp: Ptr[u8], out: Ptr[u8]) -> None:
    k: Aes256Key
    aes256_expand(key, addr(k))
    aes256_encrypt_block(addr(k), inp, out)


@function(abi="c")
def mh_test_gcm_init(ctx: Ptr[GcmCtx], key32: Ptr[u8]) -> None:
    gcm_init(ctx, key32)


@function(abi="c")
def mh_test_gcm_seal_ctx(ctx: Ptr[GcmCtx], iv: Ptr[u8], aad: Ptr[u8], aad_len: u64, pt: Ptr[u8],
                         ct: Ptr[u8], n: u64, tag: Ptr[u8]) -> None:
    gcm_seal(ctx, iv, aad, aad_len, pt, ct, n, tag)


@function(abi="c")
def mh_test_gcm_open_ctx(ctx: Ptr[GcmCtx], iv: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
                         out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8]) -> u64:
    if gcm_open(ctx, iv, aad, aad_len, ct, out, n, tag, scratch):
        return 1
    return 0


@function(abi="c")
def mh_test_gcm_seal(key: Ptr[u8], iv: Ptr[u8], aad: Ptr[u8], aad_len: u64, pt: Ptr[u8],
                     ct: Ptr[u8], n: u64, tag: Ptr[u8]) -> None:
    ctx: GcmCtx
    gcm_init(addr(ctx), key)
    gcm_seal(addr(ctx), iv, aad, aad_len, pt, ct, n, tag)


@function(abi="c")
def mh_test_gcm_open(key: Ptr[u8], iv: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
                     out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8]) -> u64:
    ctx: GcmCtx
    gcm_init(addr(ctx), key)
    if gcm_open(addr(ctx), iv, aad, aad_len, ct, out, n, tag, scratch):
        return 1
    return 0


@function(abi="c")
def mh_bench_gcm_seal(ctx: Ptr[GcmCtx], iv: Ptr[u8], aad: Ptr[u8], aad_len: u64, pt: Ptr[u8],
                      ct: Ptr[u8], n: u64, tag: Ptr[u8], reps: u64) -> None:
    """`reps` seals back to back (native throughput without the host call overhead)."""
    for i in range(reps):
        gcm_seal(ctx, iv, aad, aad_len, pt, ct, n, tag)


@function(abi="c")
def mh_bench_gcm_open(ctx: Ptr[GcmCtx], iv: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
                      out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8], reps: u64) -> u64:
    ok: u64 = 0
    for i in range(reps):
        if gcm_open(ctx, iv, aad, aad_len, ct, out, n, tag, scratch):
            ok += 1
    return ok


TEST_FUNCTIONS = [
    mh_test_aes256_expand, mh_test_aes256_encrypt, mh_test_gcm_init, mh_test_gcm_seal_ctx,
    mh_test_gcm_open_ctx, mh_test_gcm_seal, mh_test_gcm_open, mh_bench_gcm_seal, mh_bench_gcm_open,
]
