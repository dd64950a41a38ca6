"""DSL types: the single description of every value the helper handles.

Each type knows its size/alignment (the x86-64 SysV C layout), its LLVM type, its C spelling and
its `construct` parser, so a struct declared once serves the compiler, the host model and the C
header alike. Integer types are also callable: `u32(x)` is the DSL cast and, in Python, wraps `x`
to the type's range (the reference interpreter relies on that).
"""

from __future__ import annotations

import ast

import construct as cs
from llvmlite import ir


class Type:
    name: str = "?"
    size: int = 0
    align: int = 1

    def llvm(self) -> ir.Type:
        raise NotImplementedError

    def c_name(self) -> str:
        raise NotImplementedError

    def construct(self) -> cs.Construct:
        raise NotImplementedError

    @property
    def is_scalar(self) -> bool:
        return isinstance(self, (IntType, BoolType, PtrType, VecType))

    def __repr__(self) -> str:
        return self.name


class VoidType(Type):
    name = "void"

    def llvm(self) -> ir.Type:
        return ir.VoidType()

    def c_name(self) -> str:
        return "void"


class IntType(Type):
    def __init__(self, bits: int, signed: bool) -> None:
        self.bits = bits
        self.signed = signed
        self.size = self.align = bits // 8
        self.name = f"{'i' if signed else 'u'}{bits}"
        self.mask = (1 << bits) - 1
        self.min = -(1 << (bits - 1)) if signed else 0
        self.max = (1 << (bits - 1)) - 1 if signed else self.mask

    def llvm(self) -> ir.Type:
        return ir.IntType(self.bits)

    def c_name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}_t"

    def construct(self) -> cs.Construct:
        return cs.BytesInteger(self.size, signed=self.signed, swapped=True)

    def wrap(self, value: int) -> int:
        """Two's-complement wrap of a Python int into this type's range."""
        v = int(value) & self.mask
        if self.signed and v > self.max:
            v -= 1 << self.bits
        return v

    def fits(self, value: int) -> bool:
        return self.min <= value <= self.max

    def __call__(self, value: int) -> int:  # the cast, executed in Python
        return self.wrap(value)


class BoolType(Type):
    name = "bool"
    size = align = 1

    def llvm(self) -> ir.Type:
        return ir.IntType(1)

    def c_name(self) -> str:
        return "uint8_t"

    def construct(self) -> cs.Construct:
        return cs.Flag


class VecType(Type):
    """A SIMD value of `bits` bits, stored little-endian like movdqu/vmovdqu: `v128` (SSE: an AES
    block, a POLYVAL element) or `v256` (AVX2: two of them, one per 128-bit lane; lane 0 is the
    low 16 bytes). `features` are the LLVM target features a function must have to hold one
    (`@function(features=...)`); the front end refuses a wide value anywhere else."""

    def __init__(self, bits: int, features: tuple[str, ...] = ()) -> None:
        self.bits = bits
        self.size = self.align = bits // 8
        self.lanes = bits // 128  # 128-bit lanes: what the per-lane instructions act on
        self.mask = (1 << bits) - 1
        self.name = f"v{bits}"
        self.features = frozenset(features)

    def llvm(self) -> ir.Type:
        return ir.VectorType(ir.IntType(64), self.bits // 64)

    def c_name(self) -> str:
        return "uint8_t"  # declared as uint8_t x[size] by the header writer

    def construct(self) -> cs.Construct:
        return cs.Bytes(self.size)


class PtrType(Type):
    size = align = 8

    def __init__(self, pointee: Type) -> None:
        self.pointee = pointee
        self.name = f"Ptr[{pointee.name}]"

    def llvm(self) -> ir.Type:
        return ir.PointerType()

    def c_name(self) -> str:
        return "uint64_t"  # host-visible pointers are opaque 64-bit values in the ABI

    def construct(self) -> cs.Construct:
        return cs.Int64ul

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PtrType) and other.pointee == self.pointee

    def __hash__(self) -> int:
        return hash(("ptr", self.pointee))

    def __call__(self, value: int) -> int:  # Python-side cast: a pointer is an address
        return int(value) & 0xFFFFFFFFFFFFFFFF


