"""AES-256-GCM-SIV (RFC 8452) in the DSL, with AES-NI and PCLMULQDQ.

Why GCM-SIV: a host that rolls back the helper's private memory can make it seal two different
pages under one nonce. With GCM that reuses the keystream and reveals the GHASH key; GCM-SIV
derives the counter from a tag over the whole input, so a repeated nonce reveals only whether two
inputs were identical, and no tag can be forged.

The construction, per record (RFC 8452 §4): from the key-generating key K_s and the 96-bit nonce
N, AES-256 of `LE32(i) ‖ N` for i = 0..5 gives the record-authentication key H (the low 8 bytes
of blocks 0, 1) and the record-encryption key (of blocks 2..5). S = POLYVAL_H(AAD ‖ pad ‖
plaintext ‖ pad ‖ LE64(bits(AAD)) ‖ LE64(bits(plaintext))); tag = AES_enc(S ^ N with bit 127
cleared); the plaintext is encrypted in CTR mode from the tag with bit 127 set, the counter being
its first 32 bits (little-endian, wrapping mod 2^32).

POLYVAL arithmetic: a 16-byte block read little-endian is the polynomial, bit i = coefficient of
x^i, so blocks need no byte swap. The field is GF(2)[x]/P, P = x^128 + x^127 + x^126 + x^121 + 1,
and POLYVAL's product is dot(a, b) = a·b·x^-128. A carry-less product D = D1·x^128 + D0 reduces
to D1 + D0·x^-128; since x^-64 ≡ x^64 + x^63 + x^62 + x^57 (mod P), one step
L·x^-64 = swap64(L) ^ clmul(L.lo, 0xC200000000000000) and two steps give D0·x^-128 (`_reduce`).
Eight blocks are absorbed with one reduction: S' = dot(S ^ X1, H8) ^ ... ^ dot(X8, H1), where
Hk = H^k·x^(-128(k-1)) are the "dot powers" kept in `SivKeys.h` (Karatsuba: 3 PCLMULQDQ a block).

Memory discipline (the helper's threat model, docs/SECURITY.md: the host may write back an
older ciphertext of any private page, the stack included, at any instruction boundary):
- plaintext that waits in private memory is masked: each 16-byte block XORed with an AES round,
  keyed by a secret in mm6:mm7, over (an id, a per-record serial in mm5). vcpu.py draws the key;
  compiled code never touches MMX, so under SEV-ES the host can neither read nor roll back
  either. A rewound stage or scratch, or a rewound pointer, then unmasks to noise, never to
  another page's plaintext.
- seal reads its input once, into the caller's private `stage` while hashing (masked; ids =
  block offsets), so the CTR pass encrypts what was hashed even if the source changes. Unmasked,
  a rewind of the stage between the passes would have this record's keystream encrypt another
  page, and one genuine record of a known page under the same nonce (a context rollback repeats
  nonces) would then reveal it.
- open reads the ciphertext once, decrypts into a private `scratch` while hashing the plaintext
  (masked; ids = the address each block is meant for in `out`), compares the tag in constant
  time, and only then unmasks into `out`, the ids being the addresses it stores to: a block can
  only come out right at the address it was verified for. The copy hashes what it stores and
  must arrive at the verified hash; otherwise (SIV_CHANGED) `out` is zeroed. A later rewind of
  `out` itself brings back only an older content of that page: the named residual of
  docs/SECURITY.md.
Per-record keys live in the caller-provided SivKeys and are wiped before returning.
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    bind_page,
    bound_page,
    emms,
    function,
    mask8,
    mask_block,
    mask_next,
    pclmulqdq,
    pshufd,
    sizeof,
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
    v128_store,
)

from .aes import (
    AES256_ROUNDS,
    Aes256Key,
    aes256_8,
    aes256_block,
    aes256_expand,
    aes256_expand_v,
    last8,
    round8,
)
from .memops import wipe

SIV_BLOCKS = 8  # blocks absorbed per POLYVAL reduction / encrypted per AES group
SIV_TAG_LEN = 16
SIV_NONCE_LEN = 12
POLYVAL_C = 0xC200000000000000  # x^63 + x^62 + x^57: one Montgomery step (module docstring)
MSB = 0x8000000000000000  # bit 127 of a block: bit 63 of its high qword
LOW32 = 0xFFFFFFFF
SIV_OK = 0  # siv_open's results
SIV_AUTH = 1
SIV_CHANGED = 2


@struct
class SivKeys:
    """Per-record keys derived from (K_s, nonce): the encryption key schedule and the dot powers
    H1..H8 of the authentication key, with their Karatsuba halves hk[i] = lo(h[i]) ^ hi(h[i])."""

    enc: Aes256Key
    h: Array[v128, 8]
    hk: Array[v128, 8]


# -- POLYVAL ------------------------------------------------------------------------------------


@function
def _reduce(lo: v128, mid: v128, hi: v128) -> v128:
    """(hi·x^128 ^ mid·x^64 ^ lo) · x^-128 mod P."""
    d0 = lo ^ v128_bsl(mid, 8)
    d1 = hi ^ v128_bsr(mid, 8)
    c = v128_make(POLYVAL_C, POLYVAL_C)
    t = pshufd(d0, 0x4E) ^ pclmulqdq(d0, c, 0x00)
    t = pshufd(t, 0x4E) ^ pclmulqdq(t, c, 0x00)
    return d1 ^ t


@function
def _dot(a: v128, b: v128) -> v128:
    """POLYVAL's product a·b·x^-128."""
    mid = pclmulqdq(a, b, 0x01) ^ pclmulqdq(a, b, 0x10)
    return _reduce(pclmulqdq(a, b, 0x00), mid, pclmulqdq(a, b, 0x11))


