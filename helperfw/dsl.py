"""The DSL surface: `@function`, typed constants, statics and `unroll`; the intrinsics are
registered in helperfw/intrinsics.

A DSL function is ordinary annotated Python; `@function` only records it. The compiler
(codegen/lower.py) and the reference interpreter (helperfw/interp) read its AST; calling it
directly in Python is an error so nobody mistakes host execution for the firmware's behaviour.
"""

from __future__ import annotations

import ast
import inspect
import linecache
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import features as target_features
from .types import Type, bool_, void

ABIS = ("internal", "c", "efi")


class DslError(Exception):
    """A compile error pointing at the DSL source.

    The first line is `file:line:col: reason` (col counts from 1, like compilers and editors);
    when the source is readable, the line itself follows with a caret under the column."""

    def __init__(self, file: str, line: int, reason: str, col: int | None = None) -> None:
        self.file, self.line, self.reason, self.col = file, line, reason, col
        where = f"{file}:{line}:{col}" if col is not None else f"{file}:{line}"
        self.headline = f"{where}: {reason}"
        super().__init__(self.headline + _source_excerpt(file, line, col))


def _source_excerpt(file: str, line: int, col: int | None) -> str:
    """The source line and a caret under `col`, as text to append (empty if unreadable)."""
    text = linecache.getline(file, line).rstrip()
    if not text:
        return ""
    caret = "" if col is None else "\n    " + " " * (col - 1) + "^"
    return f"\n    {text.expandtabs(1)}{caret}"


class Function:
    """A recorded DSL function: its Python source, signature and ABI."""

    def __init__(self, pyfunc: Callable, abi: str, name: str | None, section: str | None,
                 small: bool = False, noinline: bool = False, features: str = ""):
        if abi not in ABIS:
            raise ValueError(f"abi must be one of {ABIS}")
        try:  # a bad spelling is the decorator's error, reported before anything compiles
            self.features = target_features.parse(features) if features else frozenset()
        except ValueError as e:
            raise ValueError(f"@function {pyfunc.__name__}: {e}") from None
        self.pyfunc = pyfunc
        self.abi = abi
        self.name = name or pyfunc.__name__
        self.section = section
        self.small = small  # optimise for size: run-once code (driver load, self-test)
        self.noinline = noinline  # keep one out-of-line copy (callers are many, the body large)
        # what the function may use: the baseline plus `features` and what they imply
        self.target = target_features.closure(self.features)
        self.globals = pyfunc.__globals__
        self.file = inspect.getsourcefile(pyfunc) or "<dsl>"
        self._tree: ast.FunctionDef | None = None
        self._indent = 0  # columns textwrap.dedent removed from the source
        self._sig: tuple[list[tuple[str, Type]], Type] | None = None

    @property
    def tree(self) -> ast.FunctionDef:
        if self._tree is None:
            lines, first = inspect.getsourcelines(self.pyfunc)
            text = textwrap.dedent("".join(lines))
            # a nested function's source is dedented before parsing: columns shift back by that
            self._indent = len(lines[0]) - len(text.splitlines(keepends=True)[0])
            mod = ast.parse(text)
            ast.increment_lineno(mod, first - 1)
            fdef = mod.body[0]
            assert isinstance(fdef, ast.FunctionDef)
            self._tree = fdef
        return self._tree

    @property
    def line(self) -> int:
        return self.tree.lineno

    def error(self, node: ast.AST | None, reason: str) -> DslError:
        """A DslError at `node` (the function's `def` line when there is no node)."""
        node = node if node is not None and hasattr(node, "lineno") else self.tree
        line = node.lineno
        return DslError(self.file, line, reason, self._column(line, node.col_offset))

    def internal_error(self, node: ast.AST | None, exc: BaseException) -> DslError:
        """An exception the DSL did not raise (a backend bug, an llvmlite assertion, LLVM
        refusing the IR), as a DslError at `node`; raise it `from exc` to keep the original."""
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        return self.error(node, f"internal compiler error: {type(exc).__name__}: {first}")

    def _column(self, line: int, col_offset: int) -> int:
        """ast's col_offset (UTF-8 bytes into the dedented line) as a 1-based character column
        of the file's line."""
        text = linecache.getline(self.file, line)
        offset = col_offset + self._indent
        return len(text.encode()[:offset].decode(errors="ignore")) + 1

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
             section: str | None = None, small: bool = False, noinline: bool = False,
             features: str = ""):
    """Record a DSL function. abi: "internal" (fastcc), "c" (SysV, callable from the host in
    tests and benchmarks) or "efi" (win64cc, the EFI entry point). `name` overrides the symbol.
    `small=True` optimises for size (code that runs once, where bytes matter more than cycles);
    `noinline=True` keeps a single out-of-line copy. `features="+avx2,+vaes"` adds x86 target
    features to this function alone (helperfw/features.py): it may then use `v256` and the wide
    intrinsics, and must only be called once the CPU said it has them."""

    def wrap(f: Callable) -> Function:
        return Function(f, abi, name, section, small, noinline, features)

    return wrap(fn) if fn is not None else wrap


@dataclass(eq=False)
class Routine:
    """Assembly for the little the DSL cannot say: an interrupt entry, where the CPU pushed a
    frame and the code must switch stacks before any DSL function may run. `name` is its global
    symbol (DSL code takes its address with `func_addr`); `calls` are the DSL functions
    (`abi="c"`, called by their symbol names) it jumps to, compiled along with it."""

    name: str
    text: str
    calls: tuple[Function, ...] = ()

    def __repr__(self) -> str:
        return f"<assembly routine {self.name}>"


def routine(name: str, text: str, calls: tuple[Function, ...] = ()) -> Routine:
    for fn in calls:
        if fn.abi != "c":
            raise ValueError(f"{name}: a routine calls DSL functions by symbol: {fn.name} must "
                             "have abi='c'")
    return Routine(name, text, tuple(calls))


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


class Unroll:
    """`for j in unroll(8):` repeats the loop body at compile time (see FrontEnd.unroll)."""

    def __call__(self, *args: Any) -> Any:
        raise TypeError("unroll(...) only exists as a for-loop header inside DSL functions")

    def __repr__(self) -> str:
        return "<DSL unroll>"


unroll = Unroll()
