"""Differential tests: every DSL function here runs three ways and all three must agree.

(a) the reference interpreter (helperfw/interp.py), (b) the compiled image natively on the host
CPU (helperfw/native.py), (c) the same image under unicorn (helperfw/ucrun.py). The wide
(AVX2/VAES/VPCLMULQDQ) functions run two ways, interpreter and native, since unicorn has no AVX;
natively only where the CPU has the features (a clear skip elsewhere). Each function gets
N_INPUTS seeded random inputs (edge values mixed in); results, the bytes of every argument buffer
and every static must match after each call. The seed is printed; replay a failure with
`DSL_DIFF_SEED=<seed> pytest tests/test_dsl_differential.py`.

The interpreter's AES and carry-less multiply are checked against `cryptography` too, so the
reference is not merely agreeing with itself.
"""

# DSL bodies are not Python semantics: `buf: Array[u32, 16]` declares a local with no value, and
# `COUNTER = COUNTER + 1` stores to the static; pyflakes sees undefined/unbound names in both.
# ruff: noqa: F821, F823

from __future__ import annotations

import ctypes
import importlib.util
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from helperfw import (
    Array,
    Function,
    Ptr,
    Type,
    addr,
    aesenc,
    aesenclast,
    aeskeygenassist,
    bool_,
    const,
    cpuid,
    emms,
    function,
    i32,
    i64,
    inb,
    mask8,
    mask8_256,
    mask_block,
    mask_key,
    mask_next,
    offsetof,
    outb,
    pclmulqdq,
    pshufb,
    pshufd,
    sizeof,
    static,
    struct,
    u8,
    u16,
    u32,
    u64,
    unroll,
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
    v256,
    v256_add32,
    v256_broadcast,
    v256_bsl,
    v256_bsr,
    v256_hi,
    v256_lo,
    v256_load,
    v256_make,
    v256_shl64,
    v256_shr64,
    v256_store,
    vaesenc256,
    vaesenclast256,
    vload,
    vpclmulqdq256,
    vpshufb256,
    vpshufd256,
    vstore,
)
from helperfw import interp as ref
from helperfw.codegen.pipeline import build
from helperfw.interp import Env, Interpreter, MmxMasks
from helperfw.native import NativeImage
from helperfw.types import INT_TYPES, IntType
from helperfw.ucrun import UcRunner
from tests.host_cpu import HAS_WIDE, needs_wide

SEED = int(os.environ.get("DSL_DIFF_SEED", "20240611"))
N_INPUTS = int(os.environ.get("DSL_DIFF_N", "300"))
BUF_BASE = 0x1000_0000  # interpreter and unicorn map argument buffer i at BUF_BASE + i*BUF_STRIDE
BUF_STRIDE = 0x10000
BUF_SIZE = 0x1000
N_BUFS = 3

# ---------------------------------------------------------------------------------------------
# DSL under test


@struct
class Entry:
    ram_addr: u64
    flags: u32
    status: i32


@struct
class Box:
    count: u32
    pad: u16
    entries: Array[Entry, 8]


@struct(packed=True)
class Packed:
    a: u8
    b: u32
    c: u16
    d: u64


SLOTS = const(u32, 8)
COUNTER = static(u64)
PICKS = static(u64)
HIST = static(Array[u64, 8])
TABLE = static(Array[u8, 16], bytes((i * 37 + 11) & 0xFF for i in range(16)),
               readonly=True)
STATICS = (COUNTER, PICKS, HIST, TABLE)


@function
def mix(x: u64, y: u64) -> u64:
    return (x ^ (y >> 3)) * 0x100000001B3 + y


@function
def gcd(a: u64, b: u64) -> u64:
    if b == 0:
        return a
    return gcd(b, a % b)


@function
def clamp_i32(v: i64) -> i32:
    if v > 0x7FFFFFFF:
        return 0x7FFFFFFF
    if v < -0x80000000:
        return -0x80000000
    return i32(v)


@function(abi="c")
def calls(a: u64, b: u64) -> u64:
    g = gcd(a & 0xFFFF, b & 0xFFF)
    c = clamp_i32(i64(a) - i64(b >> 1))
    return mix(mix(a, g), u64(c)) ^ u64(i64(c))


@function(abi="c")
def logic(a: i32, b: u32, c: i64) -> u64:
    r: u64 = 0
    if a < 0 and b > 100:
        r |= 1
    if a > -5 or c < 0:
        r |= 2
    if b != u32(a):
        r |= 4
    t = a >= -1000 and (c != 0 or b <= 7)
    if t:
        r |= 8
    f = bool_(b & 3) ^ (a < 0)
    if f:
        r |= 16
    r += u64(f) << 5
    x = i64(a) if c > 0 else c
    r += u64(x) * 3
    r += 7 if a == 0 else 9
    if u64(c) > u64(i64(a)):
        r ^= 0x400
    if min(a, -7) == max(i32(b), a):
        r ^= 0x800
    return r


