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

Two passes on both paths, one POLYVAL (`_absorb`) and one CTR (`_ctr`): seal must hash the
whole plaintext before the tag gives the counter, and open decrypts first and hashes what it
decrypted. Each pass hands its whole 256-byte groups to the wide kernel when the record's keys
say so (`SivKeys.wide`) and finishes the rest here: 8-block groups, single blocks, the last
partial block.

Memory discipline (the helper's threat model, docs/SECURITY.md): seal reads its input exactly
once (into the caller's private `stage` while hashing), so the CTR pass encrypts what was hashed
even if the source changes meanwhile; open reads the ciphertext once, decrypting it into a
private `scratch`, hashes the scratch, compares the tag in constant time, and only then copies
scratch to `out` (verify before release). Per-record keys live in the caller-provided SivKeys and
are wiped before returning.
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    bool_,
    function,
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
from .gcmsiv_wide import (
    GROUP,
    WIDE_ON,
    absorb_wide,
    cpu_wide_ok,
    ctr_wide,
    wide_keys,
)
from .memops import copy_mem, wipe

# -- POLYVAL ------------------------------------------------------------------------------------


@function
def _mul_acc(acc: Ptr[v128], x: v128, h: v128, hk: v128) -> None:
    """acc += the unreduced Karatsuba product of x and a stored power: acc[0] lo, acc[2] hi,
    acc[1] (x.lo ^ x.hi)(h.lo ^ h.hi), which still contains lo and hi (see _absorb8)."""
    acc[0] = acc[0] ^ pclmulqdq(x, h, 0x00)
    acc[2] = acc[2] ^ pclmulqdq(x, h, 0x11)
    acc[1] = acc[1] ^ pclmulqdq(pshufd(x, 0x4E) ^ x, hk, 0x00)


@function
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


@function(noinline=True)
def _absorb(k: Ptr[SivKeys], s: v128, p: Ptr[u8], stage: Ptr[u8], n: u64) -> v128:
    """Absorb n bytes at p into s (the last block zero-padded). A non-null `stage` receives an
    exact copy (stage may be p): every byte of p is read once, so what a seal later encrypts from
    stage is exactly what was hashed."""
    off: u64 = 0
    if k.wide != 0:
        s = absorb_wide(k, s, p, stage, n)
        off = n & ~u64(GROUP - 1)
    blk: Array[v128, 8]
    d = addr(blk[0])
    while n - off >= 16 * SIV_BLOCKS:
        for j in range(SIV_BLOCKS):
            d[j] = v128_load(p + off + 16 * j)
            if stage != 0:
                v128_store(stage + off + 16 * j, d[j])
        s = _absorb8(k, s, d)
        off += 16 * SIV_BLOCKS
    while off < n:
        m = min(n - off, 16)
        x = _load_partial(p + off, m)
        if stage != 0:
            _store_partial(stage + off, x, m)
        s = dot(s ^ x, k.h[15])
        off += m
    return s


# -- keys ----------------------------------------------------------------------------------------


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
    aes256_8(kgk, s)  # blocks 6 and 7 are not needed; 8 in flight costs no more than 6
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


@function
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


@function
def _ctr_skip(t: v128, n: u64) -> v128:
    """The tag t as a counter n bytes (a multiple of 16) further on: its first 32 bits + n/16."""
    lo = v128_lo(t)
    return v128_make((lo & ~u64(LOW32)) | u64(u32(lo) + u32(n >> 4)), v128_hi(t))


@function(noinline=True)
def _ctr(k: Ptr[SivKeys], t: v128, inp: Ptr[u8], out: Ptr[u8], n: u64) -> None:
    """out = inp ^ the keystream from the tag t; each input byte is read once (inp may be out)."""
    off: u64 = 0
    if k.wide != 0:
        ctr_wide(k, t, inp, out, n, t, False)
        off = n & ~u64(GROUP - 1)
    st: Array[v128, 8]
    s = addr(st[0])
    clo = v128_lo(t) & ~u64(LOW32)
    chi = v128_hi(t) | MSB
    c = u32(v128_lo(t)) + u32(off >> 4)
    e = addr(k.enc)
    while n - off >= 16 * SIV_BLOCKS:
        _ctr8(s, e.rk[0], clo, chi, c)
        aes256_8(e, s)
        for j in range(SIV_BLOCKS):
            v128_store(out + off + 16 * j, s[j] ^ v128_load(inp + off + 16 * j))
        c += SIV_BLOCKS
        off += 16 * SIV_BLOCKS
    while off < n:
        m = min(n - off, 16)
        ks = aes256_block(e, v128_make(clo | u64(c), chi))
        _store_partial(out + off, ks ^ _load_partial(inp + off, m), m)
        off += m
        c += 1


# -- the AEAD --------------------------------------------------------------------------------------


@function(noinline=True)
def siv_seal_on(path: u32, kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                pt: Ptr[u8], stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8],
                k: Ptr[SivKeys]) -> None:
    """Seal n bytes on the session's `path` (gcmsiv_wide.WIDE_*): hash pt into S while copying it
    to the private `stage` (pt is read once; stage may be pt when pt is private and stable), write
    the tag, then encrypt stage into ct. `k` is the caller's private room for the record keys; it
    is wiped on return."""
    siv_derive(kgk, nonce, k, u32(path == WIDE_ON))
    s = _absorb(k, v128_make(0, 0), aad, Ptr[u8](0), aad_len)
    s = _absorb(k, s, pt, stage, n)
    t = _tag(k, s, nonce, aad_len, n)
    v128_store(tag, t)
    _ctr(k, t, stage, ct, n)
    wipe(Ptr[u8](k), sizeof(SivKeys))


@function(noinline=True)
def siv_open_on(path: u32, kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                ct: Ptr[u8], out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8],
                k: Ptr[SivKeys]) -> bool_:
    """Decrypt n bytes of ct into the private `scratch`, hash the scratch, compare the tag in
    constant time, and only if it matches copy scratch -> out. On failure out is untouched,
    scratch is wiped and False is returned; scratch == out decrypts in place. The tag is read
    once: the same value is the counter and the comparand."""
    siv_derive(kgk, nonce, k, u32(path == WIDE_ON))
    t = v128_load(tag)
    s = _absorb(k, v128_make(0, 0), aad, Ptr[u8](0), aad_len)
    done: u64 = 0
    if k.wide != 0:  # the whole 256-byte groups in one stitched pass
        s = ctr_wide(k, t, ct, scratch, n, s, True)
        done = n & ~u64(GROUP - 1)
    _ctr(k, _ctr_skip(t, done), ct + done, scratch + done, n - done)
    s = _absorb(k, s, scratch + done, Ptr[u8](0), n - done)
    d = _tag(k, s, nonce, aad_len, n) ^ t
    wipe(Ptr[u8](k), sizeof(SivKeys))
    if (v128_lo(d) | v128_hi(d)) != 0:
        wipe(scratch, n)
        return False
    if scratch != out:
        copy_mem(out, scratch, n)
    return True


