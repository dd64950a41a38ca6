"""The DSL surface: `@function`, typed constants, statics and the intrinsic names.

A DSL function is ordinary annotated Python; `@function` only records it. The compiler
(codegen/lower.py) and the reference interpreter (interp.py) read its AST; calling it directly in
Python is an error so nobody mistakes host execution for the firmware's behaviour.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .types import Type, bool_, void

ABIS = ("internal", "c", "efi")


class DslError(Exception):
    """A compile error pointing at the DSL source: `file:line: reason`."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}")
        self.file, self.line, self.reason = file, line, reason


class Function:
    """A recorded DSL function: its Python source, signature and ABI."""

    def __init__(self, pyfunc: Callable, abi: str, name: str | None, section: str | None,
                 small: bool = False, noinline: bool = False):
        if abi not in ABIS:
            raise ValueError(f"abi must be one of {ABIS}")
        self.pyfunc = pyfunc
        self.abi = abi
        self.name = name or pyfunc.__name__
        self.section = section
        self.small = small  # optimise for size: run-once code (driver load, self-test)
        self.noinline = noinline  # keep one out-of-line copy (callers are many, the body large)
        self.globals = pyfunc.__globals__
        self.file = inspect.getsourcefile(pyfunc) or "<dsl>"
        self._tree: ast.FunctionDef | None = None
        self._sig: tuple[list[tuple[str, Type]], Type] | None = None

    @property
    def tree(self) -> ast.FunctionDef:
        if self._tree is None:
            lines, first = inspect.getsourcelines(self.pyfunc)
            mod = ast.parse(textwrap.dedent("".join(lines)))
            ast.increment_lineno(mod, first - 1)
            fdef = mod.body[0]
            assert isinstance(fdef, ast.FunctionDef)
            self._tree = fdef
        return self._tree

    @property
    def line(self) -> int:
        return self.tree.lineno

    def error(self, node: ast.AST | None, reason: str) -> DslError:
        return DslError(self.file, getattr(node, "lineno", self.line), reason)

    def eval_type(self, node: ast.expr) -> Type:
        """Evaluate a type expression (`u32`, `Ptr[Mailbox]`, `Array[u8, 16]`) in module scope."""
        try:
            t = eval(compile(ast.Expression(node), self.file, "eval"), self.globals)
        except Exception as e:  # noqa: BLE001 - any failure is a DSL type error
            raise self.error(node, f"bad type expression: {e}") from None
        if t is bool:
            t = bool_  # `-> bool` reads naturally; it is the DSL's 1-bit bool
        if not isinstance(t, Type):
            raise self.error(node, f"{ast.unparse(node)} is not a DSL type")
        return t

    @property
    def signature(self) -> tuple[list[tuple[str, Type]], Type]:
        if self._sig is None:
            args = self.tree.args
            if args.vararg or args.kwarg or args.kwonlyargs or args.defaults or args.posonlyargs:
                raise self.error(self.tree, "only plain positional parameters are supported")
            params = []
            for a in args.args:
                if a.annotation is None:
                    raise self.error(a, f"parameter {a.arg!r} needs a type annotation")
                params.append((a.arg, self.eval_type(a.annotation)))
            r = self.tree.returns
            if r is None or (isinstance(r, ast.Constant) and r.value is None):
                ret = void  # no annotation or "-> None"
            else:
                ret = self.eval_type(r)
            self._sig = (params, ret)
        return self._sig

    def __call__(self, *args: Any) -> Any:
        raise TypeError(
            f"DSL function {self.name} cannot run as Python; compile it or use helperfw.interp"
        )

    def __repr__(self) -> str:
        return f"<DSL function {self.name} ({self.abi})>"


