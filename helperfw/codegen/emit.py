"""LLVM IR → x86-64 ELF object, with the one target configuration the firmware uses."""

from __future__ import annotations

import functools

import llvmlite.binding as llvm

from .. import features
from .llvm_compat import initialize as _init

TRIPLE = "x86_64-unknown-none-elf"
# SSE up to 4.1 plus AES-NI/PCLMULQDQ; no AVX so the image runs on any x86-64 with AES-NI.
# A function that adds features (@function(features=...)) carries its own "target-features".
FEATURES = features.target_string()
CPU = "x86-64"


def new_target_machine(opt: int = 2):
    """A target machine of its own, for one object. Code generation with a machine that already
    emitted another module is not reproducible: with LLVM 22, about one firmware build in four
    in the same process came out with different bytes in efi_main; a fresh machine per object
    gave identical bytes every time."""
    _init()
    target = llvm.Target.from_triple(TRIPLE)
    return target.create_target_machine(
        cpu=CPU, features=FEATURES, opt=opt, reloc="pic", codemodel="small"
    )


@functools.cache
def target_machine(opt: int = 2):
    """The shared machine, for what keeps no state between modules: the data layout and the
    optimisation pipeline's target information."""
    return new_target_machine(opt)


def data_layout() -> str:
    return str(target_machine().target_data)


def assemble(asm: str) -> bytes:
    """Assemble AT&T-syntax x86-64 text to raw .text bytes (for hand-written test snippets).

    Only position-independent code with no external references makes sense here."""
    _init()
    lines = "\n".join(
        'module asm "' + line.replace("\\", "\\\\").replace('"', '\\22') + '"'
        for line in [".text", *asm.strip().splitlines()]
    )
    mod = llvm.parse_assembly(f'target triple = "{TRIPLE}"\n{lines}\n')
    obj = new_target_machine().emit_object(mod)
    import lief

    elf = lief.ELF.parse(list(obj))
    return bytes(elf.get_section(".text").content)


def verify(ir_text: str) -> llvm.ModuleRef:
    """Parse and verify IR; RuntimeError with LLVM's message if it is not valid."""
    _init()
    mod = llvm.parse_assembly(ir_text)
    mod.verify()
    return mod


def optimize(ir_text: str, opt: int = 2) -> llvm.ModuleRef:
    """Parse, verify and optimise IR with LLVM's standard -O pipeline for our target."""
    mod = verify(ir_text)
    if opt:
        tm = target_machine(opt)
        pto = llvm.create_pipeline_tuning_options(speed_level=opt)
        pb = llvm.create_pass_builder(tm, pto)
        pb.getModulePassManager().run(mod, pb)
        mod.verify()
    return mod


def emit_object(mod: llvm.ModuleRef, opt: int = 2) -> bytes:
    return new_target_machine(opt).emit_object(mod)


def emit_assembly(mod: llvm.ModuleRef, opt: int = 2) -> str:
    return new_target_machine(opt).emit_assembly(mod)
