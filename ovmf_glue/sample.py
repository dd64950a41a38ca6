"""A tiny hand-assembled EFI driver image for testing the packaging and boot path on its own.

It lets the PE packager, the CLI and the real-OVMF boot be tested without the DSL compiler: the
entry point prints a banner to the debug port, then checks that the loader applied the one base
relocation (a pointer in .data must equal the runtime address of the banner) and says so, and
returns EFI_SUCCESS. Layout is pinned with `.org` so symbol offsets are known without a linker.
"""

from __future__ import annotations

import struct

from helperfw.codegen.emit import assemble
from helperfw.codegen.image import LinkedImage, Section, Symbol
from helperfw.runtime.platform import DEBUG_PORT

TEXT_RVA, RODATA_RVA, DATA_RVA, BSS_RVA = 0x1000, 0x2000, 0x3000, 0x4000
PUTS_OFF, MSG_OFF, OK_OFF, BAD_OFF = 0x80, 0xC0, 0x100, 0x140

BANNER = "helperfw-smoke: entry reached"
RELOC_OK = "helperfw-smoke: relocation ok"
RELOC_BAD = "helperfw-smoke: relocation BAD"
DESCRIPTOR = b"MHD1" + struct.pack("<IQ", 1, 0x0123_4567_89AB_CDEF)

_ASM = f"""
efi_main:
    push %rbx
    push %rsi
    lea msg(%rip), %rsi
    call puts
    lea efi_main(%rip), %rbx
    add ${DATA_RVA - TEXT_RVA}, %rbx
    mov (%rbx), %rax
    lea msg(%rip), %rcx
    lea okmsg(%rip), %rsi
    cmp %rcx, %rax
    je 1f
    lea badmsg(%rip), %rsi
1:
    call puts
    xor %eax, %eax
    pop %rsi
    pop %rbx
    ret
.org {PUTS_OFF:#x}, 0xcc
puts:
    mov ${DEBUG_PORT:#x}, %dx
2:
    movb (%rsi), %al
    test %al, %al
    je 3f
    outb %al, %dx
    inc %rsi
    jmp 2b
3:
    mov $10, %al
    outb %al, %dx
    ret
.org {MSG_OFF:#x}, 0xcc
msg:
    .asciz "{BANNER}"
.org {OK_OFF:#x}, 0xcc
okmsg:
    .asciz "{RELOC_OK}"
.org {BAD_OFF:#x}, 0xcc
badmsg:
    .asciz "{RELOC_BAD}"
"""


def sample_image() -> LinkedImage:
    """The smoke-test LinkedImage: .text/.rodata/.data/.bss, one DIR64 relocation, symbol map."""
    text = assemble(_ASM)
    data = struct.pack("<Q", TEXT_RVA + MSG_OFF)  # holds an RVA; the loader adds its base
    sections = (
        Section(".text", TEXT_RVA, text, len(text), "rx"),
        Section(".rodata", RODATA_RVA, DESCRIPTOR, len(DESCRIPTOR), "r"),
        Section(".data", DATA_RVA, data, len(data), "rw"),
        Section(".bss", BSS_RVA, b"", 0x2000, "rw"),
    )
    symbols = {
        "efi_main": Symbol("efi_main", TEXT_RVA, PUTS_OFF, ".text", "func"),
        "puts": Symbol("puts", TEXT_RVA + PUTS_OFF, MSG_OFF - PUTS_OFF, ".text", "func"),
        "msg": Symbol("msg", TEXT_RVA + MSG_OFF, len(BANNER) + 1, ".text", "object"),
        "mh_descriptor": Symbol("mh_descriptor", RODATA_RVA, len(DESCRIPTOR), ".rodata", "object"),
        "msg_ptr": Symbol("msg_ptr", DATA_RVA, 8, ".data", "object"),
        "scratch": Symbol("scratch", BSS_RVA, 0x2000, ".bss", "object"),
    }
    return LinkedImage(sections, (DATA_RVA,), symbols, entry="efi_main")
