"""DSL AST → LLVM IR.

One `FunctionLowerer` walks one function's Python AST and emits IR. What the DSL means (name
resolution, literal typing, casts, intrinsic signatures, every compile error with its DSL
`file:line:col`) is decided by the shared front end, helperfw/frontend.py, which the reference
interpreter (helperfw/interp) follows too; this module only chooses instructions: integer
arithmetic wraps; `//` and `%` truncate toward zero (C, not Python); shift counts are taken modulo
the width (x86); comparisons and `>>` follow the operand's signedness.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llvmlite import ir

from .. import features
from ..dsl import DslError, Function, Routine, Static
from ..frontend import COMPARISONS, TV, FrontEnd, check_signature
from ..intrinsics.registry import Intrinsic
from ..types import BoolType, IntType, PtrType, Type, bool_, i64, u64
from . import emit, llvm_compat

FN_ATTRS = ("noredzone", "nounwind", '"no-builtins"', '"no-stack-arg-probe"')
CCONV = {"internal": "fastcc", "c": "ccc", "efi": "win64cc"}
I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)


@dataclass
class LV:
    """An lvalue: the address of a variable/field/element and its type."""

    ptr: ir.Value
    ty: Type
    volatile: bool = False


class ModuleLowerer:
    """Owns the LLVM module; lowers the transitive closure of the functions it is given."""

    def __init__(self, name: str = "helper") -> None:
        self.module = ir.Module(name)
        self.module.triple = emit.TRIPLE
        self.module.data_layout = emit.data_layout()
        self.functions: dict[Function, ir.Function] = {}
        self.statics: dict[int, ir.GlobalVariable] = {}
        self.externs: dict[str, ir.GlobalVariable] = {}
        self.intrinsic_fns: dict[str, ir.Function] = {}
        self._queue: list[Function] = []
        self._kept: list[tuple[Static, ir.GlobalVariable]] = []
        self._names: dict[str, object] = {}
        self.routines: dict[str, tuple[Routine, ir.Function]] = {}

    # -- declarations -------------------------------------------------------------------------
    def _claim(self, name: str, owner: object, err: DslError) -> None:
        if self._names.setdefault(name, owner) is not owner:
            raise err

    def declare(self, fn: Function, node: ast.AST | None = None) -> ir.Function:
        if fn in self.functions:
            return self.functions[fn]
        params, ret = check_signature(fn)
        fty = ir.FunctionType(ret.llvm(), [t.llvm() for _, t in params])
        self._claim(fn.name, fn, fn.error(fn.tree, f"duplicate symbol name {fn.name!r}"))
        f = ir.Function(self.module, fty, fn.name)
        f.calling_convention = CCONV[fn.abi]
        f.linkage = "internal" if fn.abi == "internal" else "external"
        if fn.abi != "internal":
            f.visibility = "hidden"  # dso_local, PC-relative, no GOT
        for a in FN_ATTRS:
            llvm_compat.add_attribute(f, a)
        if fn.noinline:
            llvm_compat.add_attribute(f, "noinline")
        if fn.small:
            llvm_compat.add_attribute(f, "optsize")
            llvm_compat.add_attribute(f, "minsize")
        if fn.features:  # LLVM never inlines it into a function without them
            llvm_compat.add_attribute(
                f, f'"target-features"="{features.target_string(fn.features)}"')
        if fn.section:
            f.section = fn.section
        self.functions[fn] = f
        self._queue.append(fn)
        return f

    def static_global(self, s: Static, hint: str) -> ir.GlobalVariable:
        key = id(s)
        if key in self.statics:
            return self.statics[key]
        if s.name is None:
            s.name = hint
        name = s.name
        n = 1
        while name in self._names and self._names[name] is not s:
            n += 1
            name = f"{s.name}.{n}"
        self._names[name] = s
        if s.init is None:
            g = ir.GlobalVariable(self.module, s.type.llvm(), name)
            g.initializer = ir.Constant(s.type.llvm(), None)
        else:  # initialised from raw bytes: the global is a byte array of the same size
            arr = ir.ArrayType(I8, len(s.init))
            g = ir.GlobalVariable(self.module, arr, name)
            g.initializer = ir.Constant(arr, bytearray(s.init))
        g.linkage = "internal"
        g.align = s.align
        g.global_constant = s.readonly
        self.statics[key] = g
        if s.keep:
            self._kept.append((s, g))
        return g

    def extern_symbol(self, name: str) -> ir.GlobalVariable:
        """A hidden external byte, resolved by the in-repo linker (e.g. `__image_start`)."""
        if name not in self.externs:
            g = ir.GlobalVariable(self.module, I8, name)
            g.linkage = "external"
            llvm_compat.hide_declaration(g)  # dso_local: PC-relative, no GOT
            self.externs[name] = g
        return self.externs[name]

    def routine_ref(self, r: Routine) -> ir.Function:
        """Declare an assembly routine (a hidden external function the module's asm defines) and
        queue the DSL functions it calls."""
        if r.name not in self.routines:
            self._claim(r.name, r, DslError("<routine>", 0, f"duplicate symbol name {r.name!r}"))
            f = ir.Function(self.module, ir.FunctionType(ir.VoidType(), []), r.name)
            llvm_compat.hide_declaration(f)
            self.routines[r.name] = (r, f)
            for fn in r.calls:
                self.declare(fn)
        return self.routines[r.name][1]

    def module_asm(self) -> str:
        """The routines' text as `module asm` lines, appended to the module's IR."""
        lines = [".text"]
        for r, _f in self.routines.values():
            lines += [f".globl {r.name}", f".hidden {r.name}", *r.text.strip().splitlines()]
        if len(lines) == 1:
            return ""
        return "".join('module asm "' + ln.replace("\\", "\\5C").replace('"', "\\22") + '"\n'
                       for ln in lines)

    def intrinsic(self, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
        if name not in self.intrinsic_fns:
            self.intrinsic_fns[name] = ir.Function(self.module, ir.FunctionType(ret, args), name)
        return self.intrinsic_fns[name]

    # -- driver -------------------------------------------------------------------------------
    def lower(self, roots: list[Function], keep: tuple[tuple[str, Static], ...] = ()) -> ir.Module:
        for fn in roots:
            self.declare(fn)
        for name, s in keep:
            self.static_global(s, name)
        while self._queue:
            fn = self._queue.pop(0)
            try:
                FunctionLowerer(self, fn).lower()
            except DslError:
                raise
            except Exception as exc:  # outside any statement: at the function's `def`
                raise fn.internal_error(fn.tree, exc) from exc
        kept = [g for s, g in self._kept]
        if kept:  # llvm.used: the optimiser and the object writer must keep these
            arr = ir.ArrayType(ir.PointerType(), len(kept))
            used = ir.GlobalVariable(self.module, arr, "llvm.used")
            used.linkage = "appending"
            used.section = "llvm.metadata"
            used.initializer = ir.Constant(arr, kept)
        return self.module

    def rejected(self, exc: RuntimeError) -> DslError:
        """LLVM refused the module (parse or verify() error): a DslError at the `def` of the
        first function that LLVM refuses on its own (the others stubbed out)."""
        for fn, f in self.functions.items():
            try:
                emit.verify(llvm_compat.module_text_with_stubs(self.module, f))
            except RuntimeError as alone:
                return fn.error(fn.tree, f"LLVM rejected the code lowered for {fn.name}: "
                                         f"{_llvm_reason(alone)}")
        fn = next(iter(self.functions))
        return fn.error(fn.tree, f"LLVM rejected the module built from {fn.name}: "
                                 f"{_llvm_reason(exc)}")


class FunctionLowerer(FrontEnd):
    """Emits one function's IR; the typing rules it follows are helperfw/frontend.py's."""

    def __init__(self, ml: ModuleLowerer, fn: Function) -> None:
        super().__init__(fn)
        self.ml = ml
        self.f = ml.functions[fn]
        entry = self.f.append_basic_block("entry")
        self.allocas = ir.IRBuilder(entry)
        body = self.f.append_basic_block("body")
        self.b = ir.IRBuilder(body)

    # -- helpers ------------------------------------------------------------------------------
    def alloca(self, t: Type, name: str) -> ir.Value:
        a = self.allocas.alloca(t.llvm(), name=name)
        a.align = max(t.align, 1)
        return a

    def load(self, lv: LV) -> TV:
        return TV(self.mem_load(lv.ptr, lv.ty, lv.volatile), lv.ty)

    def store(self, val: ir.Value, lv: LV) -> None:
        self.mem_store(lv.ptr, lv.ty, val, lv.volatile)

    def new_block(self, name: str) -> ir.Block:
        return self.f.append_basic_block(name)

    def index64(self, idx: TV, node: ast.AST) -> ir.Value:
        if idx.ty is None:
            return ir.Constant(I64, idx.v)
        return self.resize(idx.v, idx.ty, u64) if not idx.ty.signed else self.b.sext(
            idx.v, I64) if idx.ty.bits < 64 else idx.v

    def gep_elem(self, ptr: ir.Value, elem: Type, idx: TV, node: ast.AST) -> ir.Value:
        return self.b.gep(ptr, [self.index64(idx, node)], source_etype=elem.llvm())

    def resize(self, v: ir.Value, src: IntType, dst: IntType) -> ir.Value:
        if src.bits == dst.bits:
            return v
        if src.bits > dst.bits:
            return self.b.trunc(v, dst.llvm())
        return (self.b.sext if src.signed else self.b.zext)(v, dst.llvm())

    # -- entry --------------------------------------------------------------------------------
    def lower(self) -> None:
        for (pname, pt), arg in zip(self.params, self.f.args):
            arg.name = pname
            slot = self.alloca(pt, pname + ".addr")
            self.b.store(arg, slot)
            self.locals[pname] = LV(slot, pt)
        self.function_body()
        if not self.terminated:  # a void function falling off its end
            self.b.ret_void()
        self.allocas.branch(self.f.blocks[1])

    # -- statements ---------------------------------------------------------------------------
    def emit_block(self, results: list[None]) -> None:
        return None  # statements are emitted as they are checked

    def emit_discard(self, v: TV) -> None:
        return None

    def emit_store(self, lv: LV, val: ir.Value) -> None:
        self.store(val, lv)

    def emit_update(self, lv: LV, compute: Callable[[TV], ir.Value]) -> None:
        self.store(compute(self.load(lv)), lv)

    def emit_return(self, val: ir.Value | None) -> None:
        if val is None:
            self.b.ret_void()
        else:
            self.b.ret(val)

    def stmt_If(self, s: ast.If) -> None:
        cond = self.truth(s.test)
        then_b, else_b, end_b = (self.new_block(n) for n in ("then", "else", "endif"))
        self.b.cbranch(cond, then_b, else_b)
        self.b.position_at_end(then_b)
        self.terminated = False
        self.stmts(s.body)
        t_term = self.terminated
        if not t_term:
            self.b.branch(end_b)
        self.b.position_at_end(else_b)
        self.terminated = False
        self.stmts(s.orelse)
        e_term = self.terminated
        if not e_term:
            self.b.branch(end_b)
        self.b.position_at_end(end_b)
        self.terminated = t_term and e_term
        if self.terminated:
            self.b.unreachable()

    def stmt_While(self, s: ast.While) -> None:
        forever = self.while_forever(s)
        head, body, end = (self.new_block(n) for n in ("while.head", "while.body", "while.end"))
        self.b.branch(head)
        self.b.position_at_end(head)
        if forever:
            self.b.branch(body)
        else:
            self.b.cbranch(self.truth(s.test), body, end)
        self.loop_body(s.body, head, end, body)
        self.finish_loop(end, forever)

    def loop_body(self, body: list[ast.stmt], cont: ir.Block, brk: ir.Block,
                  start: ir.Block) -> None:
        self.loops.append((cont, brk, []))
        self.b.position_at_end(start)
        self.terminated = False
        self.stmts(body)
        if not self.terminated:
            self.b.branch(cont)

    def finish_loop(self, end: ir.Block, forever: bool) -> None:
        _, _, broke = self.loops.pop()
        self.b.position_at_end(end)
        self.terminated = forever and not broke
        if self.terminated:
            self.b.unreachable()

    def stmt_For(self, s: ast.For) -> None:
        r = self.range_loop(s)
        t = r.ty
        ctr = self.alloca(t, r.name + ".ctr")
        self.b.store(r.start, ctr)
        head, body, latch, end = (self.new_block(n) for n in
                                  ("for.head", "for.body", "for.latch", "for.end"))
        self.b.branch(head)
        self.b.position_at_end(head)
        cur = self.b.load(ctr, typ=t.llvm())
        op = "<" if r.step > 0 else ">"
        cond = (self.b.icmp_signed if t.signed else self.b.icmp_unsigned)(op, cur, r.stop)
        self.b.cbranch(cond, body, end)
        self.b.position_at_end(body)
        self.b.store(cur, r.var.ptr)
        self.loop_body(s.body, latch, end, body)
        self.b.position_at_end(latch)
        nxt = self.b.add(self.b.load(ctr, typ=t.llvm()), ir.Constant(t.llvm(), r.step))
        self.b.store(nxt, ctr)
        self.b.branch(head)
        self.finish_loop(end, False)

    def stmt_Break(self, s: ast.Break) -> None:
        _, brk, broke = self.enclosing_loop(s, "break")
        broke.append(True)
        self.b.branch(brk)
        self.terminated = True

    def stmt_Continue(self, s: ast.Continue) -> None:
        cont, _, _ = self.enclosing_loop(s, "continue")
        self.b.branch(cont)
        self.terminated = True

    # -- places -------------------------------------------------------------------------------
    def new_local(self, name: str, t: Type) -> LV:
        return LV(self.alloca(t, name), t)

    def static_place(self, s: Static, name: str) -> LV:
        return LV(self.ml.static_global(s, name), s.type)

    def field_place(self, base: LV, name: str) -> LV:
        idx = base.ty.field_index(name)
        ptr = self.b.gep(base.ptr, [ir.Constant(I32, 0), ir.Constant(I32, idx)],
                         inbounds=True, source_etype=base.ty.llvm())
        return LV(ptr, base.ty.fields[name].type)

    def elem_place(self, ptr: TV, idx: TV, node: ast.AST) -> LV:
        elem = ptr.ty.pointee
        return LV(self.gep_elem(ptr.v, elem, idx, node), elem)

    def array_place(self, base: LV, idx: TV, node: ast.AST) -> LV:
        i = self.index64(idx, node)
        ptr = self.b.gep(base.ptr, [ir.Constant(I64, 0), i], inbounds=True,
                         source_etype=base.ty.llvm())
        return LV(ptr, base.ty.elem)

    def deref(self, p: TV) -> LV:
        return LV(p.v, p.ty.pointee)

    def address_of(self, lv: LV, node: ast.AST) -> ir.Value:
        return lv.ptr

    # -- values -------------------------------------------------------------------------------
    def constant(self, t: Type, value: int) -> ir.Value:
        if isinstance(t, PtrType):
            return ir.Constant(ir.PointerType(), None)  # the only pointer literal: null
        return ir.Constant(t.llvm(), value)

    def int_constant(self, t: IntType, value: int) -> ir.Value:
        return ir.Constant(t.llvm(), value & t.mask)

    def emit_unary(self, op: ast.unaryop, t: Type, v: ir.Value) -> ir.Value:
        return self.b.neg(v) if isinstance(op, ast.USub) else self.b.not_(v)

    def emit_not(self, cond: ir.Value) -> ir.Value:
        return self.b.not_(cond)

    def emit_ptr_offset(self, p: TV, delta: TV, sub: bool, node: ast.AST) -> ir.Value:
        if sub:  # widen first: p - u32(1) steps back, not 4G forward
            delta = TV(-delta.v, None) if delta.ty is None else TV(
                self.b.neg(self.index64(delta, node)), i64)
        return self.gep_elem(p.v, p.ty.pointee, delta, node)

    def shift_count(self, count: TV, t: IntType) -> ir.Value:
        return self.resize(count.v, count.ty, IntType(t.bits, False))

    def emit_binop(self, op: ast.operator, t: Type, a: ir.Value, b: ir.Value,
                   node: ast.AST) -> ir.Value:
        b_ = self.b
        if isinstance(op, ast.Add):
            return b_.add(a, b)
        if isinstance(op, ast.Sub):
            return b_.sub(a, b)
        if isinstance(op, ast.Mult):
            return b_.mul(a, b)
        if isinstance(op, ast.FloorDiv):
            return b_.sdiv(a, b) if t.signed else b_.udiv(a, b)
        if isinstance(op, ast.Mod):
            return b_.srem(a, b) if t.signed else b_.urem(a, b)
        if isinstance(op, ast.BitAnd):
            return b_.and_(a, b)
        if isinstance(op, ast.BitOr):
            return b_.or_(a, b)
        if isinstance(op, ast.BitXor):
            return b_.xor(a, b)
        amt = b_.and_(b, ir.Constant(t.llvm(), t.bits - 1))  # x86: count mod width
        if isinstance(op, ast.LShift):
            return b_.shl(a, amt)
        return b_.ashr(a, amt) if t.signed else b_.lshr(a, amt)

    def emit_compare(self, op: type, t: Type, a: ir.Value, b: ir.Value) -> ir.Value:
        pred = COMPARISONS[op][0]
        if isinstance(t, PtrType):
            a, b = self.b.ptrtoint(a, I64), self.b.ptrtoint(b, I64)
        signed = isinstance(t, IntType) and t.signed
        return (self.b.icmp_signed if signed else self.b.icmp_unsigned)(pred, a, b)

    def emit_truth(self, t: Type, v: ir.Value) -> ir.Value:
        if isinstance(t, BoolType):
            return v
        if isinstance(t, PtrType):
            return self.b.icmp_unsigned("!=", self.b.ptrtoint(v, I64), ir.Constant(I64, 0))
        return self.b.icmp_unsigned("!=", v, ir.Constant(t.llvm(), 0))

    def emit_boolop(self, is_and: bool, values: list[ast.expr]) -> ir.Value:
        result = self.alloca(bool_, "bool")
        end = self.new_block("bool.end")
        for i, value in enumerate(values):
            c = self.truth(value)
            self.b.store(c, result)
            if i == len(values) - 1:
                self.b.branch(end)
            else:
                nxt = self.new_block("bool.next")
                if is_and:
                    self.b.cbranch(c, nxt, end)
                else:
                    self.b.cbranch(c, end, nxt)
                self.b.position_at_end(nxt)
        self.b.position_at_end(end)
        return self.b.load(result, typ=I1)

    def emit_select(self, cond: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.b.select(cond, a, b)

    def emit_minmax(self, name: str, t: IntType, a: ir.Value, b: ir.Value) -> ir.Value:
        cmp = self.b.icmp_signed if t.signed else self.b.icmp_unsigned
        c = cmp("<" if name == "min" else ">", a, b)
        return self.b.select(c, a, b)

    def emit_tuple(self, parts: list[TV]) -> tuple[None, list[TV]]:
        return None, parts

    def callee(self, g: Function) -> ir.Function:
        return self.ml.declare(g)  # declared before its arguments are emitted

    def emit_call(self, callee: ir.Function, args: list[ir.Value]) -> ir.Value:
        return self.b.call(callee, args, cconv=callee.calling_convention)

    def emit_cast(self, rule: str, v: ir.Value, src: Type, t: Type) -> ir.Value:
        if rule == "resize":
            return self.resize(v, src, t)
        if rule == "zext":
            return self.b.zext(v, t.llvm())
        if rule == "ptr_to_int":
            return self.b.ptrtoint(v, I64)
        if rule == "int_to_ptr":
            return self.b.inttoptr(v, ir.PointerType())
        if rule == "retype":
            return v
        return self.b.icmp_unsigned("!=", v, ir.Constant(src.llvm(), 0))  # nonzero

    # -- intrinsics: the registry's lowerings, given this Emitter ----------------------------
    def emit_intrinsic(self, g: Intrinsic, args: list[Any], ret: Type | tuple[Type, ...]
                       ) -> Any:
        r = g.lower(self, *(a.v if isinstance(a, TV) else a for a in args))
        return (None, r) if isinstance(ret, tuple) else r

    # the Emitter protocol (helperfw/intrinsics/registry.py)
    def asm(self, ret: ir.Type, text: str, constraints: str, args: list[ir.Value]) -> ir.Value:
        fty = ir.FunctionType(ret, [a.type for a in args])
        return self.b.asm(fty, text, constraints, args, side_effect=True)

    def llvm_intrinsic(self, name: str, ret: ir.Type, params: list[ir.Type]) -> ir.Function:
        return self.ml.intrinsic(name, ret, params)

    def mem_load(self, ptr: ir.Value, t: Type, volatile: bool = False) -> ir.Value:
        if not t.is_scalar:
            raise TypeError(f"load of a {t}")
        if volatile:
            return llvm_compat.volatile_load(self.b, ptr, t.llvm())
        return self.b.load(ptr, typ=t.llvm(), align=1)

    def mem_store(self, ptr: ir.Value, t: Type, value: ir.Value, volatile: bool = False) -> None:
        if volatile:
            llvm_compat.volatile_store(self.b, value, ptr)
        else:
            llvm_compat.store(self.b, value, ptr)

    def extern_symbol(self, name: str) -> ir.GlobalVariable:
        return self.ml.extern_symbol(name)

    def function_ref(self, fn: Function) -> ir.Function:
        return self.ml.declare(fn)

    def routine_ref(self, r: Routine) -> ir.Function:
        return self.ml.routine_ref(r)


def _llvm_reason(exc: RuntimeError) -> str:
    """One line from LLVM's multi-line message: what follows `error:` (the parser's position is
    in IR text the user never sees), else the first line (the verifier's)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    parse = next((ln for ln in lines if "error: " in ln), None)
    return parse.split("error: ", 1)[1] if parse else lines[0] if lines else "?"