@function
def _mul_acc(acc: Ptr[v128], x: v128, h: v128, hk: v128) -> None:
    """acc += the unreduced Karatsuba product of x and a stored power: acc[0] lo, acc[2] hi,
    acc[1] (x.lo ^ x.hi)(h.lo ^ h.hi), which still contains lo and hi (see _reduce_k)."""
    acc[0] = acc[0] ^ pclmulqdq(x, h, 0x00)
    acc[2] = acc[2] ^ pclmulqdq(x, h, 0x11)
    acc[1] = acc[1] ^ pclmulqdq(pshufd(x, 0x4E) ^ x, hk, 0x00)


@function
def _reduce_k(acc: Ptr[v128]) -> v128:
    return _reduce(acc[0], acc[1] ^ acc[0] ^ acc[2], acc[2])


@function(noinline=True)  # per 128 bytes: a call costs nothing, a copy ~250 bytes
def _absorb8(k: Ptr[SivKeys], s: v128, d: Ptr[v128]) -> v128:
    """S' = dot(S ^ d0, H8) ^ dot(d1, H7) ^ ... ^ dot(d7, H1): 8 blocks, one reduction."""
    acc: Array[v128, 3]
    a = addr(acc[0])
    x = s ^ d[0]
    acc[0] = pclmulqdq(x, k.h[7], 0x00)
    acc[2] = pclmulqdq(x, k.h[7], 0x11)
    acc[1] = pclmulqdq(pshufd(x, 0x4E) ^ x, k.hk[7], 0x00)
    for j in range(1, SIV_BLOCKS):
        _mul_acc(a, d[j], k.h[7 - j], k.hk[7 - j])
    return _reduce_k(a)


@function
def _load_partial(p: Ptr[u8], n: u64) -> v128:
    """p[0:n] ‖ zeros, n < 16, read byte by byte (never past the end of the buffer)."""
    buf: Array[u8, 16]
    v128_store(addr(buf[0]), v128_make(0, 0))
    for i in range(n):
        buf[i] = p[i]
    return v128_load(addr(buf[0]))


@function
def _store_partial(p: Ptr[u8], v: v128, n: u64) -> None:
    """The first n < 16 bytes of v to p."""
    buf: Array[u8, 16]
    v128_store(addr(buf[0]), v)
    for i in range(n):
        p[i] = buf[i]


@function(noinline=True)  # the AAD (48 or 64 bytes): one copy for seal and open
def _absorb(k: Ptr[SivKeys], s: v128, p: Ptr[u8], n: u64) -> v128:
    """Absorb n bytes at p (the last block zero-padded)."""
    blk: Array[v128, 8]
    d = addr(blk[0])
    off: u64 = 0
    while n - off >= 128:
        for j in range(SIV_BLOCKS):
            d[j] = v128_load(p + off + 16 * j)
        s = _absorb8(k, s, d)
        off += 128
    while n - off >= 16:
        s = _dot(s ^ v128_load(p + off), k.h[0])
        off += 16
    if off < n:
        s = _dot(s ^ _load_partial(p + off, n - off), k.h[0])
    return s


