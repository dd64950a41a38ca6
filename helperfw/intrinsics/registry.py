"""The intrinsic registry: one entry per intrinsic, holding everything the tool chain knows of it.

An `Intrinsic` is the object DSL code calls (`cpuid(...)`, imported `from helperfw`), and it
carries

- its **typing rule**: a `Signature` (fixed parameters, `Lit` immediates, a result or a tuple of
  results) or, for a special form, a function `(front_end, call_node) -> Checked | TV`;
- its **LLVM lowering**: `lower(em, *operands)`, `em` being the compiler's `Emitter`;
- its **reference-interpreter semantics**: `evaluate(machine) -> fn(*operands)`, `machine` being
  the interpreter's `Machine` (`pure(fn)` for a computation, `ask_env()` for the platform);
- its **doc line**: `spelling` and `doc`, from which docs/DSL.md's intrinsic table is generated;
- the **target features** it needs (`features=("vaes",)`, helperfw/features.py): the front end
  refuses it in a function without them, at the call's file:line:col.

The front end (helperfw/frontend.py) applies the typing rule and hands the checked operands to
its backend: codegen/lower.py calls `lower`, interp/ calls `evaluate`. Operands arrive in source
order: a typed run-time value of the front end (`TV`) becomes the backend's value (an IR value,
or an int at run time); anything else (an immediate, a symbol name, a DSL function, a type) is a
compile-time operand and is passed as it is. A *front-end form* (addr, sizeof, offsetof) has no
lowering: its typing rule computes the value itself.

Adding an intrinsic is one decorated lowering function (helperfw/intrinsics/builtin.py has every
built-in one; tests/test_dsl_registry.py adds a toy one from a test):

    @intrinsic("(x: u64, n: imm(0, 63)) -> u64", group=PLATFORM, evaluate=pure(rotl64),
               doc="rotate left")
    def rotl(em, x, n): ...
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .. import types
from ..types import Type, void

if TYPE_CHECKING:
    from llvmlite import ir

    from ..dsl import Function, Routine
    from ..frontend import TV, FrontEnd

# Groups, in the order docs/DSL.md lists them.
MEMORY = "memory"
IMAGE = "image"
PLATFORM = "platform"
SIMD = "SSE / AES-NI"
WIDE = "AVX2 / VAES / VPCLMULQDQ"
GROUPS = (MEMORY, IMAGE, PLATFORM, SIMD, WIDE)


# -- typing rules -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Lit:
    """An argument that must be an integer literal in [lo, hi] (an instruction immediate)."""

    lo: int
    hi: int


@dataclass
class Checked:
    """What a typing rule hands to a backend: the operands (run-time `TV`s and compile-time
    values, in source order) and the result type (a tuple for several results)."""

    args: list[Any]
    ret: Type | tuple[Type, ...]


@dataclass(frozen=True)
class Signature:
    """A fixed signature: parameters (types, or `Lit` immediates) and a result. A tuple result
    can only be unpacked (`a, b, c, d = cpuid(...)`); `unpack_reason` is the error for any other
    use. `arity_reason` replaces the generic "takes N arguments" error."""

    names: tuple[str, ...]
    params: tuple[Type | Lit, ...]
    ret: Type | tuple[Type, ...]
    arity_reason: str | None = None
    unpack_reason: str | None = None

    def __call__(self, fe: FrontEnd, node: ast.Call) -> Checked:
        """Check a call: values coerced to their types, immediates as ints."""
        if len(node.args) != len(self.params):
            name = node.func.id  # type: ignore[attr-defined]
            raise fe.err(node, self.arity_reason or
                         f"{name} takes {len(self.params)} arguments, got {len(node.args)}")
        args: list[Any] = []
        for i, (a, p) in enumerate(zip(node.args, self.params)):
            if isinstance(p, Lit):
                args.append(fe.literal_arg(node, i, p.lo, p.hi))
            else:
                args.append(fe.typed(a, p))
        return Checked(args, self.ret)


def _imm(lo: int, hi: int) -> Lit:
    return Lit(lo, hi)


# what a signature's annotations may name
_SIGNATURE_NAMES: dict[str, Any] = {
    **types.INT_TYPES, "bool_": types.bool_, "bool": types.bool_, "v128": types.v128,
    "v256": types.v256, "None": void,
    "imm": _imm, "imm8": Lit(0, 255),
}


def parse_signature(text: str, *, arity_reason: str | None = None,
                    unpack_reason: str | None = None) -> Signature:
    """`"(msr: u32, value: u64)"`, `"(v: v128, n: imm(0, 63)) -> v128"`,
    `"() -> (u64, bool_)"`: the signature as the docs spell it, so the two cannot disagree."""
    fdef = ast.parse(f"def _{text}: pass").body[0]
    assert isinstance(fdef, ast.FunctionDef)

    def value(node: ast.expr | None) -> Any:
        if node is None:
            return void
        return eval(compile(ast.Expression(node), "<signature>", "eval"),
                    {"__builtins__": {}}, _SIGNATURE_NAMES)

    names = tuple(a.arg for a in fdef.args.args)
    params = tuple(value(a.annotation) for a in fdef.args.args)
    for n, p in zip(names, params):
        if not isinstance(p, (Type, Lit)):
            raise TypeError(f"signature {text!r}: parameter {n!r} has no DSL type")
    ret = value(fdef.returns)
    if isinstance(fdef.returns, ast.Tuple):
        ret = tuple(ret)
        if unpack_reason is None:
            raise TypeError(f"signature {text!r}: several results need an unpack_reason")
    return Signature(names, params, ret, arity_reason, unpack_reason)


TypingRule = Callable[["FrontEnd", ast.Call], "Checked | TV"]


# -- what a lowering and an interpreter semantics may use -------------------------------------

class Emitter(Protocol):
    """What an intrinsic's LLVM lowering may use: codegen/lower.py's FunctionLowerer provides it.

    `b` is the llvmlite IRBuilder positioned where the intrinsic's value is wanted."""

    b: ir.IRBuilder

    def asm(self, ret: ir.Type, text: str, constraints: str, args: list[ir.Value]) -> ir.Value:
        """Inline assembly with side effects (never deleted, never moved across memory)."""

    def llvm_intrinsic(self, name: str, ret: ir.Type, params: list[ir.Type]) -> ir.Function:
        """The declaration of an LLVM intrinsic (`llvm.x86.aesni.aesenc`), made once."""

    def mem_load(self, ptr: ir.Value, t: Type, volatile: bool = False) -> ir.Value:
        """Load a `t` from `ptr` (align 1: DSL memory is not assumed aligned)."""

    def mem_store(self, ptr: ir.Value, t: Type, value: ir.Value, volatile: bool = False) -> None:
        """Store a `t` to `ptr` (align 1)."""

    def extern_symbol(self, name: str) -> ir.GlobalVariable:
        """A symbol the in-repo linker defines (`__image_start`, `__text_end`...)."""

    def function_ref(self, fn: Function) -> ir.Function:
        """A DSL function's declaration (queued for lowering if it is new)."""

    def routine_ref(self, r: Routine) -> ir.Function:
        """An assembly routine's declaration (its text and callees join the module)."""