@function
def siv_seal(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, pt: Ptr[u8],
             stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8], k: Ptr[SivKeys]) -> None:
    """siv_seal_on the baseline (tokens, the self-test: short records, any CPU)."""
    siv_seal_on(0, kgk, nonce, aad, aad_len, pt, stage, ct, n, tag, k)


@function
def siv_open(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
             out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8], k: Ptr[SivKeys]) -> bool_:
    """siv_open_on the baseline."""
    return siv_open_on(0, kgk, nonce, aad, aad_len, ct, out, n, tag, scratch, k)


# -- C-ABI wrappers for tests and benchmarks (native runs) -------------------------------------


@function(abi="c")
def mh_test_aes256_expand(key: Ptr[u8], out: Ptr[Aes256Key]) -> None:
    aes256_expand(key, out)


@function(abi="c")
def mh_test_cpu_wide_ok() -> u64:
    """The helper's own answer (CPUID, XGETBV) to whether this CPU can run the wide path."""
    return u64(cpu_wide_ok())


@function(abi="c")
def mh_test_siv_derive(key: Ptr[u8], nonce: Ptr[u8], out: Ptr[SivKeys], path: u32) -> None:
    kgk: Aes256Key
    aes256_expand(key, addr(kgk))
    siv_derive(addr(kgk), nonce, out, u32(path == WIDE_ON))


@function(abi="c")
def mh_test_siv_seal(key: Ptr[u8], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, pt: Ptr[u8],
                     stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8], path: u32) -> None:
    kgk: Aes256Key
    k: SivKeys
    aes256_expand(key, addr(kgk))
    siv_seal_on(path, addr(kgk), nonce, aad, aad_len, pt, stage, ct, n, tag, addr(k))


@function(abi="c")
def mh_test_siv_open(key: Ptr[u8], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64, ct: Ptr[u8],
                     out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8], path: u32) -> u64:
    kgk: Aes256Key
    k: SivKeys
    aes256_expand(key, addr(kgk))
    if siv_open_on(path, addr(kgk), nonce, aad, aad_len, ct, out, n, tag, scratch, addr(k)):
        return 1
    return 0


@function(abi="c")
def mh_bench_siv_seal(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                      pt: Ptr[u8], stage: Ptr[u8], ct: Ptr[u8], n: u64, tag: Ptr[u8],
                      reps: u64, path: u32) -> None:
    """`reps` seals back to back (the firmware's speed without the host call overhead)."""
    k: SivKeys
    for i in range(reps):
        siv_seal_on(path, kgk, nonce, aad, aad_len, pt, stage, ct, n, tag, addr(k))


@function(abi="c")
def mh_bench_siv_open(kgk: Ptr[Aes256Key], nonce: Ptr[u8], aad: Ptr[u8], aad_len: u64,
                      ct: Ptr[u8], out: Ptr[u8], n: u64, tag: Ptr[u8], scratch: Ptr[u8],
                      reps: u64, path: u32) -> u64:
    k: SivKeys
    ok: u64 = 0
    for i in range(reps):
        if siv_open_on(path, kgk, nonce, aad, aad_len, ct, out, n, tag, scratch, addr(k)):
            ok += 1
    return ok


TEST_FUNCTIONS = [mh_test_aes256_expand, mh_test_cpu_wide_ok, mh_test_siv_derive,
                  mh_test_siv_seal, mh_test_siv_open, mh_bench_siv_seal, mh_bench_siv_open]
