"""AES-256-GCM-SIV's bulk on 256-bit registers (VAES, VPCLMULQDQ, AVX2), and the choice of path.

Why: AES rounds are most of a page's cost, and VAES runs two blocks per instruction on ymm
registers (the issue-8 probe measured 1.96-2.12x the AES-NI rate); VPCLMULQDQ does the same for
POLYVAL's carry-less products. The baseline (gcmsiv.py) stays the only path on a CPU without
them and under emulation (unicorn and QEMU TCG's default model have no AVX), and it finishes
whatever is left after the whole 256-byte groups the kernels here take: tails, the AAD, partial
blocks.

The kernels keep the baseline's memory discipline (gcmsiv.py's module docstring) block for block:
the page is read (seal) or written (open) only through `bound_page()`, re-read for every group;
whatever plaintext waits in the stage or the scratch is masked with `mask8_256`, whose masks are
bit-identical to the baseline's `mask8`/`mask_block` for the same ids (seal's stage: the block
index; open's scratch: the bound page + the offset of the block's 128-byte group, + its index in
the group, as the baseline numbers them), so the two paths can finish each other's records; the
plaintext is unmasked only in registers, and POLYVAL hashes plaintext, never masked data.

The kernels are `@function(features=WIDE)`: only they may use v256 (the front end refuses it
elsewhere), LLVM never inlines them into 128-bit code, and they run only for a record whose
`SivKeys.wide` was set because the session chose them (`wide_choose`, once per session, in the
mirror: the mirror vCPU's CPUID and XCR0 are whatever the host set, not the guest's). CPUID is
asked as the platform allows: the instruction on SEV; under SEV-ES, where it is a #VC that the
mirror's handler can only end as E_FAULT, one GHCB MSR protocol request per register
(ghcb.ghcb_cpuid: four VMGEXITs per session start, no GHCB page needed). XGETBV is never
intercepted and runs as it is.

A host controls CPUID (SEV, SEV-ES without SNP, either way it is asked): one that claims VAES on
a CPU without it makes the first wide instruction raise #UD. The helper's exception handler
(vcpu.mh_fault) ends the batch with E_FAULT and calls `wide_refuse`, so every later session
takes the baseline whatever CPUID says.
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    bound_page,
    const,
    cpuid,
    function,
    mask8_256,
    u8,
    u32,
    u64,
    unroll,
    v128,
    v128_hi,
    v128_lo,
    v128_make,
    v256,
    v256_add32,
    v256_broadcast,
    v256_hi,
    v256_lo,
    v256_load,
    v256_make,
    v256_store,
    vaesenc256,
    vaesenclast256,
    vpclmulqdq256,
    vpshufd256,
    xgetbv,
)

from .aes import AES256_ROUNDS
from .gcmsiv_keys import MSB, SIV_BLOCKS, WIDE_BLOCKS, SivKeys, dot, karatsuba_half, reduce
from .ghcb import ghcb_cpuid
from .platform import (
    CPUID_1_ECX_AVX,
    CPUID_1_ECX_OSXSAVE,
    CPUID_7_EBX_AVX2,
    CPUID_7_ECX_VAES,
    CPUID_7_ECX_VPCLMULQDQ,
    CPUID_EAX,
    CPUID_EBX,
    CPUID_ECX,
    CPUID_EXT_FEATURES_LEAF,
    CPUID_FEATURES_LEAF,
    CPUID_STD_MAX_LEAF,
    MSR_AMD64_SEV_ES_ENABLED,
    XCR0,
    XCR0_AVX,
    XCR0_SSE,
)

WIDE = "+avx2,+vaes,+vpclmulqdq"
GROUP = WIDE_BLOCKS * 16  # bytes per kernel iteration: 8 ymm registers of two blocks
HALF = SIV_BLOCKS * 16  # one mask8_256 (and one baseline group): 4 ymm registers

# A session's path (HelperCtx.wide): chosen at *_BEGIN by wide_choose.
WIDE_OFF = const(u32, 0)  # the baseline: 128-bit AES-NI and PCLMULQDQ
WIDE_ON = const(u32, 1)  # whole 256-byte groups in the kernels below
WIDE_REFUSED = const(u32, 2)  # a wide instruction faulted (a lying CPUID): the baseline, for good


# -- the choice ------------------------------------------------------------------------------


@function(small=True)
def _cpuid_reg(leaf: u32, reg: u32, es: bool) -> u32:
    """CPUID register `reg` of `leaf` (subleaf 0) as the platform allows: the instruction on
    SEV (the host answers it by intercept), the GHCB MSR protocol under SEV-ES (`es`), where
    the instruction would be a #VC and the batch would end with E_FAULT."""
    if es:
        return ghcb_cpuid(leaf, reg)
    a, b, c, d = cpuid(leaf, 0)
    if reg == CPUID_EAX:
        return a
    if reg == CPUID_EBX:
        return b
    return c if reg == CPUID_ECX else d


