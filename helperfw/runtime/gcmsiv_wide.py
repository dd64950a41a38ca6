"""AES-256-GCM-SIV's bulk on 256-bit registers (VAES, VPCLMULQDQ, AVX2), and the choice of path.

Why: AES rounds are most of a page's cost, and VAES runs two blocks per instruction on ymm
registers (the issue-8 probe measured 1.96-2.12x the AES-NI rate); VPCLMULQDQ does the same for
POLYVAL's carry-less products. The baseline (gcmsiv.py) stays the only path on a CPU without
them and under emulation (unicorn and QEMU TCG's default model have no AVX), and it finishes
whatever is left after the whole 256-byte groups the kernels here take: tails, the AAD, partial
blocks.

The kernels are `@function(features=WIDE)`: only they may use v256 (the front end refuses it
elsewhere), LLVM never inlines them into 128-bit code, and they run only for a record whose
`SivKeys.wide` was set because the session chose them (`wide_choose`, once per session, in the
mirror: the mirror vCPU's CPUID and XCR0 are whatever the host set, not the guest's).

A host controls CPUID (SEV, SEV-ES without SNP): one that claims VAES on a CPU without it makes
the first wide instruction raise #UD. The #UD handler (SEV-ES work, issue 18) ends the command
with E_CPU and calls `wide_refuse`, so every later session takes the baseline whatever CPUID says.
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    const,
    cpuid,
    function,
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
from .gcmsiv_keys import MSB, WIDE_BLOCKS, SivKeys, dot, karatsuba_half, reduce
from .platform import (
    CPUID_1_ECX_AVX,
    CPUID_1_ECX_OSXSAVE,
    CPUID_7_EBX_AVX2,
    CPUID_7_ECX_VAES,
    CPUID_7_ECX_VPCLMULQDQ,
    CPUID_EXT_FEATURES_LEAF,
    CPUID_FEATURES_LEAF,
    CPUID_STD_MAX_LEAF,
    XCR0,
    XCR0_AVX,
    XCR0_SSE,
)

WIDE = "+avx2,+vaes,+vpclmulqdq"
GROUP = WIDE_BLOCKS * 16  # bytes per kernel iteration: 8 ymm registers of two blocks

# A session's path (HelperCtx.wide): chosen at *_BEGIN by wide_choose.
WIDE_OFF = const(u32, 0)  # the baseline: 128-bit AES-NI and PCLMULQDQ
WIDE_ON = const(u32, 1)  # whole 256-byte groups in the kernels below
WIDE_REFUSED = const(u32, 2)  # a wide instruction faulted (a lying CPUID): the baseline, for good


# -- the choice ------------------------------------------------------------------------------


@function(small=True)
def cpu_wide_ok() -> bool:
    """The CPU and the OS state allow the kernels: CPUID.1:ECX.OSXSAVE (XGETBV is then allowed)
    and AVX, CPUID.7.0:EBX.AVX2, ECX.VAES and VPCLMULQDQ, and XCR0 with the SSE and AVX state
    enabled (without it every VEX.256 instruction is #UD)."""
    max_leaf, _b, _c, _d = cpuid(CPUID_STD_MAX_LEAF, 0)
    if max_leaf < CPUID_EXT_FEATURES_LEAF:
        return False
    _a1, _b1, c1, _d1 = cpuid(CPUID_FEATURES_LEAF, 0)
    both = u32(CPUID_1_ECX_OSXSAVE | CPUID_1_ECX_AVX)
    if (c1 & both) != both:
        return False
    _a7, b7, c7, _d7 = cpuid(CPUID_EXT_FEATURES_LEAF, 0)
    ext = u32(CPUID_7_ECX_VAES | CPUID_7_ECX_VPCLMULQDQ)
    if (b7 & CPUID_7_EBX_AVX2) == 0 or (c7 & ext) != ext:
        return False
    state = u64(XCR0_SSE | XCR0_AVX)
    return (xgetbv(XCR0) & state) == state


@function(small=True)
def wide_choose(path: u32) -> u32:
    """The path for a new session, given the last one: the baseline for good once a wide
    instruction faulted, else the wide kernels if the CPU says it has them now."""
    if path == WIDE_REFUSED:
        return WIDE_REFUSED
    return WIDE_ON if cpu_wide_ok() else WIDE_OFF


@function(small=True)
def wide_refuse(path: Ptr[u32]) -> None:
    """For the #UD handler: the CPU refused a wide instruction CPUID promised, so later sessions
    use the baseline whatever CPUID says (the command that faulted ends with E_CPU)."""
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


@function(features=WIDE, noinline=True)
def absorb_wide(k: Ptr[SivKeys], s: v128, p: Ptr[u8], stage: Ptr[u8], n: u64) -> v128:
    """POLYVAL of the whole 256-byte groups at p into s, each copied to stage unless it is null:
    16 blocks per reduction. The blocks that do not depend on s are multiplied first, while the
    previous group's reduction, the chain from one group to the next, completes."""
    acc: Array[v256, 3]
    a = addr(acc[0])
    z = v256_broadcast(v128_make(0, 0))
    off: u64 = 0
    while n - off >= GROUP:
        acc[0] = z
        acc[1] = z
        acc[2] = z
        for j in unroll(1, WIDE_BLOCKS // 2):
            x = v256_load(p + off + 32 * j)
            if stage != 0:
                v256_store(stage + off + 32 * j, x)
            _mul2(x, k, j, a)
        x = v256_load(p + off)
        if stage != 0:
            v256_store(stage + off, x)
        _mul2(x ^ v256_make(s, v128_make(0, 0)), k, 0, a)
        s = _fold_reduce(a)
        off += GROUP
    return s


@function(features=WIDE)
def _fold_reduce(acc: Ptr[v256]) -> v128:
    """The two lanes of the Karatsuba accumulators added, then one reduction."""
    lo = v256_lo(acc[0]) ^ v256_hi(acc[0])
    hi = v256_lo(acc[2]) ^ v256_hi(acc[2])
    return reduce(lo, v256_lo(acc[1]) ^ v256_hi(acc[1]) ^ lo ^ hi, hi)


@function(features=WIDE, noinline=True)
def ctr_wide(k: Ptr[SivKeys], t: v128, inp: Ptr[u8], out: Ptr[u8], n: u64, s: v128,
             hash_out: bool) -> v128:
    """out = inp ^ the keystream from tag t over the whole 256-byte groups of n: counter blocks
    are t with bit 127 set and its first 32 bits + i mod 2^32 (vpaddd on each block's low
    dword), 16 in flight on 8 ymm registers to hide VAES's latency.

    With `hash_out` (open), the output is also absorbed into s, which is returned, stitched:
    during the AES rounds of group i, the carry-less products of group i-1 (read back from out,
    the caller's private scratch) are issued, three per round, so the out-of-order core keeps
    the carry-less multiplier busy while the AES units work. Without it (seal's second pass),
    s comes back unchanged."""
    st: Array[v256, 8]
    acc: Array[v256, 3]
    a = addr(acc[0])
    z = v256_broadcast(v128_make(0, 0))
    rk = addr(k.enc.rk[0])
    two = v256_broadcast(v128_make(2, 0))
    c = v256_add32(v256_broadcast(v128_make(v128_lo(t), v128_hi(t) | MSB)),
                   v256_make(v128_make(0, 0), v128_make(1, 0)))
    sx = v256_make(s, v128_make(0, 0))
    acc[0] = z
    acc[1] = z
    acc[2] = z
    end = n & ~u64(GROUP - 1)
    off: u64 = 0
    while off < end:
        absorb = hash_out and off != 0
        k0 = v256_broadcast(rk[0])
        for q in unroll(8):
            st[q] = c ^ k0
            c = v256_add32(c, two)
        for r in range(1, AES256_ROUNDS):
            if absorb and r <= 8:  # pair 8 - r of the previous group; pair 0 takes s
                j = u64(8 - r)
                x = v256_load(out + off - GROUP + 32 * j)
                _mul2(x ^ (sx if j == 0 else z), k, j, a)
            kr = v256_broadcast(rk[r])
            for q in unroll(8):
                st[q] = vaesenc256(st[q], kr)
        kl = v256_broadcast(rk[AES256_ROUNDS])
        for q in unroll(8):
            v256_store(out + off + 32 * q,
                       vaesenclast256(st[q], kl) ^ v256_load(inp + off + 32 * q))
        if absorb:
            s = _fold_reduce(a)
            sx = v256_make(s, v128_make(0, 0))
            acc[0] = z
            acc[1] = z
            acc[2] = z
        off += GROUP
    if hash_out and end != 0:  # the last group's products, with no AES left to hide them
        s = absorb_wide(k, s, out + end - GROUP, Ptr[u8](0), GROUP)
    return s
