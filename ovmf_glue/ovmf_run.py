"""Boot real OVMF under QEMU (TCG) and `load` one EFI image from the UEFI shell.

This is the only test of the image against EDK2's own PE/COFF loader, relocator and memory
protection, so it runs the firmware Debian ships rather than anything of ours. The image is put
on a QEMU virtual FAT drive next to a `startup.nsh` that loads it and powers the VM off; what the
image writes to I/O port 0x402 (QEMU's isa-debugcon) lands in a log file, what the shell prints
arrives on the serial console (stdout with -nographic).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from helperfw.runtime.platform import DEBUG_PORT as DEBUGCON_PORT  # OVMF's PcdDebugIoPort

QEMU = "qemu-system-x86_64"
IMAGE_NAME = "MigrationHelper.efi"
DEFAULT_CPU = "max"  # TCG's default qemu64 model has no AES-NI; "max,aes=off" takes it away again
# Lists every image still loaded, with its file path and CodeView (PDB) name: run after `load`,
# it shows whether the driver stayed resident and under which name the firmware knows it.
LIST_IMAGES = "dh -p LoadedImage -v"

# Debian's `ovmf` package: 4 MiB variable store builds first (current default), then the
# older 2 MiB ones. Never the .secboot/.ms variants: Secure Boot would refuse an unsigned image.
FIRMWARE_CANDIDATES: tuple[tuple[str, str], ...] = (
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
)

# ShellPkg `load` (UefiShellLevel2CommandsLib) prints one line per image, e.g. (measured):
#   Image 'FS0:\MigrationHelper.efi' loaded at F651000 - Success
#   Image 'FS0:\MigrationHelper.efi' error in StartImage: Unsupported
#   Image 'FS0:\MigrationHelper.efi' is not an image.
_LOADED_RE = re.compile(r"Image '([^']*)' loaded at (?:0x)?([0-9A-Fa-f]+) - ([^\n]+)")
_REFUSED_RE = re.compile(r"Image '([^']*)' (?!loaded at)([^\n]+)")
# `dh -v` prints, per image handle, "FilePath......: \X.efi" and "PdbFileName...: X.efi".
_DH_FIELD_RE = re.compile(r"^\s*(FilePath|PdbFileName)\.+:\s*(\S.*?)\s*$", re.MULTILINE)
_COUNTDOWN = "Press ESC in"
_ANSI_RE = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1b[()][A-Za-z0-9]")


@dataclass(frozen=True)
class Firmware:
    """An OVMF code image and the pristine variable store to copy for each boot."""

    code: Path
    vars: Path


@dataclass(frozen=True)
class BootResult:
    """What one boot showed: the debug-port log, the console, and the shell's verdict."""

    debug_log: str  # everything written to port 0x402 (OVMF's own log and the image's)
    console: str  # serial console with ANSI escapes removed
    load_line: str | None  # the shell's "Image '...' loaded at ... - <status>" or error line
    load_status: str | None  # "Success", or the EFI status / error text the shell printed
    loaded_at: int | None  # load address the shell reported
    returncode: int | None  # QEMU's exit status, None on timeout
    timed_out: bool
    seconds: float
    command: tuple[str, ...]

    @property
    def loaded(self) -> bool:
        """True when the shell reported the image loaded and its entry returned EFI_SUCCESS."""
        return self.load_status == "Success"

    def resident_images(self) -> list[tuple[str, str | None]]:
        """(file path, PDB name) of every image `dh -p LoadedImage -v` listed after the load
        (empty unless the boot ran LIST_IMAGES). The PDB name comes from the CodeView record."""
        images: list[tuple[str, str | None]] = []
        for field, value in _DH_FIELD_RE.findall(self.console):
            if field == "FilePath":
                images.append((value, None))
            elif images and images[-1][1] is None:
                images[-1] = (images[-1][0], value)
        return images


def find_firmware() -> Firmware | None:
    """The first installed OVMF code/vars pair, or None."""
    for code, vars_ in FIRMWARE_CANDIDATES:
        if Path(code).is_file() and Path(vars_).is_file():
            return Firmware(Path(code), Path(vars_))
    return None


