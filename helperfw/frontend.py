"""The DSL front end: the typing rules the compiler and the reference interpreter share.

`FrontEnd` walks one function's Python AST in source order and decides everything that is about the
language rather than the target: name resolution (locals, module globals, intrinsics, builtins),
statement checks, the `for ... in range(...)` header and compile-time `unroll(...)`, literal
typing and unification, cast legality (`cast_rule`) and intrinsic arguments (each intrinsic's
typing rule in helperfw/intrinsics). Whatever produces a value is handed to a `Backend` hook;
codegen/lower.py implements the hooks as LLVM IR, helperfw/interp as Python closures, so one rule
cannot drift between the two. Every error is a DslError carrying the DSL `file:line:col`; an
exception that is not one (a backend or llvmlite failure) becomes one at the statement or
expression being compiled, chained to the original.

Values are `TV(v, ty)`: `v` is the backend's value, or, for an untyped integer literal
(`ty is None`), the Python int itself until context gives it a type (a literal that does not fit
is an error, not a silent wrap). Places (lvalues) are the backend's own objects with a `.ty`.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .dsl import Const, DslError, Function, Static, unroll
from .intrinsics.registry import INTRINSICS, Intrinsic
from .structs import StructType
from .types import (
    DEFAULT_INT,
    ArrayType,
    BoolType,
    IntType,
    PtrType,
    Type,
    VecType,
    bool_,
    fold_literals,
    literal_value,
    u64,
    void,
)

# Names every DSL function sees after its module globals and the intrinsics.
BUILTINS = ("min", "max", "range", "True", "False")
UNROLL_MAX = 256  # copies one unroll(...) may make: beyond that, a loop is what is meant

# comparison operator -> (LLVM icmp spelling, Python evaluation)
COMPARISONS: dict[type, tuple[str, Callable[[Any, Any], bool]]] = {
    ast.Eq: ("==", operator.eq), ast.NotEq: ("!=", operator.ne),
    ast.Lt: ("<", operator.lt), ast.LtE: ("<=", operator.le),
    ast.Gt: (">", operator.gt), ast.GtE: (">=", operator.ge),
}
BITWISE = (ast.BitXor, ast.BitAnd, ast.BitOr)  # the only operators on bool and vectors
INT_OPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, *BITWISE, ast.LShift, ast.RShift)


@dataclass
class TV:
    """A typed value. `ty is None` means an untyped integer literal held in `v` as a Python int."""

    v: Any
    ty: Type | None


@dataclass
class RangeLoop:
    """A checked `for name in range(start, stop, step)` header; start/stop are coerced to `ty`."""

    name: str
    var: Any  # the loop variable's place
    ty: IntType
    start: Any
    stop: Any
    step: int  # a non-zero literal


class Backend(Protocol):
    """The hooks a `FrontEnd` subclass implements: what the front end needs from a target.

    Each returns the backend's value (or place) unless noted. Statement hooks return the
    backend's statement result (None for nothing to do). Control flow is the backend's own
    (`stmt_If/While/For/Break/Continue`); it calls `range_loop`, `while_forever` and
    `enclosing_loop` for the checks. Something with several results (`emit_tuple`, an intrinsic
    like cpuid) returns `(prelude, values)`: `prelude` is a statement that must run before the
    values are read (None when there is nothing to run)."""

    # places
    def new_local(self, name: str, t: Type) -> Any: ...
    def static_place(self, s: Static, name: str) -> Any: ...
    def field_place(self, base: Any, name: str) -> Any: ...
    def elem_place(self, ptr: TV, idx: TV, node: ast.AST) -> Any: ...
    def array_place(self, base: Any, idx: TV, node: ast.AST) -> Any: ...
    def deref(self, p: TV) -> Any: ...
    def address_of(self, place: Any, node: ast.AST) -> Any: ...
    def load(self, place: Any) -> TV: ...

    # statements
    def emit_block(self, results: list[Any]) -> Any: ...
    def emit_discard(self, v: TV) -> Any: ...
    def emit_store(self, place: Any, v: Any) -> Any: ...
    def emit_update(self, place: Any, compute: Callable[[TV], Any]) -> Any: ...
    def emit_return(self, v: Any | None) -> Any: ...
    def stmt_If(self, s: ast.If) -> Any: ...
    def stmt_While(self, s: ast.While) -> Any: ...
    def stmt_For(self, s: ast.For) -> Any: ...
    def stmt_Break(self, s: ast.Break) -> Any: ...
    def stmt_Continue(self, s: ast.Continue) -> Any: ...

    # values; `constant` takes the value as the interpreter holds it, `int_constant` wraps
    def constant(self, t: Type, value: int) -> Any: ...
    def int_constant(self, t: IntType, value: int) -> Any: ...
    def emit_unary(self, op: ast.unaryop, t: Type, v: Any) -> Any: ...
    def emit_not(self, cond: Any) -> Any: ...
    def emit_ptr_offset(self, p: TV, delta: TV, sub: bool, node: ast.AST) -> Any: ...
    def shift_count(self, count: TV, t: IntType) -> Any: ...
    def emit_binop(self, op: ast.operator, t: Type, a: Any, b: Any, node: ast.AST) -> Any: ...
    def emit_compare(self, op: type, t: Type, a: Any, b: Any) -> Any: ...
    def emit_truth(self, t: Type, v: Any) -> Any: ...
    def emit_boolop(self, is_and: bool, values: list[ast.expr]) -> Any: ...
    def emit_select(self, cond: Any, a: Any, b: Any) -> Any: ...
    def emit_minmax(self, name: str, t: IntType, a: Any, b: Any) -> Any: ...
    def emit_tuple(self, parts: list[TV]) -> tuple[Any, list[TV]]: ...
    def callee(self, g: Function) -> Any: ...
    def emit_call(self, callee: Any, args: list[Any]) -> Any: ...
    def emit_cast(self, rule: str, v: Any, src: Type, t: Type) -> Any: ...

    # an intrinsic's checked operands (run-time TVs and compile-time values) and result type
    def emit_intrinsic(self, g: Intrinsic, args: list[Any], ret: Type | tuple[Type, ...]
                       ) -> Any: ...


# -- rules over types -------------------------------------------------------------------------

def check_signature(fn: Function) -> tuple[list[tuple[str, Type]], Type]:
    """A function's parameters and result; both must be scalars (aggregates travel by Ptr), and
    a wide vector only in a function with the features to hold it."""
    params, ret = fn.signature
    for pname, pt in params:
        if not pt.is_scalar:
            raise fn.error(fn.tree, f"parameter {pname!r}: pass {pt} by Ptr, not by value")
    if ret is not void and not ret.is_scalar:
        raise fn.error(fn.tree, f"return type {ret} must be a scalar")
    for what, t in [*((f"parameter {n!r}", t) for n, t in params), ("return type", ret)]:
        reason = missing_features(fn, getattr(t, "features", frozenset()), f"{what} {t}")
        if reason:
            raise fn.error(fn.tree, reason)
    return params, ret


def missing_features(fn: Function, required: frozenset[str], what: str) -> str | None:
    """The error when `fn` lacks target features `required` (a wide type or intrinsic needs
    them; helperfw/features.py), else None. LLVM would otherwise split a v256 into SSE halves
    silently, or fail instruction selection far from the DSL line."""
    miss = sorted(required - fn.target)
    if not miss:
        return None
    want = ",".join(f"+{f}" for f in sorted(required))
    return (f'{what} needs @function(features="{want}"); {fn.name} lacks '
            f'{",".join("+" + f for f in miss)}')


def cast_rule(src: Type, dst: Type) -> str | None:
    """What the cast `dst(x)` does to a typed `x: src`, or None if the DSL refuses it.

    "resize": truncate, or extend by the source's signedness; "zext": a bool as 0/1;
    "ptr_to_int" / "int_to_ptr": a pointer is a 64-bit address; "retype": a pointer to another
    pointee; "nonzero": an integer's truth value."""
    if isinstance(dst, IntType):
        if isinstance(src, IntType):
            return "resize"
        if isinstance(src, BoolType):
            return "zext"
        if isinstance(src, PtrType) and dst.bits == 64:
            return "ptr_to_int"
    if isinstance(dst, PtrType):
        if isinstance(src, PtrType):
            return "retype"
        if isinstance(src, IntType) and src.bits == 64:
            return "int_to_ptr"
    if isinstance(dst, BoolType) and isinstance(src, IntType):
        return "nonzero"
    return None