@function
def _absorb_bind(k: Ptr[SivKeys], aad: Ptr[u8], aad_len: u64, base: u64) -> v128:
    """Absorb the AAD and bind_page() the record's page: base + the u64 at aad + 8 (the
    envelope's ram_addr), taken from the very load that is absorbed. The page is then read or
    written only through bound_page(), so the address the tag covers is the address used, whatever
    memory the host rewinds (module docstring). An AAD shorter than a block binds base."""
    if aad_len < 16:
        bind_page(base)
        return _absorb(k, v128_make(0, 0), aad, aad_len)
    b0 = v128_load(aad)
    bind_page(base + v128_hi(b0))
    return _absorb(k, _dot(b0, k.h[0]), aad + 16, aad_len - 16)


@function
def _absorb_copy(k: Ptr[SivKeys], s: v128, stage: Ptr[u8], n: u64) -> v128:
    """Absorb n bytes of the bound page and leave a masked copy in `stage`: every source byte
    is read once, so what is later encrypted from `stage` is exactly what was hashed. The
    source address is re-read from mm4 for every group, so it never waits in memory. stage may
    be the bound page."""
    blk: Array[v128, 8]
    d = addr(blk[0])
    off: u64 = 0
    while n - off >= 128:
        src = Ptr[u8](bound_page()) + off
        for j in range(SIV_BLOCKS):
            d[j] = v128_load(src + 16 * j)
        _store_masked8(stage + off, d, off >> 4)
        s = _absorb8(k, s, d)
        off += 128
    while n - off >= 16:
        x = v128_load(Ptr[u8](bound_page()) + off)
        v128_store(stage + off, mask_block(x, off >> 4))
        s = _dot(s ^ x, k.h[0])
        off += 16
    if off < n:
        x = _load_partial(Ptr[u8](bound_page()) + off, n - off)
        _store_partial(stage + off, mask_block(x, off >> 4), n - off)
        s = _dot(s ^ x, k.h[0])
    return s


@function
def _unmask_copy_absorb(k: Ptr[SivKeys], s: v128, stage: Ptr[u8], n: u64) -> v128:
    """The bound page = the masked stage, unmasked with the ids of the addresses stored to,
    absorbing each block as it is stored: the hash covers exactly what the page got. The
    address is re-read from mm4 for every group. stage may be the bound page."""
    blk: Array[v128, 8]
    d = addr(blk[0])
    off: u64 = 0
    while n - off >= 128:
        out = Ptr[u8](bound_page()) + off
        _load_masked8(d, stage + off, u64(out))
        for j in range(SIV_BLOCKS):
            v128_store(out + 16 * j, d[j])
        s = _absorb8(k, s, d)
        off += 128
    while n - off >= 16:
        out = Ptr[u8](bound_page()) + off
        x = mask_block(v128_load(stage + off), u64(out))
        v128_store(out, x)
        s = _dot(s ^ x, k.h[0])
        off += 16
    if off < n:
        out = Ptr[u8](bound_page()) + off
        _store_partial(out, mask_block(_load_partial(stage + off, n - off), u64(out)), n - off)
        s = _dot(s ^ _load_partial(out, n - off), k.h[0])  # zero padded, as verified
    return s


@function(noinline=True)  # a call per 128 bytes costs little; a copy ~250 bytes
def _store_masked8(p: Ptr[u8], d: Ptr[v128], id: u64) -> None:
    """p[0:128] = the 8 blocks d[0..7], masked (ids id..id+7)."""
    m0, m1, m2, m3, m4, m5, m6, m7 = mask8(d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], id)
    v128_store(p, m0)
    v128_store(p + 16, m1)
    v128_store(p + 32, m2)
    v128_store(p + 48, m3)
    v128_store(p + 64, m4)
    v128_store(p + 80, m5)
    v128_store(p + 96, m6)
    v128_store(p + 112, m7)


@function(noinline=True)  # a call per 128 bytes costs little; a copy ~250 bytes
def _load_masked8(d: Ptr[v128], p: Ptr[u8], id: u64) -> None:
    """d[0..7] = the 8 masked blocks at p, unmasked (ids id..id+7)."""
    d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7] = mask8(
        v128_load(p), v128_load(p + 16), v128_load(p + 32), v128_load(p + 48),
        v128_load(p + 64), v128_load(p + 80), v128_load(p + 96), v128_load(p + 112), id)


