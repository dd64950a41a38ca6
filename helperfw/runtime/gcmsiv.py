"""AES-256-GCM-SIV (RFC 8452) in the DSL: the AEAD, its baseline on AES-NI and PCLMULQDQ, and
the hand-off of the bulk to the wide kernels (gcmsiv_wide.py) for a session that chose them.

Why GCM-SIV: a host that rolls back the helper's private memory can make it seal two different
pages under one nonce. With GCM that reuses the keystream and reveals the GHASH key; GCM-SIV
derives the counter from a tag over the whole input, so a repeated nonce reveals only whether two
inputs were identical, and no tag can be forged.

The construction, per record (RFC 8452 §4): from the key-generating key K_s and the 96-bit nonce
N, AES-256 of `LE32(i) ‖ N` for i = 0..5 gives the record-authentication key H (the low 8 bytes
of blocks 0, 1) and the record-encryption key (of blocks 2..5). S = POLYVAL_H(AAD ‖ pad ‖
plaintext ‖ pad ‖ LE64(bits(AAD)) ‖ LE64(bits(plaintext))); tag = AES_enc(S ^ N with bit 127
cleared); the plaintext is encrypted in CTR mode from the tag with bit 127 set, the counter being
its first 32 bits (little-endian, wrapping mod 2^32). POLYVAL's arithmetic and the record keys
are in gcmsiv_keys.py.

Two passes over the page on both sides, seal: hash while staging, then CTR; open: CTR while
hashing, then the copy-out, which hashes again. Each pass hands its whole 256-byte groups to the
wide kernel when the record's keys say so (`SivKeys.wide`) and finishes the rest here: 8-block
groups, single blocks, the last partial block. The AAD is always hashed here.

Memory discipline (the helper's threat model, docs/SECURITY.md: the host may write back an
older ciphertext of any private page, the stack included, at any instruction boundary):
- plaintext that waits in private memory is masked: each 16-byte block XORed with an AES round,
  keyed by a secret in mm6:mm7, over (an id, a per-record serial in mm5). vcpu.py draws the key;
  compiled code never touches MMX, so under SEV-ES the host can neither read nor roll back
  either. A rewound stage or scratch, or a rewound pointer, then unmasks to noise, never to
  another page's plaintext. Both paths compute the same mask for the same id.
- seal reads its input once, into the caller's private `stage` while hashing (masked; ids =
  block offsets), so the CTR pass encrypts what was hashed even if the source changes. Unmasked,
  a rewind of the stage between the passes would have this record's keystream encrypt another
  page, and one genuine record of a known page under the same nonce (a context rollback repeats
  nonces) would then reveal it.
- open reads the ciphertext once, decrypts into a private `scratch` while hashing the plaintext
  (masked; ids = the address each block is meant for in the page: its 128-byte group's address
  + its index there), compares the tag in constant time, and only then unmasks into the page,
  the ids being the addresses it stores to: a block can only come out right at the address it
  was verified for. The copy hashes what it stores and must arrive at the verified hash;
  otherwise (SIV_CHANGED) the page is zeroed. A later rewind of the page itself brings back
  only an older content of that page: the named residual of docs/SECURITY.md.
- the page's address is base + the ram_addr of the AAD block absorbed (`_absorb_bind`), held in
  mm4 and re-read from there for every group: the address the tag covers is the address used.
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
    mask_key,
    mask_next,
    pclmulqdq,
    pshufd,
    sizeof,
    u8,
    u32,
    u64,
    v128,
    v128_hi,
    v128_lo,
    v128_load,
    v128_make,
    v128_store,
)

from .aes import Aes256Key, aes256_8, aes256_block, aes256_expand, aes256_expand_v
from .gcmsiv_keys import LOW32, MSB, SIV_BLOCKS, SivKeys, dot, karatsuba_half, reduce
from .gcmsiv_wide import GROUP, WIDE_ON, copy_wide, cpu_wide_ok, ctr_wide, wide_keys
from .memops import copy_mem, wipe

SIV_OK = 0  # siv_open's results
SIV_AUTH = 1
SIV_CHANGED = 2

# -- POLYVAL ------------------------------------------------------------------------------------


@function
def _mul_acc(acc: Ptr[v128], x: v128, h: v128, hk: v128) -> None:
    """acc += the unreduced Karatsuba product of x and a stored power: acc[0] lo, acc[2] hi,
    acc[1] (x.lo ^ x.hi)(h.lo ^ h.hi), which still contains lo and hi (see _absorb8)."""
    acc[0] = acc[0] ^ pclmulqdq(x, h, 0x00)
    acc[2] = acc[2] ^ pclmulqdq(x, h, 0x11)
    acc[1] = acc[1] ^ pclmulqdq(pshufd(x, 0x4E) ^ x, hk, 0x00)


@function(noinline=True)  # per 128 bytes: a call costs nothing, a copy ~250 bytes
def _absorb8(k: Ptr[SivKeys], s: v128, d: Ptr[v128]) -> v128:
    """S' = dot(S ^ d0, H8) ^ dot(d1, H7) ^ ... ^ dot(d7, H1): 8 blocks, one reduction
    (d[j] takes h[8 + j] = H^(8-j))."""
    acc: Array[v128, 3]
    a = addr(acc[0])
    x = s ^ d[0]
    acc[0] = pclmulqdq(x, k.h[8], 0x00)
    acc[2] = pclmulqdq(x, k.h[8], 0x11)
    acc[1] = pclmulqdq(pshufd(x, 0x4E) ^ x, k.hk[8], 0x00)
    for j in range(1, SIV_BLOCKS):
        _mul_acc(a, d[j], k.h[8 + j], k.hk[8 + j])
    return reduce(acc[0], acc[1] ^ acc[0] ^ acc[2], acc[2])


@function
def _load_partial(p: Ptr[u8], n: u64) -> v128:
    """p[0:n] ‖ zeros, n <= 16; a partial block is read byte by byte (never past its end)."""
    if n == 16:
        return v128_load(p)
    buf: Array[u8, 16]
    v128_store(addr(buf[0]), v128_make(0, 0))
    for i in range(n):
        buf[i] = p[i]
    return v128_load(addr(buf[0]))


@function
def _store_partial(p: Ptr[u8], v: v128, n: u64) -> None:
    """The first n <= 16 bytes of v to p."""
    if n == 16:
        v128_store(p, v)
        return
    buf: Array[u8, 16]
    v128_store(addr(buf[0]), v)
    for i in range(n):
        p[i] = buf[i]


@function
def _truncate(v: v128, n: u64) -> v128:
    """The first n <= 16 bytes of v, zero padded (a partial block as POLYVAL takes it)."""
    if n == 16:
        return v
    buf: Array[u8, 16]
    v128_store(addr(buf[0]), v)
    return _load_partial(addr(buf[0]), n)


@function(noinline=True)  # the AAD (48 or 64 bytes): one copy for seal, open and the copy-out
def _absorb(k: Ptr[SivKeys], s: v128, p: Ptr[u8], n: u64) -> v128:
    """Absorb n bytes at p into s (the last block zero-padded)."""
    blk: Array[v128, 8]
    d = addr(blk[0])
    off: u64 = 0
    while n - off >= 16 * SIV_BLOCKS:
        for j in range(SIV_BLOCKS):
            d[j] = v128_load(p + off + 16 * j)
        s = _absorb8(k, s, d)
        off += 16 * SIV_BLOCKS
    while off < n:
        m = min(n - off, 16)
        s = dot(s ^ _load_partial(p + off, m), k.h[15])
        off += m
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
    return _absorb(k, dot(b0, k.h[15]), aad + 16, aad_len - 16)


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


@function(noinline=True)
def _copy_absorb(k: Ptr[SivKeys], s: v128, buf: Ptr[u8], n: u64, opening: bool) -> v128:
    """The copy passes, hashing the plaintext into s. Seal (`opening` False): the bound page is
    copied, masked (ids = block indexes), to the private stage `buf`; every source byte is read
    once, so what is later encrypted from the stage is exactly what was hashed. Open's
    copy-out: the bound page = the masked scratch `buf`, unmasked with the ids of the addresses
    stored to, each block hashed as it is stored: the hash covers exactly what the page got.
    The page address is re-read from mm4 for every group, so it never waits in memory. buf may
    be the bound page."""
    off: u64 = 0
    if k.wide != 0:
        s = copy_wide(k, s, buf, n, opening)
        off = n & ~u64(GROUP - 1)
    blk: Array[v128, 8]
    d = addr(blk[0])
    while n - off >= 16 * SIV_BLOCKS:
        page = Ptr[u8](bound_page()) + off
        if opening:
            _load_masked8(d, buf + off, u64(page))
            for j in range(SIV_BLOCKS):
                v128_store(page + 16 * j, d[j])
        else:
            for j in range(SIV_BLOCKS):
                d[j] = v128_load(page + 16 * j)
            _store_masked8(buf + off, d, off >> 4)
        s = _absorb8(k, s, d)
        off += 16 * SIV_BLOCKS
    while off < n:
        m = min(n - off, 16)
        page = Ptr[u8](bound_page()) + off
        x = v128_make(0, 0)
        if opening:
            x = mask_block(_load_partial(buf + off, m), u64(page))
            _store_partial(page, x, m)
            if m < 16:
                x = _load_partial(page, m)  # what the page holds, zero padded, as verified
        else:
            x = _load_partial(page, m)
            _store_partial(buf + off, mask_block(x, off >> 4), m)
        s = dot(s ^ x, k.h[15])
        off += m
    return s


# -- keys ----------------------------------------------------------------------------------------


@function(noinline=True)  # one copy (~1.2 KB inlined in the CTR pass)
def _aes8(e: Ptr[Aes256Key], s: Ptr[v128]) -> None:
    """aes256_8 for the baseline's CTR pass and the key derivation, on a local copy of the 8
    blocks: s may alias e as far as LLVM knows, the copy cannot, so the state stays in
    registers for all 14 rounds instead of being stored after each."""
    st: Array[v128, 8]
    for j in range(SIV_BLOCKS):
        st[j] = s[j]
    aes256_8(e, addr(st[0]))
    for j in range(SIV_BLOCKS):
        s[j] = st[j]


@function
def _nonce_block(nonce: Ptr[u8], i: u64) -> v128:
    """LE32(i) ‖ nonce (12 bytes)."""
    return v128_make(i | (u64(Ptr[u32](nonce)[0]) << 32), Ptr[u64](nonce + 4)[0])


@function(small=True, noinline=True)  # ~5% of a page's time: one small copy
def siv_derive(kgk: Ptr[Aes256Key], nonce: Ptr[u8], k: Ptr[SivKeys], wide: u32) -> None:
    """The record keys for `nonce` (RFC 8452 §4) and the dot powers H^1..H^8 (H^9..H^16 too for
    the wide kernels, if `wide`)."""
    st: Array[v128, 8]
    s = addr(st[0])
    for i in range(SIV_BLOCKS):
        s[i] = _nonce_block(nonce, u64(i)) ^ kgk.rk[0]
    _aes8(kgk, s)  # blocks 6 and 7 are not needed; 8 in flight costs no more than 6
    aes256_expand_v(v128_make(v128_lo(s[2]), v128_lo(s[3])),
                    v128_make(v128_lo(s[4]), v128_lo(s[5])), addr(k.enc))
    k.h[15] = v128_make(v128_lo(s[0]), v128_lo(s[1]))
    for i in range(1, SIV_BLOCKS):  # H^(i+1) = H^a·H^b, a = (i+1)/2: a chain of 3, not 7
        a = (i + 1) >> 1
        k.h[15 - i] = dot(k.h[16 - a], k.h[15 - i + a])
    for i in range(SIV_BLOCKS, 2 * SIV_BLOCKS):
        k.hk[i] = karatsuba_half(k.h[i])
    k.wide = wide
    if wide != 0:
        wide_keys(k)
    wipe(Ptr[u8](s), SIV_BLOCKS * 16)


@function(noinline=True)  # seal and open: one copy
def _tag(k: Ptr[SivKeys], s: v128, nonce: Ptr[u8], aad_len: u64, n: u64) -> v128:
    """Absorb the length block, XOR the nonce, clear bit 127, encrypt: the tag."""
    s = dot(s ^ v128_make(aad_len << 3, n << 3), k.h[15])
    s = s ^ v128_make(Ptr[u64](nonce)[0], u64(Ptr[u32](nonce + 8)[0]))
    s = v128_make(v128_lo(s), v128_hi(s) & ~u64(MSB))
    return aes256_block(addr(k.enc), s)


# -- CTR -----------------------------------------------------------------------------------------


@function
def _ctr8(s: Ptr[v128], k0: v128, clo: u64, chi: u64, c: u32) -> None:
    """s[j] = counter block c+j (its first 32 bits wrap mod 2^32), whitened with round key 0."""
    for j in range(SIV_BLOCKS):
        s[j] = v128_make(clo | u64(c + u32(j)), chi) ^ k0


@function(noinline=True)
def _ctr(k: Ptr[SivKeys], t: v128, inp: Ptr[u8], out: Ptr[u8], n: u64, s: v128,
         opening: bool) -> v128:
    """CTR from the tag t; each input byte is read once (inp may be out). Seal (`opening`
    False): out = (the masked stage inp, unmasked) ^ keystream; s comes back unchanged. Open:
    inp is the ciphertext, the plaintext goes to the private scratch `out` masked with the ids
    of where each block is meant to go in the bound page, and is absorbed into s as it is
    decrypted (in registers, before it is masked); s is returned."""
    off: u64 = 0
    if k.wide != 0:  # the whole 256-byte groups in one pass (stitched when opening)
        s = ctr_wide(k, t, inp, out, n, s, opening)
        off = n & ~u64(GROUP - 1)
    st: Array[v128, 8]
    blk: Array[v128, 8]
    sp = addr(st[0])
    d = addr(blk[0])
    clo = v128_lo(t) & ~u64(LOW32)
    chi = v128_hi(t) | MSB
    c = u32(v128_lo(t)) + u32(off >> 4)
    e = addr(k.enc)
    while n - off >= 16 * SIV_BLOCKS:
        _ctr8(sp, e.rk[0], clo, chi, c)
        _aes8(e, sp)
        if opening:
            for j in range(SIV_BLOCKS):
                d[j] = st[j] ^ v128_load(inp + off + 16 * j)
            _store_masked8(out + off, d, bound_page() + off)
            s = _absorb8(k, s, d)
        else:
            _load_masked8(d, inp + off, off >> 4)
            for j in range(SIV_BLOCKS):
                v128_store(out + off + 16 * j, st[j] ^ d[j])
        c += SIV_BLOCKS
        off += 16 * SIV_BLOCKS
    while off < n:
        m = min(n - off, 16)
        v = aes256_block(e, v128_make(clo | u64(c), chi)) ^ _load_partial(inp + off, m)
        if opening:
            x = _truncate(v, m)  # the plaintext, zero padded
            s = dot(s ^ x, k.h[15])
            v = mask_block(x, bound_page() + off)
        else:
            v = mask_block(v, off >> 4)  # keystream ^ masked stage, unmasked: the ciphertext
        _store_partial(out + off, v, m)
        off += m
        c += 1
    return s


# -- the AEAD --------------------------------------------------------------------------------------


@function(noinline=True)
def siv_seal_on(path: u32, kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                base: u64, stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8],
                k: Ptr[SivKeys]) -> None:
    """Seal n bytes of the page at base + the AAD's ram_addr (_absorb_bind) on the session's
    `path` (gcmsiv_wide.WIDE_*): hash it into S while copying it, masked, to the private `stage`
    (read once; stage may be the page), write the tag, then encrypt stage into ct. `k` is the
    caller's private room for the record keys; it is wiped on return."""
    mask_next()
    siv_derive(kgk, nonce, k, u32(path == WIDE_ON))
    s = _absorb_bind(k, aad, aad_len, base)
    s = _copy_absorb(k, s, stage, n, False)
    t = _tag(k, s, nonce, aad_len, n)
    v128_store(tag, t)
    _ctr(k, t, stage, ct, n, s, False)
    wipe(Ptr[u8](k), sizeof(SivKeys))