class ArrayType(Type):
    def __init__(self, elem: Type, count: int) -> None:
        if not isinstance(count, int) or count <= 0:
            raise TypeError(f"array length must be a positive int, got {count!r}")
        self.elem = elem
        self.count = count
        self.size = elem.size * count
        self.align = elem.align
        self.name = f"Array[{elem.name}, {count}]"

    def llvm(self) -> ir.Type:
        return ir.ArrayType(self.elem.llvm(), self.count)

    def c_name(self) -> str:
        return self.elem.c_name()

    def construct(self) -> cs.Construct:
        if self.elem == u8:
            return cs.Bytes(self.count)
        return cs.Array(self.count, self.elem.construct())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArrayType) and (other.elem, other.count) == (
            self.elem,
            self.count,
        )

    def __hash__(self) -> int:
        return hash(("arr", self.elem, self.count))


class _PtrFactory:
    """`Ptr[T]` spells a pointer type."""

    def __getitem__(self, pointee: Type) -> PtrType:
        if not isinstance(pointee, Type):
            raise TypeError(f"Ptr[...] needs a DSL type, got {pointee!r}")
        return PtrType(pointee)


class _ArrayFactory:
    """`Array[T, N]` spells a fixed array type."""

    def __getitem__(self, args: tuple[Type, int]) -> ArrayType:
        elem, count = args
        return ArrayType(elem, count)


u8, u16, u32, u64 = (IntType(b, False) for b in (8, 16, 32, 64))
i8, i16, i32, i64 = (IntType(b, True) for b in (8, 16, 32, 64))
bool_ = BoolType()
v128 = VecType(128)
v256 = VecType(256, ("avx2",))  # 256-bit integer operations are AVX2 (AVX alone splits them)
void = VoidType()
Ptr = _PtrFactory()
Array = _ArrayFactory()

INT_TYPES = {t.name: t for t in (u8, u16, u32, u64, i8, i16, i32, i64)}
# The type an unannotated integer literal takes when nothing else decides it.
DEFAULT_INT = u64


# -- integer rules shared by the compiler (codegen/lower.py) and the interpreter (interp/) -----

def trunc_div(a: int, b: int) -> int:
    """C division: the quotient truncates toward zero (Python's `//` floors)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def trunc_rem(a: int, b: int) -> int:
    """C remainder: takes the sign of the dividend, so a == trunc_div(a, b) * b + rem."""
    return a - trunc_div(a, b) * b


def fold_literals(op: ast.operator, a: int, b: int) -> int:
    """Combine two untyped literals with unbounded integers and C-style division.

    Raises ZeroDivisionError for a zero divisor and ValueError (with a reason) for an operator
    the DSL has no literal meaning for."""
    if isinstance(op, ast.Add):
        return a + b
    if isinstance(op, ast.Sub):
        return a - b
    if isinstance(op, ast.Mult):
        return a * b
    if isinstance(op, (ast.FloorDiv, ast.Mod)):
        if b == 0:
            raise ZeroDivisionError("division by zero in a constant expression")
        return trunc_div(a, b) if isinstance(op, ast.FloorDiv) else trunc_rem(a, b)
    if isinstance(op, ast.BitAnd):
        return a & b
    if isinstance(op, ast.BitOr):
        return a | b
    if isinstance(op, ast.BitXor):
        return a ^ b
    if isinstance(op, ast.LShift):
        return a << b
    if isinstance(op, ast.RShift):
        return a >> b
    raise ValueError(f"unsupported operator {type(op).__name__}")


def literal_value(value: int, t: Type) -> int:
    """The value an untyped integer literal takes when context gives it type `t`.

    A literal never wraps silently: it must fit an integer type; only 0 is a pointer (null) and
    only 0/1 are bools. Raises ValueError with the one-line reason otherwise."""
    if isinstance(t, IntType):
        if not t.fits(value):
            raise ValueError(f"literal {value} does not fit {t}")
        return value
    if isinstance(t, PtrType) and value == 0:
        return 0
    if isinstance(t, BoolType) and value in (0, 1):
        return value
    raise ValueError(f"cannot use integer literal {value} as {t}")