@function(abi="c")
def loops(n: u32, k: u32) -> u64:
    acc: u64 = 0
    i: u32 = 0
    lim = n & 511
    while i < lim:
        i += 1
        if i % 3 == 0:
            continue
        if acc > 5000 + u64(k):
            break
        acc += u64(i * k)
    for j in range(i64(10), -7, -3):
        acc = acc * 3 + u64(j)
    for m in range(n % 17):
        m = m + 100  # the hidden counter, not m, drives the loop
        acc ^= u64(m)
        if m == 110:
            break
    total: u64 = 0
    for a in range(4):
        for b in range(a, 4):
            if b == 2:
                continue
            total += a * 4 + b
    while True:
        total += 1
        if total % 7 == 0:
            break
    for q in range(u8(k), u8(250), 7):  # u8 counter: may wrap past 250 only if stepping over
        total += u64(q)
    return acc + total


@function(abi="c")
def boxes(mb: Ptr[Box], k: u64) -> i32:
    n = min(mb.count, SLOTS)
    bad: i32 = 0
    for i in range(n):
        e = addr(mb.entries[i])
        if e.ram_addr & 0xFFF != 0:
            mb.entries[i].status = -22
            bad -= 1
            continue
        e.status = i32(e.flags) + 1
        e.flags = e.flags | 0x80000000
        mb.entries[i].ram_addr = mix(e.ram_addr, k)
    last = Ptr[Entry](u64(addr(mb.entries[0])) + u64(sizeof(Entry)) * 3)
    last.flags ^= 0x55
    p = addr(mb.entries[7])
    q = p - u32(2)
    q.status = bad
    (p - 1).flags = u32(k)
    x = vload(addr(mb.entries[1].flags))
    vstore(addr(mb.entries[2].flags), x + 1)
    pk = Ptr[u8](mb)
    pk[offsetof(Box, "pad") + 1] = u8(k)
    return bad + i32(mb.count & 0xF)


@function(abi="c")
def packed(p: Ptr[Packed], n: u64) -> u64:
    p.b = p.b + u32(n)
    p.d ^= u64(p.a) << 56
    p[1].c = p.c * 3
    return u64(p.b) + u64(p[1].c) + sizeof(Packed)


@function(abi="c")
def local_arrays(p: Ptr[u32], n: u64) -> u64:
    buf: Array[u32, 16]
    m = min(n, 16)
    for i in range(m):
        buf[i] = p[i]
    for i in range(1, m):  # insertion sort
        v = buf[i]
        j = i
        while j > 0 and buf[j - 1] > v:
            buf[j] = buf[j - 1]
            j -= 1
        buf[j] = v
    e: Entry
    e.flags = 0
    s: u64 = 0
    for i in range(m):
        p[i] = buf[i]
        s = s * 31 + u64(buf[i])
        e.flags ^= buf[i]
    ep = addr(e)
    ep.status = -1
    x: u64 = 5
    xp = addr(x)
    xp[0] = xp[0] + s
    return x + u64(e.flags) + u64(u32(e.status))


@function(abi="c")
def statics(x: u64) -> u64:
    COUNTER = COUNTER + 1
    HIST[x & 7] += x
    acc: u64 = 0
    for i in range(8):
        acc ^= HIST[i] + u64(TABLE[(x + i) & 15])
    return acc + COUNTER


@function
def next_pick() -> u32:
    PICKS += 1
    return u32(PICKS & 3)


@function(abi="c")
def eval_once(mb: Ptr[Box], v: u32) -> u64:
    mb.entries[next_pick()].flags = v  # the index expression runs exactly once
    mb.entries[next_pick()].status += 1
    return PICKS