# -- keys ----------------------------------------------------------------------------------------


@function
def _nonce_block(nonce: Ptr[u8], i: u64) -> v128:
    """LE32(i) ‖ nonce (12 bytes)."""
    return v128_make(i | (u64(Ptr[u32](nonce)[0]) << 32), Ptr[u64](nonce + 4)[0])


@function(small=True, noinline=True)  # ~5% of a page's time: one small copy
def siv_derive(kgk: Ptr[Aes256Key], nonce: Ptr[u8], k: Ptr[SivKeys]) -> None:
    """The record keys for `nonce` (RFC 8452 §4) and the dot powers H1..H8."""
    st: Array[v128, 8]
    s = addr(st[0])
    for i in range(SIV_BLOCKS):
        s[i] = _nonce_block(nonce, u64(i)) ^ kgk.rk[0]
    aes256_8(kgk, s)  # blocks 6 and 7 are not needed; 8 in flight costs no more than 6
    h = v128_make(v128_lo(s[0]), v128_lo(s[1]))
    aes256_expand_v(v128_make(v128_lo(s[2]), v128_lo(s[3])),
                    v128_make(v128_lo(s[4]), v128_lo(s[5])), addr(k.enc))
    k.h[0] = h
    for i in range(1, SIV_BLOCKS):
        k.h[i] = _dot(k.h[i - 1], h)
    for i in range(SIV_BLOCKS):
        k.hk[i] = k.h[i] ^ pshufd(k.h[i], 0x4E)
    wipe(Ptr[u8](s), SIV_BLOCKS * 16)


@function
def _tag(k: Ptr[SivKeys], s: v128, nonce: Ptr[u8], aad_len: u64, n: u64) -> v128:
    """Absorb the length block, XOR the nonce, clear bit 127, encrypt: the tag."""
    s = _dot(s ^ v128_make(aad_len << 3, n << 3), k.h[0])
    s = s ^ v128_make(Ptr[u64](nonce)[0], u64(Ptr[u32](nonce + 8)[0]))
    s = v128_make(v128_lo(s), v128_hi(s) & ~u64(MSB))
    return aes256_block(addr(k.enc), s)


# -- CTR -----------------------------------------------------------------------------------------


@function
def _ctr8(s: Ptr[v128], k0: v128, clo: u64, chi: u64, c: u32) -> None:
    """s[j] = counter block c+j (its first 32 bits wrap mod 2^32), whitened with round key 0."""
    for j in range(SIV_BLOCKS):
        s[j] = v128_make(clo | u64(c + u32(j)), chi) ^ k0


@function
def _ctr(k: Ptr[SivKeys], t: v128, inp: Ptr[u8], out: Ptr[u8], n: u64) -> None:
    """out = (the masked stage inp, unmasked) ^ keystream from the tag t (seal's second pass)."""
    st: Array[v128, 8]
    blk: Array[v128, 8]
    s = addr(st[0])
    d = addr(blk[0])
    clo = v128_lo(t) & ~u64(LOW32)
    chi = v128_hi(t) | MSB
    c = u32(v128_lo(t))
    e = addr(k.enc)
    off: u64 = 0
    while n - off >= 128:
        _ctr8(s, e.rk[0], clo, chi, c)
        aes256_8(e, s)
        _load_masked8(d, inp + off, off >> 4)
        for j in range(SIV_BLOCKS):
            v128_store(out + off + 16 * j, s[j] ^ d[j])
        c += 8
        off += 128
    while off < n:
        ks = aes256_block(e, v128_make(clo | u64(c), chi))
        if n - off >= 16:
            v128_store(out + off, ks ^ mask_block(v128_load(inp + off), off >> 4))
            off += 16
        else:
            x = mask_block(_load_partial(inp + off, n - off), off >> 4)
            _store_partial(out + off, ks ^ x, n - off)
            off = n
        c += 1


