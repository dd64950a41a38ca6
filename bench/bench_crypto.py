"""Native AES-256-GCM throughput of the helper's firmware code vs `cryptography` on 4 KiB pages.

Why: issue 8 — sealing/opening a page must not be slower than a stock AES-GCM (target ratio >= 1.0).
The helper's code is the exact image bytes that go into the .efi, mapped and run natively. Two
helper figures are printed: "loop" runs `reps` seals inside the firmware code (one host call;
this is the firmware's real speed), "call" makes one ctypes call per page (includes ctypes
overhead, comparable to cryptography's per-call Python overhead). The ratio uses "loop".

Context for the ratio: each `cryptography` call also pays a fixed cost (Python, the Rust/FFI
layer, EVP set-up) that is a large share of a 4 KiB page; `cryptography_call_us` measures it with
an empty message, and the `*_1m` figures (1 MiB messages, both sides) compare the bulk code alone.
Run: python bench/bench_crypto.py [--pages N] [--rounds R]
"""

from __future__ import annotations

import argparse
import ctypes
import os

from common import best, json_line, table  # bench/ is on sys.path (script dir or ensure_paths)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from helperfw.codegen.pipeline import build
from helperfw.native import NativeImage
from helperfw.runtime import aesgcm

PAGE = 4096
AAD = 48
BULK = 1 << 20  # the "bulk" message size: per-call costs vanish


def _buf(data: bytes | int):
    n = data if isinstance(data, int) else len(data)
    b = (ctypes.c_uint8 * n)()
    if not isinstance(data, int):
        ctypes.memmove(b, data, n)
    return b


def run(pages: int, rounds: int = 30) -> dict:
    img = NativeImage(build(aesgcm.TEST_FUNCTIONS).image)
    key, iv, aad, pt = os.urandom(32), os.urandom(12), os.urandom(AAD), os.urandom(PAGE)
    A = ctypes.addressof
    ctx, k, i, a, p = _buf(aesgcm.GcmCtx.size), _buf(key), _buf(iv), _buf(aad), _buf(pt)
    c, t, out, scratch = _buf(PAGE), _buf(16), _buf(PAGE), _buf(PAGE)
    img.call("mh_test_gcm_init", A(ctx), A(k))
    vp = ctypes.c_void_p
    u = ctypes.c_uint64
    seal_loop = img.function("mh_bench_gcm_seal", None, [vp, vp, vp, u, vp, vp, u, vp, u])
    open_loop = img.function("mh_bench_gcm_open", u, [vp, vp, vp, u, vp, vp, u, vp, vp, u])
    seal_one = img.function("mh_test_gcm_seal_ctx", None, [vp, vp, vp, u, vp, vp, u, vp])
    open_one = img.function("mh_test_gcm_open_ctx", u, [vp, vp, vp, u, vp, vp, u, vp, vp])
    args_s = (A(ctx), A(i), A(a), AAD, A(p), A(c), PAGE, A(t))
    args_o = (A(ctx), A(i), A(a), AAD, A(c), A(out), PAGE, A(t), A(scratch))

    seal_one(*args_s)
    ref = AESGCM(key).encrypt(iv, pt, aad)
    assert bytes(c) + bytes(t) == ref, "helper seal disagrees with cryptography"
    assert open_loop(*args_o, 3) == 3 and bytes(out) == pt

    def h_seal_loop(n: int) -> None:
        seal_loop(*args_s, n)

    def h_open_loop(n: int) -> None:
        assert open_loop(*args_o, n) == n

    def h_seal_call(n: int) -> None:
        for _ in range(n):
            seal_one(*args_s)

    def h_open_call(n: int) -> None:
        for _ in range(n):
            open_one(*args_o)

    gcm = AESGCM(key)
    big = os.urandom(BULK)
    bp, bc = _buf(big), _buf(BULK)

    def h_seal_1m(n: int) -> None:
        seal_loop(A(ctx), A(i), A(a), AAD, A(bp), A(bc), BULK, A(t), n)

    def c_seal_1m(n: int) -> None:
        for _ in range(n):
            gcm.encrypt(iv, big, aad)

    def c_empty(n: int) -> None:
        for _ in range(n):
            gcm.encrypt(iv, b"", aad)

    def c_seal(n: int) -> None:
        for _ in range(n):
            gcm.encrypt(iv, pt, aad)

    def c_open(n: int) -> None:
        for _ in range(n):
            gcm.decrypt(iv, ref, aad)

    mbs = {name: PAGE / best(fn, pages, rounds) / 1e6 for name, fn in [
        ("helper_seal_loop", h_seal_loop), ("helper_open_loop", h_open_loop),
        ("helper_seal_call", h_seal_call), ("helper_open_call", h_open_call),
        ("cryptography_seal", c_seal), ("cryptography_open", c_open)]}
    bulk_reps = max(2, pages // 256)
    mbs["helper_seal_1m"] = BULK / best(h_seal_1m, bulk_reps, rounds) / 1e6
    mbs["cryptography_seal_1m"] = BULK / best(c_seal_1m, bulk_reps, rounds) / 1e6
    call_us = best(c_empty, pages, rounds) * 1e6
    return {
        **{k: round(v, 1) for k, v in mbs.items()},
        "cryptography_call_us": round(call_us, 3),
        "ratio_seal_1m": round(mbs["helper_seal_1m"] / mbs["cryptography_seal_1m"], 3),
        "ratio_seal": round(mbs["helper_seal_loop"] / mbs["cryptography_seal"], 3),
        "ratio_open": round(mbs["helper_open_loop"] / mbs["cryptography_open"], 3),
        "ratio_seal_call": round(mbs["helper_seal_call"] / mbs["cryptography_seal"], 3),
        "ratio_open_call": round(mbs["helper_open_call"] / mbs["cryptography_open"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=2000, help="pages per timing round")
    ap.add_argument("--rounds", type=int, default=30, help="timing rounds (the best is kept)")
    args = ap.parse_args()
    r = run(args.pages, args.rounds)
    print(report(r))
    print(json_line("crypto", **r))


def report(r: dict) -> str:
    rows = [[f"{op} {PAGE} B page", r[f"helper_{op}_loop"], r[f"helper_{op}_call"],
             r[f"cryptography_{op}"], r[f"ratio_{op}"]] for op in ("seal", "open")]
    rows.append(["seal 1 MiB message", r["helper_seal_1m"], "", r["cryptography_seal_1m"],
                 r["ratio_seal_1m"]])
    return (table(["AES-256-GCM MB/s", "helper loop", "helper call", "cryptography", "ratio"],
                  rows, f"AES-256-GCM, {AAD}-byte AAD; ratio = helper loop / cryptography")
            + f"\ncryptography fixed cost per call (empty message): {r['cryptography_call_us']} us")


if __name__ == "__main__":
    main()
