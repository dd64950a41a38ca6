"""Native AES-256-GCM-SIV throughput of the helper's firmware code vs `cryptography` on 4 KiB pages.

Why: a page's seal/open is the migration's per-page cost on hardware. Two references on the same
machine in the same run: `cryptography`'s AESGCMSIV (the same AEAD; goal >= 5x) and its AESGCM
(the fast AEAD OpenSSL has assembly for; goals >= 1.0x per 4 KiB page, >= 0.5x on 1 MiB). The
helper's code is the exact image bytes that go into the .efi, mapped and run natively.

The helper has two paths (runtime/gcmsiv_wide.py): "wide" (VAES/VPCLMULQDQ on ymm registers for
whole 256-byte groups), which it chooses per session when CPUID and XCR0 allow, and "base"
(128-bit AES-NI/PCLMULQDQ). The `helper_*` figures are the path the helper chooses on this CPU
(`path`), the `base_*` figures the baseline forced. Two helper figures per operation: "loop" runs
`reps` seals inside the firmware code (one host call; the firmware's real speed), "call" makes
one ctypes call per page (includes ctypes overhead, comparable to cryptography's per-call Python
overhead). Ratios use "loop".

Context: each `cryptography` call pays a fixed cost (Python, the Rust/FFI layer, EVP set-up) that
is a large share of a 4 KiB page; `cryptography_call_us` measures it with an empty message, and
the `*_1m` figures (1 MiB messages, both sides) compare the bulk code alone. `derive_us` is the
per-record key derivation alone (a zero-length seal with the envelope's AAD).
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
from helperfw.runtime.gcmsiv_wide import WIDE_OFF, WIDE_ON

PAGE = 4096
AAD = 48  # the envelope's authenticated bytes
BULK = 1 << 20  # the "bulk" message size: per-call costs vanish
GOAL_VS_SIV = 5.0
GOAL_VS_GCM = 1.0  # per 4 KiB page
GOAL_1M_VS_GCM = 0.5  # on 1 MiB: the CPU's AES limit as OpenSSL reaches it


def _buf(data: bytes | int):
    n = data if isinstance(data, int) else len(data)
    b = (ctypes.c_uint8 * n)()
    if not isinstance(data, int):
        ctypes.memmove(b, data, n)
    return b


class Helper:
    """The image's bench entry points on one key, nonce and AAD, with buffers for n bytes."""

    def __init__(self, img: NativeImage, key: bytes, nonce: bytes, aad: bytes, pt: bytes) -> None:
        A, n = ctypes.addressof, len(pt)
        self.kgk, self.k, self.nonce, self.aad = (_buf(aes.Aes256Key.size), _buf(key),
                                                  _buf(nonce), _buf(aad))
        self.pt, self.stage, self.ct, self.tag = _buf(pt), _buf(n), _buf(n), _buf(16)
        self.out, self.scratch = _buf(n), _buf(n)
        img.call("mh_test_aes256_expand", A(self.k), A(self.kgk))
        vp, u = ctypes.c_void_p, ctypes.c_uint64
        self.seal_fn = img.function("mh_bench_siv_seal", None,
                                    [vp, vp, vp, u, vp, vp, vp, u, vp, u, ctypes.c_uint32])
        self.open_fn = img.function("mh_bench_siv_open", u,
                                    [vp, vp, vp, u, vp, vp, u, vp, vp, u, ctypes.c_uint32])
        self.seal_args = (A(self.kgk), A(self.nonce), A(self.aad), len(aad), A(self.pt),
                          A(self.stage), A(self.ct), n, A(self.tag))
        self.open_args = (A(self.kgk), A(self.nonce), A(self.aad), len(aad), A(self.ct),
                          A(self.out), n, A(self.tag), A(self.scratch))

    def sealed(self, path: int) -> bytes:
        self.seal_fn(*self.seal_args, 1, path)
        return bytes(self.ct) + bytes(self.tag)

    def loop(self, op: str, path: int):
        """`reps` operations inside the firmware code: one host call."""
        fn, args = (self.seal_fn, self.seal_args) if op == "seal" else (self.open_fn,
                                                                         self.open_args)
        return lambda reps: fn(*args, reps, path)

    def calls(self, op: str, path: int):
        """One host (ctypes) call per operation."""
        fn, args = (self.seal_fn, self.seal_args) if op == "seal" else (self.open_fn,
                                                                         self.open_args)

        def go(reps: int) -> None:
            for _ in range(reps):
                fn(*args, 1, path)
        return go


def _py(f, *args):
    def go(reps: int) -> None:
        for _ in range(reps):
            f(*args)
    return go