@function(small=True)
def cpu_wide_ok(es: bool) -> bool:
    """The CPU and the OS state allow the kernels: CPUID.1:ECX.OSXSAVE (XGETBV is then allowed)
    and AVX, CPUID.7.0:EBX.AVX2, ECX.VAES and VPCLMULQDQ, and XCR0 with the SSE and AVX state
    enabled (without it every VEX.256 instruction is #UD). CPUID by _cpuid_reg; XGETBV is never
    intercepted, so it runs as it is under SEV-ES too."""
    if _cpuid_reg(CPUID_STD_MAX_LEAF, CPUID_EAX, es) < CPUID_EXT_FEATURES_LEAF:
        return False
    both = u32(CPUID_1_ECX_OSXSAVE | CPUID_1_ECX_AVX)
    if (_cpuid_reg(CPUID_FEATURES_LEAF, CPUID_ECX, es) & both) != both:
        return False
    ext = u32(CPUID_7_ECX_VAES | CPUID_7_ECX_VPCLMULQDQ)
    if (_cpuid_reg(CPUID_EXT_FEATURES_LEAF, CPUID_EBX, es) & CPUID_7_EBX_AVX2) == 0:
        return False
    if (_cpuid_reg(CPUID_EXT_FEATURES_LEAF, CPUID_ECX, es) & ext) != ext:
        return False
    state = u64(XCR0_SSE | XCR0_AVX)
    return (xgetbv(XCR0) & state) == state


@function(small=True)
def wide_choose(path: u32, sev_status: u32) -> u32:
    """The path for a new session, given the last one and MSR_AMD64_SEV as the driver read it:
    the baseline for good once a wide instruction faulted, else the wide kernels if the CPU
    says it has them now."""
    if path == WIDE_REFUSED:
        return WIDE_REFUSED
    es = (sev_status & MSR_AMD64_SEV_ES_ENABLED) != 0
    return WIDE_ON if cpu_wide_ok(es) else WIDE_OFF


@function(small=True)
def wide_refuse(path: Ptr[u32]) -> None:
    """For the #UD handler (vcpu.mh_fault): the CPU refused an instruction CPUID promised, so
    later sessions use the baseline whatever CPUID says."""
    path[0] = WIDE_REFUSED


# -- the kernels -------------------------------------------------------------------------------


@function(features=WIDE, noinline=True)
def wide_keys(k: Ptr[SivKeys]) -> None:
    """The dot powers H^9..H^16 (h[7..0]) from H^8 and H^1..H^8: eight independent products."""
    for j in range(8):
        x = dot(k.h[8], k.h[15 - j])
        k.h[7 - j] = x
        k.hk[7 - j] = karatsuba_half(x)


