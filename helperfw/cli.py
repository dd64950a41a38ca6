"""`helperfw` command line: look inside a built MigrationHelper.efi, run a whole live
migration with it under the emulator (`migrate`, optionally with a report), or draw the mirror's
address spaces from a real boot (`map`).

`inspect` and `disasm` read the PE file plus the sidecar link map (`X.map` next to `X.efi`,
written by ovmf_glue.pe.write_symbol_map), so a reviewer or integrator can check what the
measured image contains without rebuilding it.

Every mistake a user can make on the command line ends in one line on stderr and a non-zero
status: argparse's errors are shortened to one line (status 2), everything else is a CliError
(status 1). Inputs are checked before the slow work starts (booting, migrating).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

import capstone
import pefile

from helperfw.codegen.image import LinkedImage, Symbol
from helperfw.runtime.protocol import OPTION_NAMES
from ovmf_glue.pe import map_path_for, read_symbol_map
from ovmf_glue.pe_format import IMAGE_SCN_MEM_EXECUTE as _SCN_EXECUTE
from ovmf_glue.pe_format import IMAGE_SCN_MEM_READ as _SCN_READ
from ovmf_glue.pe_format import IMAGE_SCN_MEM_WRITE as _SCN_WRITE
from ovmf_glue.pe_format import RELOC_TYPE_NAMES as _RELOC_TYPES

DEFAULT_IMAGE = Path("out/MigrationHelper.efi")  # where build.py writes it
DESCRIPTOR_SYMBOL = "mh_descriptor"


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`helperfw migrate: argument --mem: ...`)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message (emulator errors may append a debug log)."""
    text = str(exc).strip() or type(exc).__name__
    first = text.splitlines()[0]
    return first if len(first) <= 300 else first[:297] + "..."


@contextlib.contextmanager
def _emulator_errors(what: str) -> Iterator[None]:
    """Turn what booting or migrating raises for bad input (a PE that is not the helper, a
    helper that refuses, a transport that cannot open) into one CliError line."""
    from emulate.faults import GuestFault
    from emulate.uefi import PeError

    try:
        yield
    except (PeError, GuestFault, RuntimeError, ValueError, OSError, MemoryError) as exc:
        raise CliError(f"{what}: {_one_line(exc)}") from exc


def check_image(path: Path) -> Path:
    """The image must be a readable PE32+ AMD64 file (checked before anything boots)."""
    from emulate.uefi import PeError, parse_pe

    if not path.exists():
        raise CliError(f"{path}: not found; build it first with `python build.py`")
    try:
        parse_pe(path.read_bytes())
    except (OSError, PeError) as exc:
        raise CliError(f"{path}: not a PE32+ image: {_one_line(exc)}") from exc
    _load_map(path, None, required=False)  # the emulator symbolizes faults with it: check it
    return path


def check_output(path: Path, suffixes: Sequence[str], what: str) -> Path:
    """An output file name with a known extension in an existing, writable directory."""
    if path.suffix.lower() not in suffixes:
        raise CliError(f"{path}: {what} must end in {', '.join(suffixes)}")
    parent = path.parent
    if path.is_dir():
        raise CliError(f"{path}: is a directory")
    if not parent.is_dir():
        raise CliError(f"{path}: directory {parent} does not exist")
    existed = path.exists()
    try:  # the only reliable test (root passes os.access everywhere): open it for appending
        with path.open("ab"):
            pass
    except OSError as exc:
        raise CliError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    if not existed:
        path.unlink()
    return path


def _write(path: Path, data: bytes) -> None:
    """Write an output file; a failure (disk full, permissions changed) is one line."""
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise CliError(f"{path}: cannot write: {exc.strerror or exc}") from exc


def _require_plotting() -> None:
    """Fail before the slow work if the optional 'plot' extra is missing."""
    from helperfw.plots import PlotUnavailable, require_matplotlib

    try:
        require_matplotlib()
    except PlotUnavailable as exc:
        raise CliError(str(exc)) from exc