class Machine(Protocol):
    """What an intrinsic's interpreter semantics may use: helperfw/interp's Interpreter."""

    env: Any  # helperfw.interp.Env: the platform (cpuid, MSRs, hypercalls...)

    def read(self, t: Type, addr: int) -> Any:
        """The value of type `t` stored at `addr` (ints by signedness, bools as 0/1)."""

    def write(self, t: Type, addr: int, value: Any) -> None:
        """Store `value` as a `t` at `addr`."""

    def trap(self, where: str) -> None:
        """trap() was executed at `where` (`file:line`): raises the interpreter's Trap."""


Lowering = Callable[..., Any]  # (em: Emitter, *operands) -> ir.Value | list | None
Semantics = Callable[[Machine], Callable[..., Any]]  # (machine) -> fn(*operands)


def pure(fn: Callable[..., Any]) -> Semantics:
    """Semantics that are a computation on the operands alone (the SSE/AES instructions)."""
    return lambda machine: fn


@dataclass(frozen=True)
class AskEnv:
    """Semantics of a platform instruction: the interpreter Env's method named after the
    intrinsic. An Env that does not define it refuses (`InterpError`), unless `idle`: then the
    instruction has no architectural effect on one thread (hints, fences) and does nothing."""

    method: str = ""
    idle: bool = False

    def __call__(self, machine: Machine) -> Callable[..., Any]:
        return getattr(machine.env, self.method)


def ask_env(*, idle: bool = False) -> AskEnv:
    """`evaluate=ask_env()`: the Env method named after the intrinsic being registered."""
    return AskEnv("", idle)


# -- the entries ------------------------------------------------------------------------------

