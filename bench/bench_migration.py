"""Live-migration throughput under emulation, per option: pages/s, mirror exits per page, rounds.

Why: the point of the mailbox design is one VM exit per batch, not per page, and a helper that
keeps up with pre-copy; this puts numbers on both for each address-space option with the built
image (run `python build.py` first). Each run migrates a guest that keeps dirtying memory.
`--protocol N` also seals and opens the same N private pages through the same helpers with
64-page batches and with one page per command (the RFC's granularity), to isolate the protocol.
Run: python bench/bench_migration.py [--mem 64M] [--cbit 47] [--transport tcp] [--sev-es]
[--protocol N]
"""

from __future__ import annotations

import argparse
import time

from common import json_line, table  # bench/ is on sys.path (script dir or ensure_paths)

from emulate.migration import Destination, Migration, MigrationParams, Source
from helperfw.cli import parse_size
from helperfw.runtime.protocol import OPTION_NAMES


def measure(p: MigrationParams) -> dict:
    """One whole migration. With the "memory" transport the source runs to completion before
    the destination starts, so each side's time is measured alone: source = first round to the
    last record written (sealing, the guest running between batches, dirty-log scans), and
    destination = reading the stream, opening and installing every record."""
    marks: dict[str, float] = {}

    def progress(event: str, _n: int) -> None:
        marks.setdefault(event, time.perf_counter())

    t = time.perf_counter()
    m = Migration(p, progress)
    boot = time.perf_counter() - t
    r = m.run()
    end = time.perf_counter()
    row = {"option": OPTION_NAMES[p.option], "transport": p.transport, "pages": r.pages,
           "private_pages": r.private_pages, "pages_per_s": round(r.pages_per_s),
           "src_exits": r.src_exits, "dst_exits": r.dst_exits,
           "exits_per_page": round(r.exits_per_page, 4),
           "exits_per_page_per_side": round(r.exits_per_page / 2, 4),
           "rounds": len(r.rounds), "epochs": r.epochs,
           "wire_mib": round(r.bytes_on_wire / (1 << 20), 1), "seconds": round(r.seconds, 2),
           "boot_s": round(boot, 2)}
    if p.transport == "memory" and "round" in marks and "done" in marks:
        src_s = marks["done"] - marks["round"]
        dst_s = end - marks["done"] if not p.verify else None
        row["src_pages_per_s"] = round(r.pages / src_s)
        if dst_s:
            row["dst_pages_per_s"] = round(r.pages / dst_s)
    if r.downtime is not None:
        row["downtime_s"] = round(r.downtime, 3)
    if r.verification is not None:
        row["verified"] = r.verification.ok
    return row


def protocol_compare(p: MigrationParams, pages: int, batches: tuple[int, ...] = (64, 1),
                     reps: int = 3) -> list:
    """Seal on the source and open on the destination `pages` private pages with each batch
    size, `reps` times in alternation (fresh pages every pass: a page is installed at most once
    per epoch); the guest does not run. Keeps each side's best pass (the host is shared).
    Returns per batch size: exits/page per side and pages/s per side."""
    src, dst = Source(p), Destination(p)
    h = src.host
    priv = [a for a in h.pages() if a not in src.skip and not h.shared.is_shared(a)]
    need = 64 + pages * len(batches) * reps
    if len(priv) < need:
        raise ValueError(f"{len(priv)} private pages, need {need}: use more --mem or fewer pages")
    ram_size = -(-h.ram_size // (2 << 20)) * (2 << 20)
    challenge = dst.ch.recv_begin(ram_size)  # protocol v2: the destination's challenge first
    dst.ch.bind(src.ch.send_begin(ram_size, challenge))

    def run(todo: list[int], batch: int) -> tuple[float, float, int]:
        e_src, t_src, t_dst = src.ch.exits, 0.0, 0.0
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            t = time.perf_counter()
            recs = src.ch.send(chunk)
            t_src += time.perf_counter() - t
            t = time.perf_counter()
            st = dst.ch.recv(chunk, recs)
            t_dst += time.perf_counter() - t
            if any(st):
                raise RuntimeError(f"destination refused records: {st}")
        return t_src, t_dst, src.ch.exits - e_src

    run(priv[:64], 64)  # warm the translation caches; not reported
    best: dict[int, list[float]] = {b: [float("inf"), float("inf"), 0] for b in batches}
    cursor = 64
    for _ in range(reps):
        for b in batches:
            t_src, t_dst, exits = run(priv[cursor : cursor + pages], b)
            cursor += pages
            best[b] = [min(best[b][0], t_src), min(best[b][1], t_dst), exits]
    src.ch.abort()
    dst.ch.abort()
    return [{"batch": b, "pages": pages, "reps": reps,
             "exits_per_page_per_side": round(exits / pages, 4),
             "src_pages_per_s": round(pages / t_src), "dst_pages_per_s": round(pages / t_dst),
             "src_ms_per_command": round(t_src / exits * 1e3, 3)}
            for b, (t_src, t_dst, exits) in best.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mem", type=parse_size, default=parse_size("64M"))
    ap.add_argument("--cbit", type=int, default=47)
    ap.add_argument("--transport", default="tcp")
    ap.add_argument("--sev-es", action="store_true", help="SEV-ES guests (the guest parks)")
    ap.add_argument("--protocol", type=int, default=0, metavar="N",
                    help="also compare 64-page batches with one page per command on N pages")
    args = ap.parse_args()
    rows = []
    for opt in OPTION_NAMES:
        rows.append(measure(MigrationParams(mem=args.mem, option=opt, cbit=args.cbit,
                                            transport=args.transport, verify=False,
                                            sev_es=args.sev_es)))
    print(table(["option", "pages", "pages/s", "exits/page", "rounds", "MiB wire", "seconds"],
                [[r["option"], r["pages"], r["pages_per_s"], r["exits_per_page"], r["rounds"],
                  r["wire_mib"], r["seconds"]] for r in rows]))
    proto = []
    if args.protocol:
        proto = protocol_compare(MigrationParams(mem=args.mem, cbit=args.cbit), args.protocol)
        print(table(["pages per command", "exits/page/side", "src pages/s", "dst pages/s",
                     "src ms/command"],
                    [[r["batch"], r["exits_per_page_per_side"], r["src_pages_per_s"],
                      r["dst_pages_per_s"], r["src_ms_per_command"]] for r in proto]))
    print(json_line("migration", mem=args.mem, cbit=args.cbit, transport=args.transport,
                    sev_es=args.sev_es, runs=rows, **({"protocol": proto} if proto else {})))


if __name__ == "__main__":
    main()