# -- the walk ---------------------------------------------------------------------------------

class FrontEnd:
    """Type-checks one DSL function in source order; a subclass emits (see the module doc)."""

    def __init__(self, fn: Function) -> None:
        self.fn = fn
        self.params, self.ret = fn.signature
        self.locals: dict[str, Any] = {}  # name -> the backend's place
        self.loops: list[Any] = []  # the backend's record of each enclosing loop
        self.terminated = False  # the current block has returned, broken or continued
        self.unrolled: dict[str, int] = {}  # unroll variables in scope -> this copy's value
        self.unroll_depths: list[int] = []  # len(self.loops) at each enclosing unroll
        self.redeclarable: set[str] = set()  # locals a later unrolled copy declares again

    def err(self, node: ast.AST, reason: str) -> DslError:
        return self.fn.error(node, reason)

    def function_body(self) -> list[Any]:
        """Check the body (parameters already declared); the backend's statement results."""
        out = self.stmts(self.fn.tree.body)
        if not self.terminated and self.ret is not void:
            last = self.fn.tree.body[-1] if self.fn.tree.body else self.fn.tree
            raise self.err(last, f"function {self.fn.name} can reach its end without return")
        return out

    # -- statements ---------------------------------------------------------------------------
    def stmts(self, body: list[ast.stmt]) -> list[Any]:
        out = []
        for s in body:
            if self.terminated:
                break  # dead code after return/break/continue: Python allows it, we skip it
            r = self.stmt(s)
            if r is not None:
                out.append(r)
        return out

    def stmt(self, s: ast.stmt) -> Any:
        if self.is_unroll(s):
            m = self.unroll
        else:
            m = getattr(self, "stmt_" + type(s).__name__, None)
        if m is None:
            raise self.err(s, f"unsupported statement: {type(s).__name__}")
        try:
            return m(s)
        except DslError:
            raise
        except Exception as exc:  # a backend failure, reported at the DSL source
            raise self.fn.internal_error(s, exc) from exc


    def stmt_Expr(self, s: ast.Expr) -> Any:
        if isinstance(s.value, ast.Constant) and isinstance(s.value.value, str):
            return None  # docstring
        if not isinstance(s.value, ast.Call):
            raise self.err(s, "an expression statement must be a call")
        return self.emit_discard(self.expr(s.value, allow_void=True))

    def stmt_Pass(self, s: ast.Pass) -> None:
        return None

    def stmt_AnnAssign(self, s: ast.AnnAssign) -> Any:
        if not isinstance(s.target, ast.Name):
            raise self.err(s, "annotated assignment needs a plain name")
        name = s.target.id
        self.check_not_unrolled(name, s)
        t = self.fn.eval_type(s.annotation)
        if name in self.redeclarable and self.locals[name].ty == t:
            lv = self.locals[name]  # an unrolled copy of the declaring statement
        elif name in self.locals:
            raise self.err(s, f"local {name!r} is already declared")
        elif isinstance(self.lookup_global(name), (Static, Function)):
            raise self.err(s, f"local {name!r} shadows a module-level name")
        else:
            lv = self.locals[name] = self.new_local(name, t)
        if s.value is None:
            return None
        if not t.is_scalar:
            raise self.err(s, f"cannot initialise {t} with a value; assign its elements")
        return self.emit_store(lv, self.coerce(self.expr(s.value), t, s.value))

    def stmt_Assign(self, s: ast.Assign) -> Any:
        if len(s.targets) != 1:
            raise self.err(s, "chained assignment is not supported")
        target = s.targets[0]
        if isinstance(target, ast.Tuple):  # every value first, then the stores in order
            prelude, vals = self.expr_multi(s.value)
            if len(vals) != len(target.elts):
                raise self.err(s, f"cannot unpack {len(vals)} values into {len(target.elts)}")
            stores = [self.assign(t, v, s) for t, v in zip(target.elts, vals)]
            return self.emit_block([r for r in (prelude, *stores) if r is not None])
        return self.assign(target, self.expr(s.value), s)

    def assign(self, target: ast.expr, val: TV, s: ast.AST) -> Any:
        """Store `val` into `target`; an unknown plain name becomes a new local of val's type."""
        if isinstance(target, ast.Name):
            self.check_not_unrolled(target.id, s)
        if isinstance(target, ast.Name) and target.id not in self.locals:
            g = self.lookup_global(target.id)
            if g is not None and not isinstance(g, Static):
                raise self.err(s, f"cannot assign to module-level name {target.id!r}")
            if g is None:
                t = DEFAULT_INT if val.ty is None else val.ty
                if not t.is_scalar:
                    raise self.err(s, f"cannot create a local of type {t}")
                self.locals[target.id] = self.new_local(target.id, t)
        lv = self.lvalue(target)
        if not lv.ty.is_scalar:
            raise self.err(s, f"cannot assign to a whole {lv.ty}; assign its elements")
        return self.emit_store(lv, self.coerce(val, lv.ty, s))

    def stmt_AugAssign(self, s: ast.AugAssign) -> Any:
        lv = self.lvalue(s.target)
        if not lv.ty.is_scalar:
            raise self.err(s, f"cannot update a whole {lv.ty}")

        def compute(cur: TV) -> Any:  # the operator sees the loaded value, then the operand
            return self.coerce(self.binop(s.op, cur, self.expr(s.value), s), lv.ty, s)
        return self.emit_update(lv, compute)

    def stmt_Return(self, s: ast.Return) -> Any:
        if s.value is None:
            if self.ret is not void:
                raise self.err(s, f"{self.fn.name} must return a {self.ret}")
            v = None
        else:
            if self.ret is void:
                raise self.err(s, f"{self.fn.name} returns nothing")
            v = self.coerce(self.expr(s.value), self.ret, s)
        r = self.emit_return(v)
        self.terminated = True
        return r

    # -- control-flow checks (the backends emit the loops and branches) -----------------------
    def while_forever(self, s: ast.While) -> bool:
        """Check a while header; True for `while True:`, which has no condition to evaluate."""
        if s.orelse:
            raise self.err(s, "while/else is not supported")
        return isinstance(s.test, ast.Constant) and s.test.value is True

    def range_loop(self, s: ast.For) -> RangeLoop:
        """Check `for i in range(a[, b[, literal_step]])`, declaring `i` if it is new."""
        if s.orelse:
            raise self.err(s, "for/else is not supported")
        if not isinstance(s.target, ast.Name):
            raise self.err(s, "for needs a plain loop variable")
        self.check_not_unrolled(s.target.id, s)
        it = s.iter
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name)
                and it.func.id == "range" and not it.keywords and 1 <= len(it.args) <= 3):
            raise self.err(s, "for loops iterate over range(...) only")
        args = [self.expr(a) for a in it.args]
        step = 1
        if len(args) == 3:
            if args[2].ty is not None or args[2].v == 0:
                raise self.err(it, "range step must be a non-zero integer literal")
            step = args[2].v
            args = args[:2]
        if len(args) == 1:
            args = [TV(0, None), args[0]]
        start, stop = self.unify(args[0], args[1], it)
        t = start.ty if start.ty is not None else DEFAULT_INT
        if not isinstance(t, IntType):
            raise self.err(it, f"range needs integers, got {t}")
        startv, stopv = self.coerce(start, t, it), self.coerce(stop, t, it)
        name = s.target.id
        if name not in self.locals:
            self.locals[name] = self.new_local(name, t)
        var = self.locals[name]
        if var.ty != t:
            raise self.err(s, f"loop variable {name!r} is {var.ty}, range is {t}")
        return RangeLoop(name, var, t, startv, stopv, step)

    def enclosing_loop(self, s: ast.stmt, what: str) -> Any:
        if self.unroll_depths and self.unroll_depths[-1] == len(self.loops):
            raise self.err(s, f"{what} cannot leave an unroll(...) body")
        if not self.loops:
            raise self.err(s, f"{what} outside a loop")
        return self.loops[-1]

    # -- unroll: a for loop expanded at compile time -------------------------------------------
    def is_unroll(self, s: ast.stmt) -> bool:
        """`for name in unroll(...)`, with `unroll` the DSL's (helperfw.unroll)."""
        if not isinstance(s, ast.For):
            return False
        it = s.iter
        return (isinstance(it, ast.Call) and isinstance(it.func, ast.Name)
                and it.func.id not in self.locals and self.lookup_global(it.func.id) is unroll)

    def unroll(self, s: ast.For) -> Any:
        """`for j in unroll(a[, b[, step]])`: the body once per value, `j` being that value as
        an untyped literal (so `rk[j]`, `x >> (8 * j)` are constants). Locals the first copy
        declares are the same locals in the later ones; `break`/`continue` cannot leave it."""
        if s.orelse:
            raise self.err(s, "for/else is not supported")
        if not isinstance(s.target, ast.Name):
            raise self.err(s, "for needs a plain loop variable")
        name = s.target.id
        if name in self.locals or name in self.unrolled:
            raise self.err(s, f"unroll variable {name!r} is already a variable")
        values = self.unroll_values(s.iter)
        before, redeclarable = set(self.locals), set(self.redeclarable)
        self.unroll_depths.append(len(self.loops))
        out: list[Any] = []
        try:
            for k, value in enumerate(values):
                self.unrolled[name] = value
                out.extend(self.stmts(s.body))
                if self.terminated:
                    break  # a copy returned: the later ones are dead code
                if k == 0:
                    self.redeclarable |= set(self.locals) - before
        finally:
            self.unroll_depths.pop()
            self.unrolled.pop(name, None)
            self.redeclarable = redeclarable
        return self.emit_block(out)

    def unroll_values(self, it: ast.Call) -> range:
        """The values of `unroll(a[, b[, step]])`: integer literals, at most UNROLL_MAX."""
        if it.keywords or not 1 <= len(it.args) <= 3:
            raise self.err(it, "unroll takes one to three integer literals, like range")
        bounds = []
        for a in it.args:
            v = self.expr(a)
            if v.ty is not None:
                raise self.err(a, "unroll bounds must be integer literals (known when compiling)")
            bounds.append(v.v)
        if len(bounds) == 3 and bounds[2] == 0:
            raise self.err(it, "unroll step must not be zero")
        values = range(*bounds)
        if len(values) > UNROLL_MAX:
            raise self.err(it, f"unroll of {len(values)} copies; at most {UNROLL_MAX}")
        return values

    def check_not_unrolled(self, name: str, node: ast.AST) -> None:
        if name in self.unrolled:
            raise self.err(node, f"cannot assign to unroll variable {name!r}")

    # -- names --------------------------------------------------------------------------------
    def lookup_global(self, name: str) -> Any:
        """A non-local name: the function's module globals, then the intrinsics, then the
        builtins (returned as their name); None if it is unknown."""
        if name in self.fn.globals:
            return self.fn.globals[name]
        if name in INTRINSICS:
            return INTRINSICS[name]
        if name in BUILTINS:
            return name
        return None

    # -- places -------------------------------------------------------------------------------
    def lvalue(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Name):
            self.check_not_unrolled(node.id, node)
            if node.id in self.locals:
                return self.locals[node.id]
            g = self.lookup_global(node.id)
            if isinstance(g, Static):
                return self.static_place(g, node.id)
            if g is None:
                raise self.err(node, f"unknown name {node.id!r}")
            raise self.err(node, f"{node.id!r} is not a variable")
        if isinstance(node, ast.Attribute):
            base = self.aggregate(node.value)
            if not isinstance(base.ty, StructType):
                raise self.err(node, f"{base.ty} has no fields (.{node.attr})")
            if node.attr not in base.ty.fields:
                raise self.err(node, f"struct {base.ty.name} has no field {node.attr!r}")
            return self.field_place(base, node.attr)
        if isinstance(node, ast.Subscript):
            idx = self.expr(node.slice)  # the index is evaluated before the base
            if idx.ty is not None and not isinstance(idx.ty, IntType):
                raise self.err(node, f"index must be an integer, not {idx.ty}")
            ptr, base = self.place(node.value)
            if ptr is not None:  # pointer indexing: p[i]
                self.check_indexable(ptr.ty, node)
                return self.elem_place(ptr, idx, node)
            if not isinstance(base.ty, ArrayType):
                raise self.err(node, f"cannot index {base.ty}")
            if idx.ty is None and not 0 <= idx.v < base.ty.count:
                raise self.err(node, f"index {idx.v} out of range for {base.ty}")
            return self.array_place(base, idx, node)
        raise self.err(node, f"cannot assign to or take the address of {ast.unparse(node)}")

    def place(self, node: ast.expr) -> tuple[TV | None, Any]:
        """Evaluate `node` exactly once: a pointer value, or else the place of an aggregate.

        (Evaluating it twice, once to see whether it is a pointer and again for its place,
        would repeat side effects in index expressions: `p.es[next()].f`.)"""
        if isinstance(node, (ast.Name, ast.Attribute, ast.Subscript)):
            lv = self.lvalue(node)
            if isinstance(lv.ty, PtrType):
                return self.load(lv), None
            return None, lv
        v = self.expr(node)
        if isinstance(v.ty, PtrType):
            return v, None
        raise self.err(node, f"cannot index or access fields of {v.ty or 'an integer literal'}")

    def aggregate(self, node: ast.expr) -> Any:
        """The place of a struct/array, following one pointer: `p.f` means `(*p).f`."""
        p, lv = self.place(node)
        return self.deref(p) if p is not None else lv

    def check_indexable(self, t: PtrType, node: ast.AST) -> None:
        """Pointer indexing and arithmetic scale by the pointee's size, which must not be 0."""
        if t.pointee.size == 0:
            raise self.err(node, f"cannot index a pointer to {t.pointee}")

    # -- expressions --------------------------------------------------------------------------
    def expr(self, node: ast.expr, allow_void: bool = False) -> TV:
        m = getattr(self, "expr_" + type(node).__name__, None)
        if m is None:
            raise self.err(node, f"unsupported expression: {type(node).__name__}")
        try:
            r = m(node)
        except DslError:
            raise
        except Exception as exc:  # see stmt()
            raise self.fn.internal_error(node, exc) from exc
        if r.ty is void and not allow_void:
            raise self.err(node, "this call returns nothing")
        if isinstance(r.ty, VecType) and r.ty.features:  # every wide value is an expression
            self.need(node, r.ty.features, f"a {r.ty} value")
        return r

    def need(self, node: ast.AST, required: frozenset[str], what: str) -> None:
        """Refuse `what` at `node` unless this function has target features `required`."""
        reason = missing_features(self.fn, required, what)
        if reason:
            raise self.err(node, reason)

    def expr_multi(self, node: ast.expr) -> tuple[Any, list[TV]]:
        """The right-hand side of a tuple assignment: (prelude, values), see the module doc."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            g = self.lookup_global(node.func.id) if node.func.id not in self.locals else None
            if isinstance(g, Intrinsic) and g.results is not None:
                return self.intrinsic(g, node, multi=True)
        if isinstance(node, ast.Tuple):
            return self.emit_tuple([self.expr(e) for e in node.elts])
        several = ", ".join(f"{n}()" for n, e in INTRINSICS.items() if e.results is not None)
        raise self.err(node, f"only {several} or a tuple can be unpacked")

    def expr_Constant(self, node: ast.Constant) -> TV:
        v = node.value
        if isinstance(v, bool):
            return TV(self.constant(bool_, int(v)), bool_)
        if isinstance(v, int):
            return TV(v, None)
        raise self.err(node, f"unsupported constant {v!r}")

    def expr_Name(self, node: ast.Name) -> TV:
        if node.id in self.unrolled:
            return TV(self.unrolled[node.id], None)
        if node.id in self.locals:
            lv = self.locals[node.id]
            if not lv.ty.is_scalar:
                raise self.err(node, f"{node.id!r} is a {lv.ty}; index it or use addr()")
            return self.load(lv)
        g = self.lookup_global(node.id)
        if g is None:
            raise self.err(node, f"unknown name {node.id!r}")
        if isinstance(g, bool):
            return TV(self.constant(bool_, int(g)), bool_)
        if isinstance(g, int):
            return TV(g, None)  # module-level ints are untyped literals
        if isinstance(g, Const):
            return TV(self.constant(g.type, g.type.wrap(g.value)), g.type)
        if isinstance(g, Static):
            lv = self.lvalue(node)
            if not lv.ty.is_scalar:
                raise self.err(node, f"{node.id!r} is a {lv.ty}; index it or use addr()")
            return self.load(lv)
        raise self.err(node, f"{node.id!r} ({type(g).__name__}) cannot be used as a value")

    def expr_Attribute(self, node: ast.Attribute | ast.Subscript) -> TV:
        lv = self.lvalue(node)
        if not lv.ty.is_scalar:
            raise self.err(node, f"{ast.unparse(node)} is a {lv.ty}; index it or use addr()")
        return self.load(lv)

    expr_Subscript = expr_Attribute

    def expr_UnaryOp(self, node: ast.UnaryOp) -> TV:
        if isinstance(node.op, ast.Not):
            return TV(self.emit_not(self.truth(node.operand)), bool_)
        v = self.expr(node.operand)
        if v.ty is None:
            if isinstance(node.op, ast.USub):
                return TV(-v.v, None)
            if isinstance(node.op, ast.UAdd):
                return v
            raise self.err(node, "~ needs a typed operand; cast the literal, e.g. ~u64(0)")
        if (isinstance(node.op, ast.USub) and isinstance(v.ty, IntType)) or (
                isinstance(node.op, ast.Invert) and isinstance(v.ty, (IntType, VecType))):
            return TV(self.emit_unary(node.op, v.ty, v.v), v.ty)
        raise self.err(node, f"unsupported unary operator on {v.ty}")

    def expr_BinOp(self, node: ast.BinOp) -> TV:
        return self.binop(node.op, self.expr(node.left), self.expr(node.right), node)

    def binop(self, op: ast.operator, lhs: TV, rhs: TV, node: ast.AST) -> TV:
        if isinstance(op, ast.Div):
            raise self.err(node, "'/' is not integer division; use '//'")
        # pointer arithmetic scales by the pointee size, like C
        if isinstance(lhs.ty, PtrType) and isinstance(op, (ast.Add, ast.Sub)):
            if rhs.ty is not None and not isinstance(rhs.ty, IntType):
                raise self.err(node, f"cannot add {rhs.ty} to a pointer")
            self.check_indexable(lhs.ty, node)
            return TV(self.emit_ptr_offset(lhs, rhs, isinstance(op, ast.Sub), node), lhs.ty)
        # a shift count may have any integer type: it is resized to the shifted value's width
        if isinstance(op, (ast.LShift, ast.RShift)) and lhs.ty is not None and rhs.ty is not None:
            if not isinstance(lhs.ty, IntType) or not isinstance(rhs.ty, IntType):
                raise self.err(node, f"cannot shift {lhs.ty} by {rhs.ty}")
            rhs = TV(self.shift_count(rhs, lhs.ty), lhs.ty)
        lhs, rhs = self.unify(lhs, rhs, node)
        if lhs.ty is None:
            try:
                return TV(fold_literals(op, lhs.v, rhs.v), None)
            except (ZeroDivisionError, ValueError) as e:
                raise self.err(node, str(e)) from None
        t = lhs.ty
        if isinstance(t, (VecType, BoolType)) and isinstance(op, BITWISE):
            return TV(self.emit_binop(op, t, lhs.v, rhs.v, node), t)
        if isinstance(t, VecType):
            raise self.err(node, f"{t} supports only ^ & |")
        if not isinstance(t, IntType):
            raise self.err(node, f"arithmetic needs integers, got {t}")
        if not isinstance(op, INT_OPS):
            raise self.err(node, f"unsupported operator {type(op).__name__}")
        return TV(self.emit_binop(op, t, lhs.v, rhs.v, node), t)

    def unify(self, a: TV, b: TV, node: ast.AST) -> tuple[TV, TV]:
        """Give two operands one type: a literal takes the other side's; two literals stay."""
        if a.ty is None and b.ty is None:
            return a, b
        if a.ty is None:
            return TV(self.coerce(a, b.ty, node), b.ty), b
        if b.ty is None:
            return a, TV(self.coerce(b, a.ty, node), a.ty)
        if a.ty != b.ty:
            raise self.err(node, f"type mismatch: {a.ty} and {b.ty}; cast one side")
        return a, b

    def coerce(self, v: TV, t: Type, node: ast.AST) -> Any:
        """`v` as a value of type `t`: a literal must fit it, a typed value must already be it."""
        if v.ty is None:
            try:
                lit = literal_value(v.v, t)
            except ValueError as e:
                raise self.err(node, str(e)) from None
            if isinstance(t, IntType):
                return self.int_constant(t, lit)
            return self.constant(t, lit)  # a bool 0/1, or the null pointer
        if v.ty != t:
            raise self.err(node, f"type mismatch: expected {t}, got {v.ty}")
        return v.v

    def expr_Compare(self, node: ast.Compare) -> TV:
        if len(node.ops) != 1:
            raise self.err(node, "chained comparisons are not supported")
        lhs, rhs = self.unify(self.expr(node.left), self.expr(node.comparators[0]), node)
        op = type(node.ops[0])
        if op not in COMPARISONS:
            raise self.err(node, f"unsupported comparison {op.__name__}")
        if lhs.ty is None:
            return TV(self.constant(bool_, int(COMPARISONS[op][1](lhs.v, rhs.v))), bool_)
        t = lhs.ty
        if isinstance(t, BoolType) and op not in (ast.Eq, ast.NotEq):
            raise self.err(node, "bools compare only with == and !=")
        if not isinstance(t, (IntType, PtrType, BoolType)):
            raise self.err(node, f"cannot compare {t}")
        return TV(self.emit_compare(op, t, lhs.v, rhs.v), bool_)

    def truth(self, node: ast.expr) -> Any:
        """A condition: bools, integers and pointers are true when non-zero."""
        v = self.expr(node)
        if v.ty is None:
            return self.constant(bool_, int(v.v != 0))
        if isinstance(v.ty, (BoolType, IntType, PtrType)):
            return self.emit_truth(v.ty, v.v)
        raise self.err(node, f"{v.ty} has no truth value")

    def expr_BoolOp(self, node: ast.BoolOp) -> TV:
        """`and`/`or` short-circuit; the backend evaluates `self.truth` of each value."""
        return TV(self.emit_boolop(isinstance(node.op, ast.And), node.values), bool_)

    def expr_IfExp(self, node: ast.IfExp) -> TV:
        """`a if c else b` is a select: both arms are evaluated (no branch, constant time)."""
        c = self.truth(node.test)
        a, b = self.unify(self.expr(node.body), self.expr(node.orelse), node)
        if a.ty is None:
            a, b = (TV(self.coerce(x, DEFAULT_INT, node), DEFAULT_INT) for x in (a, b))
        return TV(self.emit_select(c, a.v, b.v), a.ty)

    # -- calls --------------------------------------------------------------------------------
    def expr_Call(self, node: ast.Call) -> TV:
        if node.keywords:
            raise self.err(node, "keyword arguments are not supported")
        func = node.func
        if isinstance(func, ast.Subscript):  # Ptr[T](x): pointer cast
            return self.cast(self.fn.eval_type(func), node)
        if not isinstance(func, ast.Name):
            raise self.err(node, f"cannot call {ast.unparse(func)}")
        if func.id in self.locals:
            raise self.err(node, f"{func.id!r} is a variable, not a function")
        g = self.lookup_global(func.id)
        if g is None:
            raise self.err(node, f"unknown function {func.id!r}")
        if isinstance(g, Type):
            return self.cast(g, node)
        if isinstance(g, Function):
            return self.call(g, node)
        if isinstance(g, Intrinsic):
            return self.intrinsic(g, node)
        if g is unroll:
            raise self.err(node, "unroll(...) is only a for-loop header: for i in unroll(n)")
        if g in ("min", "max"):
            if len(node.args) != 2:
                raise self.err(node, f"{g} takes two arguments")
            a, b = self.unify(self.expr(node.args[0]), self.expr(node.args[1]), node)
            if a.ty is None:
                return TV((min if g == "min" else max)(a.v, b.v), None)
            if not isinstance(a.ty, IntType):
                raise self.err(node, f"{g} needs integers")
            return TV(self.emit_minmax(g, a.ty, a.v, b.v), a.ty)
        raise self.err(node, f"{func.id!r} is not callable in the DSL")

    def call(self, g: Function, node: ast.Call) -> TV:
        callee = self.callee(g)
        params, ret = g.signature
        if len(node.args) != len(params):
            raise self.err(node, f"{g.name} takes {len(params)} arguments, got {len(node.args)}")
        args = []
        for (pname, pt), a in zip(params, node.args):
            v = self.expr(a)
            if v.ty is not None and v.ty != pt:
                raise self.err(a, f"argument {pname!r} of {g.name}: expected {pt}, got {v.ty}")
            args.append(self.coerce(v, pt, a))
        return TV(self.emit_call(callee, args), ret)

    def cast(self, t: Type, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, f"cast to {t} takes one argument")
        v = self.expr(node.args[0])
        if v.ty is None:  # a literal converts to any integer type (wrapping), bool or address
            if isinstance(t, IntType):
                return TV(self.int_constant(t, v.v), t)
            if isinstance(t, BoolType):
                return TV(self.constant(bool_, int(v.v != 0)), t)
            if not isinstance(t, PtrType):
                raise self.err(node, f"cannot cast a literal to {t}")
            v = TV(self.int_constant(u64, v.v), u64)  # Ptr[T](0x1000): an address
        rule = cast_rule(v.ty, t)
        if rule is None:
            raise self.err(node, f"cannot cast {v.ty} to {t}")
        return TV(self.emit_cast(rule, v.v, v.ty, t), t)

    # -- intrinsics (their typing rules are the registry's: helperfw/intrinsics) -------------
    def intrinsic(self, g: Intrinsic, node: ast.Call, multi: bool = False) -> Any:
        """A TV, or with `multi` (a tuple assignment) (prelude, [TV per result])."""
        if g.results is not None and not multi:
            raise self.err(node, g.unpack_reason)
        if g.features:
            self.need(node, g.features, g.name)
        checked = g.typing(self, node)
        if isinstance(checked, TV):
            return checked  # a front-end form: the rule computed the value
        r = self.emit_intrinsic(g, checked.args, checked.ret)
        if isinstance(checked.ret, tuple):
            prelude, vals = r
            return prelude, [TV(v, t) for v, t in zip(vals, checked.ret)]
        return TV(r, checked.ret)

    # helpers for typing rules
    def typed(self, node: ast.expr, t: Type) -> TV:
        """The value of `node` as a `t` (a literal must fit, a typed value must be a `t`)."""
        return TV(self.coerce(self.expr(node), t, node), t)

    def literal_arg(self, node: ast.Call, i: int, lo: int, hi: int) -> int:
        v = self.expr(node.args[i])
        if v.ty is not None or not lo <= v.v <= hi:
            raise self.err(node, f"argument {i + 1} must be an integer literal in [{lo}, {hi}]")
        return v.v

    def ptr_arg(self, node: ast.Call, i: int) -> TV:
        v = self.expr(node.args[i])
        if not isinstance(v.ty, PtrType):
            raise self.err(node, f"argument {i + 1} must be a pointer, got {v.ty}")
        return v