@function
def _copy_out(k: Ptr[SivKeys], aad: Ptr[u8], aad_len: u64, scratch: Ptr[u8], n: u64,
              s: v128) -> u32:
    """Release a verified record: unmask scratch into the bound page, hashing the AAD as memory
    holds it now and then what is stored; that must be s, the hash the tag verified. SIV_OK,
    or SIV_CHANGED with the page zeroed (private memory changed in between)."""
    d = _copy_absorb(k, _absorb(k, v128_make(0, 0), aad, aad_len), scratch, n, True) ^ s
    if (v128_lo(d) | v128_hi(d)) != 0:
        wipe(Ptr[u8](bound_page()), n)
        return SIV_CHANGED
    return SIV_OK


@function(noinline=True)
def siv_open_on(path: u32, kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                ct: Ptr[u8], base: u64, n: u64, tag: Ptr[u8], scratch: Ptr[u8],
                k: Ptr[SivKeys]) -> u32:
    """Open n bytes of ct into the page at base + the AAD's ram_addr (_absorb_bind) on the
    session's `path`: decrypt into the private `scratch` (masked) while hashing the plaintext,
    compare the tag in constant time, and only if it matches unmask scratch into the page,
    hashing what is stored (_copy_out). SIV_OK: the page holds the plaintext. SIV_AUTH: the tag
    did not match, the page is untouched. SIV_CHANGED: what was stored is not what was verified
    (module docstring), the page is zeroed. scratch is wiped unless SIV_OK; it may be the page
    itself (in place). The tag is read once: the same value is the counter and the comparand."""
    mask_next()
    siv_derive(kgk, nonce, k, u32(path == WIDE_ON))
    t = v128_load(tag)
    s = _absorb_bind(k, aad, aad_len, base)
    s = _ctr(k, t, ct, scratch, n, s, True)
    d = _tag(k, s, nonce, aad_len, n) ^ t
    r: u32 = SIV_AUTH
    if (v128_lo(d) | v128_hi(d)) == 0:
        r = _copy_out(k, aad, aad_len, scratch, n, s)
    wipe(Ptr[u8](k), sizeof(SivKeys))
    if r != SIV_OK:
        wipe(scratch, n)
    return r


