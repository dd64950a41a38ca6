#!/usr/bin/env python3
"""Emit the firmware: out/MigrationHelper.efi, its symbol map, and the EDK2 integration files.

    python build.py [--out DIR] [--emit ll,o]

`--emit ll` also writes the LLVM IR (as lowered, and after -O2), `--emit o` the ELF object the
image is linked from. Prints the image's size, SHA-256 and SHA-384 (the guest owner recomputes
these to check the launch measurement; builds are byte-for-byte reproducible). The build itself
is `helperfw.build.build_firmware`.
"""

from __future__ import annotations

import argparse
import sys

import helperfw  # noqa: F401  (first: configures llvmlite)
from helperfw import DslError
from helperfw.build import build_firmware, check_emit
from helperfw.codegen.link import LinkError


def _emit_kinds(text: str) -> tuple[str, ...]:
    try:
        return check_emit([k.strip() for k in text.split(",") if k.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build.py", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out", help="output directory (default: out)")
    ap.add_argument("--emit", type=_emit_kinds, default=(), metavar="KINDS",
                    help="also write intermediates: ll (LLVM IR), o (ELF object), comma-separated")
    args = ap.parse_args(argv)
    try:
        b = build_firmware(args.out, emit=args.emit)
    except OSError as e:
        print(f"build.py: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    except (DslError, LinkError) as e:  # the firmware's source does not compile or link
        print(f"build.py: {e}", file=sys.stderr)
        return 1
    print(f"{b.efi}: {len(b.pe)} bytes ({b.seconds:.2f} s)")
    for kind, path in b.paths.items():
        if kind in ("ll", "opt.ll", "o"):
            print(f"{path}: {path.stat().st_size} bytes")
    print(f"SHA-256 {b.sha256}")
    print(f"SHA-384 {b.sha384}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