@function(abi="c")
def vec(p: Ptr[u8], out: Ptr[u8]) -> u64:
    a = v128_load(p)
    b = v128_load(p + 16)
    o = Ptr[v128](out)
    o[0] = aesenc(a, b)
    o[1] = aesenclast(a, b)
    o[2] = aeskeygenassist(a, 0x1B)
    o[3] = aeskeygenassist(b, 0)
    o[4] = pclmulqdq(a, b, 0x00)
    o[5] = pclmulqdq(a, b, 0x11)
    o[6] = pclmulqdq(a, b, 0x01)
    o[7] = pclmulqdq(a, b, 0x10)
    o[8] = pshufb(a, b)
    o[9] = pshufd(a, 0x1B)
    o[10] = v128_shl64(a, 13)
    o[11] = v128_shr64(b, 63)
    o[12] = v128_bsl(a, 3)
    o[13] = v128_bsr(b, 16) | v128_bsr(a, 5)
    o[14] = (a ^ b) & ~(a | v128_bsl(b, 1))
    v128_store(out + 240, v128_make(v128_hi(a), v128_lo(b)))
    return v128_lo(o[2]) ^ v128_hi(o[5])


@function
def ks_a(t1: v128, assist: v128) -> v128:
    """AES-256 key schedule, even step: fold t1's words and add SubWord(RotWord(w)) ^ rcon."""
    t2 = pshufd(assist, 0xFF)
    t4 = v128_bsl(t1, 4)
    t1 = t1 ^ t4
    t4 = v128_bsl(t4, 4)
    t1 = t1 ^ t4
    t4 = v128_bsl(t4, 4)
    return t1 ^ t4 ^ t2


@function
def ks_b(t1: v128, t3: v128) -> v128:
    """AES-256 key schedule, odd step: SubWord without rotation or rcon."""
    t2 = pshufd(aeskeygenassist(t1, 0), 0xAA)
    t4 = v128_bsl(t3, 4)
    t3 = t3 ^ t4
    t4 = v128_bsl(t4, 4)
    t3 = t3 ^ t4
    t4 = v128_bsl(t4, 4)
    return t3 ^ t4 ^ t2


@function
def aes256_schedule(key: Ptr[u8], rk: Ptr[v128]) -> None:
    t1 = v128_load(key)
    t3 = v128_load(key + 16)
    rk[0] = t1
    rk[1] = t3
    t1 = ks_a(t1, aeskeygenassist(t3, 0x01))
    rk[2] = t1
    t3 = ks_b(t1, t3)
    rk[3] = t3
    t1 = ks_a(t1, aeskeygenassist(t3, 0x02))
    rk[4] = t1
    t3 = ks_b(t1, t3)
    rk[5] = t3
    t1 = ks_a(t1, aeskeygenassist(t3, 0x04))
    rk[6] = t1
    t3 = ks_b(t1, t3)
    rk[7] = t3
    t1 = ks_a(t1, aeskeygenassist(t3, 0x08))
    rk[8] = t1
    t3 = ks_b(t1, t3)
    rk[9] = t3
    t1 = ks_a(t1, aeskeygenassist(t3, 0x10))
    rk[10] = t1
    t3 = ks_b(t1, t3)
    rk[11] = t3
    t1 = ks_a(t1, aeskeygenassist(t3, 0x20))
    rk[12] = t1
    t3 = ks_b(t1, t3)
    rk[13] = t3
    rk[14] = ks_a(t1, aeskeygenassist(t3, 0x40))


@function(abi="c")
def aes256(key: Ptr[u8], blk: Ptr[u8], out: Ptr[u8]) -> u64:
    rk: Array[v128, 15]
    aes256_schedule(key, addr(rk[0]))
    s = v128_load(blk) ^ rk[0]
    for r in range(1, 14):
        s = aesenc(s, rk[r])
    s = aesenclast(s, rk[14])
    v128_store(out, s)
    return v128_lo(s)


@function(abi="c")
def unrolled(p: Ptr[u8], k: u64) -> u64:
    """unroll(...) expanded at compile time: constant indices, a local declared in every copy,
    a real loop (with break) inside a copy, nested and descending unrolls, return in a copy."""
    rk: Array[v128, 15]
    for r in unroll(15):
        rk[r] = v128_make(k * (r + 1), k ^ r)
    s = v128_load(p)
    for r in unroll(1, 14):
        s = aesenc(s, rk[r])
    s = aesenclast(s, rk[14])
    acc: u64 = 0
    for j in unroll(8):
        t: u64 = u64(p[j + 16]) << (8 * j)
        acc ^= t
        for i in range(3):
            if acc & 1 == 0:
                break
            acc += u64(i)
    for j in unroll(6, 0, -2):
        for q in unroll(2):
            acc = acc * 3 + j + q
    for j in unroll(4):
        if acc & 0xF == j:
            return acc ^ v128_lo(s)
    return acc + v128_hi(s)


@function(abi="c")
def platform(x: u32) -> u64:
    a, b, c, d = cpuid(x, x >> 4)
    outb(0x402, u8(a ^ d))
    r = u64(inb(0x60))
    return (u64(b) << 32 | u64(c)) + r