def function(fn: Callable | None = None, *, abi: str = "internal", name: str | None = None,
             section: str | None = None, small: bool = False, noinline: bool = False):
    """Record a DSL function. abi: "internal" (fastcc), "c" (SysV, callable from the host in
    tests and benchmarks) or "efi" (win64cc, the EFI entry point). `name` overrides the symbol.
    `small=True` optimises for size (code that runs once, where bytes matter more than cycles);
    `noinline=True` keeps a single out-of-line copy."""

    def wrap(f: Callable) -> Function:
        return Function(f, abi, name, section, small, noinline)

    return wrap(fn) if fn is not None else wrap


@dataclass(frozen=True)
class Const:
    """A typed module constant: `SLOTS = const(u32, 64)`. Plain ints are untyped literals."""

    type: Type
    value: int


def const(t: Type, value: int) -> Const:
    wrapped = t.wrap(value) if hasattr(t, "wrap") else value
    if wrapped != value:
        raise ValueError(f"constant {value} does not fit {t}")
    return Const(t, value)


class Static:
    """A module-level variable in the image: `.bss` when zero, `.data` when initialised, `.rodata`
    when `readonly`. `init` is the raw bytes of its initial value (e.g. from StructType.build)."""

    def __init__(self, t: Type, init: bytes | None = None, readonly: bool = False,
                 align: int | None = None, keep: bool = False) -> None:
        if init is not None and len(init) != t.size:
            raise ValueError(f"initialiser is {len(init)} bytes, {t} needs {t.size}")
        if readonly and init is None:
            raise ValueError("a readonly static needs an initialiser")
        self.type = t
        self.init = init
        self.readonly = readonly
        self.align = align or max(t.align, 1)
        self.keep = keep  # stays in the image (llvm.used) even if no code reads it
        self.name: str | None = None  # symbol name, assigned by the compiler

    def __repr__(self) -> str:
        return f"<static {self.name or '?'}: {self.type}>"


def static(t: Type, init: bytes | None = None, *, readonly: bool = False,
           align: int | None = None, keep: bool = False) -> Static:
    return Static(t, init, readonly, align, keep)


class Intrinsic:
    """A name the compiler lowers specially (a machine instruction or a compile-time query)."""

    def __init__(self, name: str, doc: str) -> None:
        self.name = name
        self.__doc__ = doc

    def __call__(self, *args: Any) -> Any:
        raise TypeError(f"intrinsic {self.name} only exists inside DSL functions")

    def __repr__(self) -> str:
        return f"<intrinsic {self.name}>"