def _load_pe(path: Path) -> pefile.PE:
    if not path.is_file():
        raise CliError(f"{path}: {'not a file' if path.exists() else 'not found'}")
    try:
        return pefile.PE(str(path))
    except (OSError, pefile.PEFormatError) as exc:
        raise CliError(f"{path}: cannot read PE image: {exc}") from exc


def _load_map(efi: Path, map_file: Path | None, *, required: bool) -> dict[str, Symbol] | None:
    """The symbol map: `map_file` if given (then it must exist), else the one beside `efi`
    (which `inspect` may do without)."""
    path = map_file or map_path_for(efi)
    if not path.exists():
        if required or map_file is not None:
            raise CliError(f"{path}: symbol map not found (written next to the .efi by the build)")
        return None
    try:
        return read_symbol_map(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CliError(f"{path}: bad symbol map: {_one_line(exc)}") from exc


def _perms(characteristics: int) -> str:
    return "".join(
        c if characteristics & bit else "-"
        for c, bit in (("r", _SCN_READ), ("w", _SCN_WRITE), ("x", _SCN_EXECUTE))
    )


def _hexdump(data: bytes, base: int, out: TextIO) -> None:
    for off in range(0, len(data), 16):
        chunk = data[off : off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        print(f"  {base + off:08x}  {chunk.hex(' '):<47}  {text}", file=out)


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    """Headers, sections, relocations, symbols and the descriptor of one image."""
    efi: Path = args.file
    pe = _load_pe(efi)
    raw = efi.read_bytes()
    fh, oh = pe.FILE_HEADER, pe.OPTIONAL_HEADER
    print(f"{efi}: {len(raw)} bytes", file=out)
    print(f"  sha256 {hashlib.sha256(raw).hexdigest()}", file=out)
    print(f"  sha384 {hashlib.sha384(raw).hexdigest()}", file=out)
    print("headers:", file=out)
    machine = pefile.MACHINE_TYPE.get(fh.Machine, hex(fh.Machine))
    subsystem = pefile.SUBSYSTEM_TYPE.get(oh.Subsystem, str(oh.Subsystem))
    rows = [
        ("machine", f"{fh.Machine:#06x} {machine}"),
        ("characteristics", f"{fh.Characteristics:#06x}"),
        ("timestamp", f"{fh.TimeDateStamp:#x}"),
        ("magic", f"{oh.Magic:#x} {'PE32+' if oh.Magic == 0x20B else 'PE32'}"),
        ("subsystem", f"{oh.Subsystem} {subsystem}"),
        ("entry point", f"{oh.AddressOfEntryPoint:#x}"),
        ("image base", f"{oh.ImageBase:#x}"),
        ("size of image", f"{oh.SizeOfImage:#x}"),
        ("size of headers", f"{oh.SizeOfHeaders:#x}"),
        ("section align", f"{oh.SectionAlignment:#x}"),
        ("file align", f"{oh.FileAlignment:#x}"),
        ("size of code", f"{oh.SizeOfCode:#x}"),
        ("init data", f"{oh.SizeOfInitializedData:#x}"),
        ("uninit data", f"{oh.SizeOfUninitializedData:#x}"),
        ("dll chars", f"{oh.DllCharacteristics:#06x}"),
        ("checksum", f"{oh.CheckSum:#x} ({'ok' if pe.verify_checksum() else 'BAD'})"),
    ]
    for key, val in rows:
        print(f"  {key:<16} {val}", file=out)
    print("sections:", file=out)
    print(f"  {'name':<8} {'rva':>8} {'vsize':>8} {'rawsize':>8} perms", file=out)
    for s in pe.sections:
        name = s.Name.rstrip(b"\0").decode("ascii", "replace")
        print(
            f"  {name:<8} {s.VirtualAddress:>#8x} {s.Misc_VirtualSize:>#8x} "
            f"{s.SizeOfRawData:>#8x} {_perms(s.Characteristics)}",
            file=out,
        )
    print("base relocations:", file=out)
    pe.parse_data_directories(
        directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_BASERELOC"]]
    )
    count = 0
    for block in getattr(pe, "DIRECTORY_ENTRY_BASERELOC", []):
        for e in block.entries:
            if e.type == 0:
                continue  # ABSOLUTE: block padding
            count += 1
            print(f"  {e.rva:#010x} {_RELOC_TYPES.get(e.type, str(e.type))}", file=out)
    if not count:
        print("  (none)", file=out)
    symbols = _load_map(efi, args.map, required=False)
    if symbols is None:
        print(f"symbols: (no map at {args.map or map_path_for(efi)})", file=out)
        return 0
    print("symbols:", file=out)
    for sym in sorted(symbols.values(), key=lambda s: (s.rva, s.name)):
        print(
            f"  {sym.rva:#010x} {sym.size:>#8x} {sym.kind:<6} {sym.section:<8} {sym.name}", file=out
        )
    desc = symbols.get(DESCRIPTOR_SYMBOL)
    if desc is None:
        print(f"descriptor: (no {DESCRIPTOR_SYMBOL} symbol)", file=out)
    else:
        print(f"descriptor ({DESCRIPTOR_SYMBOL}, {desc.size} bytes at {desc.rva:#x}):", file=out)
        raw = pe.get_data(desc.rva, desc.size)
        _hexdump(raw, desc.rva, out)
        _print_descriptor(raw, out)
    return 0


def _print_descriptor(raw: bytes, out: TextIO) -> None:
    """Decode the descriptor with the same struct the firmware was built from."""
    import uuid

    from helperfw.runtime.protocol import DESCRIPTOR_MAGIC, OPTION_NAMES, ImageDescriptor

    if len(raw) < ImageDescriptor.size:
        return
    d = ImageDescriptor.parse(raw)
    if d.magic != DESCRIPTOR_MAGIC:
        print("  (bad descriptor magic)", file=out)
        return
    print(f"  protocol version {d.protocol_version}, default option "
          f"{OPTION_NAMES.get(d.default_option, d.default_option)}, {d.slots} slots, "
          f"capabilities {d.capabilities:#x}", file=out)
    print(f"  key entry GUID   {uuid.UUID(bytes_le=bytes(d.key_entry_guid))}", file=out)
    print(f"  config GUID      {uuid.UUID(bytes_le=bytes(d.config_guid))}", file=out)


def cmd_disasm(args: argparse.Namespace, out: TextIO) -> int:
    """Disassemble one function of the image, with call/jump targets named from the map."""
    efi: Path = args.image
    pe = _load_pe(efi)
    symbols = _load_map(efi, args.map, required=True)
    assert symbols is not None
    sym = symbols.get(args.function)
    if sym is None:
        raise CliError(f"no symbol {args.function!r} in {args.map or map_path_for(efi)}")
    if sym.kind != "func":
        raise CliError(f"{sym.name} is an {sym.kind} symbol, not a function")
    try:
        code = pe.get_data(sym.rva, sym.size)
    except pefile.PEFormatError as exc:
        raise CliError(f"{sym.name}: not inside {efi}: {_one_line(exc)}") from exc
    names = LinkedImage(sections=(), relocs=(), symbols=symbols)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.syntax = capstone.CS_OPT_SYNTAX_ATT if args.syntax == "att" else capstone.CS_OPT_SYNTAX_INTEL
    md.detail = True
    print(f"{sym.name} ({sym.size:#x} bytes at {sym.rva:#x}, section {sym.section}):", file=out)
    end = sym.rva
    padding = 0
    for ins in md.disasm(code, sym.rva):
        end = ins.address + ins.size
        if ins.mnemonic == "int3":  # inter-function padding: summarise, don't list
            padding += 1
            continue
        if padding:
            print(f"  ({padding} bytes of int3)", file=out)
            padding = 0
        note = ""
        if ins.group(capstone.CS_GRP_JUMP) or ins.group(capstone.CS_GRP_CALL):
            ops = ins.operands
            if len(ops) == 1 and ops[0].type == capstone.x86.X86_OP_IMM:
                note = f"  <{names.symbolize(ops[0].imm)}>"
        print(
            f"  {ins.address:08x}:  {ins.bytes.hex(' '):<30} {ins.mnemonic} {ins.op_str}{note}",
            file=out,
        )
    if padding:
        print(f"  ({padding} bytes of int3)", file=out)
    if end < sym.rva + sym.size:
        print(f"  ({sym.rva + sym.size - end} trailing bytes not decoded)", file=out)
    return 0


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MAX_MEM = 4 << 30  # the emulator holds each host's guest RAM in this process


def parse_size(text: str) -> int:
    """'256M', '1G', '64MiB', '1048576' -> bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] and t[-1:] in "KMG" else ""
    try:
        n = int(t[: len(t) - len(unit)]) * _SIZE_UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (must be positive)")
    return n


def parse_mem(text: str) -> int:
    """Guest RAM: a size the host model's default layout accepts, at most MAX_MEM."""
    from emulate.host import default_layout

    n = parse_size(text)
    if n > MAX_MEM:
        raise argparse.ArgumentTypeError(f"{text}: at most {MAX_MEM >> 30}G (the emulator keeps "
                                         "guest RAM in memory)")
    try:
        default_layout(n)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text}: {exc}") from None
    return n


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer not below `low`."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"{n} is less than {low}")
        return n

    return parse


def parse_transport(text: str) -> str:
    """memory | file:PATH (in an existing, writable directory) | tcp[:HOST:PORT] on loopback,
    as emulate.migration.Migration.run reads it; checked here so a typo fails before booting."""
    from emulate.stream import check_loopback

    if text == "memory" or text == "tcp":
        return text
    if text.startswith("file:"):
        path = Path(text[5:])
        if not text[5:]:
            raise argparse.ArgumentTypeError("file: needs a path (file:PATH)")
        if not path.parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: directory {path.parent} does not exist")
        if path.is_dir() or not os.access(path.parent, os.W_OK):
            raise argparse.ArgumentTypeError(f"{text}: cannot write the stream there")
        return text
    if text.startswith("tcp:"):
        host, _, port = text[4:].rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise argparse.ArgumentTypeError(f"{text}: expected tcp:HOST:PORT, e.g. "
                                             "tcp:127.0.0.1:7000")
        try:
            check_loopback(host)
        except (OSError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"{text}: {_one_line(exc)}") from None
        return text
    raise argparse.ArgumentTypeError(f"unknown transport {text!r} (memory, file:PATH, "
                                     "tcp[:HOST:PORT])")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def cmd_migrate(args: argparse.Namespace, out: TextIO) -> int:
    """A whole live migration under emulation: boot both hosts, pre-copy, stop-and-copy,
    verify; print throughput, exits per page, rounds and bytes on the wire."""
    from tqdm import tqdm

    from emulate.host import default_layout
    from emulate.migration import MigrationParams, migrate, parse_lane_event

    check_image(args.image)
    if args.report is not None:
        from helperfw.plots.report import REPORT_FORMATS

        check_output(args.report, REPORT_FORMATS, "the report")
        _require_plotting()
    option = {v: k for k, v in OPTION_NAMES.items()}[args.option]
    layout = default_layout(args.mem)
    p = MigrationParams(mem=args.mem, option=option, cbit=args.cbit, seed=args.seed,
                        image=args.image, transport=args.transport, max_rounds=args.max_rounds,
                        converge_pages=args.converge, sev_es=args.sev_es, lanes=args.lanes)
    blocks = ", ".join(f"{b.name} {_mib(b.size)} " + (f"@ GPA {b.gpa:#x}" if b.gpa is not None
                                                        else "unplugged")
                       for b in layout)
    platform = "SEV-ES" if args.sev_es else "SEV"
    print(f"migrate: {_mib(args.mem)} {platform} guest ({blocks}); option {args.option}, C-bit "
          f"{args.cbit}, transport {args.transport}, seed {args.seed}, lanes {args.lanes}",
          file=out)
    print(f"helper: {args.image}", file=out)
    bar = None if args.no_progress else tqdm(total=0, unit="page", desc="booting",
                                            file=sys.stderr, dynamic_ncols=True)
    # with several lanes, one bar per lane under the overall one: its private pages per round
    lane_bars = [] if bar is None or args.lanes == 1 else [
        tqdm(total=0, unit="page", desc=f"  lane {i}", position=i + 1, leave=False,
             file=sys.stderr, dynamic_ncols=True) for i in range(args.lanes)]
    rounds = [0]

    def progress(event: str, n: int) -> None:
        if bar is None:
            return
        lane = parse_lane_event(event)
        if lane is not None:
            b = lane_bars[lane[0]]
            if lane[1] == "round":
                b.reset(total=n)
            else:
                b.update(n)
            return
        if event == "round":
            rounds[0] += 1
            bar.total += n
            bar.set_description(f"round {rounds[0]}")
            bar.refresh()
        elif event == "pages":
            bar.update(n)
        elif event == "done":
            bar.set_description("verifying")

    try:
        with _emulator_errors("migration failed"):
            res = migrate(p, progress)
    finally:
        for b in [*lane_bars, *([bar] if bar is not None else [])]:
            b.close()
    for r in res.rounds:
        kind = "stop-and-copy" if r.final else "pre-copy"
        print(f"round {r.round} ({kind}): {r.pages} pages ({r.private} private, {r.shared} "
              f"shared), guest wrote {r.guest_touches} times, {r.dirty_after} pages dirtied, "
              f"{r.seconds:.2f} s", file=out)
    print(f"session {res.session_id:#018x}: {res.records} records, {res.epochs} epochs",
          file=out)
    print(f"pages: {res.pages} ({res.private_pages} private sealed+opened, {res.shared_pages} "
          f"shared raw) in {res.seconds:.1f} s = {res.pages_per_s:.0f} pages/s", file=out)
    print(f"VM exits: {res.src_exits} source + {res.dst_exits} destination mirror exits = "
          f"{res.exits_per_page:.4f} exits/page", file=out)
    print(f"source guest exits while migrating: {res.guest_exits} (dirty-log write faults and "
          f"budget slices)", file=out)
    print(f"rounds: {len(res.rounds)} ({len(res.rounds) - 1} pre-copy + stop-and-copy)",
          file=out)
    if res.downtime is not None:
        print(f"downtime: {res.downtime * 1000:.0f} ms (guest stopped on the source until "
              f"RECV_FINISH on the destination)", file=out)
    print(f"bytes on the wire: {res.bytes_on_wire} ({res.bytes_on_wire / (1 << 20):.1f} MiB)",
          file=out)
    v = res.verification
    print(f"verification: {'skipped' if v is None else v.summary()}", file=out)
    if args.report is not None:
        _write_report(res, args.report, out)
    return 0 if v is None or v.ok else 1


def _write_report(res: object, path: Path, out: TextIO) -> None:
    """The report from the migration's own timeline, as HTML or SVG by extension."""
    from emulate.timeline import summarize
    from helperfw.plots.report import report_bytes

    blob = report_bytes(summarize(res), path)  # type: ignore[arg-type]
    _write(path, blob)
    print(f"report: {path} ({len(blob)} bytes)", file=out)


def cmd_map(args: argparse.Namespace, out: TextIO) -> int:
    """Boot the helper, read BootInfo, the mirror's memslots and its page tables; print them as
    a table and, with --output, draw them."""
    from emulate.addrmap import read_map
    from helperfw.runtime.protocol import OPT_SHIFT

    check_image(args.image)
    if args.output is not None:
        from helperfw.plots import FORMATS

        check_output(args.output, tuple(FORMATS), "the picture")
        _require_plotting()
    by_name = {v: k for k, v in OPTION_NAMES.items()}
    options = list(OPTION_NAMES) if args.all else [by_name[args.option]]
    if args.shift_high and OPT_SHIFT not in options:
        raise CliError("--shift-high applies to the shift option only")
    maps = []
    for option in options:
        with _emulator_errors(f"booting {args.image} (option {OPTION_NAMES[option]})"):
            maps.append(read_map(args.image, option, args.cbit, args.mem, seed=args.seed,
                                 shift_high=args.shift_high and option == OPT_SHIFT))
    print("\n\n".join(m.table() for m in maps), file=out)
    if args.output is not None:
        from helperfw.plots import format_for, render
        from helperfw.plots.addrmap import draw_maps

        blob = render(draw_maps(maps), format_for(args.output))
        _write(args.output, blob)
        print(f"picture: {args.output} ({len(blob)} bytes)", file=out)
    return 0


def register_map(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The `map` subcommand: the mirror's address spaces, read from a real boot."""
    p = subparsers.add_parser(
        "map", help="boot the helper and show (or draw) the mirror's address spaces")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--option", choices=tuple(OPTION_NAMES.values()), default="tuples",
                       help="mirror address-space option (default tuples)")
    which.add_argument("--all", action="store_true", help="the three options side by side")
    p.add_argument("--cbit", type=int, choices=(47, 51), default=47, help="SEV C-bit position")
    p.add_argument("--mem", type=parse_mem, default=parse_size("256M"),
                   help="guest RAM, sizes the RAM window (multiple of 16 MiB; default 256M)")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help=f"default {DEFAULT_IMAGE}")
    p.add_argument("--seed", type=_int_at_least(0), default=1, help="seed of the boot")
    p.add_argument("--shift-high", action="store_true",
                   help="shift with RAM at 2^(MAXPHYADDR - reduction - 1) instead of 4 GiB")
    p.add_argument("-o", "--output", type=Path, metavar="PATH.svg|PATH.png",
                   help="draw the map into this file (needs the 'plot' extra)")
    p.set_defaults(func=cmd_map)