@function
def siv_seal(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, base: u64,
             stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8], k: Ptr[SivKeys]) -> None:
    """siv_seal_on the baseline (tokens, the self-test: short records, any CPU)."""
    siv_seal_on(0, kgk, nonce, aad, aad_len, base, stage, ct, n, tag, k)


@function
def siv_open(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
             base: u64, n: u64, tag: Ptr[u8], scratch: Ptr[u8], k: Ptr[SivKeys]) -> u32:
    """siv_open_on the baseline."""
    return siv_open_on(0, kgk, nonce, aad, aad_len, ct, base, n, tag, scratch, k)


@function
def aad_base(p: Ptr[u8], aad: Ptr[u8], aad_len: u64) -> u64:
    """The `base` that makes siv_seal/siv_open use the buffer p for this AAD (tests, selftest):
    p - the AAD's ram_addr field (wrapping), or p for an AAD shorter than a block."""
    if aad_len < 16:
        return u64(p)
    return u64(p) - Ptr[u64](aad + 8)[0]


# -- C-ABI wrappers for tests and benchmarks (native runs) -------------------------------------
# Those that seal or open set the mask key first (mkey: two u64, serial 0) so a test knows the
# masks, and end with EMMS: the masks used MMX registers, the host process's x87 stack must be
# free again.


