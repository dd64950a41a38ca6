#!/usr/bin/env python3
"""Emit the firmware: out/MigrationHelper.efi, its symbol map, and the EDK2 integration files.

    python build.py [--out DIR]

Prints the image's size, SHA-256 and SHA-384 (the guest owner recomputes these to check the
launch measurement; builds are byte-for-byte reproducible).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import helperfw  # noqa: F401  (first: configures llvmlite)
from helperfw.codegen.image import LinkedImage
from helperfw.codegen.pipeline import build
from helperfw.runtime import protocol
from helperfw.runtime.driver import efi_main, mh_descriptor
from ovmf_glue import edk2
from ovmf_glue.pe import package_pe, write_symbol_map

ENTRY = "efi_main"


def firmware_roots() -> list:
    """The DSL functions the image is built from (everything they call comes along)."""
    return [efi_main]


def link_image() -> LinkedImage:
    return build(firmware_roots(), entry=ENTRY, keep=(("mh_descriptor", mh_descriptor),)).image


def header_constants() -> list[tuple[str, int, str]]:
    consts: list[tuple[str, int, str]] = [
        ("MH_PROTOCOL_VERSION", protocol.PROTOCOL_VERSION.value, "uint32_t"),
        ("MH_HC_ANNOUNCE", protocol.MH_HC_ANNOUNCE, "uint64_t"),
        ("MH_ENVELOPE_MAGIC", protocol.ENVELOPE_MAGIC, "uint32_t"),
        ("MH_TOKEN_MAGIC", protocol.TOKEN_MAGIC, "uint32_t"),
        ("MH_BOOTINFO_MAGIC", protocol.BOOTINFO_MAGIC, "uint32_t"),
        ("MH_DEFAULT_SLOTS", protocol.DEFAULT_SLOTS, "uint32_t"),
        ("MH_SLOT_SIZE", protocol.SLOT_SIZE, "uint32_t"),
        ("MH_CONTROL_OFFSET", protocol.CONTROL_OFFSET, "uint32_t"),
    ]
    for name in dir(protocol):
        if name.startswith(("OP_", "OPT_", "REGION_", "ST_", "ENTRY_F_")):
            consts.append((f"MH_{name}", getattr(protocol, name), "uint32_t"))
    for name, (value, _doc) in protocol.STATUS.items():
        consts.append((f"MH_{name}", value, "int32_t"))
    return consts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out", help="output directory (default: out)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    image = link_image()
    pe = package_pe(image, entry=ENTRY)
    efi = out / "MigrationHelper.efi"
    efi.write_bytes(pe)
    write_symbol_map(image, efi.with_suffix(".map"))
    edk2.write_integration_files(out, structs=protocol.WIRE_STRUCTS,
                                 constants=header_constants())
    dt = time.perf_counter() - t0
    print(f"{efi}: {len(pe)} bytes ({dt:.2f} s)")
    print(f"SHA-256 {hashlib.sha256(pe).hexdigest()}")
    print(f"SHA-384 {hashlib.sha384(pe).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