WIDE = "+avx2,+vaes,+vpclmulqdq"


@function(features=WIDE)
def wide_mix(a: v256, b: v256) -> v256:
    """A wide value passed and returned between two wide functions."""
    return vpshufd256(a, 0x4E) ^ v256_add32(a, b)


@function(abi="c", features=WIDE)
def wide(p: Ptr[u8], out: Ptr[u8]) -> u64:
    """Every 256-bit intrinsic once, on two random 32-byte values; results to out[0..10]."""
    a = v256_load(p)
    b = v256_load(p + 32)
    o = Ptr[v256](out)
    o[0] = vaesenc256(a, b)
    o[1] = vaesenclast256(a, b)
    for j in unroll(4):
        o[2 + j] = vpclmulqdq256(a, b, (j & 1) | ((j >> 1) << 4))
    o[6] = vpshufb256(a, b) ^ wide_mix(a, b)
    o[7] = v256_bsl(a, 3) ^ v256_bsr(b, 16) ^ v256_bsr(a, 5)
    o[8] = v256_shl64(a, 7) | v256_shr64(b, 63)
    o[9] = v256_make(v256_hi(a), v256_lo(b)) & ~v256_broadcast(v256_lo(a))
    v256_store(out + 320, v256_add32(a, v256_broadcast(v128_make(0xFFFFFFFF, 1))))
    return v128_lo(v256_hi(a)) ^ v128_hi(v256_lo(o[3]))


@function(abi="c", features=WIDE)
def wide_aes(key: Ptr[u8], blk: Ptr[u8], out: Ptr[u8]) -> u64:
    """AES-256 of two blocks at once, one per lane, with the key schedule of `aes256` below
    (expanded by the 128-bit code, which LLVM may inline here: it needs no more features)."""
    rk: Array[v128, 15]
    aes256_schedule(key, addr(rk[0]))
    s = v256_load(blk) ^ v256_broadcast(rk[0])
    for r in range(1, 14):
        s = vaesenc256(s, v256_broadcast(rk[r]))
    s = vaesenclast256(s, v256_broadcast(rk[14]))
    v256_store(out, s)
    return v128_lo(v256_lo(s)) ^ v128_lo(v256_hi(s))



@function(abi="c", features=WIDE)
def masks(key: Ptr[u64], p: Ptr[u8], out: Ptr[u8], serial: u64, first: u64) -> u64:
    """The staging masks three ways on the same 8 blocks at p, ids first..first+7, after
    mask_key and `serial` mask_next: mask_block each (out[0:128]), mask8 (out[128:256]),
    mask8_256 on them two per ymm (out[256:384])."""
    mask_key(key[0], key[1])
    for i in range(serial):
        mask_next()
    for j in range(8):
        v128_store(out + 16 * j, mask_block(v128_load(p + 16 * j), first + u64(j)))
    m0, m1, m2, m3, m4, m5, m6, m7 = mask8(
        v128_load(p), v128_load(p + 16), v128_load(p + 32), v128_load(p + 48),
        v128_load(p + 64), v128_load(p + 80), v128_load(p + 96), v128_load(p + 112), first)
    o = Ptr[v128](out + 128)
    o[0] = m0
    o[1] = m1
    o[2] = m2
    o[3] = m3
    o[4] = m4
    o[5] = m5
    o[6] = m6
    o[7] = m7
    y0, y1, y2, y3 = mask8_256(v256_load(p), v256_load(p + 32), v256_load(p + 64),
                               v256_load(p + 96), first)
    w = Ptr[v256](out + 256)
    w[0] = y0
    w[1] = y1
    w[2] = y2
    w[3] = y3
    emms()
    return 0

# Arithmetic of every integer type, from one template (a DSL function's source must be a file).
ARITH_TEMPLATE = '''
from helperfw import *


@function(abi="c")
def arith_{T}(a: {T}, b: {T}, s: u8, k: {T}) -> {T}:
    r: {T} = a + b * k - (a ^ 5)
    r ^= a - b
    if b != 0{GUARD}:
        r += a // b
        r ^= a % b
    r += a << s
    r ^= a >> s
    r += b >> 33
    r ^= k << 35
    r += -a
    r ^= ~b
    if a < b:
        r += 1
    if a >= k:
        r ^= 0x3C
    r += min(a, b) - max(b, k)
    r += {T}((u64(a) * 0x9E3779B97F4A7C15) >> 7)
    r ^= {T}(i8(b)) + {T}(u16(k)) + {T}(s)
    r += a * a // (k | 1)  # a*a is never MIN (an odd power of two is no square mod 2^n)
    return r
'''


