"""Where a page's time goes, natively: instruction rates and the helper's GCM-SIV passes, per path.

Why: docs/PERFORMANCE.md explains what bounds the AEAD (two passes vs GCM's one, per-record key
derivation, the CPU's AES and carry-less-multiply rates) with these figures.

1. Instruction rates: 8 independent chains of one instruction, in DSL functions compiled by the
   firmware's pipeline: AESENC (xmm), VAESENC (ymm), PCLMULQDQ (xmm), VPCLMULQDQ (ymm), and
   4 VAESENC + 4 VPCLMULQDQ interleaved (do the two units overlap?). ns per instruction and
   blocks per ns (an xmm instruction works on one block, a ymm one on two).
2. The helper's own passes over one 4 KiB page (the functions in runtime/gcmsiv*.py that a
   seal or an open calls), base (AES-NI) and wide (VAES/VPCLMULQDQ): key derivation, POLYVAL
   with the masked copy to stage (seal's first pass), CTR unmasking the stage (seal's second
   pass), open's CTR + POLYVAL into the masked scratch (stitched on the wide path), and the
   copy-out that unmasks, stores and hashes again; a plain 4 KiB copy for scale.
The wide rows are skipped, saying so, on a CPU without AVX2/VAES/VPCLMULQDQ.
Run: python bench/vaes_probe.py [--rounds R]
"""

from __future__ import annotations

import argparse
import ctypes
import os

from common import best, json_line, table

from helperfw import (
    Ptr,
    aesenc,
    bind_page,
    emms,
    function,
    pclmulqdq,
    u8,
    u32,
    u64,
    v128,
    v128_lo,
    v128_make,
    v256,
    vaesenc256,
    vpclmulqdq256,
)
from helperfw.codegen.pipeline import build
from helperfw.native import NativeImage
from helperfw.runtime import aes, gcmsiv
from helperfw.runtime.gcmsiv import _copy_absorb, _ctr, siv_derive
from helperfw.runtime.gcmsiv_keys import SivKeys
from helperfw.runtime.gcmsiv_wide import WIDE
from helperfw.runtime.memops import copy_mem

PAGE = 4096
CHAIN_REPS = 200_000  # loop iterations per timing of an instruction-rate kernel


# -- 1. instruction rates -------------------------------------------------------------------

@function(abi="c")
def probe_aes_xmm(p: Ptr[v128], reps: u64) -> None:
    a0, a1, a2, a3, a4, a5, a6, a7 = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    k = p[8]
    for i in range(reps):
        a0 = aesenc(a0, k)
        a1 = aesenc(a1, k)
        a2 = aesenc(a2, k)
        a3 = aesenc(a3, k)
        a4 = aesenc(a4, k)
        a5 = aesenc(a5, k)
        a6 = aesenc(a6, k)
        a7 = aesenc(a7, k)
    p[0] = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7


@function(abi="c")
def probe_clmul_xmm(p: Ptr[v128], reps: u64) -> None:
    a0, a1, a2, a3, a4, a5, a6, a7 = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    k = p[8]
    for i in range(reps):
        a0 = pclmulqdq(a0, k, 0x01)
        a1 = pclmulqdq(a1, k, 0x01)
        a2 = pclmulqdq(a2, k, 0x01)
        a3 = pclmulqdq(a3, k, 0x01)
        a4 = pclmulqdq(a4, k, 0x01)
        a5 = pclmulqdq(a5, k, 0x01)
        a6 = pclmulqdq(a6, k, 0x01)
        a7 = pclmulqdq(a7, k, 0x01)
    p[0] = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7


@function(abi="c", features=WIDE)
def probe_aes_ymm(p: Ptr[v256], reps: u64) -> None:
    a0, a1, a2, a3, a4, a5, a6, a7 = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    k = p[8]
    for i in range(reps):
        a0 = vaesenc256(a0, k)
        a1 = vaesenc256(a1, k)
        a2 = vaesenc256(a2, k)
        a3 = vaesenc256(a3, k)
        a4 = vaesenc256(a4, k)
        a5 = vaesenc256(a5, k)
        a6 = vaesenc256(a6, k)
        a7 = vaesenc256(a7, k)
    p[0] = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7


