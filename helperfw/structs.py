"""`@struct`: declare a layout once, get the LLVM type, a construct parser and a C declaration.

Offsets follow the x86-64 C rules (natural alignment, tail padding) unless `packed=True`. The LLVM
type is emitted as a packed struct with explicit padding arrays, so LLVM cannot disagree with the
offsets computed here; tests check all three (LLVM data layout, construct, gcc's offsetof).
"""

from __future__ import annotations

import inspect
import struct as struct_module
from dataclasses import dataclass

import construct as cs
from llvmlite import ir

from .types import ArrayType, BoolType, IntType, PtrType, Type, VecType

_INT_FORMATS = {1: "Bb", 2: "Hh", 4: "Ii", 8: "Qq"}  # struct codes by size: [unsigned, signed]
C_KEYWORDS = frozenset(
    ["auto", "break", "case", "char", "const", "continue", "default", "do", "double", "else", "enum", "extern", "float", "for", "goto", "if", "inline", "int", "long", "register", "restrict", "return", "short", "signed", "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void", "volatile", "while", "_Bool", "_Alignas", "_Alignof", "_Atomic", "_Static_assert"]
)


@dataclass(frozen=True)
class Field:
    name: str
    type: Type
    offset: int


class StructType(Type):
    def __init__(self, name: str, fields: list[tuple[str, Type]], packed: bool, doc: str = ""):
        self.name = name
        self.packed = packed
        self.doc = doc
        self.fields: dict[str, Field] = {}
        off = 0
        align = 1
        for fname, ftype in fields:
            if fname in C_KEYWORDS:
                raise TypeError(f"struct {name}: field {fname!r} is a C keyword (the header "
                                "would not compile)")
            if not isinstance(ftype, Type) or ftype.size == 0:
                raise TypeError(f"struct {name}: field {fname!r} has no DSL type ({ftype!r})")
            a = 1 if packed else ftype.align
            off = (off + a - 1) // a * a
            self.fields[fname] = Field(fname, ftype, off)
            off += ftype.size
            align = max(align, a)
        self.align = align
        self.size = (off + align - 1) // align * align
        self._llvm: ir.Type | None = None
        self._construct: cs.Construct | None = None

    # -- layout queries -------------------------------------------------------------------------
    def offset(self, field: str) -> int:
        return self.field(field).offset

    def field(self, name: str) -> Field:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(f"struct {self.name} has no field {name!r}") from None

    def field_index(self, name: str) -> int:
        """Index of `name` in the LLVM struct (padding arrays occupy indices too)."""
        self.llvm()
        return self._llvm_index[name]

    # -- the three derived views ----------------------------------------------------------------
    def llvm(self) -> ir.Type:
        if self._llvm is None:
            elems: list[ir.Type] = []
            self._llvm_index: dict[str, int] = {}
            pos = 0
            for f in self.fields.values():
                if f.offset > pos:
                    elems.append(ir.ArrayType(ir.IntType(8), f.offset - pos))
                self._llvm_index[f.name] = len(elems)
                elems.append(f.type.llvm())
                pos = f.offset + f.type.size
            if self.size > pos:
                elems.append(ir.ArrayType(ir.IntType(8), self.size - pos))
            self._llvm = ir.LiteralStructType(elems, packed=True)
        return self._llvm

    def construct(self) -> cs.Construct:
        if self._construct is None:
            parts: list[cs.Construct] = []
            pos = 0
            for f in self.fields.values():
                if f.offset > pos:
                    parts.append(cs.Padding(f.offset - pos))
                parts.append(f.name / f.type.construct())
                pos = f.offset + f.type.size
            if self.size > pos:
                parts.append(cs.Padding(self.size - pos))
            self._construct = cs.Struct(*parts)
        return self._construct

    def pystruct(self, upto: str | None = None) -> struct_module.Struct:
        """The integer fields (those before `upto`, or all) as one little-endian
        `struct.Struct`, padding included: the fast view for host code that packs or unpacks a
        layout per batch (construct is far slower). Fields must be integers."""
        fmt, pos = "<", 0
        for f in self.fields.values():
            if f.name == upto:
                break
            if not isinstance(f.type, IntType):
                raise TypeError(f"struct {self.name}: field {f.name} is not an integer")
            fmt += "x" * (f.offset - pos) + _INT_FORMATS[f.type.size][f.type.signed]
            pos = f.offset + f.type.size
        if upto is None:
            fmt += "x" * (self.size - pos)
        return struct_module.Struct(fmt)

    def parse(self, data: bytes) -> cs.Container:
        return self.construct().parse(bytes(data[: self.size]))

    def build(self, **values: object) -> bytes:
        """Bytes of this struct; omitted fields are zero."""
        full = {}
        for f in self.fields.values():
            if f.name in values:
                full[f.name] = values.pop(f.name)
            else:
                full[f.name] = _zero(f.type)
        if values:
            raise KeyError(f"struct {self.name} has no fields {sorted(values)}")
        return self.construct().build(full)

    def c_name(self) -> str:
        return self.name

    def c_decl(self) -> str:
        """A C typedef with explicit padding and static_asserts on size and every offset."""
        lines = []
        if self.doc:
            lines.append(f"/* {self.doc} */")
        lines.append(f"typedef struct {'__attribute__((packed)) ' if self.packed else ''}{{")
        for f in self.fields.values():
            lines.append(f"  {_c_field(f.type, f.name)};")
        lines.append(f"}} {self.name};")
        lines.append(f"_Static_assert(sizeof({self.name}) == {self.size}, \"{self.name} size\");")
        for f in self.fields.values():
            lines.append(
                f"_Static_assert(offsetof({self.name}, {f.name}) == {f.offset}, "
                f'"{self.name}.{f.name}");'
            )
        return "\n".join(lines)

    def __eq__(self, other: object) -> bool:
        return other is self

    def __hash__(self) -> int:
        return id(self)


def _c_field(t: Type, name: str) -> str:
    if isinstance(t, ArrayType):
        dims = ""
        while isinstance(t, ArrayType):
            dims += f"[{t.count}]"
            t = t.elem
        return f"{_c_field(t, name + dims)}"
    if isinstance(t, VecType):
        return f"_Alignas({t.size}) uint8_t {name}[{t.size}]"
    return f"{t.c_name()} {name}"


def _zero(t: Type) -> object:
    if isinstance(t, (IntType, PtrType)):
        return 0
    if isinstance(t, BoolType):
        return False
    if isinstance(t, VecType):
        return bytes(t.size)
    if isinstance(t, ArrayType):
        return bytes(t.count) if t.elem.size == 1 and isinstance(t.elem, IntType) and not t.elem.signed else [_zero(t.elem)] * t.count
    if isinstance(t, StructType):
        return {f.name: _zero(f.type) for f in t.fields.values()}
    raise TypeError(t)


def struct(cls: type | None = None, *, packed: bool = False):
    """Class decorator: the annotated fields, in order, become a StructType."""

    def make(c: type) -> StructType:
        ann = inspect.get_annotations(c, eval_str=True)
        return StructType(c.__name__, list(ann.items()), packed, inspect.getdoc(c) or "")

    return make(cls) if cls is not None else make
