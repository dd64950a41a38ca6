"""Every work-around for llvmlite's gaps, in one place: an llvmlite upgrade touches this file.

Targets llvmlite 0.50 (LLVM 22). Each function says what it works around; when a newer llvmlite
does the thing itself, replace the body with the plain call and run the tests (the firmware image
must stay byte-identical: `python build.py` prints its SHA-256).

This module is imported by `helperfw/__init__.py` before anything else, because the first work-
around (opaque pointers in the IR layer) must happen before llvmlite is imported at all.
"""

from __future__ import annotations

import functools
import os
import sys

LLVMLITE_VERSION = (0, 50)  # the llvmlite release these work-arounds were written against

# LLVM 22 only has opaque pointers; llvmlite's IR layer must print them too, and it reads this
# variable once, when it is first imported.
if "llvmlite" not in sys.modules:
    os.environ["LLVMLITE_ENABLE_IR_LAYER_TYPED_POINTERS"] = "0"

# (imported after the variable above is set)
import llvmlite
import llvmlite.binding as llvm
from llvmlite import ir

if llvmlite.ir_layer_typed_pointers_enabled:
    raise ImportError(
        "llvmlite was imported before helperfw with typed pointers enabled; import helperfw first "
        "or set LLVMLITE_ENABLE_IR_LAYER_TYPED_POINTERS=0"
    )


def installed_version() -> tuple[int, int]:
    """llvmlite's (major, minor), to compare with LLVMLITE_VERSION."""
    major, minor = llvmlite.__version__.split(".")[:2]
    return int(major), int(minor)


@functools.cache
def initialize() -> None:
    """Initialise LLVM's native target once. The asm parser is not optional: without it, any
    inline asm (cpuid, wrmsr, vmmcall...) aborts the whole process instead of raising."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    llvm.initialize_native_asmparser()


def add_attribute(fn: ir.Function, name: str) -> None:
    """Add a function attribute. llvmlite checks names against a fixed list that lacks the
    string attributes (`"no-builtins"`, `"no-stack-arg-probe"`) and some newer ones, so the
    check is bypassed by adding to the underlying set directly."""
    set.add(fn.attributes, name)


def hide_declaration(g: ir.GlobalVariable) -> None:
    """Mark an external declaration `hidden` (dso_local: PC-relative, no GOT). llvmlite prints
    no visibility on declarations; `storage_class` is printed right after the linkage, which is
    where LLVM expects the visibility."""
    g.storage_class = "hidden"


class _VolatileLoad(ir.instructions.LoadInstr):
    """llvmlite's load has no volatile flag."""

    def descr(self, buf: list) -> None:
        (ptr,) = self.operands
        buf.append(f"load volatile {self.type}, {ptr.type} {ptr.get_reference()}, align 1\n")


class _VolatileStore(ir.instructions.StoreInstr):
    """llvmlite's store has no volatile flag."""

    def descr(self, buf: list) -> None:
        val, ptr = self.operands
        buf.append(
            f"store volatile {val.type} {val.get_reference()}, {ptr.type} "
            f"{ptr.get_reference()}, align 1\n"
        )


def volatile_load(b: ir.IRBuilder, ptr: ir.Value, typ: ir.Type) -> ir.Instruction:
    """`load volatile typ, ptr, align 1`."""
    instr = _VolatileLoad(b.block, ptr, typ=typ)
    b._insert(instr)
    return instr


def volatile_store(b: ir.IRBuilder, val: ir.Value, ptr: ir.Value) -> None:
    """`store volatile val, ptr, align 1`."""
    b._insert(_VolatileStore(b.block, val, ptr))


def store(b: ir.IRBuilder, val: ir.Value, ptr: ir.Value, align: int = 1) -> None:
    """A plain store. IRBuilder.store compares the value's type with the pointer's pointee,
    which llvmlite still tracks on GEP results even with opaque pointers (an `i8` GEP used for a
    `v128` store is refused); building the instruction directly skips that stale check."""
    st = ir.instructions.StoreInstr(b.block, val, ptr)
    st.align = align
    b._insert(st)


class _FnPtr:
    """An opaque-pointer callee that carries its function type. IRBuilder.call reads the callee's
    `function_type`, which an opaque pointer value does not have."""

    def __init__(self, ptr: ir.Value, fty: ir.FunctionType) -> None:
        self.ptr, self.function_type, self.type = ptr, fty, ptr.type

    def get_reference(self) -> str:
        return self.ptr.get_reference()

    def _get_reference(self) -> str:
        return self.ptr.get_reference()


def indirect_callee(ptr: ir.Value, fty: ir.FunctionType) -> _FnPtr:
    """Something `IRBuilder.call` accepts for a call through pointer `ptr` of type `fty`."""
    return _FnPtr(ptr, fty)


def module_text_with_stubs(module: ir.Module, keep: ir.Function) -> str:
    """The module's IR with every defined function but `keep` reduced to `unreachable`: enough
    for LLVM to parse and verify `keep` alone. llvmlite prints a module only whole, so the
    prototypes come from `descr_prototype` and the module's metadata from its private printer."""
    lines = [f'target triple = "{module.triple}"', f'target datalayout = "{module.data_layout}"']
    lines += [t.get_declaration() for t in module.get_identified_types().values()]
    for g in module.globals.values():
        if isinstance(g, ir.Function) and g.blocks and g is not keep:
            proto: list[str] = []
            g.descr_prototype(proto)
            lines.append("".join(proto) + "{\nentry:\n  unreachable\n}\n")
        else:
            lines.append(str(g))
    lines += module._get_metadata_lines()
    return "\n".join(lines)
