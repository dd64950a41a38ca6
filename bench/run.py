"""The performance goals in one command: crypto vs OpenSSL, the protocol vs the RFC's, image size and build time.

    python bench/run.py [--quick] [--options tuples|all] [--cbit 47]

Measures, in this order and in one process (except the timed `python build.py` subprocess):

1. build: `python build.py` as a subprocess (wall time, interpreter start-up included; it also
   refreshes out/MigrationHelper.efi for step 3), then compile + link + package in-process (best
   of N), whose bytes must equal the file (reproducible build); image size against the 32 KiB
   goal.
2. crypto: the helper's compiled AES-256-GCM-SIV seal/open (linked image mapped executable,
   called natively; bench_crypto.run) against `cryptography`'s AESGCMSIV and AESGCM on the same
   4 KiB pages, plus the 1 MiB bulk comparison and cryptography's fixed per-call cost, on the
   path the helper chooses on this CPU (wide: VAES/VPCLMULQDQ) and on the forced baseline; then
   where a page's time goes (vaes_probe.run: instruction rates, the helper's passes).
3. migration: a whole emulated live migration (bench_migration.measure) twice: "memory"
   transport, so the source and destination are timed separately, and "tcp" (loopback, both
   sides' vCPUs at once) for the end-to-end rate and the downtime; then the same private pages
   sealed and opened with 64-page batches vs one page per command, the RFC's granularity
   (bench_migration.protocol_compare).
4. lanes: helper-side throughput with 1, 2 and 4 lanes, each lane a mirror vCPU on its own
   host thread (bench_lanes.measure).

Prints a summary table, the detailed tables, then one JSON line (the last line of output).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time

from common import ROOT, ensure_paths, json_line, machine, table

import helperfw  # noqa: F401  (first: configures llvmlite)

ensure_paths()

import bench_crypto
import bench_lanes
import bench_migration
import vaes_probe

from emulate.migration import MigrationParams
from helperfw.build import ENTRY, compile_firmware
from helperfw.runtime.protocol import OPTION_NAMES
from ovmf_glue.pe import package_pe

IMAGE_GOAL = 32 * 1024
RFC_EXITS_PER_PAGE = 1.0  # one synchronous command (round trip) per 4 KiB page, per side
PROFILES = {  # quick: a smoke run in about a minute; full: the figures in docs/PERFORMANCE.md
    "quick": {"pages": 300, "rounds": 8, "mem": 32 << 20, "proto_pages": 128, "build_reps": 1,
              "lane_pages": 512, "lane_rounds": 1},
    "full": {"pages": 2000, "rounds": 30, "mem": 64 << 20, "proto_pages": 512, "build_reps": 3,
             "lane_pages": 2048, "lane_rounds": 2},
}


def measure_build(reps: int) -> dict:
    efi = ROOT / "out" / "MigrationHelper.efi"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "build.py"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    sub_s = time.perf_counter() - t
    reported = re.search(r"\(([\d.]+) s\)", proc.stdout)
    data = efi.read_bytes()
    best, pe = float("inf"), b""
    for _ in range(reps):
        t = time.perf_counter()
        image = compile_firmware().image
        pe = package_pe(image, entry=ENTRY)
        best = min(best, time.perf_counter() - t)
    text = image.section(".text")
    return {"image_bytes": len(data), "image_goal": IMAGE_GOAL,
            "image_headroom": IMAGE_GOAL - len(data), "text_bytes": text.vsize,
            "sha256": hashlib.sha256(data).hexdigest(),
            "reproducible": pe == data,
            "build_subprocess_s": round(sub_s, 2),
            "build_reported_s": float(reported.group(1)) if reported else None,
            "link_package_s": round(best, 3)}


def measure_migration(prof: dict, options: list[int], cbit: int) -> tuple[list, list, dict]:
    runs = [bench_migration.measure(MigrationParams(mem=prof["mem"], option=o, cbit=cbit,
                                                    transport=tr, verify=False))
            for o in options for tr in ("memory", "tcp")]
    proto = bench_migration.protocol_compare(MigrationParams(mem=prof["mem"], cbit=cbit),
                                             prof["proto_pages"])
    b64 = next(r for r in proto if r["batch"] == 64)
    b1 = next(r for r in proto if r["batch"] == 1)
    # seconds a page costs with per-page commands minus with batches, per exit saved
    saved = b1["exits_per_page_per_side"] - b64["exits_per_page_per_side"]
    per_exit_ms = (1 / b1["src_pages_per_s"] - 1 / b64["src_pages_per_s"]) / saved * 1e3
    cmp = {"rfc_exits_per_page_per_side": RFC_EXITS_PER_PAGE,
           "exits_ratio_vs_rfc": round(runs[0]["exits_per_page_per_side"] / RFC_EXITS_PER_PAGE, 4),
           "src_speedup_batched_vs_per_page": round(b64["src_pages_per_s"] / b1["src_pages_per_s"],
                                                    2),
           "dst_speedup_batched_vs_per_page": round(b64["dst_pages_per_s"] / b1["dst_pages_per_s"],
                                                    2),
           "emulated_cost_per_exit_ms": round(per_exit_ms, 3)}
    return runs, proto, cmp


def summary(c: dict, runs: list, proto: list, cmp: dict, b: dict) -> str:
    m = runs[0]
    tcp = next(r for r in runs if r["transport"] == "tcp")
    mem = f"{m['option']}, {m['pages']} pages"
    b1 = next(r for r in proto if r["batch"] == 1)
    b64 = next(r for r in proto if r["batch"] == 64)
    path = c["path"]
    rows = [
        [f"GCM-SIV seal 4 KiB page ({path}), native MB/s", c["helper_seal_loop"],
         "cryptography AESGCMSIV", c["siv_seal"], c["ratio_seal_vs_siv"],
         f">= {bench_crypto.GOAL_VS_SIV}"],
        [f"GCM-SIV open 4 KiB page ({path}), native MB/s", c["helper_open_loop"],
         "cryptography AESGCMSIV", c["siv_open"], c["ratio_open_vs_siv"],
         f">= {bench_crypto.GOAL_VS_SIV}"],
        *([f"GCM-SIV {op} {size} ({path if who == 'helper' else 'base, forced'}), native MB/s",
           c[f"{who}_{op}_{key}"],
           "cryptography AESGCM", c[f"gcm_{op}{'_1m' if key == '1m' else ''}"],
           c[f"{who}_ratio_{op}{'_1m' if key == '1m' else ''}_vs_gcm"],
           f">= {bench_crypto.GOAL_1M_VS_GCM if key == '1m' else bench_crypto.GOAL_VS_GCM}"
           if who == "helper" else "(baseline)"]
          for who in (("helper", "base") if path == "wide" else ("helper",))
          for key, size in (("loop", "4 KiB page"), ("1m", "1 MiB"))
          for op in ("seal", "open")),
        [f"migration source pages/s ({mem})", m["src_pages_per_s"], "", "", "", ""],
        [f"migration destination pages/s ({mem})", m["dst_pages_per_s"], "", "", "", ""],
        ["migration end to end pages/s (sides in turn)", m["pages_per_s"], "", "", "", ""],
        [f"migration end to end pages/s (TCP, sides at once; {tcp['pages']} pages)",
         tcp["pages_per_s"], "", "", "", ""],
        ["VM exits per private page, per side", m["exits_per_page_per_side"], "RFC",
         RFC_EXITS_PER_PAGE, cmp["exits_ratio_vs_rfc"], "< 1"],
        ["source pages/s, 64 pages/command", b64["src_pages_per_s"], "1 page/command",
         b1["src_pages_per_s"], cmp["src_speedup_batched_vs_per_page"], ""],
        ["destination pages/s, 64 pages/command", b64["dst_pages_per_s"], "1 page/command",
         b1["dst_pages_per_s"], cmp["dst_speedup_batched_vs_per_page"], ""],
        ["image size, bytes", b["image_bytes"], "goal", IMAGE_GOAL,
         round(b["image_bytes"] / IMAGE_GOAL, 3), "< 1"],
        ["build: compile + link + package in-process, s", b["link_package_s"], "", "", "", ""],
        ["build: python build.py subprocess, s", b["build_subprocess_s"], "", "", "", ""],
    ]
    return table(["measure", "helper", "reference", "ref value", "ratio", "goal"], rows,
                 "== summary ==")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    ap.add_argument("--options", default="tuples", help="address-space option(s): a name or all")
    ap.add_argument("--cbit", type=int, default=47)
    args = ap.parse_args()
    prof = PROFILES["quick" if args.quick else "full"]
    by_name = {v: k for k, v in OPTION_NAMES.items()}
    options = list(OPTION_NAMES) if args.options == "all" else [by_name[args.options]]

    t0 = time.perf_counter()
    b = measure_build(prof["build_reps"])
    c = bench_crypto.run(prof["pages"], prof["rounds"])
    probe = vaes_probe.run(prof["rounds"], prof["pages"])
    runs, proto, cmp = measure_migration(prof, options, args.cbit)
    lanes = bench_lanes.measure(MigrationParams(mem=prof["mem"], option=options[0],
                                                cbit=args.cbit), prof["lane_pages"],
                                prof["lane_rounds"])
    sat = bench_lanes.saturation(c["helper_seal_loop"], c["helper_open_loop"])
    total = time.perf_counter() - t0

    mach = machine()
    print(f"machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs, flags "
          f"{' '.join(mach.get('flags', []))}; profile {'quick' if args.quick else 'full'}")
    print()
    print(summary(c, runs, proto, cmp, b))
    print()
    print(bench_crypto.report(c))
    print()
    print(vaes_probe.report(probe))
    print()
    print(table(["migration", "transport", "pages", "private", "src p/s", "dst p/s", "e2e p/s",
                 "exits/page/side", "rounds", "MiB wire", "downtime s"],
                [[r["option"], r["transport"], r["pages"], r["private_pages"],
                  r.get("src_pages_per_s", ""), r.get("dst_pages_per_s", ""), r["pages_per_s"],
                  r["exits_per_page_per_side"], r["rounds"], r["wire_mib"],
                  r.get("downtime_s", "")] for r in runs],
                "src/dst p/s: each side timed alone (memory transport: the sides run in turn)"))
    print()
    print(table(["pages per command", "pages", "exits/page/side", "src pages/s", "dst pages/s"],
                [[r["batch"], r["pages"], r["exits_per_page_per_side"], r["src_pages_per_s"],
                  r["dst_pages_per_s"]] for r in proto],
                f"same helper, same pages, batched vs the RFC's one page per command "
                f"(emulated cost of one exit: {cmp['emulated_cost_per_exit_ms']} ms)"))
    print()
    print(bench_lanes.report(lanes))
    print()
    print(bench_lanes.saturation_report(sat, 4096 / c["helper_seal_loop"],
                                        4096 / c["helper_open_loop"]))
    print()
    print(f"image {b['image_bytes']} bytes (.text {b['text_bytes']}), goal < {IMAGE_GOAL}; "
          f"reproducible in-process: {b['reproducible']}; sha256 {b['sha256'][:16]}...; "
          f"whole run {total:.0f} s")
    print(json_line("issue8", profile="quick" if args.quick else "full", machine=mach,
                    crypto=c, probe=probe, migration=runs, protocol=proto, protocol_vs_rfc=cmp, build=b,
                    lanes=lanes, lanes_to_saturate=sat,
                    total_s=round(total, 1)))


if __name__ == "__main__":
    main()