@function
def _ctr_absorb(k: Ptr[SivKeys], t: v128, ct: Ptr[u8], pt: Ptr[u8], n: u64, s: v128) -> v128:
    """Decrypt ct -> pt (masked with the ids of where each block is meant to go in the bound
    page) from the tag t and absorb the plaintext into s, reading each ciphertext byte once. Stitched: while the AES rounds of group i run, POLYVAL absorbs the plaintext of
    group i-1 (kept in `g`), so the AES and carry-less-multiply units work at the same time."""
    st: Array[v128, 8]
    g: Array[v128, 8]
    acc: Array[v128, 3]
    sp = addr(st[0])
    gp = addr(g[0])
    a = addr(acc[0])
    clo = v128_lo(t) & ~u64(LOW32)
    chi = v128_hi(t) | MSB
    c = u32(v128_lo(t))
    e = addr(k.enc)
    rk = addr(e.rk[0])
    h = addr(k.h[0])
    hk = addr(k.hk[0])
    off: u64 = 0
    if n >= 128:
        _ctr8(sp, rk[0], clo, chi, c)
        aes256_8(e, sp)
        for j in range(SIV_BLOCKS):
            g[j] = st[j] ^ v128_load(ct + 16 * j)
        _store_masked8(pt, gp, bound_page())
        c += 8
        off = 128
        while n - off >= 128:
            _ctr8(sp, rk[0], clo, chi, c)
            round8(sp, rk[1])
            x = s ^ g[0]
            acc[0] = pclmulqdq(x, h[7], 0x00)
            acc[2] = pclmulqdq(x, h[7], 0x11)
            acc[1] = pclmulqdq(pshufd(x, 0x4E) ^ x, hk[7], 0x00)
            round8(sp, rk[2])
            _mul_acc(a, g[1], h[6], hk[6])
            round8(sp, rk[3])
            _mul_acc(a, g[2], h[5], hk[5])
            round8(sp, rk[4])
            _mul_acc(a, g[3], h[4], hk[4])
            round8(sp, rk[5])
            _mul_acc(a, g[4], h[3], hk[3])
            round8(sp, rk[6])
            _mul_acc(a, g[5], h[2], hk[2])
            round8(sp, rk[7])
            _mul_acc(a, g[6], h[1], hk[1])
            round8(sp, rk[8])
            _mul_acc(a, g[7], h[0], hk[0])
            round8(sp, rk[9])
            s = _reduce_k(a)
            round8(sp, rk[10])
            round8(sp, rk[11])
            round8(sp, rk[12])
            round8(sp, rk[13])
            last8(sp, rk[AES256_ROUNDS])
            for j in range(SIV_BLOCKS):
                g[j] = st[j] ^ v128_load(ct + off + 16 * j)
            _store_masked8(pt + off, gp, bound_page() + off)
            c += 8
            off += 128
        s = _absorb8(k, s, gp)
    while off < n:
        ks = aes256_block(e, v128_make(clo | u64(c), chi))
        if n - off >= 16:
            x = ks ^ v128_load(ct + off)
            v128_store(pt + off, mask_block(x, bound_page() + off))
            s = _dot(s ^ x, h[0])
            off += 16
        else:
            rem = n - off
            buf: Array[u8, 16]
            _store_partial(addr(buf[0]), ks ^ _load_partial(ct + off, rem), rem)
            x = _load_partial(addr(buf[0]), rem)  # the plaintext, zero padded for POLYVAL
            _store_partial(pt + off, mask_block(x, bound_page() + off), rem)
            s = _dot(s ^ x, h[0])
            off = n
        c += 1
    return s


# -- the AEAD --------------------------------------------------------------------------------------


@function
def siv_seal(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, base: u64,
             stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8], k: Ptr[SivKeys]) -> None:
    """Seal n bytes of the page at base + the AAD's ram_addr (_absorb_bind): hash it into S
    while copying it, masked, to the private `stage` (read once; stage may be the page), write
    the tag, then encrypt stage into ct. `k` is the caller's private room for the record keys;
    it is wiped on return."""
    mask_next()
    siv_derive(kgk, nonce, k)
    s = _absorb_bind(k, aad, aad_len, base)
    s = _absorb_copy(k, s, stage, n)
    t = _tag(k, s, nonce, aad_len, n)
    v128_store(tag, t)
    _ctr(k, t, stage, ct, n)
    wipe(Ptr[u8](k), sizeof(SivKeys))