def run(pages: int, rounds: int = 30) -> dict:
    img = NativeImage(build(gcmsiv.TEST_FUNCTIONS).image)
    wide = bool(img.call("mh_test_cpu_wide_ok"))
    path = WIDE_ON.value if wide else WIDE_OFF.value
    paths = {"helper": path, "base": WIDE_OFF.value}
    key, nonce, aad, pt = os.urandom(32), os.urandom(12), os.urandom(AAD), os.urandom(PAGE)
    big = os.urandom(BULK)
    h, hb, h0 = (Helper(img, key, nonce, aad, m) for m in (pt, big, b""))
    siv, gcm = AESGCMSIV(key), AESGCM(key)
    ref, ref_big = siv.encrypt(nonce, pt, aad), siv.encrypt(nonce, big, aad)
    for p in paths.values():  # both paths agree with cryptography before anything is timed
        assert h.sealed(p) == ref and hb.sealed(p) == ref_big, "seal disagrees with cryptography"
        assert h.loop("open", p)(3) == 3 and bytes(h.out) == pt
        assert hb.loop("open", p)(1) == 1 and bytes(hb.out) == big

    mbs: dict[str, float] = {}
    for who, p in paths.items():
        if who == "base" and not wide:
            break  # the baseline is the helper's path: measured once
        for op in ("seal", "open"):
            hb.sealed(p)
            mbs[f"{who}_{op}_loop"] = PAGE / best(h.loop(op, p), pages, rounds) / 1e6
            mbs[f"{who}_{op}_call"] = PAGE / best(h.calls(op, p), pages, rounds) / 1e6
            mbs[f"{who}_{op}_1m"] = BULK / best(hb.loop(op, p), max(2, pages // 256),
                                                rounds) / 1e6
    if not wide:
        mbs.update({k.replace("helper_", "base_"): v for k, v in list(mbs.items())})
    gcm_ct, gcm_big = gcm.encrypt(nonce, pt, aad), gcm.encrypt(nonce, big, aad)
    for name, fn, n in (
            ("siv_seal", _py(siv.encrypt, nonce, pt, aad), PAGE),
            ("siv_open", _py(siv.decrypt, nonce, ref, aad), PAGE),
            ("gcm_seal", _py(gcm.encrypt, nonce, pt, aad), PAGE),
            ("gcm_open", _py(gcm.decrypt, nonce, gcm_ct, aad), PAGE),
            ("gcm_seal_1m", _py(gcm.encrypt, nonce, big, aad), BULK),
            ("gcm_open_1m", _py(gcm.decrypt, nonce, gcm_big, aad), BULK)):
        reps = max(2, pages // 256) if n == BULK else (
            max(10, pages // 20) if name.startswith("siv_") else pages)  # OpenSSL GCM-SIV: slow
        mbs[name] = n / best(fn, reps, rounds) / 1e6
    r: dict[str, object] = {"path": "wide" if wide else "base"}
    r.update({k: round(v, 1) for k, v in mbs.items()})
    r["cryptography_call_us"] = round(best(_py(gcm.encrypt, nonce, b"", aad), pages,
                                           rounds) * 1e6, 3)
    for who, p in paths.items():  # a record's fixed work: key derivation, AAD, tag
        r[f"{who}_empty_seal_us"] = round(best(h0.loop("seal", p), pages, rounds) * 1e6, 3)
    for who in paths:
        for op in ("seal", "open"):
            r[f"{who}_ratio_{op}_vs_gcm"] = round(mbs[f"{who}_{op}_loop"] / mbs[f"gcm_{op}"], 3)
            r[f"{who}_ratio_{op}_1m_vs_gcm"] = round(mbs[f"{who}_{op}_1m"] / mbs[f"gcm_{op}_1m"],
                                                     3)
    for op in ("seal", "open"):  # the summary's names: the helper's own path
        r[f"ratio_{op}_vs_siv"] = round(mbs[f"helper_{op}_loop"] / mbs[f"siv_{op}"], 2)
        r[f"ratio_{op}_vs_gcm"] = r[f"helper_ratio_{op}_vs_gcm"]
        r[f"ratio_{op}_1m_vs_gcm"] = r[f"helper_ratio_{op}_1m_vs_gcm"]
        r[f"ratio_{op}_call_vs_gcm"] = round(mbs[f"helper_{op}_call"] / mbs[f"gcm_{op}"], 3)
    r["wide_vs_base_seal"] = round(mbs["helper_seal_loop"] / mbs["base_seal_loop"], 2)
    r["wide_vs_base_open"] = round(mbs["helper_open_loop"] / mbs["base_open_loop"], 2)
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
    for who in ("helper", "base"):
        label = f"{r['path']} (chosen)" if who == "helper" else "base (forced)"
        for op in ("seal", "open"):
            rows.append([f"{op} {PAGE} B page, {label}", r[f"{who}_{op}_loop"],
                         r[f"{who}_{op}_call"], r[f"siv_{op}"],
                         round(r[f"{who}_{op}_loop"] / r[f"siv_{op}"], 2), r[f"gcm_{op}"],
                         r[f"{who}_ratio_{op}_vs_gcm"]])
        for op in ("seal", "open"):
            rows.append([f"{op} 1 MiB message, {label}", r[f"{who}_{op}_1m"], "", "", "",
                         r[f"gcm_{op}_1m"], r[f"{who}_ratio_{op}_1m_vs_gcm"]])
        if r["path"] == "base":
            break
    return (table(["MB/s", "helper loop", "helper call", "cryptography GCM-SIV", "ratio",
                   "cryptography GCM", "ratio"], rows,
                  f"AES-256-GCM-SIV (helper) vs cryptography, {AAD}-byte AAD; ratio = helper "
                  f"loop / reference; goals: >= {GOAL_VS_SIV}x GCM-SIV, >= {GOAL_VS_GCM}x GCM "
                  f"per page, >= {GOAL_1M_VS_GCM}x GCM on 1 MiB")
            + f"\ncryptography fixed cost per call (empty message): {r['cryptography_call_us']} us"
            + f"\nhelper fixed cost per record (empty message, {AAD}-byte AAD): "
              f"{r['helper_empty_seal_us']} us ({r['path']}), {r['base_empty_seal_us']} us (base)")


if __name__ == "__main__":
    main()