class Intrinsic:
    """A name the compiler lowers specially (a machine instruction or a compile-time query).

    Calling it from Python is an error: it only exists inside DSL functions."""

    def __init__(self, name: str, *, group: str, spelling: str, doc: str,
                 typing: TypingRule, lower: Lowering | None = None,
                 evaluate: Semantics | None = None, features: tuple[str, ...] = ()) -> None:
        if group not in GROUPS:
            raise ValueError(f"intrinsic {name}: group must be one of {GROUPS}")
        if (lower is None) != (evaluate is None):
            raise ValueError(f"intrinsic {name}: a lowering needs interpreter semantics too")
        if isinstance(evaluate, AskEnv) and not evaluate.method:
            evaluate = AskEnv(name, evaluate.idle)
        self.name, self.group, self.spelling, self.doc = name, group, spelling, doc
        self.typing, self.lower, self.evaluate = typing, lower, evaluate
        self.features = frozenset(features)  # target features a caller must have
        self.__doc__ = f"{name}{spelling}: {doc}"

    @property
    def results(self) -> tuple[Type, ...] | None:
        """The result types of an intrinsic with several results (only unpacked), else None."""
        t = self.typing
        return t.ret if isinstance(t, Signature) and isinstance(t.ret, tuple) else None

    @property
    def unpack_reason(self) -> str:
        assert isinstance(self.typing, Signature) and self.typing.unpack_reason
        return self.typing.unpack_reason

    def __call__(self, *args: Any) -> Any:
        raise TypeError(f"intrinsic {self.name} only exists inside DSL functions")

    def __repr__(self) -> str:
        return f"<intrinsic {self.name}>"


# Every registered intrinsic by name, in registration order (the docs' order).
INTRINSICS: dict[str, Intrinsic] = {}


def register(entry: Intrinsic) -> Intrinsic:
    if entry.name in INTRINSICS:
        raise ValueError(f"intrinsic {entry.name!r} is already registered")
    INTRINSICS[entry.name] = entry
    return entry


def unregister(name: str) -> None:
    """Remove an intrinsic (a test's toy one); DSL functions already compiled keep theirs."""
    del INTRINSICS[name]


def intrinsic(signature: str | None = None, *, group: str, doc: str, evaluate: Semantics,
              typing: TypingRule | None = None, spelling: str | None = None,
              arity_reason: str | None = None, unpack_reason: str | None = None,
              name: str | None = None, features: tuple[str, ...] = ()
              ) -> Callable[[Lowering], Intrinsic]:
    """Register the decorated LLVM lowering as intrinsic `name` (default: the function's name).

    Give either `signature` (parsed by `parse_signature`; it is also the doc spelling) or a
    special form's `typing` rule with its `spelling`. `features`: the target features a
    function must have to call it."""

    def wrap(lower: Lowering) -> Intrinsic:
        rule: TypingRule
        if signature is not None:
            rule = parse_signature(signature, arity_reason=arity_reason,
                                   unpack_reason=unpack_reason)
        elif typing is not None and spelling is not None:
            rule = typing
        else:
            raise TypeError("an intrinsic needs a signature, or a typing rule and its spelling")
        return register(Intrinsic(name or lower.__name__, group=group,
                                  spelling=spelling or signature or "", doc=doc,
                                  typing=rule, lower=lower, evaluate=evaluate,
                                  features=features))
    return wrap


def form(*, group: str, spelling: str, doc: str) -> Callable[[TypingRule], Intrinsic]:
    """Register the decorated typing rule as a front-end form: the rule computes the value
    itself (an address, a size), so there is nothing to lower or to evaluate."""

    def wrap(rule: TypingRule) -> Intrinsic:
        return register(Intrinsic(rule.__name__, group=group, spelling=spelling, doc=doc,
                                  typing=rule))
    return wrap


TABLE_BEGIN = "<!-- intrinsics: generated from the registry by `python -m helperfw.intrinsics` -->"
TABLE_END = "<!-- end of generated intrinsics -->"


def doc_table() -> str:
    """docs/DSL.md's intrinsic table, one row per registered intrinsic, by group."""
    rows = ["| group | intrinsic | meaning |", "|---|---|---|"]
    for g in GROUPS:
        for e in INTRINSICS.values():
            if e.group == g:
                need = f"; needs {', '.join('+' + f for f in sorted(e.features))}" \
                    if e.features else ""
                rows.append(f"| {g} | `{e.name}{e.spelling}` | {e.doc}{need} |")
    return "\n".join(rows) + "\n"


def with_doc_table(markdown: str) -> str:
    """`markdown` with the text between TABLE_BEGIN and TABLE_END replaced by `doc_table()`."""
    try:
        head, rest = markdown.split(TABLE_BEGIN + "\n", 1)
        _, tail = rest.split(TABLE_END, 1)
    except ValueError:
        raise ValueError(f"the document has no {TABLE_BEGIN} ... {TABLE_END} block") from None
    return f"{head}{TABLE_BEGIN}\n{doc_table()}{TABLE_END}{tail}"