@function(abi="c", features=WIDE)
def probe_clmul_ymm(p: Ptr[v256], reps: u64) -> None:
    a0, a1, a2, a3, a4, a5, a6, a7 = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    k = p[8]
    for i in range(reps):
        a0 = vpclmulqdq256(a0, k, 0x01)
        a1 = vpclmulqdq256(a1, k, 0x01)
        a2 = vpclmulqdq256(a2, k, 0x01)
        a3 = vpclmulqdq256(a3, k, 0x01)
        a4 = vpclmulqdq256(a4, k, 0x01)
        a5 = vpclmulqdq256(a5, k, 0x01)
        a6 = vpclmulqdq256(a6, k, 0x01)
        a7 = vpclmulqdq256(a7, k, 0x01)
    p[0] = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7


@function(abi="c", features=WIDE)
def probe_mixed_ymm(p: Ptr[v256], reps: u64) -> None:
    """4 VAESENC and 4 VPCLMULQDQ chains: if the units overlap, this costs what the slower
    half costs alone."""
    a0, a1, a2, a3, a4, a5, a6, a7 = p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]
    k = p[8]
    for i in range(reps):
        a0 = vaesenc256(a0, k)
        a4 = vpclmulqdq256(a4, k, 0x01)
        a1 = vaesenc256(a1, k)
        a5 = vpclmulqdq256(a5, k, 0x01)
        a2 = vaesenc256(a2, k)
        a6 = vpclmulqdq256(a6, k, 0x01)
        a3 = vaesenc256(a3, k)
        a7 = vpclmulqdq256(a7, k, 0x01)
    p[0] = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7


# -- 2. the helper's passes -----------------------------------------------------------------

@function(abi="c")
def probe_derive(kgk: Ptr[aes.Aes256Key], nonce: Ptr[u8], k: Ptr[SivKeys], wide: u32,
                 reps: u64) -> None:
    for i in range(reps):
        siv_derive(kgk, nonce, k, wide)


@function(abi="c")
def probe_absorb(k: Ptr[SivKeys], p: Ptr[u8], stage: Ptr[u8], n: u64, reps: u64) -> u64:
    """Seal's first pass: the page p hashed and copied, masked, to stage."""
    s = v128_make(0, 0)
    bind_page(u64(p))
    for i in range(reps):
        s = _copy_absorb(k, s, stage, n, False)
    emms()
    return v128_lo(s)


@function(abi="c")
def probe_ctr(k: Ptr[SivKeys], stage: Ptr[u8], out: Ptr[u8], n: u64, reps: u64) -> None:
    """Seal's second pass: the masked stage unmasked and encrypted."""
    for i in range(reps):
        _ctr(k, v128_make(i, 0), stage, out, n, v128_make(0, 0), False)
    emms()


@function(abi="c")
def probe_open(k: Ptr[SivKeys], ct: Ptr[u8], scratch: Ptr[u8], page: Ptr[u8], n: u64,
               reps: u64) -> u64:
    """Open's first pass: decrypted, hashed, masked into scratch for the page."""
    s = v128_make(0, 0)
    bind_page(u64(page))
    for i in range(reps):
        s = _ctr(k, s, ct, scratch, n, s, True)
    emms()
    return v128_lo(s)


@function(abi="c")
def probe_copy_out(k: Ptr[SivKeys], scratch: Ptr[u8], page: Ptr[u8], n: u64, reps: u64) -> u64:
    """Open's copy-out: the scratch unmasked into the page, hashed as stored."""
    s = v128_make(0, 0)
    bind_page(u64(page))
    for i in range(reps):
        s = _copy_absorb(k, s, scratch, n, True)
    emms()
    return v128_lo(s)


@function(abi="c")
def probe_copy(d: Ptr[u8], s: Ptr[u8], n: u64, reps: u64) -> None:
    for i in range(reps):
        copy_mem(d, s, n)


FUNCTIONS = [probe_aes_xmm, probe_clmul_xmm, probe_aes_ymm, probe_clmul_ymm, probe_mixed_ymm,
             probe_derive, probe_absorb, probe_ctr, probe_open, probe_copy_out, probe_copy,
             gcmsiv.mh_test_aes256_expand, gcmsiv.mh_test_cpu_wide_ok]


def _buf(n: int, data: bytes | None = None):
    b = (ctypes.c_uint8 * n)()
    if data:
        ctypes.memmove(b, data, len(data))
    return b


