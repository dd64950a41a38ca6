"""The preparer: a DSL function turned into Python closures over a frame, once, before it runs.

The front end (helperfw/frontend.py) walks the AST in the compiler's order (the same local
declarations, literal typing and dead-code skipping) and `Preparer` turns each step into a
closure; each call then runs those closures (helperfw/interp/machine.py). Type errors are the
front end's: preparation raises its DslError on anything the DSL refuses, and never guesses.

Locals whose address is taken and aggregate locals live in the frame's memory; other scalars in
registers of the frame. Intrinsics evaluate the registry's semantics (helperfw/intrinsics).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..dsl import Function, Static
from ..frontend import COMPARISONS, TV, FrontEnd, check_signature
from ..intrinsics.registry import Intrinsic
from ..types import IntType, Type, VecType, trunc_div, trunc_rem, void
from .errors import InterpError
from .memory import MASK64, Memory, reader, wrapper, writer

if TYPE_CHECKING:
    from .machine import Interpreter

Run = Callable[["Frame"], Any]
BREAK, CONTINUE, RETURN = 1, 2, 3  # what a statement closure returns


class Frame:
    """One call's registers (scalar locals whose address is never taken), its frame base in
    memory and its return value."""

    __slots__ = ("base", "regs", "ret")

    def __init__(self, nregs: int, base: int) -> None:
        self.regs: list[Any] = [0] * nregs
        self.base = base
        self.ret: Any = None


@dataclass
class LV:
    """A prepared place: a register slot (`reg`) or a memory address closure (`addr`)."""

    ty: Type
    addr: Run | None = None
    reg: int | None = None


def _const(value: Any) -> Run:
    return lambda fr: value


@dataclass
class Prepared:
    """A function ready to run: its frame's shape and the closure of its body."""

    fn: Function
    params: list[tuple[str, Type]]
    ret: Type
    nregs: int
    frame_size: int
    param_slots: list[LV]
    body: Run


def load(mem: Memory, lv: LV) -> Run:
    """A closure reading place `lv` (a register of the frame, or memory)."""
    if lv.reg is not None:
        i = lv.reg
        return lambda fr: fr.regs[i]
    rd, addr = reader(mem, lv.ty), lv.addr
    return lambda fr: rd(addr(fr))


def store(mem: Memory, lv: LV) -> Callable[[Frame, Any], None]:
    """A closure writing a value to place `lv` (a register of the frame, or memory)."""
    if lv.reg is not None:
        i = lv.reg

        def st(fr: Frame, v: Any) -> None:
            fr.regs[i] = v
        return st
    wr, addr = writer(mem, lv.ty), lv.addr
    return lambda fr, v: wr(addr(fr), v)


def _seq(runs: list[Run]) -> Run:
    if len(runs) == 1:
        return runs[0]

    def run(fr: Frame) -> Any:
        for r in runs:
            s = r(fr)
            if s:
                return s
        return None
    return run