@function(abi="c")
def mh_test_aes256_expand(key: Ptr[u8], out: Ptr[Aes256Key]) -> None:
    aes256_expand(key, out)


@function(abi="c")
def mh_test_cpu_wide_ok() -> u64:
    """The helper's own answer (CPUID, XGETBV) to whether this CPU can run the wide path."""
    return u64(cpu_wide_ok(False))


@function(abi="c")
def mh_test_siv_derive(key: Ptr[u8], nonce: Ptr[u8], out: Ptr[SivKeys], path: u32) -> None:
    kgk: Aes256Key
    aes256_expand(key, addr(kgk))
    siv_derive(addr(kgk), nonce, out, u32(path == WIDE_ON))


@function(abi="c")
def mh_test_siv_seal(key: Ptr[u8], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, pt: Ptr[u8],
                     stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8], path: u32,
                     mkey: Ptr[u64]) -> None:
    kgk: Aes256Key
    k: SivKeys
    aes256_expand(key, addr(kgk))
    mask_key(mkey[0], mkey[1])
    siv_seal_on(path, addr(kgk), nonce, aad, aad_len, aad_base(pt, aad, aad_len), stage, ct, n,
                tag, addr(k))
    emms()


@function(abi="c")
def mh_test_siv_open(key: Ptr[u8], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
                     out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8], path: u32,
                     mkey: Ptr[u64]) -> u64:
    kgk: Aes256Key
    k: SivKeys
    aes256_expand(key, addr(kgk))
    mask_key(mkey[0], mkey[1])
    r = siv_open_on(path, addr(kgk), nonce, aad, aad_len, ct, aad_base(out, aad, aad_len), n,
                    tag, scratch, addr(k))
    emms()
    return u64(r)