@function(features=WIDE)
def _mul2(x: v256, k: Ptr[SivKeys], j: u64, acc: Ptr[v256]) -> None:
    """acc += the unreduced Karatsuba products of blocks 2j, 2j+1 (the lanes of x) with their
    powers h[2j], h[2j+1]: acc[0] lo·lo, acc[2] hi·hi, acc[1] the middle (lo and hi included)."""
    hp = v256_load(addr(k.h[2 * j]))
    acc[0] = acc[0] ^ vpclmulqdq256(x, hp, 0x00)
    acc[2] = acc[2] ^ vpclmulqdq256(x, hp, 0x11)
    acc[1] = acc[1] ^ vpclmulqdq256(vpshufd256(x, 0x4E) ^ x, v256_load(addr(k.hk[2 * j])), 0x00)


@function(features=WIDE)
def _mul8(k: Ptr[SivKeys], acc: Ptr[v256], j: u64, x0: v256, x1: v256, x2: v256,
          x3: v256) -> None:
    """_mul2 of four registers, pairs j..j+3: one half group."""
    _mul2(x0, k, j, acc)
    _mul2(x1, k, j + 1, acc)
    _mul2(x2, k, j + 2, acc)
    _mul2(x3, k, j + 3, acc)


@function(features=WIDE)
def _store4(p: Ptr[u8], y0: v256, y1: v256, y2: v256, y3: v256) -> None:
    v256_store(p, y0)
    v256_store(p + 32, y1)
    v256_store(p + 64, y2)
    v256_store(p + 96, y3)


@function(features=WIDE)
def _fold_reduce(acc: Ptr[v256]) -> v128:
    """The two lanes of the Karatsuba accumulators added, then one reduction."""
    lo = v256_lo(acc[0]) ^ v256_hi(acc[0])
    hi = v256_lo(acc[2]) ^ v256_hi(acc[2])
    return reduce(lo, v256_lo(acc[1]) ^ v256_hi(acc[1]) ^ lo ^ hi, hi)


@function(features=WIDE)
def _zero(acc: Ptr[v256]) -> None:
    z = v256_broadcast(v128_make(0, 0))
    acc[0] = z
    acc[1] = z
    acc[2] = z


@function(features=WIDE, noinline=True)
def copy_wide(k: Ptr[SivKeys], s: v128, buf: Ptr[u8], n: u64, opening: bool) -> v128:
    """The copy passes over the whole 256-byte groups of n, POLYVAL of the plaintext into s, 16
    blocks per reduction. Seal (`opening` False): the bound page is copied to the private
    stage `buf`, masked (ids = block indexes), each block read once and hashed as read (buf may
    be the page). Open's copy-out: the masked scratch `buf` is unmasked into the bound page
    (ids = the addresses stored to) and each block hashed from the register that is stored.
    The page address is re-read from mm4 for every group. The half group without s goes first,
    so its products overlap the previous group's reduction, the chain between groups."""
    acc: Array[v256, 3]
    a = addr(acc[0])
    off: u64 = 0
    while n - off >= GROUP:
        page = Ptr[u8](bound_page()) + off
        _zero(a)
        for i in unroll(2):
            h = 1 - i
            p = page + HALF * h
            q = buf + off + HALF * h
            if opening:
                x0, x1, x2, x3 = mask8_256(v256_load(q), v256_load(q + 32), v256_load(q + 64),
                                           v256_load(q + 96), u64(p))
                _store4(p, x0, x1, x2, x3)
            else:
                x0 = v256_load(p)
                x1 = v256_load(p + 32)
                x2 = v256_load(p + 64)
                x3 = v256_load(p + 96)
                m0, m1, m2, m3 = mask8_256(x0, x1, x2, x3, (off >> 4) + SIV_BLOCKS * h)
                _store4(q, m0, m1, m2, m3)
            sx = v256_make(s, v128_make(0, 0)) if h == 0 else v256_broadcast(v128_make(0, 0))
            _mul8(k, a, u64(4 * h), x0 ^ sx, x1, x2, x3)
        s = _fold_reduce(a)
        off += GROUP
    return s