class Preparer(FrontEnd):
    """Builds one function's closures; the typing rules it follows are helperfw/frontend.py's,
    and it walks the AST in the same order as lower.py emits."""

    def __init__(self, it: Interpreter, fn: Function) -> None:
        super().__init__(fn)
        self.it = it
        self.mem = it.memory
        self.nregs = 0
        self.frame_size = 0
        # scalars whose address is taken live in the frame's memory, like every aggregate
        self.in_memory = {
            n.args[0].id for n in ast.walk(fn.tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "addr"
            and len(n.args) == 1 and isinstance(n.args[0], ast.Name)
        }

    def prepare(self) -> Prepared:
        check_signature(self.fn)
        slots = []
        for pname, pt in self.params:
            self.locals[pname] = self.new_local(pname, pt)
            slots.append(self.locals[pname])
        body = self.emit_block(self.function_body())
        frame = (self.frame_size + 15) // 16 * 16
        return Prepared(self.fn, self.params, self.ret, self.nregs, frame, slots, body)

    def hidden_reg(self) -> int:
        self.nregs += 1
        return self.nregs - 1

    def _park(self, evaluate: Callable[[Frame], list[Any]], n: int) -> tuple[Run, list[Run]]:
        """Several results of one evaluation: a prelude statement computes them into hidden
        registers, and each result reads its register back."""
        base = self.nregs
        self.nregs += n

        def prelude(fr: Frame) -> None:
            fr.regs[base:base + n] = evaluate(fr)
        return prelude, [lambda fr, i=base + k: fr.regs[i] for k in range(n)]

    # -- statements -------------------------------------------------------------------------
    def block(self, body: list[ast.stmt]) -> Run:
        return self.emit_block(self.stmts(body))

    def emit_block(self, runs: list[Run]) -> Run:
        if not runs:
            return lambda fr: None
        return _seq(runs)

    def emit_discard(self, e: TV) -> Run | None:
        if e.ty is None:
            return None  # a literal-valued call (sizeof...) has no effect
        f = e.v

        def run(fr: Frame) -> None:  # drop the value: a statement returns a control code
            f(fr)
        return run

    def emit_store(self, lv: LV, v: Run) -> Run:
        st = store(self.mem, lv)

        def run(fr: Frame) -> None:  # the value, then the target's address (lower.py's order)
            st(fr, v(fr))
        return run

    def emit_update(self, lv: LV, compute: Callable[[TV], Run]) -> Run:
        # the address is computed once; the operator sees the loaded value, then the operand
        if lv.reg is not None:
            i = lv.reg
            f = compute(TV(lambda fr: fr.regs[i], lv.ty))

            def run_reg(fr: Frame) -> None:
                fr.regs[i] = f(fr)
            return run_reg
        rd, wr, addr = reader(self.mem, lv.ty), writer(self.mem, lv.ty), lv.addr
        areg = self.hidden_reg()  # carries the address from the load to the store
        f = compute(TV(lambda fr: rd(fr.regs[areg]), lv.ty))

        def run_mem(fr: Frame) -> None:
            fr.regs[areg] = addr(fr)
            wr(fr.regs[areg], f(fr))
        return run_mem

    def emit_return(self, v: Run | None) -> Run:
        if v is None:
            def run_void(fr: Frame) -> int:
                return RETURN
            return run_void

        def run(fr: Frame) -> int:
            fr.ret = v(fr)
            return RETURN
        return run

    def stmt_If(self, s: ast.If) -> Run:
        cond = self.truth(s.test)
        self.terminated = False
        then = self.block(s.body)
        t_term = self.terminated
        self.terminated = False
        other = self.block(s.orelse)
        self.terminated = t_term and self.terminated

        def run(fr: Frame) -> Any:
            return then(fr) if cond(fr) else other(fr)
        return run

    def stmt_While(self, s: ast.While) -> Run:
        forever = self.while_forever(s)
        cond = None if forever else self.truth(s.test)
        body, broke = self.loop_body(s.body)
        self.terminated = forever and not broke

        def run(fr: Frame) -> Any:
            while cond is None or cond(fr):
                r = body(fr)
                if r == BREAK:
                    break
                if r == RETURN:
                    return r
            return None
        return run

    def loop_body(self, body: list[ast.stmt]) -> tuple[Run, bool]:
        """The body's closure and whether it can break; like lower.finish_loop, only
        `while True` without a break ends the block."""
        self.loops.append([])
        self.terminated = False
        run = self.block(body)
        broke = self.loops.pop()
        self.terminated = False
        return run, bool(broke)

    def stmt_For(self, s: ast.For) -> Run:
        r = self.range_loop(s)
        startf, stopf, step = r.start, r.stop, r.step
        setvar = store(self.mem, r.var)
        body, _ = self.loop_body(s.body)
        wrap = r.ty.wrap
        up = step > 0

        def run(fr: Frame) -> Any:
            ctr = startf(fr)  # the hidden counter: assigning the variable does not move it
            end = stopf(fr)
            while (ctr < end) if up else (ctr > end):
                setvar(fr, ctr)
                r = body(fr)
                if r == BREAK:
                    break
                if r == RETURN:
                    return r
                ctr = wrap(ctr + step)
            return None
        return run

    def stmt_Break(self, s: ast.Break) -> Run:
        self.enclosing_loop(s, "break").append(True)
        self.terminated = True
        return lambda fr: BREAK

    def stmt_Continue(self, s: ast.Continue) -> Run:
        self.enclosing_loop(s, "continue")
        self.terminated = True
        return lambda fr: CONTINUE

    # -- places -----------------------------------------------------------------------------
    def new_local(self, name: str, t: Type) -> LV:
        if t.is_scalar and name not in self.in_memory:
            return LV(t, reg=self.hidden_reg())
        a = max(t.align, 1)
        off = (self.frame_size + a - 1) // a * a
        self.frame_size = off + t.size
        return LV(t, addr=lambda fr, off=off: fr.base + off)

    def static_place(self, s: Static, name: str) -> LV:
        return LV(s.type, addr=_const(self.it.static_addr(s)))

    def field_place(self, base: LV, name: str) -> LV:
        f = base.ty.fields[name]
        return LV(f.type, addr=_offset(base.addr, f.offset))

    def elem_place(self, ptr: TV, idx: TV, node: ast.AST) -> LV:
        elem = ptr.ty.pointee
        return LV(elem, addr=_index(idx, ptr.v, elem.size))

    def array_place(self, base: LV, idx: TV, node: ast.AST) -> LV:
        return LV(base.ty.elem, addr=_index(idx, base.addr, base.ty.elem.size))

    def deref(self, p: TV) -> LV:
        return LV(p.ty.pointee, addr=p.v)

    def address_of(self, lv: LV, node: ast.AST) -> Run:
        if lv.addr is None:
            raise self.err(node, "internal: address of a register local")
        return lv.addr

    def load(self, lv: LV) -> TV:
        return TV(load(self.mem, lv), lv.ty)

    # -- values -----------------------------------------------------------------------------
    def constant(self, t: Type, value: int) -> Run:
        return _const(value)

    def int_constant(self, t: IntType, value: int) -> Run:
        return _const(t.wrap(value))

    def emit_unary(self, op: ast.unaryop, t: Type, f: Run) -> Run:
        if isinstance(t, VecType):  # ~v
            mask = t.mask
            return lambda fr: f(fr) ^ mask
        wrap = t.wrap
        if isinstance(op, ast.USub):
            return lambda fr: wrap(-f(fr))
        return lambda fr: wrap(~f(fr))

    def emit_not(self, c: Run) -> Run:
        return lambda fr: 0 if c(fr) else 1

    def emit_ptr_offset(self, p: TV, delta: TV, sub: bool, node: ast.AST) -> Run:
        size, pf = p.ty.pointee.size, p.v
        sign = -1 if sub else 1
        if delta.ty is None:  # the index is widened (sign/zero) to 64 bits, then scaled
            d = delta.v * size * sign
            return lambda fr: (pf(fr) + d) & MASK64
        rf = delta.v
        return lambda fr: (pf(fr) + sign * rf(fr) * size) & MASK64

    def shift_count(self, count: TV, t: IntType) -> Run:
        return count.v  # resized to the shifted value's width: only its low bits matter

    def emit_binop(self, op: ast.operator, t: Type, a: Run, b: Run, node: ast.AST) -> Run:
        if isinstance(t, IntType):
            return _int_op(op, t, a, b, self, node)
        if isinstance(op, ast.BitXor):  # bool or a vector
            return lambda fr: a(fr) ^ b(fr)
        if isinstance(op, ast.BitAnd):
            return lambda fr: a(fr) & b(fr)
        return lambda fr: a(fr) | b(fr)

    def emit_compare(self, op: type, t: Type, a: Run, b: Run) -> Run:
        # ints hold their signed or unsigned value and pointers are unsigned: Python's
        # comparison is then the signed/unsigned icmp
        cmp = COMPARISONS[op][1]
        return lambda fr: int(cmp(a(fr), b(fr)))

    def emit_truth(self, t: Type, f: Run) -> Run:
        return lambda fr: f(fr) != 0

    def emit_boolop(self, is_and: bool, values: list[ast.expr]) -> Run:
        conds = [self.truth(v) for v in values]
        if is_and:
            return lambda fr: int(all(c(fr) for c in conds))
        return lambda fr: int(any(c(fr) for c in conds))

    def emit_select(self, c: Run, fa: Run, fb: Run) -> Run:
        def run(fr: Frame) -> Any:  # a select: both arms are evaluated, in order
            cond = c(fr)
            x, y = fa(fr), fb(fr)
            return x if cond else y
        return run

    def emit_minmax(self, name: str, t: IntType, fa: Run, fb: Run) -> Run:
        pick = min if name == "min" else max
        return lambda fr: pick(fa(fr), fb(fr))

    def emit_tuple(self, parts: list[TV]) -> tuple[Run, list[TV]]:
        fs = [p.v for p in parts if p.ty is not None]  # a literal stays one, for its coercion
        prelude, reads = self._park(lambda fr: [f(fr) for f in fs], len(fs))
        it = iter(reads)
        return prelude, [TV(next(it), p.ty) if p.ty is not None else p for p in parts]

    def callee(self, g: Function) -> Function:
        return g  # prepared on its first call

    def emit_call(self, g: Function, args: list[Run]) -> Run:
        it = self.it

        def run(fr: Frame) -> Any:
            vals = [f(fr) for f in args]
            return it._invoke(it.prepare(g), vals)
        return run

    def emit_cast(self, rule: str, f: Run, src: Type, t: Type) -> Run:
        if rule in ("resize", "ptr_to_int"):
            wrap = t.wrap  # type: ignore[attr-defined]
            return lambda fr: wrap(f(fr))
        if rule in ("zext", "retype"):
            return f
        if rule == "int_to_ptr":
            return lambda fr: f(fr) & MASK64
        return lambda fr: int(f(fr) != 0)  # nonzero

    # -- intrinsics: the registry's semantics, evaluated on the interpreter ------------------
    def emit_intrinsic(self, g: Intrinsic, args: list[Any], ret: Type | tuple[Type, ...]
                       ) -> Any:
        """Operands: a run-time TV's closure is called, a compile-time operand (an immediate,
        a name, a function) passed as it is; results are held like any value of their type."""
        fn = g.evaluate(self.it)
        ops = [a.v if isinstance(a, TV) else _const(a) for a in args]
        if isinstance(ret, tuple):
            wraps = [wrapper(t) for t in ret]

            def evaluate(fr: Frame) -> list[Any]:
                return [w(x) for w, x in zip(wraps, fn(*(o(fr) for o in ops)))]
            return self._park(evaluate, len(ret))
        if ret is void:
            def run_void(fr: Frame) -> None:  # a statement: returns no control code
                fn(*(o(fr) for o in ops))
            return run_void
        wrap = wrapper(ret)
        return lambda fr: wrap(fn(*(o(fr) for o in ops)))


def _offset(addr: Run | None, off: int) -> Run:
    assert addr is not None
    if off == 0:
        return addr
    return lambda fr: (addr(fr) + off) & MASK64


def _index(idx: TV, base: Run | None, size: int) -> Run:
    """Address of element `idx` (sign- or zero-extended to 64 bits by its type) from `base`."""
    assert base is not None
    if idx.ty is None:
        d = idx.v * size
        return lambda fr: (base(fr) + d) & MASK64
    f = idx.v
    # the index is evaluated before the base, as lower.py emits it
    def run(fr: Frame) -> int:
        i = f(fr)
        return (base(fr) + i * size) & MASK64
    return run


def _int_op(op: ast.operator, t: IntType, a: Run, b: Run, p: Preparer, node: ast.AST) -> Run:
    """One of frontend.INT_OPS on two values of integer type `t`."""
    wrap, bits = t.wrap, t.bits
    if isinstance(op, ast.Add):
        return lambda fr: wrap(a(fr) + b(fr))
    if isinstance(op, ast.Sub):
        return lambda fr: wrap(a(fr) - b(fr))
    if isinstance(op, ast.Mult):
        return lambda fr: wrap(a(fr) * b(fr))
    if isinstance(op, (ast.FloorDiv, ast.Mod)):
        rem = isinstance(op, ast.Mod)
        where = f"{p.fn.file}:{getattr(node, 'lineno', p.fn.line)}"

        def div(fr: Frame) -> int:
            x, y = a(fr), b(fr)
            if y == 0:
                raise InterpError(f"{where}: division by zero")
            if t.signed and x == t.min and y == -1:
                raise InterpError(f"{where}: {t} division overflow")
            return trunc_rem(x, y) if rem else trunc_div(x, y)
        return div
    if isinstance(op, ast.BitAnd):
        return lambda fr: a(fr) & b(fr)
    if isinstance(op, ast.BitOr):
        return lambda fr: a(fr) | b(fr)
    if isinstance(op, ast.BitXor):
        return lambda fr: a(fr) ^ b(fr)
    m = bits - 1  # x86: the count is taken modulo the width
    if isinstance(op, ast.LShift):
        return lambda fr: wrap(a(fr) << (b(fr) & m))
    return lambda fr: a(fr) >> (b(fr) & m)  # RShift; signed values shift arithmetically