@function
def _rewind_keys(key: Ptr[u8], nonce: Ptr[u8], k: Ptr[SivKeys], path: u32, mkey: Ptr[u64],
                 serial: u64) -> None:
    """A rewind test's record keys and mask state: the mask key `mkey`, `serial` records
    counted in mm5 (mask_next), the record keys for `nonce` on `path`."""
    kgk: Aes256Key
    aes256_expand(key, addr(kgk))
    mask_key(mkey[0], mkey[1])
    for i in range(serial):
        mask_next()
    siv_derive(addr(kgk), nonce, k, u32(path == WIDE_ON))


@function(abi="c")
def mh_test_siv_open_rewound(key: Ptr[u8], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                             ct: Ptr[u8], out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8],
                             path: u32, mkey: Ptr[u64], old: Ptr[u8], serial: u64,
                             check: u32) -> u64:
    """siv_open_on's steps, with the host's rewind of the scratch simulated between the tag
    check and the copy-out: `old` (n bytes, e.g. another record's masked scratch) is copied over
    scratch there. `serial` records are opened before (mask_next), so that record's serial can
    be this one's. SIV_AUTH if the tag did not match (nothing is copied). `check` 0 copies out
    without comparing the hash (the code without that defence: a test's control)."""
    k: SivKeys
    _rewind_keys(key, nonce, addr(k), path, mkey, serial)
    t = v128_load(tag)
    s = _absorb_bind(addr(k), aad, aad_len, aad_base(out, aad, aad_len))
    s = _ctr(addr(k), t, ct, scratch, n, s, True)
    d = _tag(addr(k), s, nonce, aad_len, n) ^ t
    r: u32 = SIV_AUTH
    if (v128_lo(d) | v128_hi(d)) == 0:
        copy_mem(scratch, old, n)  # the rewind
        if check != 0:
            r = _copy_out(addr(k), aad, aad_len, scratch, n, s)
        else:
            _copy_absorb(addr(k), s, scratch, n, True)
            r = SIV_OK
    emms()
    return u64(r)