def run(rounds: int = 20, pages: int = 2000) -> dict:
    img = NativeImage(build(FUNCTIONS).image)
    wide = bool(img.call("mh_test_cpu_wide_ok"))
    A = ctypes.addressof
    r: dict[str, object] = {"wide_cpu": wide}
    regs = _buf(9 * 32, os.urandom(9 * 32))
    kinds = [("aes_xmm", "probe_aes_xmm", 1), ("clmul_xmm", "probe_clmul_xmm", 1)]
    if wide:
        kinds += [("aes_ymm", "probe_aes_ymm", 2), ("clmul_ymm", "probe_clmul_ymm", 2),
                  ("mixed_ymm", "probe_mixed_ymm", 2)]
    for name, fn, blocks in kinds:
        t = best(lambda reps, fn=fn: img.call(fn, A(regs), reps), CHAIN_REPS, rounds)
        r[f"{name}_ns"] = round(t / 8 * 1e9, 3)  # 8 instructions per iteration
        r[f"{name}_blocks_per_ns"] = round(8 * blocks / (t * 1e9), 2)

    key, nonce, kgk = _buf(32, os.urandom(32)), _buf(12, os.urandom(12)), _buf(240)
    k = _buf(SivKeys.size)
    img.call("mh_test_aes256_expand", A(key), A(kgk))
    p, st, out = _buf(PAGE, os.urandom(PAGE)), _buf(PAGE), _buf(PAGE)
    for path in (("base", "wide") if wide else ("base",)):
        w = int(path == "wide")
        img.call("probe_derive", A(kgk), A(nonce), A(k), w, 1)  # the keys the passes use
        per_page = {
            "derive": lambda reps, w=w: img.call("probe_derive", A(kgk), A(nonce), A(k), w, reps),
            "polyval_copy": lambda reps: img.call("probe_absorb", A(k), A(p), A(st), PAGE, reps),
            "ctr": lambda reps: img.call("probe_ctr", A(k), A(st), A(out), PAGE, reps),
            "open_pass": lambda reps: img.call("probe_open", A(k), A(p), A(st), A(out), PAGE,
                                               reps),
            "copy_out": lambda reps: img.call("probe_copy_out", A(k), A(st), A(out), PAGE,
                                              reps),
        }
        for name, fn in per_page.items():
            r[f"{path}_{name}_ns"] = round(best(fn, pages, rounds) * 1e9)
    r["copy_4k_ns"] = round(best(lambda reps: img.call("probe_copy", A(out), A(p), PAGE, reps),
                                 pages, rounds) * 1e9)
    return r


def report(r: dict) -> str:
    rows = []
    for name, label in (("aes_xmm", "AESENC xmm"), ("aes_ymm", "VAESENC ymm"),
                        ("clmul_xmm", "PCLMULQDQ xmm"), ("clmul_ymm", "VPCLMULQDQ ymm"),
                        ("mixed_ymm", "4 VAESENC + 4 VPCLMULQDQ ymm")):
        if f"{name}_ns" in r:
            rows.append([label, r[f"{name}_ns"], r[f"{name}_blocks_per_ns"]])
    out = table(["instruction (8 independent chains)", "ns / instruction", "blocks / ns"], rows,
                "instruction rates")
    rows = []
    for name, label in (("derive", "key derivation (per record)"),
                        ("polyval_copy", "POLYVAL + masked copy to stage (seal pass 1)"),
                        ("ctr", "CTR from the masked stage (seal pass 2)"),
                        ("open_pass", "CTR + POLYVAL to the masked scratch (open pass 1)"),
                        ("copy_out", "unmask, store, POLYVAL (open's copy-out)")):
        rows.append([label, r.get(f"base_{name}_ns", ""), r.get(f"wide_{name}_ns", "skipped")])
    rows.append(["plain copy of 4 KiB, for scale", r["copy_4k_ns"], r["copy_4k_ns"]])
    out += "\n" + table(["one 4 KiB page", "base ns", "wide ns"], rows, "the helper's passes")
    if not r["wide_cpu"]:
        out += "\n(this CPU lacks AVX2/VAES/VPCLMULQDQ: the wide rows are skipped)"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20, help="timing rounds (the best is kept)")
    args = ap.parse_args()
    r = run(args.rounds)
    print(report(r))
    print(json_line("vaes_probe", **r))


if __name__ == "__main__":
    main()
