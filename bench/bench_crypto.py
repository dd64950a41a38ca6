"""Native AES-256-GCM-SIV throughput of the helper's firmware code vs `cryptography` on 4 KiB pages.

Why: a page's seal/open is the migration's per-page cost on hardware. Two references on the same
machine in the same run: `cryptography`'s AESGCMSIV (the same AEAD; goal >= 5x) and its AESGCM
(the fast AEAD OpenSSL has assembly for; goal >= 0.8x). The helper's code is the exact image
bytes that go into the .efi, mapped and run natively. Two helper figures are printed: "loop" runs
`reps` seals inside the firmware code (one host call; the firmware's real speed), "call" makes one
ctypes call per page (includes ctypes overhead, comparable to cryptography's per-call Python
overhead). Ratios use "loop".

Context: each `cryptography` call pays a fixed cost (Python, the Rust/FFI layer, EVP set-up) that
is a large share of a 4 KiB page; `cryptography_call_us` measures it with an empty message, and
the `*_1m` figures (1 MiB messages, both sides) compare the bulk code alone.
Run: python bench/bench_crypto.py [--pages N] [--rounds R]
"""

from __future__ import annotations

import argparse
import ctypes
import os

from common import best, json_line, table  # bench/ is on sys.path (script dir or ensure_paths)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV

from helperfw.codegen.pipeline import build
from helperfw.native import NativeImage
from helperfw.runtime import aes, gcmsiv

PAGE = 4096
AAD = 48  # the envelope's authenticated bytes
BULK = 1 << 20  # the "bulk" message size: per-call costs vanish
GOAL_VS_SIV = 5.0
GOAL_VS_GCM = 0.8


def _buf(data: bytes | int):
    n = data if isinstance(data, int) else len(data)
    b = (ctypes.c_uint8 * n)()
    if not isinstance(data, int):
        ctypes.memmove(b, data, n)
    return b


def run(pages: int, rounds: int = 30) -> dict:
    img = NativeImage(build(gcmsiv.TEST_FUNCTIONS).image)
    key, nonce, aad, pt = os.urandom(32), os.urandom(12), os.urandom(AAD), os.urandom(PAGE)
    A = ctypes.addressof
    kgk, k, n, a, p = _buf(aes.Aes256Key.size), _buf(key), _buf(nonce), _buf(aad), _buf(pt)
    stage, c, t, out, scratch = _buf(PAGE), _buf(PAGE), _buf(16), _buf(PAGE), _buf(PAGE)
    img.call("mh_test_aes256_expand", A(k), A(kgk))
    vp, u = ctypes.c_void_p, ctypes.c_uint64
    seal_loop = img.function("mh_bench_siv_seal", None, [vp, vp, vp, u, vp, vp, vp, u, vp, u])
    open_loop = img.function("mh_bench_siv_open", u, [vp, vp, vp, u, vp, vp, u, vp, vp, u])
    args_s = (A(kgk), A(n), A(a), AAD, A(p), A(stage), A(c), PAGE, A(t))
    args_o = (A(kgk), A(n), A(a), AAD, A(c), A(out), PAGE, A(t), A(scratch))

    seal_loop(*args_s, 1)
    ref = AESGCMSIV(key).encrypt(nonce, pt, aad)
    assert bytes(c) + bytes(t) == ref, "helper seal disagrees with cryptography"
    assert open_loop(*args_o, 3) == 3 and bytes(out) == pt

    siv, gcm = AESGCMSIV(key), AESGCM(key)
    big = os.urandom(BULK)
    bp, bs, bc = _buf(big), _buf(BULK), _buf(BULK)

    def loop(fn, args):
        return lambda reps: fn(*args, reps)

    def calls(fn, args):
        def go(reps: int) -> None:
            for _ in range(reps):
                fn(*args, 1)
        return go

    def py(f, *args):
        def go(reps: int) -> None:
            for _ in range(reps):
                f(*args)
        return go

    page_cases = [
        ("helper_seal_loop", loop(seal_loop, args_s)), ("helper_open_loop", loop(open_loop, args_o)),
        ("helper_seal_call", calls(seal_loop, args_s)), ("helper_open_call", calls(open_loop, args_o)),
        ("siv_seal", py(siv.encrypt, nonce, pt, aad)), ("siv_open", py(siv.decrypt, nonce, ref, aad)),
        ("gcm_seal", py(gcm.encrypt, nonce, pt, aad)),
        ("gcm_open", py(gcm.decrypt, nonce, gcm.encrypt(nonce, pt, aad), aad)),
    ]
    mbs = {}
    for name, fn in page_cases:
        slow = name.startswith("siv_")  # OpenSSL's GCM-SIV is ~50x slower: fewer pages
        mbs[name] = PAGE / best(fn, max(10, pages // 20) if slow else pages, rounds) / 1e6
    bulk_reps = max(2, pages // 256)
    mbs["helper_seal_1m"] = BULK / best(
        loop(seal_loop, (A(kgk), A(n), A(a), AAD, A(bp), A(bs), A(bc), BULK, A(t))),
        bulk_reps, rounds) / 1e6
    mbs["gcm_seal_1m"] = BULK / best(py(gcm.encrypt, nonce, big, aad), bulk_reps, rounds) / 1e6
    call_us = best(py(gcm.encrypt, nonce, b"", aad), pages, rounds) * 1e6
    r = {k: round(v, 1) for k, v in mbs.items()}
    r["cryptography_call_us"] = round(call_us, 3)
    for op in ("seal", "open"):
        r[f"ratio_{op}_vs_siv"] = round(mbs[f"helper_{op}_loop"] / mbs[f"siv_{op}"], 2)
        r[f"ratio_{op}_vs_gcm"] = round(mbs[f"helper_{op}_loop"] / mbs[f"gcm_{op}"], 3)
        r[f"ratio_{op}_call_vs_gcm"] = round(mbs[f"helper_{op}_call"] / mbs[f"gcm_{op}"], 3)
    r["ratio_seal_1m_vs_gcm"] = round(mbs["helper_seal_1m"] / mbs["gcm_seal_1m"], 3)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=2000, help="pages per timing round")
    ap.add_argument("--rounds", type=int, default=30, help="timing rounds (the best is kept)")
    args = ap.parse_args()
    r = run(args.pages, args.rounds)
    print(report(r))
    print(json_line("crypto", **r))


def report(r: dict) -> str:
    rows = []
    for op in ("seal", "open"):
        rows.append([f"{op} {PAGE} B page", r[f"helper_{op}_loop"], r[f"helper_{op}_call"],
                     r[f"siv_{op}"], r[f"ratio_{op}_vs_siv"], r[f"gcm_{op}"],
                     r[f"ratio_{op}_vs_gcm"]])
    rows.append(["seal 1 MiB message", r["helper_seal_1m"], "", "", "", r["gcm_seal_1m"],
                 r["ratio_seal_1m_vs_gcm"]])
    return (table(["MB/s", "helper loop", "helper call", "cryptography GCM-SIV", "ratio",
                   "cryptography GCM", "ratio"], rows,
                  f"AES-256-GCM-SIV (helper) vs cryptography, {AAD}-byte AAD; ratio = helper "
                  f"loop / reference; goals: >= {GOAL_VS_SIV}x GCM-SIV, >= {GOAL_VS_GCM}x GCM")
            + f"\ncryptography fixed cost per call (empty message): {r['cryptography_call_us']} us")


if __name__ == "__main__":
    main()