def register_migrate(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The `migrate` subcommand: a whole live migration under the emulator."""
    p = subparsers.add_parser(
        "migrate", help="live-migrate an emulated SEV guest through the helper, and verify")
    p.add_argument("--mem", type=parse_mem, default=parse_size("256M"),
                   help="guest RAM (multiple of 16 MiB; default 256M)")
    p.add_argument("--option", choices=tuple(OPTION_NAMES.values()), default="tuples",
                   help="mirror address-space option (default tuples)")
    p.add_argument("--cbit", type=int, choices=(47, 51), default=47, help="SEV C-bit position")
    p.add_argument("--seed", type=_int_at_least(0), default=1,
                   help="seed for keys, guest and layout")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help=f"default {DEFAULT_IMAGE}")
    p.add_argument("--transport", type=parse_transport, default="tcp",
                   help="tcp[:127.0.0.1:PORT] (loopback), file:PATH or memory (default tcp)")
    p.add_argument("--max-rounds", type=_int_at_least(1), default=6,
                   help="pre-copy rounds at most")
    p.add_argument("--converge", type=_int_at_least(0), default=384,
                   help="stop-and-copy once a round leaves at most this many dirty pages")
    p.add_argument("--sev-es", action="store_true",
                   help="SEV-ES guests: registers hidden from the host, the guest parks its vCPU")
    p.add_argument("--lanes", type=_int_at_least(1), default=1,
                   help="mirror vCPUs per helper, each driven by its own host thread (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report", type=Path, metavar="PATH.html|PATH.svg",
                   help="write a report with charts (needs the 'plot' extra)")
    p.set_defaults(func=cmd_migrate)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; subcommands set `func(args, out) -> int`."""
    parser = _Parser(
        prog="helperfw",
        description="Inspect the SEV migration helper firmware image, migrate with it under "
        "the emulator, or draw its mirror address spaces.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="PE headers, sections, relocations, symbols, descriptor")
    p.add_argument("file", type=Path, metavar="FILE.efi")
    p.add_argument("--map", type=Path, help="symbol map (default: FILE.map next to FILE.efi)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("disasm", help="disassemble one function using the symbol map")
    p.add_argument("function", metavar="FUNCTION")
    p.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help=f"default {DEFAULT_IMAGE}")
    p.add_argument("--map", type=Path, help="symbol map (default: IMAGE.map next to IMAGE)")
    p.add_argument("--syntax", choices=("att", "intel"), default="att")
    p.set_defaults(func=cmd_disasm)

    register_migrate(sub)
    register_map(sub)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the `helperfw` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, out or sys.stdout))
    except CliError as exc:
        print(f"helperfw: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("helperfw: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `helperfw disasm f | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