_INTRINSICS = {
    # memory and compile-time queries
    "addr": "addr(lvalue) -> Ptr[T]: address of a variable, field or element",
    "vload": "vload(p: Ptr[T]) -> T: volatile load (shared memory: read exactly once)",
    "vstore": "vstore(p: Ptr[T], v: T): volatile store (shared memory)",
    "sizeof": "sizeof(T) -> literal: size in bytes of a DSL type",
    "offsetof": "offsetof(S, 'field') -> literal: byte offset of a struct field",
    "symbol_addr": "symbol_addr('name') -> u64: run-time address of a linker symbol",
    "func_addr": "func_addr(f) -> u64: run-time address of a DSL function",
    "efi_call": "efi_call(fnptr: u64, args...) -> u64: call through a pointer with EFIAPI (win64)",
    "trap": "trap(): ud2; marks a state that must never be reached",
    # privileged / platform instructions
    "cpuid": "cpuid(leaf: u32, subleaf: u32) -> (eax, ebx, ecx, edx) as u32",
    "rdmsr": "rdmsr(msr: u32) -> u64",
    "wrmsr": "wrmsr(msr: u32, value: u64)",
    "vmmcall": "vmmcall(nr, a0, a1, a2, a3: u64) -> u64: KVM hypercall (rax=nr, rbx, rcx, rdx, rsi)",
    "hlt": "hlt(): halt; in the mirror VM this exits to the host",
    "pause": "pause(): spin-loop hint",
    "rdrand64": "rdrand64() -> (value: u64, ok: bool)",
    "invlpg": "invlpg(va: u64)",
    "read_cr3": "read_cr3() -> u64",
    "write_cr3": "write_cr3(value: u64)",
    "outb": "outb(port: u16, value: u8)",
    "inb": "inb(port: u16) -> u8",
    "mfence": "mfence()",
    "lfence": "lfence()",
    "sfence": "sfence()",
    # 128-bit SSE / AES-NI / PCLMULQDQ
    "aesenc": "aesenc(state: v128, round_key: v128) -> v128",
    "aesenclast": "aesenclast(state: v128, round_key: v128) -> v128",
    "aeskeygenassist": "aeskeygenassist(v: v128, rcon: literal) -> v128",
    "pclmulqdq": "pclmulqdq(a: v128, b: v128, imm: literal) -> v128",
    "pshufb": "pshufb(v: v128, mask: v128) -> v128",
    "pshufd": "pshufd(v: v128, imm: literal) -> v128",
    "v128_make": "v128_make(lo: u64, hi: u64) -> v128",
    "v128_lo": "v128_lo(v: v128) -> u64",
    "v128_hi": "v128_hi(v: v128) -> u64",
    "v128_load": "v128_load(p: Ptr[T]) -> v128: unaligned 16-byte load",
    "v128_store": "v128_store(p: Ptr[T], v: v128): unaligned 16-byte store",
    "v128_shl64": "v128_shl64(v, n: literal) -> v128: shift each 64-bit lane left",
    "v128_shr64": "v128_shr64(v, n: literal) -> v128: shift each 64-bit lane right (logical)",
    "v128_bsl": "v128_bsl(v, n: literal) -> v128: shift the whole value left by n bytes",
    "v128_bsr": "v128_bsr(v, n: literal) -> v128: shift the whole value right by n bytes",
}
INTRINSICS: dict[str, Intrinsic] = {n: Intrinsic(n, d) for n, d in _INTRINSICS.items()}

# Spelled out (not globals().update) so readers and linters see every intrinsic name.
addr = INTRINSICS["addr"]
vload = INTRINSICS["vload"]
vstore = INTRINSICS["vstore"]
sizeof = INTRINSICS["sizeof"]
offsetof = INTRINSICS["offsetof"]
symbol_addr = INTRINSICS["symbol_addr"]
func_addr = INTRINSICS["func_addr"]
efi_call = INTRINSICS["efi_call"]
trap = INTRINSICS["trap"]
cpuid = INTRINSICS["cpuid"]
rdmsr = INTRINSICS["rdmsr"]
wrmsr = INTRINSICS["wrmsr"]
vmmcall = INTRINSICS["vmmcall"]
hlt = INTRINSICS["hlt"]
pause = INTRINSICS["pause"]
rdrand64 = INTRINSICS["rdrand64"]
invlpg = INTRINSICS["invlpg"]
read_cr3 = INTRINSICS["read_cr3"]
write_cr3 = INTRINSICS["write_cr3"]
outb = INTRINSICS["outb"]
inb = INTRINSICS["inb"]
mfence = INTRINSICS["mfence"]
lfence = INTRINSICS["lfence"]
sfence = INTRINSICS["sfence"]
aesenc = INTRINSICS["aesenc"]
aesenclast = INTRINSICS["aesenclast"]
aeskeygenassist = INTRINSICS["aeskeygenassist"]
pclmulqdq = INTRINSICS["pclmulqdq"]
pshufb = INTRINSICS["pshufb"]
pshufd = INTRINSICS["pshufd"]
v128_make = INTRINSICS["v128_make"]
v128_lo = INTRINSICS["v128_lo"]
v128_hi = INTRINSICS["v128_hi"]
v128_load = INTRINSICS["v128_load"]
v128_store = INTRINSICS["v128_store"]
v128_shl64 = INTRINSICS["v128_shl64"]
v128_shr64 = INTRINSICS["v128_shr64"]
v128_bsl = INTRINSICS["v128_bsl"]
v128_bsr = INTRINSICS["v128_bsr"]
