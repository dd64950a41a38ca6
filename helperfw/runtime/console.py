"""Diagnostics: text to QEMU's debug port 0x402 always, and to UEFI ConOut while boot services
exist (the mirror VM has none, so ConOut is cleared before the driver returns)."""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    Static,
    addr,
    efi_call,
    function,
    outb,
    static,
    struct,
    u8,
    u16,
    u64,
)

from .efi import EfiSimpleTextOutput
from .platform import DEBUG_PORT


def text(s: str) -> Static:
    """A NUL-terminated ASCII string in .rodata."""
    raw = s.encode("ascii") + b"\0"
    return static(Array[u8, len(raw)], raw, readonly=True)


@struct
class ConsoleState:
    conout: u64  # EFI_SIMPLE_TEXT_OUTPUT_PROTOCOL*, 0 when unavailable


CONSOLE = static(ConsoleState)
HEX = text("0123456789abcdef")


@function(small=True)
def con_set_conout(conout: u64) -> None:
    CONSOLE.conout = conout


@function(small=True)
def con_flush16(buf: Ptr[u16], n: u64) -> None:
    if CONSOLE.conout != 0 and n != 0:
        buf[n] = 0
        fp = Ptr[EfiSimpleTextOutput](CONSOLE.conout).OutputString
        efi_call(fp, CONSOLE.conout, buf)


@function(small=True)
def con_puts(s: Ptr[u8]) -> None:
    """Write a NUL-terminated string; '\\n' becomes CR LF on ConOut."""
    buf: Array[u16, 80]
    n: u64 = 0
    i: u64 = 0
    while s[i] != 0:
        c = s[i]
        outb(DEBUG_PORT, c)
        if c == 10:
            buf[n] = 13
            n += 1
        buf[n] = u16(c)
        n += 1
        if n >= 76:
            con_flush16(addr(buf[0]), n)
            n = 0
        i += 1
    con_flush16(addr(buf[0]), n)


@function(small=True)
def con_hex(v: u64) -> None:
    """Write `v` as 0x-prefixed hex (16 digits)."""
    digits: Array[u8, 20]
    digits[0] = 48
    digits[1] = 120
    for i in range(16):
        digits[2 + i] = HEX[(v >> u64(60 - 4 * i)) & 15]
    digits[18] = 0
    con_puts(addr(digits[0]))

