"""The sidecar link map (`X.map` next to `X.efi`): written by the build, read by every tool.

One reader and one writer for the format, in a module without lief, so the emulator (fault
reports name symbols) and `helperfw inspect/disasm` load maps without the packager's weight.
"""

from __future__ import annotations

import json
from pathlib import Path

from helperfw.codegen.image import LinkedImage, Symbol

MAP_FORMAT = "helperfw-map/1"


def write_symbol_map(image: LinkedImage, path: str | Path) -> None:
    """Write the sidecar link map (`X.map` next to `X.efi`) that `helperfw inspect/disasm` read.

    JSON rather than a text map so tools need no parser; keys sorted for reproducible output."""
    doc = {
        "format": MAP_FORMAT,
        "entry": image.entry,
        "image_size": image.size,
        "sections": [
            {"name": s.name, "rva": s.rva, "vsize": s.vsize, "perms": s.perms}
            for s in sorted(image.sections, key=lambda s: s.rva)
        ],
        "symbols": {
            name: {"rva": s.rva, "size": s.size, "section": s.section, "kind": s.kind}
            for name, s in sorted(image.symbols.items())
        },
        "relocs": sorted(image.relocs),
    }
    Path(path).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read_symbol_map(path: str | Path) -> dict[str, Symbol]:
    """Symbols from a map written by `write_symbol_map`."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != MAP_FORMAT:
        raise ValueError(f"{path}: not a {MAP_FORMAT} symbol map")
    return {
        name: Symbol(name, s["rva"], s["size"], s["section"], s["kind"])
        for name, s in doc["symbols"].items()
    }


def map_path_for(efi: str | Path) -> Path:
    """The sidecar map path for an .efi file (same stem, `.map`)."""
    return Path(efi).with_suffix(".map")