def missing_requirements() -> str | None:
    """Why a real-OVMF boot cannot run here (None when it can): qemu or firmware absent."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found (Debian package qemu-system-x86)"
    if find_firmware() is None:
        return "OVMF firmware not found in /usr/share/OVMF (Debian package ovmf)"
    return None


def startup_script(image_name: str = IMAGE_NAME, after_load: tuple[str, ...] = ()) -> str:
    """The shell script: load the driver from the FAT drive, run `after_load` (shell commands),
    then power off so QEMU exits.

    The shell wants CRLF line endings in .nsh files."""
    lines = ["@echo -off", "fs0:", f"load fs0:\\{image_name}", *after_load, "reset -s"]
    return "\r\n".join(lines) + "\r\n"


def qemu_command(
    fw: Firmware, vars_copy: Path, fat_dir: Path, debug_log: Path, cpu: str = DEFAULT_CPU
) -> list[str]:
    """The QEMU command line for one boot (TCG: KVM is neither needed nor always present).

    `-cpu max` by default because TCG's default qemu64 model lacks AES-NI, which the helper's
    self-test uses; `-no-reboot` turns any reset into an exit so a crash cannot loop."""
    return [
        QEMU,
        "-machine", "q35",
        "-accel", "tcg",
        "-cpu", cpu,
        "-m", "256",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial", "stdio",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={fw.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
        "-drive", f"file=fat:rw:{fat_dir},format=raw,media=disk,if=ide,index=0",
        "-debugcon", f"file:{debug_log}",
        "-global", f"isa-debugcon.iobase={DEBUGCON_PORT:#x}",
        "-net", "none",
    ]  # fmt: skip


def _parse_load(console: str) -> tuple[str | None, str | None, int | None]:
    """Find the shell's `load` verdict in the console text."""
    m = _LOADED_RE.search(console)
    if m:
        return m.group(0).strip(), m.group(3).strip(), int(m.group(2), 16)
    m = _REFUSED_RE.search(console)
    if m:
        why = m.group(2).strip().rstrip(".")
        return m.group(0).strip(), why.split(": ", 1)[1] if ": " in why else why, None
    return None, None, None


def boot_efi(
    efi: str | Path,
    *,
    timeout: float = 120.0,
    firmware: Firmware | None = None,
    workdir: str | Path | None = None,
    cpu: str = DEFAULT_CPU,
    after_load: tuple[str, ...] = (),
) -> BootResult:
    """Boot OVMF, `load` the image at `efi` from the shell, and report what happened.

    `cpu` is QEMU's -cpu model; `after_load` are shell commands run after the load (e.g.
    LIST_IMAGES). `workdir` keeps the boot's files (FAT dir, logs) for inspection; by default a
    temporary directory is used and removed. Raises RuntimeError when qemu or OVMF is missing."""
    reason = missing_requirements()
    fw = firmware or find_firmware()
    if reason is not None or fw is None:
        raise RuntimeError(reason or "OVMF firmware not found")
    with tempfile.TemporaryDirectory(prefix="ovmf-boot-") as tmp:
        root = Path(workdir) if workdir is not None else Path(tmp)
        if any(c in str(root.resolve()) for c in ",:"):
            raise ValueError(f"{root}: QEMU's fat: drive syntax cannot take ',' or ':' in paths")
        root.mkdir(parents=True, exist_ok=True)
        fat_dir = root / "esp"
        fat_dir.mkdir(exist_ok=True)
        shutil.copyfile(efi, fat_dir / IMAGE_NAME)
        script = startup_script(IMAGE_NAME, after_load)
        (fat_dir / "startup.nsh").write_bytes(script.encode("ascii"))
        vars_copy = root / "OVMF_VARS.fd"
        shutil.copyfile(fw.vars, vars_copy)
        debug_log = root / "debugcon.log"
        debug_log.write_bytes(b"")
        cmd = qemu_command(fw, vars_copy, fat_dir, debug_log, cpu)
        return _run(cmd, debug_log, timeout)


def _run(cmd: list[str], debug_log: Path, timeout: float) -> BootResult:
    """Run QEMU to completion or timeout (then kill its process group).

    Console output is watched as it arrives: a key typed before the shell is up is swallowed by
    the firmware, so a CR is sent only once the shell's "Press ESC in 5 seconds" prompt shows,
    which skips the countdown (any key but ESC continues into startup.nsh)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(proc.stdout, chunks), daemon=True)
    reader.start()
    timed_out = False
    prompted = 0
    deadline = start + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            break
        seen = _ANSI_RE.sub("", b"".join(chunks).decode("latin-1")).count(_COUNTDOWN)
        if seen > prompted:  # once per countdown tick, in case a key is lost
            prompted = seen
            try:
                proc.stdin.write(b"\r")
                proc.stdin.flush()
            except BrokenPipeError:
                pass
        time.sleep(0.05)
    proc.wait()
    reader.join(timeout=5)
    proc.stdin.close()
    seconds = time.monotonic() - start
    out = b"".join(chunks)
    console = _ANSI_RE.sub("", out.decode("utf-8", "replace")).replace("\r", "")
    line, status, at = _parse_load(console)
    return BootResult(
        debug_log=debug_log.read_bytes().decode("utf-8", "replace"),
        console=console,
        load_line=line,
        load_status=status,
        loaded_at=at,
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        seconds=seconds,
        command=tuple(cmd),
    )


def _drain(stream: IO[bytes], chunks: list[bytes]) -> None:
    """Copy a pipe into `chunks` until EOF (runs in a thread so the main loop can time out)."""
    while True:
        data = os.read(stream.fileno(), 65536)
        if not data:
            return
        chunks.append(data)
