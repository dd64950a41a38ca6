"""The firmware build as a function: DSL runtime → linked image → PE32+ EFI driver, plus its
symbol map and EDK2 integration files, optionally the IR and the object they came from.

`build.py` at the repository root is its command line. Builds are byte-for-byte reproducible:
the guest owner recomputes the image's digests to check the launch measurement.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from ovmf_glue import edk2
from ovmf_glue.pe import package_pe, write_symbol_map

from .codegen.image import LinkedImage
from .codegen.pipeline import Build, build
from .runtime import protocol
from .runtime.driver import efi_main, mh_descriptor

ENTRY = "efi_main"
BASE_NAME = edk2.BASE_NAME  # every output is BASE_NAME + a suffix
# Intermediates written on request: kind -> (suffix, the bytes of a compile).
EMIT_KINDS = {
    "ll": ((".ll", lambda b: b.ir.encode()), (".opt.ll", lambda b: b.optimized_ir.encode())),
    "o": ((".o", lambda b: b.obj),),
}


@dataclass(frozen=True)
class FirmwareBuild:
    """What one build wrote: `paths` by file suffix ("efi", "map", "inf", "h", "fdf.inc",
    "dsc.inc", and with emit "ll", "opt.ll", "o"), the compile behind it (IR, object, linked
    image), the PE bytes and their digests."""

    compiled: Build
    pe: bytes
    paths: dict[str, Path]
    sha256: str
    sha384: str
    seconds: float

    @property
    def efi(self) -> Path:
        return self.paths["efi"]

    @property
    def image(self) -> LinkedImage:
        return self.compiled.image


def firmware_roots() -> list:
    """The DSL functions the image is built from (everything they call comes along)."""
    return [efi_main]


def compile_firmware() -> Build:
    """The firmware's IR, object and linked image (no files written)."""
    return build(firmware_roots(), entry=ENTRY, keep=(("mh_descriptor", mh_descriptor),))


def header_constants() -> list[tuple[str, int, str]]:
    """The constants MigrationHelper.h declares for the host side: (name, value, C type)."""
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


def check_emit(kinds: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The requested intermediates, refusing any unknown kind with the list of known ones."""
    for k in kinds:
        if k not in EMIT_KINDS:
            raise ValueError(f"unknown emit kind {k!r}; choose from {', '.join(EMIT_KINDS)}")
    return tuple(kinds)


def build_firmware(out_dir: str | Path, emit: tuple[str, ...] | list[str] = ()) -> FirmwareBuild:
    """Build the firmware into `out_dir` (created if missing): BASE_NAME.efi and .map, the EDK2
    files, and the intermediates `emit` names ("ll": IR as lowered and after -O2, "o": the ELF
    object)."""
    emit = check_emit(emit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    compiled = compile_firmware()
    pe = package_pe(compiled.image, entry=ENTRY)
    efi = out / f"{BASE_NAME}.efi"
    efi.write_bytes(pe)
    write_symbol_map(compiled.image, efi.with_suffix(".map"))
    written = [efi, efi.with_suffix(".map")]
    written += edk2.write_integration_files(out, structs=protocol.WIRE_STRUCTS,
                                            constants=header_constants())
    for kind in emit:
        for suffix, content in EMIT_KINDS[kind]:
            path = out / f"{BASE_NAME}{suffix}"
            path.write_bytes(content(compiled))
            written.append(path)
    return FirmwareBuild(
        compiled=compiled, pe=pe,
        paths={p.name[len(BASE_NAME) + 1:]: p for p in written},
        sha256=hashlib.sha256(pe).hexdigest(), sha384=hashlib.sha384(pe).hexdigest(),
        seconds=time.perf_counter() - t0)