@function
def siv_open(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
             base: u64, n: u64, tag: Ptr[u8], scratch: Ptr[u8], k: Ptr[SivKeys]) -> u32:
    """Open n bytes of ct into the page at base + the AAD's ram_addr (_absorb_bind): decrypt
    into the private `scratch` (masked) while hashing the plaintext, compare the tag in constant
    time, and only if it matches unmask scratch into the page, hashing what is stored.
    SIV_OK: the page holds the plaintext. SIV_AUTH: the tag did not match, the page is
    untouched. SIV_CHANGED: what was stored is not what was verified (module docstring), the
    page is zeroed. scratch is wiped unless SIV_OK; it may be the page itself (in place). The
    tag is read once: the same value is the counter and the comparand."""
    mask_next()
    siv_derive(kgk, nonce, k)
    t = v128_load(tag)
    s = _absorb_bind(k, aad, aad_len, base)
    s = _ctr_absorb(k, t, ct, scratch, n, s)
    d = _tag(k, s, nonce, aad_len, n) ^ t
    r: u32 = SIV_OK
    if (v128_lo(d) | v128_hi(d)) != 0:
        r = SIV_AUTH
    else:
        # the AAD as memory holds it now, then what is stored: must be what was verified
        d = _unmask_copy_absorb(k, _absorb(k, v128_make(0, 0), aad, aad_len), scratch, n) ^ s
        if (v128_lo(d) | v128_hi(d)) != 0:
            wipe(Ptr[u8](bound_page()), n)
            r = SIV_CHANGED
    wipe(Ptr[u8](k), sizeof(SivKeys))
    if r != SIV_OK:
        wipe(scratch, n)
    return r


@function
def aad_base(p: Ptr[u8], aad: Ptr[u8], aad_len: u64) -> u64:
    """The `base` that makes siv_seal/siv_open use the buffer p for this AAD (tests, selftest):
    p - the AAD's ram_addr field (wrapping), or p for an AAD shorter than a block."""
    if aad_len < 16:
        return u64(p)
    return u64(p) - Ptr[u64](aad + 8)[0]


# -- C-ABI wrappers for tests and benchmarks (native runs) -------------------------------------


@function(abi="c")
def mh_test_aes256_expand(key: Ptr[u8], out: Ptr[Aes256Key]) -> None:
    aes256_expand(key, out)


@function(abi="c")
def mh_test_siv_derive(key: Ptr[u8], nonce: Ptr[u8], out: Ptr[SivKeys]) -> None:
    kgk: Aes256Key
    aes256_expand(key, addr(kgk))
    siv_derive(addr(kgk), nonce, out)


@function(abi="c")
def mh_test_siv_seal(key: Ptr[u8], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, pt: Ptr[u8],
                     stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8]) -> None:
    kgk: Aes256Key
    k: SivKeys
    aes256_expand(key, addr(kgk))
    siv_seal(addr(kgk), nonce, aad, aad_len, aad_base(pt, aad, aad_len), stage, ct, n, tag,
             addr(k))
    emms()


@function(abi="c")
def mh_test_siv_open(key: Ptr[u8], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
                     out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8]) -> u64:
    kgk: Aes256Key
    k: SivKeys
    aes256_expand(key, addr(kgk))
    r = siv_open(addr(kgk), nonce, aad, aad_len, ct, aad_base(out, aad, aad_len), n, tag,
                 scratch, addr(k))
    emms()  # the masks used MMX registers: leave the x87 stack free for the host process
    return u64(r)


@function(abi="c")
def mh_bench_siv_seal(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                      pt: Ptr[u8], stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8],
                      reps: u64) -> None:
    """`reps` seals back to back (the firmware's speed without the host call overhead)."""
    k: SivKeys
    base = aad_base(pt, aad, aad_len)
    for i in range(reps):
        siv_seal(kgk, nonce, aad, aad_len, base, stage, ct, n, tag, addr(k))
    emms()


@function(abi="c")
def mh_bench_siv_open(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                      ct: Ptr[u8], out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8],
                      reps: u64) -> u64:
    k: SivKeys
    ok: u64 = 0
    base = aad_base(out, aad, aad_len)
    for i in range(reps):
        if siv_open(kgk, nonce, aad, aad_len, ct, base, n, tag, scratch, addr(k)) == SIV_OK:
            ok += 1
    emms()
    return ok


TEST_FUNCTIONS = [mh_test_aes256_expand, mh_test_siv_derive, mh_test_siv_seal, mh_test_siv_open,
                  mh_bench_siv_seal, mh_bench_siv_open]