@function(abi="c")
def mh_test_siv_seal_rewound(key: Ptr[u8], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                             pt: Ptr[u8], stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8],
                             path: u32, mkey: Ptr[u64], old: Ptr[u8], serial: u64) -> None:
    """siv_seal_on's steps, with the host's rewind of the stage simulated between the passes:
    after the tag is written, `old` (n bytes, e.g. another record's masked stage) is copied
    over the stage, which the CTR pass then encrypts. The record's serial is `serial` (1: a
    wrapper's one record; 2: the record after it, as after a context rollback, which cannot
    reach mm5)."""
    k: SivKeys
    _rewind_keys(key, nonce, addr(k), path, mkey, serial)
    s = _absorb_bind(addr(k), aad, aad_len, aad_base(pt, aad, aad_len))
    s = _copy_absorb(addr(k), s, stage, n, False)
    t = _tag(addr(k), s, nonce, aad_len, n)
    v128_store(tag, t)
    copy_mem(stage, old, n)  # the rewind
    _ctr(addr(k), t, stage, ct, n, s, False)
    emms()


@function(abi="c")
def mh_bench_siv_seal(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                      pt: Ptr[u8], stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8],
                      reps: u64, path: u32) -> None:
    """`reps` seals back to back (the firmware's speed without the host call overhead)."""
    k: SivKeys
    base = aad_base(pt, aad, aad_len)
    for i in range(reps):
        siv_seal_on(path, kgk, nonce, aad, aad_len, base, stage, ct, n, tag, addr(k))
    emms()


@function(abi="c")
def mh_bench_siv_open(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                      ct: Ptr[u8], out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8],
                      reps: u64, path: u32) -> u64:
    k: SivKeys
    ok: u64 = 0
    base = aad_base(out, aad, aad_len)
    for i in range(reps):
        if siv_open_on(path, kgk, nonce, aad, aad_len, ct, base, n, tag, scratch,
                       addr(k)) == SIV_OK:
            ok += 1
    emms()
    return ok


TEST_FUNCTIONS = [mh_test_aes256_expand, mh_test_cpu_wide_ok, mh_test_siv_derive,
                  mh_test_siv_seal, mh_test_siv_open, mh_test_siv_open_rewound,
                  mh_test_siv_seal_rewound,
                  mh_bench_siv_seal, mh_bench_siv_open]