def _arith_functions() -> dict[str, Function]:
    src = "".join(
        ARITH_TEMPLATE.split("\n\n\n")[1].format(
            T=t.name, GUARD=f" and (a != {t.min} or b != -1)" if t.signed else "")
        + "\n\n" for t in INT_TYPES.values())
    path = os.path.join(tempfile.mkdtemp(prefix="dsl_arith_"), "dsl_arith_gen.py")
    with open(path, "w") as f:
        f.write("from helperfw import *  # noqa: F403\n\n\n" + src)
    spec = importlib.util.spec_from_file_location("dsl_arith_gen", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dsl_arith_gen"] = mod
    spec.loader.exec_module(mod)
    return {t.name: getattr(mod, f"arith_{t.name}") for t in INT_TYPES.values()}


ARITH = _arith_functions()

# ---------------------------------------------------------------------------------------------
# inputs


def rand_int(rng: random.Random, t: IntType) -> int:
    """Edge values a third of the time, else uniform over the type."""
    if rng.random() < 0.35:
        return t.wrap(rng.choice([0, 1, 2, 3, -1, -2, t.min, t.max, t.min + 1, t.max - 1,
                                  1 << (t.bits - 1), 7, 8, 63, 64, 65]))
    return t.wrap(rng.getrandbits(t.bits))


@dataclass
class Buf:
    """An argument that is a pointer to argument buffer `index`."""

    index: int


@dataclass
class Case:
    fn: Function
    ret: Type
    gen: Callable[[random.Random], tuple[list, list[bytes]]]
    native: bool = True  # False: needs the platform Env (cpuid, in/out), not the host's
    n: int = N_INPUTS
    extra: dict = field(default_factory=dict)


def _arith_gen(t: IntType):
    def gen(rng: random.Random):
        return [rand_int(rng, t), rand_int(rng, t), rng.getrandbits(8), rand_int(rng, t)], []
    return gen


def _box_bytes(rng: random.Random) -> bytes:
    entries = [{"ram_addr": rng.getrandbits(64) & (~0xFFF if rng.random() < 0.5 else ~0),
                    "flags": rng.getrandbits(32), "status": rand_int(rng, i32)} for _ in range(8)]
    return Box.build(count=rng.choice([0, 1, 3, 8, 9, rng.getrandbits(32)]), pad=0,
                     entries=entries)


CASES = [
    *(Case(f, t, _arith_gen(t)) for t, f in ((INT_TYPES[n], f) for n, f in ARITH.items())),
    Case(calls, u64, lambda r: ([rand_int(r, u64), rand_int(r, u64)], [])),
    Case(logic, u64, lambda r: ([rand_int(r, i32), rand_int(r, u32), rand_int(r, i64)], [])),
    Case(loops, u64, lambda r: ([rand_int(r, u32), r.choice([0, 1, 5, r.getrandbits(8),
                                                              rand_int(r, u32)])], [])),
    Case(boxes, i32, lambda r: ([Buf(0), rand_int(r, u64)], [_box_bytes(r)])),
    Case(packed, u64, lambda r: ([Buf(0), rand_int(r, u64)], [r.randbytes(40)])),
    Case(local_arrays, u64, lambda r: ([Buf(0), r.choice([0, 1, 2, 15, 16, 17, r.getrandbits(64)])],
                                       [r.randbytes(64)])),
    Case(statics, u64, lambda r: ([rand_int(r, u64)], [])),
    Case(eval_once, u64, lambda r: ([Buf(0), rand_int(r, u32)], [_box_bytes(r)])),
    Case(vec, u64, lambda r: ([Buf(0), Buf(1)], [r.randbytes(32), bytes(256)])),
    Case(aes256, u64, lambda r: ([Buf(0), Buf(1), Buf(2)], [r.randbytes(32), r.randbytes(16),
                                                           bytes(16)]), n=60),
    Case(unrolled, u64, lambda r: ([Buf(0), rand_int(r, u64)], [r.randbytes(32)])),
    Case(platform, u64, lambda r: ([rand_int(r, u32)], []), native=False),
]


# interpreter and native only (unicorn has no AVX), in an image of their own
WIDE_CASES = [
    Case(wide, u64, lambda r: ([Buf(0), Buf(1)], [r.randbytes(64), bytes(352)]), n=120),
    Case(wide_aes, u64, lambda r: ([Buf(0), Buf(1), Buf(2)], [r.randbytes(32), r.randbytes(32),
                                                             bytes(32)]), n=20),
]


class PlatformModel(Env):
    """A deterministic platform for cpuid/in/out: the same answers for interpreter and unicorn."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        h = (leaf * 0x9E3779B1 + subleaf * 0x85EBCA77) & 0xFFFFFFFF
        return (h, h ^ 0xDEADBEEF, (h * 3) & 0xFFFFFFFF, leaf ^ subleaf)

    def outb(self, port: int, value: int) -> None:
        self.log.append(("out", port, value))

    def inb(self, port: int) -> int:
        self.log.append(("in", port))
        return (port * 7 + len(self.log)) & 0xFF


# ---------------------------------------------------------------------------------------------
# the three runners


@pytest.fixture(scope="module")
def runners():
    print(f"\nDSL differential seed: {SEED} (replay: DSL_DIFF_SEED={SEED} pytest "
          f"tests/test_dsl_differential.py)")
    return make_runners([c.fn for c in CASES])


def make_runners(fns: list[Function]) -> dict:
    """The three runners over one image of `fns`, with argument buffers mapped in each."""
    image = build(fns).image
    native = NativeImage(image)
    nbufs = [(ctypes.c_uint8 * BUF_SIZE)() for _ in range(N_BUFS)]
    uc_env, it_env = PlatformModel(), PlatformModel()
    ucr = UcRunner(image, env=uc_env)
    interp = Interpreter(env=it_env)
    ibufs = []
    for i in range(N_BUFS):
        ucr.map(BUF_BASE + i * BUF_STRIDE, BUF_SIZE)
        ibufs.append(interp.memory.map(BUF_BASE + i * BUF_STRIDE, bytearray(BUF_SIZE)))
    return {"image": image, "native": native, "nbufs": nbufs, "uc": ucr, "uc_env": uc_env,
                "interp": interp, "it_env": it_env, "ibufs": ibufs}


def _statics(R: dict) -> list[tuple[str, bytes, bytes, bytes]]:
    out = []
    for s in STATICS:
        if s.name is None or s.name not in R["image"].symbols:
            continue  # never referenced, or folded away by LLVM (a readonly table)
        n = s.type.size
        nat = ctypes.string_at(R["native"].address(s.name), n)
        out.append((s.name, R["interp"].read_static(s), nat,
                    R["uc"].read(R["uc"].address(s.name), n)))
    return out


def run_case(R: dict, case: Case, rng: random.Random) -> None:
    mask = case.ret.mask if isinstance(case.ret, IntType) else 1
    for k in range(case.n):
        args, bufs = case.gen(rng)
        if case.native:
            for b, nb in zip(bufs, R["nbufs"]):
                ctypes.memmove(nb, b, len(b))
        for i, b in enumerate(bufs):
            R["ibufs"][i][: len(b)] = b
            R["uc"].write(BUF_BASE + i * BUF_STRIDE, b)

        def actual(a, base):  # a Buf becomes that runner's buffer address
            return base(a.index) if isinstance(a, Buf) else a & 0xFFFFFFFFFFFFFFFF

        ia = [actual(a, lambda i: BUF_BASE + i * BUF_STRIDE) for a in args]
        what = f"{case.fn.name}{tuple(args)} (seed {SEED}, input #{k})"
        got_i = R["interp"].call(case.fn, *ia) & mask
        got_u = R["uc"].call(case.fn.name, *ia) & mask
        assert got_u == got_i, f"unicorn {got_u:#x} != interp {got_i:#x}: {what}"
        if case.native:
            na = [actual(a, lambda i: ctypes.addressof(R["nbufs"][i])) for a in args]
            got_n = R["native"].call(case.fn.name, *na) & mask
            assert got_n == got_i, f"native {got_n:#x} != interp {got_i:#x}: {what}"
        for i, b in enumerate(bufs):
            ib = bytes(R["ibufs"][i][: len(b)])
            assert R["uc"].read(BUF_BASE + i * BUF_STRIDE, len(b)) == ib, f"buffer {i}: {what}"
            if case.native:
                assert bytes(R["nbufs"][i][: len(b)]) == ib, f"native buffer {i}: {what}"
        for name, si, sn, su in _statics(R):
            assert su == si, f"static {name} (unicorn): {what}"
            if case.native:
                assert sn == si, f"static {name} (native): {what}"
    assert R["uc_env"].log == R["it_env"].log


@pytest.mark.parametrize("case", CASES, ids=[c.fn.name for c in CASES])
def test_three_ways_agree(runners, case: Case) -> None:
    rng = random.Random(f"{SEED}:{case.fn.name}")
    run_case(runners, case, rng)


@needs_wide
@pytest.mark.parametrize("case", WIDE_CASES, ids=[c.fn.name for c in WIDE_CASES])
def test_wide_interpreter_and_native_agree(case: Case) -> None:
    """The 256-bit intrinsics: the interpreter's per-lane models against the CPU."""
    image = build([case.fn]).image
    native, interp = NativeImage(image), Interpreter()
    nbufs = [(ctypes.c_uint8 * BUF_SIZE)() for _ in range(N_BUFS)]
    ibufs = [interp.memory.map(BUF_BASE + i * BUF_STRIDE, bytearray(BUF_SIZE))
             for i in range(N_BUFS)]
    rng = random.Random(f"{SEED}:{case.fn.name}")
    for k in range(case.n):
        args, bufs = case.gen(rng)
        for i, b in enumerate(bufs):
            ctypes.memmove(nbufs[i], b, len(b))
            ibufs[i][: len(b)] = b
        what = f"{case.fn.name} (seed {SEED}, input #{k})"
        got_i = interp.call(case.fn, *(BUF_BASE + a.index * BUF_STRIDE for a in args))
        got_n = native.call(case.fn.name, *(ctypes.addressof(nbufs[a.index]) for a in args))
        assert got_n == got_i, f"native {got_n:#x} != interp {got_i:#x}: {what}"
        for i, b in enumerate(bufs):
            assert bytes(nbufs[i][: len(b)]) == bytes(ibufs[i][: len(b)]), f"buffer {i}: {what}"


def test_wide_code_is_wide_and_the_rest_stays_sse() -> None:
    """Without running anything: the wide function selects ymm VAES/VPCLMULQDQ, and a 128-bit
    function in the same module keeps legacy SSE encodings (no AVX state assumed)."""
    from helperfw.codegen import emit

    asm = emit.emit_assembly(emit.optimize(build([wide, vec]).optimized_ir))
    bodies = dict(re.findall(r"^(\w+):\n(.*?)\.Lfunc_end", asm, re.MULTILINE | re.DOTALL))
    assert re.search(r"vaesenc\s+%ymm", bodies["wide"])
    assert re.search(r"vpclmulqdq\s+\$\d+, %ymm", bodies["wide"])
    assert "ymm" not in bodies["vec"] and not re.search(r"\bv(aes|pclmul|pxor|movdq)", bodies["vec"])
    assert re.search(r"\baesenc\s+%xmm", bodies["vec"])


def test_wide_models_are_two_128_bit_instructions() -> None:
    """Each lane of a 256-bit model is the 128-bit model (what VEX.256 promises), and the lanes
    do not mix: checked here without the CPU, on random operands."""
    from helperfw.intrinsics import x86

    rng = random.Random(f"{SEED}:wide-models")
    for _ in range(30):
        a, b, imm = rng.getrandbits(256), rng.getrandbits(256), rng.getrandbits(8)
        (a0, a1), (b0, b1) = x86.lanes(a), x86.lanes(b)
        assert x86.vaesenc256(a, b) == x86.join(ref.aesenc(a0, b0), ref.aesenc(a1, b1))
        assert x86.vaesenclast256(a, b) == x86.join(ref.aesenclast(a0, b0),
                                                    ref.aesenclast(a1, b1))
        assert x86.vpclmulqdq256(a, b, imm) == x86.join(ref.pclmulqdq(a0, b0, imm),
                                                        ref.pclmulqdq(a1, b1, imm))
        assert x86.vpshufd256(a, imm) == x86.join(ref.pshufd(a0, imm), ref.pshufd(a1, imm))
        n = imm % 17
        assert x86.byte_shift256(a, n, True) == x86.join(ref.byte_shift(a0, n, True),
                                                         ref.byte_shift(a1, n, True))
    # vpaddd wraps each dword alone: 0xFFFFFFFF + 1 carries nothing into the next dword
    assert x86.add32(0xFFFFFFFF, 1, 256) == 0
    assert x86.add32(0xFFFFFFFF << 224, 3 << 224, 256) == 2 << 224


# ---------------------------------------------------------------------------------------------
# the reference's crypto is itself checked


def _aes256_ref_model(key: bytes, block: bytes) -> bytes:
    """AES-256 from the interpreter's instruction models, keyed like the Intel white paper."""
    def fold(t: int) -> int:
        t4 = ref.byte_shift(t, 4, True)
        t ^= t4
        t4 = ref.byte_shift(t4, 4, True)
        t ^= t4
        t4 = ref.byte_shift(t4, 4, True)
        return t ^ t4

    t1 = int.from_bytes(key[:16], "little")
    t3 = int.from_bytes(key[16:], "little")
    rks = [t1, t3]
    for i, rcon in enumerate((1, 2, 4, 8, 16, 32, 64)):
        t1 = fold(t1) ^ ref.pshufd(ref.aeskeygenassist(t3, rcon), 0xFF)
        rks.append(t1)
        if i < 6:
            t3 = fold(t3) ^ ref.pshufd(ref.aeskeygenassist(t1, 0), 0xAA)
            rks.append(t3)
    s = int.from_bytes(block, "little") ^ rks[0]
    for rk in rks[1:14]:
        s = ref.aesenc(s, rk)
    return ref.aesenclast(s, rks[14]).to_bytes(16, "little")


def _aes256_ref(key: bytes, block: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(block) + enc.finalize()


def test_interp_aes_matches_cryptography() -> None:
    rng = random.Random(f"{SEED}:aes")
    for _ in range(20):
        key, block = rng.randbytes(32), rng.randbytes(16)
        assert _aes256_ref_model(key, block) == _aes256_ref(key, block)
    # FIPS-197 appendix C.3
    key = bytes(range(32))
    pt = bytes.fromhex("00112233445566778899aabbccddeeff")
    assert _aes256_ref_model(key, pt).hex() == "8ea2b7ca516745bfeafc49904b496089"


def test_dsl_aes256_matches_cryptography(runners) -> None:
    """The DSL AES-256 (compiled and interpreted) is real AES, not just self-consistent."""
    rng = random.Random(f"{SEED}:dsl-aes")
    it = runners["interp"]
    for _ in range(10):
        key, block = rng.randbytes(32), rng.randbytes(16)
        kb, bb, ob = (BUF_BASE + i * BUF_STRIDE for i in range(3))
        for i, b in enumerate((key, block)):
            runners["ibufs"][i][:len(b)] = b
        it.call(aes256, kb, bb, ob)
        want = _aes256_ref(key, block)
        assert bytes(runners["ibufs"][2][:16]) == want
        kn, bn, on = (ctypes.create_string_buffer(b, 32) for b in (key, block, b""))
        runners["native"].call("aes256", *(ctypes.addressof(x) for x in (kn, bn, on)))
        assert on.raw[:16] == want


def test_clmul_matches_schoolbook() -> None:
    """Carry-less multiply against a bit-by-bit polynomial product."""
    rng = random.Random(f"{SEED}:clmul")
    for _ in range(200):
        a, b = rng.getrandbits(64), rng.getrandbits(64)
        want = 0
        for i in range(64):
            for j in range(64):
                if (a >> i) & (b >> j) & 1:
                    want ^= 1 << (i + j)
        assert ref.clmul64(a, b) == want


def test_wide_masks_are_the_baselines() -> None:
    """mask8_256 (the wide path's staging masks) gives, block for block, what mask8 and
    mask_block give and what x86.mask models (the interpreter's MmxMasks): so either path can
    unmask the other's stage or scratch. The interpreter runs everywhere, natively where the CPU
    has VAES; ids cross 2^64 (they wrap) and serials 1..3."""
    rng = random.Random(f"{SEED}:masks")
    native = NativeImage(build([masks]).image) if HAS_WIDE else None
    for k in range(12):
        key = [rng.getrandbits(64), rng.getrandbits(64)]
        data = rng.randbytes(128)
        serial = 1 + k % 3
        first = rng.choice([rng.getrandbits(64), (1 << 64) - 1 - rng.randrange(8),
                            rng.getrandbits(12) << 4])
        m = [ref.aesenc(((first + j) % (1 << 64) | (serial << 64)) ^ (key[0] | key[1] << 64),
                        key[0] | key[1] << 64).to_bytes(16, "little") for j in range(8)]
        want = bytes(b ^ m[i >> 4][i & 15] for i, b in enumerate(data)) * 3
        it = Interpreter(env=MmxMasks())
        it.memory.map(BUF_BASE, bytearray(16 + 128 + 384))
        it.memory.write(BUF_BASE, b"".join(x.to_bytes(8, "little") for x in key) + data)
        it.call(masks, BUF_BASE, BUF_BASE + 16, BUF_BASE + 144, serial, first)
        assert it.memory.read(BUF_BASE + 144, 384) == want, f"interpreter, case {k}"
        if native is not None:
            kb, pb = (ctypes.c_uint64 * 2)(*key), (ctypes.c_uint8 * 128)(*data)
            ob = (ctypes.c_uint8 * 384)()
            native.call("masks", ctypes.addressof(kb), ctypes.addressof(pb),
                        ctypes.addressof(ob), serial, first)
            assert bytes(ob) == want, f"native, case {k}"