@function(features=WIDE)
def _absorb_regs(k: Ptr[SivKeys], s: v128, g: Ptr[v256]) -> v128:
    """POLYVAL of one group of plaintext held in g (16 blocks) into s."""
    acc: Array[v256, 3]
    a = addr(acc[0])
    _zero(a)
    _mul8(k, a, 4, g[4], g[5], g[6], g[7])
    _mul8(k, a, 0, g[0] ^ v256_make(s, v128_make(0, 0)), g[1], g[2], g[3])
    return _fold_reduce(a)


@function(features=WIDE, noinline=True)
def ctr_wide(k: Ptr[SivKeys], t: v128, inp: Ptr[u8], out: Ptr[u8], n: u64, s: v128,
             opening: bool) -> v128:
    """CTR over the whole 256-byte groups of n from the tag t: counter blocks are t with bit 127
    set and its first 32 bits + i mod 2^32 (vpaddd on each block's low dword), 16 in flight on
    8 ymm registers to hide VAES's latency.

    Seal (`opening` False): inp is the masked stage, unmasked in registers (ids = block
    indexes) just before the keystream is XORed in; out is the ciphertext; s comes back
    unchanged. Open: inp is the ciphertext; the plaintext is masked into the private scratch
    `out` (ids = the bound page + the group's offset + index, the addresses it is meant for) and
    absorbed into s, which is returned. Stitched: the plaintext of group i waits in `g` and its
    carry-less products are issued during the AES rounds of group i+1, three per round, so the
    carry-less multiplier works while the AES units do; POLYVAL never reads the scratch."""
    st: Array[v256, 8]
    g: Array[v256, 8]
    acc: Array[v256, 3]
    a = addr(acc[0])
    rk = addr(k.enc.rk[0])
    two = v256_broadcast(v128_make(2, 0))
    z = v256_broadcast(v128_make(0, 0))
    c = v256_add32(v256_broadcast(v128_make(v128_lo(t), v128_hi(t) | MSB)),
                   v256_make(v128_make(0, 0), v128_make(1, 0)))
    sx = v256_make(s, v128_make(0, 0))
    _zero(a)
    end = n & ~u64(GROUP - 1)
    off: u64 = 0
    while off < end:
        absorb = opening and off != 0
        k0 = v256_broadcast(rk[0])
        for q in unroll(8):
            st[q] = c ^ k0
            c = v256_add32(c, two)
        for r in range(1, AES256_ROUNDS):
            if absorb and r <= 8:  # pair 8 - r of the previous group; pair 0 takes s
                pair = u64(8 - r)
                _mul2(g[pair] ^ (sx if pair == 0 else z), k, pair, a)
            kr = v256_broadcast(rk[r])
            for q in unroll(8):
                st[q] = vaesenc256(st[q], kr)
        kl = v256_broadcast(rk[AES256_ROUNDS])
        for q in unroll(8):
            st[q] = vaesenclast256(st[q], kl)
        if absorb:
            s = _fold_reduce(a)
            sx = v256_make(s, v128_make(0, 0))
            _zero(a)
        for h in unroll(2):
            p = inp + off + HALF * h
            q = out + off + HALF * h
            if opening:
                for j in unroll(4):
                    g[4 * h + j] = st[4 * h + j] ^ v256_load(p + 32 * j)
                m0, m1, m2, m3 = mask8_256(g[4 * h], g[4 * h + 1], g[4 * h + 2], g[4 * h + 3],
                                           bound_page() + off + HALF * h)
                _store4(q, m0, m1, m2, m3)
            else:
                x0, x1, x2, x3 = mask8_256(v256_load(p), v256_load(p + 32), v256_load(p + 64),
                                           v256_load(p + 96), (off >> 4) + SIV_BLOCKS * h)
                _store4(q, st[4 * h] ^ x0, st[4 * h + 1] ^ x1, st[4 * h + 2] ^ x2,
                        st[4 * h + 3] ^ x3)
        off += GROUP
    if opening and end != 0:  # the last group's products, with no AES left to hide them
        s = _absorb_regs(k, s, addr(g[0]))
    return s
