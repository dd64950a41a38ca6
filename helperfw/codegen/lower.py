"""DSL AST → LLVM IR.

One `FunctionLowerer` walks one function's Python AST and emits IR, type-checking as it goes;
every error is a `DslError` carrying the DSL `file:line`. Values are `TV(value, type)`; an integer
literal stays a Python int with type None until context gives it a type (a literal that does not
fit is an error, not a silent wrap). Semantics the interpreter mirrors (helperfw/interp.py):
integer arithmetic wraps; `//` and `%` truncate toward zero (C, not Python); shift counts are taken
modulo the width (x86); comparisons and `>>` follow the operand's signedness.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

from llvmlite import ir

from .. import dsl
from ..dsl import Const, DslError, Function, Intrinsic, Static
from ..structs import StructType
from ..types import (
    DEFAULT_INT,
    ArrayType,
    BoolType,
    IntType,
    PtrType,
    Type,
    V128Type,
    bool_,
    fold_literals,
    i64,
    literal_value,
    u8,
    u16,
    u32,
    u64,
    v128,
    void,
)
from . import emit

FN_ATTRS = ("noredzone", "nounwind", '"no-builtins"', '"no-stack-arg-probe"')
CCONV = {"internal": "fastcc", "c": "ccc", "efi": "win64cc"}
I1, I8, I32, I64 = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64)
V2I64, V16I8, V4I32 = ir.VectorType(I64, 2), ir.VectorType(I8, 16), ir.VectorType(I32, 4)


@dataclass
class TV:
    """A typed value. `ty is None` means an untyped integer literal held in `v` as a Python int."""

    v: Any
    ty: Type | None


@dataclass
class LV:
    """An lvalue: the address of a variable/field/element and its type."""

    ptr: ir.Value
    ty: Type
    volatile: bool = False


class _VolatileLoad(ir.instructions.LoadInstr):
    def descr(self, buf: list) -> None:
        (ptr,) = self.operands
        buf.append(f"load volatile {self.type}, {ptr.type} {ptr.get_reference()}, align 1\n")


class _VolatileStore(ir.instructions.StoreInstr):
    def descr(self, buf: list) -> None:
        val, ptr = self.operands
        buf.append(
            f"store volatile {val.type} {val.get_reference()}, {ptr.type} "
            f"{ptr.get_reference()}, align 1\n"
        )


class _FnPtr:
    """An opaque-pointer callee that carries its function type (for indirect calls)."""

    def __init__(self, ptr: ir.Value, fty: ir.FunctionType) -> None:
        self.ptr, self.function_type, self.type = ptr, fty, ptr.type

    def get_reference(self) -> str:
        return self.ptr.get_reference()

    def _get_reference(self) -> str:
        return self.ptr.get_reference()


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

    # -- declarations -------------------------------------------------------------------------
    def _claim(self, name: str, owner: object, err: DslError) -> None:
        if self._names.setdefault(name, owner) is not owner:
            raise err

    def declare(self, fn: Function, node: ast.AST | None = None) -> ir.Function:
        if fn in self.functions:
            return self.functions[fn]
        params, ret = fn.signature
        for pname, pt in params:
            if not pt.is_scalar:
                raise fn.error(fn.tree, f"parameter {pname!r}: pass {pt} by Ptr, not by value")
        if ret is not void and not ret.is_scalar:
            raise fn.error(fn.tree, f"return type {ret} must be a scalar")
        fty = ir.FunctionType(ret.llvm(), [t.llvm() for _, t in params])
        self._claim(fn.name, fn, fn.error(fn.tree, f"duplicate symbol name {fn.name!r}"))
        f = ir.Function(self.module, fty, fn.name)
        f.calling_convention = CCONV[fn.abi]
        f.linkage = "internal" if fn.abi == "internal" else "external"
        if fn.abi != "internal":
            f.visibility = "hidden"  # dso_local, PC-relative, no GOT
        for a in FN_ATTRS:
            set.add(f.attributes, a)  # bypass llvmlite's list of known attribute names
        if fn.small:
            set.add(f.attributes, "optsize")
            set.add(f.attributes, "minsize")
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
            # llvmlite prints no visibility on declarations; this slot is printed right after
            # the linkage, where LLVM expects it. Hidden = dso_local: PC-relative, no GOT.
            g.storage_class = "hidden"
            self.externs[name] = g
        return self.externs[name]

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
            FunctionLowerer(self, fn).lower()
        kept = [g for s, g in self._kept]
        if kept:  # llvm.used: the optimiser and the object writer must keep these
            arr = ir.ArrayType(ir.PointerType(), len(kept))
            used = ir.GlobalVariable(self.module, arr, "llvm.used")
            used.linkage = "appending"
            used.section = "llvm.metadata"
            used.initializer = ir.Constant(arr, kept)
        return self.module


class FunctionLowerer:
    def __init__(self, ml: ModuleLowerer, fn: Function) -> None:
        self.ml = ml
        self.fn = fn
        self.f = ml.functions[fn]
        self.params, self.ret = fn.signature
        self.locals: dict[str, LV] = {}
        self.loops: list[tuple[ir.Block, ir.Block, list[bool]]] = []
        entry = self.f.append_basic_block("entry")
        self.allocas = ir.IRBuilder(entry)
        body = self.f.append_basic_block("body")
        self.b = ir.IRBuilder(body)
        self.terminated = False

    # -- helpers ------------------------------------------------------------------------------
    def err(self, node: ast.AST, reason: str) -> DslError:
        return self.fn.error(node, reason)

    def alloca(self, t: Type, name: str) -> ir.Value:
        a = self.allocas.alloca(t.llvm(), name=name)
        a.align = max(t.align, 1)
        return a

    def load(self, lv: LV) -> TV:
        if not lv.ty.is_scalar:
            raise TypeError(lv.ty)
        t = lv.ty.llvm()
        if lv.volatile:
            instr = _VolatileLoad(self.b.block, lv.ptr, typ=t)
            self.b._insert(instr)
            return TV(instr, lv.ty)
        return TV(self.b.load(lv.ptr, typ=t, align=1), lv.ty)

    def store(self, val: ir.Value, lv: LV) -> None:
        if lv.volatile:
            self.b._insert(_VolatileStore(self.b.block, val, lv.ptr))
        else:
            # llvmlite still tracks pointee types on GEP results; build the store directly
            st = ir.instructions.StoreInstr(self.b.block, val, lv.ptr)
            st.align = 1
            self.b._insert(st)

    def new_block(self, name: str) -> ir.Block:
        return self.f.append_basic_block(name)

    # -- entry --------------------------------------------------------------------------------
    def lower(self) -> None:
        for (pname, pt), arg in zip(self.params, self.f.args):
            arg.name = pname
            slot = self.alloca(pt, pname + ".addr")
            self.b.store(arg, slot)
            self.locals[pname] = LV(slot, pt)
        self.stmts(self.fn.tree.body)
        if not self.terminated:
            if self.ret is void:
                self.b.ret_void()
            else:
                last = self.fn.tree.body[-1] if self.fn.tree.body else self.fn.tree
                raise self.err(last, f"function {self.fn.name} can reach its end without return")
        self.allocas.branch(self.f.blocks[1])

    # -- statements ---------------------------------------------------------------------------
    def stmts(self, body: list[ast.stmt]) -> None:
        for s in body:
            if self.terminated:
                return  # dead code after return/break/continue: Python allows it, we skip it
            self.stmt(s)

    def stmt(self, s: ast.stmt) -> None:
        m = getattr(self, "stmt_" + type(s).__name__, None)
        if m is None:
            raise self.err(s, f"unsupported statement: {type(s).__name__}")
        m(s)

    def stmt_Expr(self, s: ast.Expr) -> None:
        if isinstance(s.value, ast.Constant) and isinstance(s.value.value, str):
            return  # docstring
        if not isinstance(s.value, ast.Call):
            raise self.err(s, "an expression statement must be a call")
        self.expr(s.value, allow_void=True)

    def stmt_Pass(self, s: ast.Pass) -> None:
        pass

    def stmt_AnnAssign(self, s: ast.AnnAssign) -> None:
        if not isinstance(s.target, ast.Name):
            raise self.err(s, "annotated assignment needs a plain name")
        name = s.target.id
        t = self.fn.eval_type(s.annotation)
        if name in self.locals:
            raise self.err(s, f"local {name!r} is already declared")
        if isinstance(self.lookup_global(name, s), (Static, Function)):
            raise self.err(s, f"local {name!r} shadows a module-level name")
        self.locals[name] = LV(self.alloca(t, name), t)
        if s.value is not None:
            if not t.is_scalar:
                raise self.err(s, f"cannot initialise {t} with a value; assign its elements")
            self.store(self.coerce(self.expr(s.value), t, s.value), self.locals[name])

    def stmt_Assign(self, s: ast.Assign) -> None:
        if len(s.targets) != 1:
            raise self.err(s, "chained assignment is not supported")
        target = s.targets[0]
        if isinstance(target, ast.Tuple):
            vals = self.expr_multi(s.value)
            if len(vals) != len(target.elts):
                raise self.err(s, f"cannot unpack {len(vals)} values into {len(target.elts)}")
            for t, v in zip(target.elts, vals):
                self.assign(t, v, s)
            return
        self.assign(target, self.expr(s.value), s)

    def assign(self, target: ast.expr, val: TV, s: ast.AST) -> None:
        if isinstance(target, ast.Name) and target.id not in self.locals:
            g = self.lookup_global(target.id, s)
            if g is not None and not isinstance(g, Static):
                raise self.err(s, f"cannot assign to module-level name {target.id!r}")
            if g is None:
                t = DEFAULT_INT if val.ty is None else val.ty
                if not t.is_scalar:
                    raise self.err(s, f"cannot create a local of type {t}")
                self.locals[target.id] = LV(self.alloca(t, target.id), t)
        lv = self.lvalue(target)
        if not lv.ty.is_scalar:
            raise self.err(s, f"cannot assign to a whole {lv.ty}; assign its elements")
        self.store(self.coerce(val, lv.ty, s), lv)

    def stmt_AugAssign(self, s: ast.AugAssign) -> None:
        lv = self.lvalue(s.target)
        if not lv.ty.is_scalar:
            raise self.err(s, f"cannot update a whole {lv.ty}")
        cur = self.load(lv)
        res = self.binop(s.op, cur, self.expr(s.value), s)
        self.store(self.coerce(res, lv.ty, s), lv)

    def stmt_Return(self, s: ast.Return) -> None:
        if s.value is None:
            if self.ret is not void:
                raise self.err(s, f"{self.fn.name} must return a {self.ret}")
            self.b.ret_void()
        else:
            if self.ret is void:
                raise self.err(s, f"{self.fn.name} returns nothing")
            self.b.ret(self.coerce(self.expr(s.value), self.ret, s))
        self.terminated = True

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
        if s.orelse:
            raise self.err(s, "while/else is not supported")
        head, body, end = (self.new_block(n) for n in ("while.head", "while.body", "while.end"))
        self.b.branch(head)
        self.b.position_at_end(head)
        forever = isinstance(s.test, ast.Constant) and s.test.value is True
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
        if s.orelse:
            raise self.err(s, "for/else is not supported")
        if not isinstance(s.target, ast.Name):
            raise self.err(s, "for needs a plain loop variable")
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
            self.locals[name] = LV(self.alloca(t, name), t)
        var = self.locals[name]
        if var.ty != t:
            raise self.err(s, f"loop variable {name!r} is {var.ty}, range is {t}")
        ctr = self.alloca(t, name + ".ctr")
        self.b.store(startv, ctr)
        head, body, latch, end = (self.new_block(n) for n in
                                  ("for.head", "for.body", "for.latch", "for.end"))
        self.b.branch(head)
        self.b.position_at_end(head)
        cur = self.b.load(ctr, typ=t.llvm())
        op = "<" if step > 0 else ">"
        cond = (self.b.icmp_signed if t.signed else self.b.icmp_unsigned)(op, cur, stopv)
        self.b.cbranch(cond, body, end)
        self.b.position_at_end(body)
        self.b.store(cur, var.ptr)
        self.loop_body(s.body, latch, end, body)
        self.b.position_at_end(latch)
        nxt = self.b.add(self.b.load(ctr, typ=t.llvm()), ir.Constant(t.llvm(), step))
        self.b.store(nxt, ctr)
        self.b.branch(head)
        self.finish_loop(end, False)

    def stmt_Break(self, s: ast.Break) -> None:
        if not self.loops:
            raise self.err(s, "break outside a loop")
        self.loops[-1][2].append(True)
        self.b.branch(self.loops[-1][1])
        self.terminated = True

    def stmt_Continue(self, s: ast.Continue) -> None:
        if not self.loops:
            raise self.err(s, "continue outside a loop")
        self.b.branch(self.loops[-1][0])
        self.terminated = True

    # -- names --------------------------------------------------------------------------------
    def lookup_global(self, name: str, node: ast.AST) -> Any:
        if name in self.fn.globals:
            return self.fn.globals[name]
        if name in dsl.INTRINSICS:
            return dsl.INTRINSICS[name]
        if name in ("min", "max", "range", "True", "False"):
            return name
        return None

    # -- lvalues ------------------------------------------------------------------------------
    def lvalue(self, node: ast.expr) -> LV:
        if isinstance(node, ast.Name):
            if node.id in self.locals:
                return self.locals[node.id]
            g = self.lookup_global(node.id, node)
            if isinstance(g, Static):
                return LV(self.ml.static_global(g, node.id), g.type)
            if g is None:
                raise self.err(node, f"unknown name {node.id!r}")
            raise self.err(node, f"{node.id!r} is not a variable")
        if isinstance(node, ast.Attribute):
            base = self.aggregate(node.value)
            if not isinstance(base.ty, StructType):
                raise self.err(node, f"{base.ty} has no fields (.{node.attr})")
            if node.attr not in base.ty.fields:
                raise self.err(node, f"struct {base.ty.name} has no field {node.attr!r}")
            f = base.ty.fields[node.attr]
            idx = base.ty.field_index(node.attr)
            ptr = self.b.gep(base.ptr, [ir.Constant(I32, 0), ir.Constant(I32, idx)],
                             inbounds=True, source_etype=base.ty.llvm())
            return LV(ptr, f.type)
        if isinstance(node, ast.Subscript):
            idx = self.expr(node.slice)
            if idx.ty is not None and not isinstance(idx.ty, IntType):
                raise self.err(node, f"index must be an integer, not {idx.ty}")
            ptr, base = self.place(node.value)
            if ptr is not None:  # pointer indexing: p[i]
                elem = ptr.ty.pointee
                return LV(self.gep_elem(ptr.v, elem, idx, node), elem)
            if not isinstance(base.ty, ArrayType):
                raise self.err(node, f"cannot index {base.ty}")
            if idx.ty is None and not 0 <= idx.v < base.ty.count:
                raise self.err(node, f"index {idx.v} out of range for {base.ty}")
            i = self.index64(idx, node)
            ptr = self.b.gep(base.ptr, [ir.Constant(I64, 0), i], inbounds=True,
                             source_etype=base.ty.llvm())
            return LV(ptr, base.ty.elem)
        raise self.err(node, f"cannot assign to or take the address of {ast.unparse(node)}")

    def place(self, node: ast.expr) -> tuple[TV | None, LV | None]:
        """Evaluate `node` exactly once: a pointer value, or else the lvalue of an aggregate.

        (Evaluating it twice, once to see whether it is a pointer and again for its lvalue,
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

    def aggregate(self, node: ast.expr) -> LV:
        """The lvalue of a struct/array, following one pointer: `p.f` means `(*p).f`."""
        p, lv = self.place(node)
        return LV(p.v, p.ty.pointee) if p is not None else lv

    def index64(self, idx: TV, node: ast.AST) -> ir.Value:
        if idx.ty is None:
            return ir.Constant(I64, idx.v)
        return self.resize(idx.v, idx.ty, u64) if not idx.ty.signed else self.b.sext(
            idx.v, I64) if idx.ty.bits < 64 else idx.v

    def gep_elem(self, ptr: ir.Value, elem: Type, idx: TV, node: ast.AST) -> ir.Value:
        if elem.size == 0:
            raise self.err(node, f"cannot index a pointer to {elem}")
        return self.b.gep(ptr, [self.index64(idx, node)], source_etype=elem.llvm())

    # -- expressions --------------------------------------------------------------------------
    def expr(self, node: ast.expr, allow_void: bool = False) -> TV:
        m = getattr(self, "expr_" + type(node).__name__, None)
        if m is None:
            raise self.err(node, f"unsupported expression: {type(node).__name__}")
        r = m(node)
        if r.ty is void and not allow_void:
            raise self.err(node, "this call returns nothing")
        return r

    def expr_multi(self, node: ast.expr) -> list[TV]:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            g = self.lookup_global(node.func.id, node) if node.func.id not in self.locals else None
            if isinstance(g, Intrinsic) and g.name in ("cpuid", "rdrand64"):
                return getattr(self, "intr_" + g.name)(node, multi=True)
        if isinstance(node, ast.Tuple):
            return [self.expr(e) for e in node.elts]
        raise self.err(node, "only cpuid(), rdrand64() or a tuple can be unpacked")

    def expr_Constant(self, node: ast.Constant) -> TV:
        v = node.value
        if isinstance(v, bool):
            return TV(ir.Constant(I1, int(v)), bool_)
        if isinstance(v, int):
            return TV(v, None)
        raise self.err(node, f"unsupported constant {v!r}")

    def expr_Name(self, node: ast.Name) -> TV:
        if node.id in self.locals:
            lv = self.locals[node.id]
            if not lv.ty.is_scalar:
                raise self.err(node, f"{node.id!r} is a {lv.ty}; index it or use addr()")
            return self.load(lv)
        g = self.lookup_global(node.id, node)
        if g is None:
            raise self.err(node, f"unknown name {node.id!r}")
        if isinstance(g, bool):
            return TV(ir.Constant(I1, int(g)), bool_)
        if isinstance(g, int):
            return TV(g, None)
        if isinstance(g, Const):
            return TV(ir.Constant(g.type.llvm(), g.type.wrap(g.value)), g.type)
        if isinstance(g, Static):
            lv = self.lvalue(node)
            if not lv.ty.is_scalar:
                raise self.err(node, f"{node.id!r} is a {lv.ty}; index it or use addr()")
            return self.load(lv)
        raise self.err(node, f"{node.id!r} ({type(g).__name__}) cannot be used as a value")

    def expr_Attribute(self, node: ast.Attribute) -> TV:
        lv = self.lvalue(node)
        if not lv.ty.is_scalar:
            raise self.err(node, f"{ast.unparse(node)} is a {lv.ty}; index it or use addr()")
        return self.load(lv)

    expr_Subscript = expr_Attribute

    def expr_UnaryOp(self, node: ast.UnaryOp) -> TV:
        if isinstance(node.op, ast.Not):
            return TV(self.b.not_(self.truth(node.operand)), bool_)
        v = self.expr(node.operand)
        if v.ty is None:
            if isinstance(node.op, ast.USub):
                return TV(-v.v, None)
            if isinstance(node.op, ast.UAdd):
                return v
            raise self.err(node, "~ needs a typed operand; cast the literal, e.g. ~u64(0)")
        if isinstance(node.op, ast.USub) and isinstance(v.ty, IntType):
            return TV(self.b.neg(v.v), v.ty)
        if isinstance(node.op, ast.Invert) and isinstance(v.ty, (IntType, V128Type)):
            return TV(self.b.not_(v.v), v.ty)
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
            if isinstance(op, ast.Sub):  # widen first: p - u32(1) steps back, not 4G forward
                rhs = TV(-rhs.v, None) if rhs.ty is None else TV(
                    self.b.neg(self.index64(rhs, node)), i64)
            return TV(self.gep_elem(lhs.v, lhs.ty.pointee, rhs, node), lhs.ty)
        if isinstance(op, (ast.LShift, ast.RShift)) and lhs.ty is not None and rhs.ty is not None:
            if not isinstance(lhs.ty, IntType) or not isinstance(rhs.ty, IntType):
                raise self.err(node, f"cannot shift {lhs.ty} by {rhs.ty}")
            rhs = TV(self.resize(rhs.v, rhs.ty, IntType(lhs.ty.bits, False)), lhs.ty)
        lhs, rhs = self.unify(lhs, rhs, node)
        if lhs.ty is None:
            return TV(_fold(op, lhs.v, rhs.v, node, self), None)
        t = lhs.ty
        a, b = lhs.v, rhs.v
        if isinstance(t, V128Type):
            ops = {ast.BitXor: self.b.xor, ast.BitAnd: self.b.and_, ast.BitOr: self.b.or_}
            if type(op) not in ops:
                raise self.err(node, "v128 supports only ^ & |")
            return TV(ops[type(op)](a, b), t)
        if isinstance(t, BoolType) and isinstance(op, (ast.BitXor, ast.BitAnd, ast.BitOr)):
            ops = {ast.BitXor: self.b.xor, ast.BitAnd: self.b.and_, ast.BitOr: self.b.or_}
            return TV(ops[type(op)](a, b), t)
        if not isinstance(t, IntType):
            raise self.err(node, f"arithmetic needs integers, got {t}")
        b_ = self.b
        if isinstance(op, ast.Add):
            r = b_.add(a, b)
        elif isinstance(op, ast.Sub):
            r = b_.sub(a, b)
        elif isinstance(op, ast.Mult):
            r = b_.mul(a, b)
        elif isinstance(op, ast.FloorDiv):
            r = b_.sdiv(a, b) if t.signed else b_.udiv(a, b)
        elif isinstance(op, ast.Mod):
            r = b_.srem(a, b) if t.signed else b_.urem(a, b)
        elif isinstance(op, ast.BitAnd):
            r = b_.and_(a, b)
        elif isinstance(op, ast.BitOr):
            r = b_.or_(a, b)
        elif isinstance(op, ast.BitXor):
            r = b_.xor(a, b)
        elif isinstance(op, (ast.LShift, ast.RShift)):
            amt = b_.and_(b, ir.Constant(t.llvm(), t.bits - 1))  # x86: count mod width
            if isinstance(op, ast.LShift):
                r = b_.shl(a, amt)
            else:
                r = b_.ashr(a, amt) if t.signed else b_.lshr(a, amt)
        else:
            raise self.err(node, f"unsupported operator {type(op).__name__}")
        return TV(r, t)

    def unify(self, a: TV, b: TV, node: ast.AST) -> tuple[TV, TV]:
        if a.ty is None and b.ty is None:
            return a, b
        if a.ty is None:
            return TV(self.coerce(a, b.ty, node), b.ty), b
        if b.ty is None:
            return a, TV(self.coerce(b, a.ty, node), a.ty)
        if a.ty != b.ty:
            raise self.err(node, f"type mismatch: {a.ty} and {b.ty}; cast one side")
        return a, b

    def coerce(self, v: TV, t: Type, node: ast.AST) -> ir.Value:
        if v.ty is None:
            try:
                lit = literal_value(v.v, t)
            except ValueError as e:
                raise self.err(node, str(e)) from None
            if isinstance(t, IntType):
                return ir.Constant(t.llvm(), lit & t.mask)
            if isinstance(t, PtrType):
                return ir.Constant(ir.PointerType(), None)
            return ir.Constant(I1, lit)
        if v.ty != t:
            raise self.err(node, f"type mismatch: expected {t}, got {v.ty}")
        return v.v

    def resize(self, v: ir.Value, src: IntType, dst: IntType) -> ir.Value:
        if src.bits == dst.bits:
            return v
        if src.bits > dst.bits:
            return self.b.trunc(v, dst.llvm())
        return (self.b.sext if src.signed else self.b.zext)(v, dst.llvm())

    def expr_Compare(self, node: ast.Compare) -> TV:
        if len(node.ops) != 1:
            raise self.err(node, "chained comparisons are not supported")
        lhs, rhs = self.unify(self.expr(node.left), self.expr(node.comparators[0]), node)
        op = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
              ast.GtE: ">="}.get(type(node.ops[0]))
        if op is None:
            raise self.err(node, f"unsupported comparison {type(node.ops[0]).__name__}")
        if lhs.ty is None:
            return TV(ir.Constant(I1, int(eval(f"{lhs.v} {op} {rhs.v}"))), bool_)
        t = lhs.ty
        a, b = lhs.v, rhs.v
        if isinstance(t, PtrType):
            a, b = self.b.ptrtoint(a, I64), self.b.ptrtoint(b, I64)
            return TV(self.b.icmp_unsigned(op, a, b), bool_)
        if isinstance(t, BoolType):
            if op not in ("==", "!="):
                raise self.err(node, "bools compare only with == and !=")
            return TV(self.b.icmp_unsigned(op, a, b), bool_)
        if not isinstance(t, IntType):
            raise self.err(node, f"cannot compare {t}")
        cmp = self.b.icmp_signed if t.signed else self.b.icmp_unsigned
        return TV(cmp(op, a, b), bool_)

    def truth(self, node: ast.expr) -> ir.Value:
        v = self.expr(node)
        if v.ty is None:
            return ir.Constant(I1, int(v.v != 0))
        if isinstance(v.ty, BoolType):
            return v.v
        if isinstance(v.ty, IntType):
            return self.b.icmp_unsigned("!=", v.v, ir.Constant(v.ty.llvm(), 0))
        if isinstance(v.ty, PtrType):
            return self.b.icmp_unsigned("!=", self.b.ptrtoint(v.v, I64), ir.Constant(I64, 0))
        raise self.err(node, f"{v.ty} has no truth value")

    def expr_BoolOp(self, node: ast.BoolOp) -> TV:
        is_and = isinstance(node.op, ast.And)
        result = self.alloca(bool_, "bool")
        end = self.new_block("bool.end")
        for i, value in enumerate(node.values):
            c = self.truth(value)
            self.b.store(c, result)
            if i == len(node.values) - 1:
                self.b.branch(end)
            else:
                nxt = self.new_block("bool.next")
                if is_and:
                    self.b.cbranch(c, nxt, end)
                else:
                    self.b.cbranch(c, end, nxt)
                self.b.position_at_end(nxt)
        self.b.position_at_end(end)
        return TV(self.b.load(result, typ=I1), bool_)

    def expr_IfExp(self, node: ast.IfExp) -> TV:
        c = self.truth(node.test)
        a, b = self.unify(self.expr(node.body), self.expr(node.orelse), node)
        if a.ty is None:
            a, b = TV(self.coerce(a, DEFAULT_INT, node), DEFAULT_INT), TV(
                self.coerce(b, DEFAULT_INT, node), DEFAULT_INT)
        return TV(self.b.select(c, a.v, b.v), a.ty)

    # -- calls --------------------------------------------------------------------------------
    def expr_Call(self, node: ast.Call) -> TV:
        if node.keywords:
            raise self.err(node, "keyword arguments are not supported")
        func = node.func
        if isinstance(func, ast.Subscript):  # Ptr[T](x): pointer cast
            t = self.fn.eval_type(func)
            return self.cast(t, node)
        if not isinstance(func, ast.Name):
            raise self.err(node, f"cannot call {ast.unparse(func)}")
        if func.id in self.locals:
            raise self.err(node, f"{func.id!r} is a variable, not a function")
        g = self.lookup_global(func.id, node)
        if g is None:
            raise self.err(node, f"unknown function {func.id!r}")
        if isinstance(g, Type):
            return self.cast(g, node)
        if isinstance(g, Function):
            return self.call(g, node)
        if isinstance(g, Intrinsic):
            return getattr(self, "intr_" + g.name)(node)
        if g in ("min", "max"):
            if len(node.args) != 2:
                raise self.err(node, f"{g} takes two arguments")
            a, b = self.unify(self.expr(node.args[0]), self.expr(node.args[1]), node)
            if a.ty is None:
                return TV((min if g == "min" else max)(a.v, b.v), None)
            if not isinstance(a.ty, IntType):
                raise self.err(node, f"{g} needs integers")
            cmp = self.b.icmp_signed if a.ty.signed else self.b.icmp_unsigned
            c = cmp("<" if g == "min" else ">", a.v, b.v)
            return TV(self.b.select(c, a.v, b.v), a.ty)
        raise self.err(node, f"{func.id!r} is not callable in the DSL")

    def call(self, g: Function, node: ast.Call) -> TV:
        callee = self.ml.declare(g, node)
        params, ret = g.signature
        if len(node.args) != len(params):
            raise self.err(node, f"{g.name} takes {len(params)} arguments, got {len(node.args)}")
        args = []
        for (pname, pt), a in zip(params, node.args):
            v = self.expr(a)
            if v.ty is not None and v.ty != pt:
                raise self.err(a, f"argument {pname!r} of {g.name}: expected {pt}, got {v.ty}")
            args.append(self.coerce(v, pt, a))
        r = self.b.call(callee, args, cconv=callee.calling_convention)
        return TV(r, ret)

    def cast(self, t: Type, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, f"cast to {t} takes one argument")
        v = self.expr(node.args[0])
        if v.ty is None:
            if isinstance(t, IntType):
                return TV(ir.Constant(t.llvm(), v.v & t.mask), t)
            if isinstance(t, PtrType):
                return TV(self.b.inttoptr(ir.Constant(I64, v.v & u64.mask), ir.PointerType()), t)
            if isinstance(t, BoolType):
                return TV(ir.Constant(I1, int(v.v != 0)), t)
            raise self.err(node, f"cannot cast a literal to {t}")
        src = v.ty
        if isinstance(t, IntType):
            if isinstance(src, IntType):
                return TV(self.resize(v.v, src, t), t)
            if isinstance(src, BoolType):
                return TV(self.b.zext(v.v, t.llvm()) if t.bits > 1 else v.v, t)
            if isinstance(src, PtrType) and t.bits == 64:
                return TV(self.b.ptrtoint(v.v, I64), t)
        if isinstance(t, PtrType):
            if isinstance(src, PtrType):
                return TV(v.v, t)
            if isinstance(src, IntType) and src.bits == 64:
                return TV(self.b.inttoptr(v.v, ir.PointerType()), t)
        if isinstance(t, BoolType) and isinstance(src, IntType):
            return TV(self.b.icmp_unsigned("!=", v.v, ir.Constant(src.llvm(), 0)), t)
        raise self.err(node, f"cannot cast {src} to {t}")

    # -- intrinsics ---------------------------------------------------------------------------
    def args(self, node: ast.Call, types: list[Type | None]) -> list[ir.Value]:
        name = node.func.id  # type: ignore[attr-defined]
        if len(node.args) != len(types):
            raise self.err(node, f"{name} takes {len(types)} arguments, got {len(node.args)}")
        out = []
        for a, t in zip(node.args, types):
            v = self.expr(a)
            out.append(v if t is None else self.coerce(v, t, a))
        return out

    def literal_arg(self, node: ast.Call, i: int, lo: int, hi: int) -> int:
        v = self.expr(node.args[i])
        if v.ty is not None or not lo <= v.v <= hi:
            raise self.err(node, f"argument {i + 1} must be an integer literal in [{lo}, {hi}]")
        return v.v

    def asm(self, ret: ir.Type, text: str, cons: str, args: list[ir.Value]) -> ir.Value:
        fty = ir.FunctionType(ret, [a.type for a in args])
        return self.b.asm(fty, text, cons, args, side_effect=True)

    def intr_addr(self, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, "addr takes one argument")
        lv = self.lvalue(node.args[0])
        return TV(lv.ptr, PtrType(lv.ty))

    def ptr_arg(self, node: ast.Call, i: int) -> TV:
        v = self.expr(node.args[i])
        if not isinstance(v.ty, PtrType):
            raise self.err(node, f"argument {i + 1} must be a pointer, got {v.ty}")
        return v

    def intr_vload(self, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, "vload takes one pointer")
        p = self.ptr_arg(node, 0)
        if not p.ty.pointee.is_scalar:
            raise self.err(node, f"vload of a {p.ty.pointee}")
        return self.load(LV(p.v, p.ty.pointee, volatile=True))

    def intr_vstore(self, node: ast.Call) -> TV:
        if len(node.args) != 2:
            raise self.err(node, "vstore takes a pointer and a value")
        p = self.ptr_arg(node, 0)
        if not p.ty.pointee.is_scalar:
            raise self.err(node, f"vstore of a {p.ty.pointee}")
        val = self.coerce(self.expr(node.args[1]), p.ty.pointee, node.args[1])
        self.store(val, LV(p.v, p.ty.pointee, volatile=True))
        return TV(None, void)

    def intr_sizeof(self, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, "sizeof takes one type")
        return TV(self.fn.eval_type(node.args[0]).size, None)

    def intr_offsetof(self, node: ast.Call) -> TV:
        if len(node.args) != 2 or not isinstance(node.args[1], ast.Constant):
            raise self.err(node, "offsetof takes a struct type and a field name string")
        t = self.fn.eval_type(node.args[0])
        if not isinstance(t, StructType) or node.args[1].value not in t.fields:
            raise self.err(node, f"{t} has no field {node.args[1].value!r}")
        return TV(t.offset(node.args[1].value), None)

    def intr_symbol_addr(self, node: ast.Call) -> TV:
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Constant) or not isinstance(
                node.args[0].value, str):
            raise self.err(node, "symbol_addr takes a symbol name string")
        g = self.ml.extern_symbol(node.args[0].value)
        return TV(self.b.ptrtoint(g, I64), u64)

    def intr_func_addr(self, node: ast.Call) -> TV:
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Name):
            raise self.err(node, "func_addr takes a DSL function name")
        g = self.lookup_global(node.args[0].id, node)
        if not isinstance(g, Function):
            raise self.err(node, f"{node.args[0].id!r} is not a DSL function")
        return TV(self.b.ptrtoint(self.ml.declare(g, node), I64), u64)

    def intr_efi_call(self, node: ast.Call) -> TV:
        if not node.args:
            raise self.err(node, "efi_call needs a function pointer")
        fp = self.coerce(self.expr(node.args[0]), u64, node.args[0])
        args = []
        for a in node.args[1:]:
            v = self.expr(a)
            if isinstance(v.ty, PtrType):
                args.append(self.b.ptrtoint(v.v, I64))
            elif v.ty is None or v.ty == u64:
                args.append(self.coerce(v, u64, a))
            else:
                raise self.err(a, f"efi_call arguments are u64 or pointers, got {v.ty}")
        fty = ir.FunctionType(I64, [I64] * len(args))
        callee = _FnPtr(self.b.inttoptr(fp, ir.PointerType()), fty)
        return TV(self.b.call(callee, args, cconv="win64cc"), u64)

    def intr_trap(self, node: ast.Call) -> TV:
        self.b.call(self.ml.intrinsic("llvm.trap", ir.VoidType(), []), [])
        return TV(None, void)

    def intr_cpuid(self, node: ast.Call, multi: bool = False) -> Any:
        if not multi:
            raise self.err(node, "cpuid returns four values: a, b, c, d = cpuid(leaf, sub)")
        leaf, sub = self.args(node, [u32, u32])
        st = ir.LiteralStructType([I32] * 4)
        r = self.asm(st, "cpuid", "={eax},={ebx},={ecx},={edx},{eax},{ecx}", [leaf, sub])
        return [TV(self.b.extract_value(r, i), u32) for i in range(4)]

    def intr_rdrand64(self, node: ast.Call, multi: bool = False) -> Any:
        if not multi:
            raise self.err(node, "rdrand64 returns two values: value, ok = rdrand64()")
        self.args(node, [])
        st = ir.LiteralStructType([I64, I8])
        r = self.asm(st, "rdrand $0\n\tsetc $1", "=r,=r,~{flags}", [])
        ok = self.b.icmp_unsigned("!=", self.b.extract_value(r, 1), ir.Constant(I8, 0))
        return [TV(self.b.extract_value(r, 0), u64), TV(ok, bool_)]

    def intr_rdmsr(self, node: ast.Call) -> TV:
        (msr,) = self.args(node, [u32])
        st = ir.LiteralStructType([I32, I32])
        r = self.asm(st, "rdmsr", "={eax},={edx},{ecx}", [msr])
        lo = self.b.zext(self.b.extract_value(r, 0), I64)
        hi = self.b.zext(self.b.extract_value(r, 1), I64)
        return TV(self.b.or_(lo, self.b.shl(hi, ir.Constant(I64, 32))), u64)

    def intr_wrmsr(self, node: ast.Call) -> TV:
        msr, val = self.args(node, [u32, u64])
        lo = self.b.trunc(val, I32)
        hi = self.b.trunc(self.b.lshr(val, ir.Constant(I64, 32)), I32)
        self.asm(ir.VoidType(), "wrmsr", "{ecx},{eax},{edx},~{memory}", [msr, lo, hi])
        return TV(None, void)

    def intr_vmmcall(self, node: ast.Call) -> TV:
        vals = self.args(node, [u64] * 5)
        r = self.asm(I64, "vmmcall", "={rax},{rax},{rbx},{rcx},{rdx},{rsi},~{memory}", vals)
        return TV(r, u64)

    def _simple_asm(self, node: ast.Call, text: str) -> TV:
        self.args(node, [])
        self.asm(ir.VoidType(), text, "~{memory}", [])
        return TV(None, void)

    def intr_hlt(self, node: ast.Call) -> TV:
        return self._simple_asm(node, "hlt")

    def intr_pause(self, node: ast.Call) -> TV:
        return self._simple_asm(node, "pause")

    def intr_mfence(self, node: ast.Call) -> TV:
        return self._simple_asm(node, "mfence")

    def intr_lfence(self, node: ast.Call) -> TV:
        return self._simple_asm(node, "lfence")

    def intr_sfence(self, node: ast.Call) -> TV:
        return self._simple_asm(node, "sfence")

    def intr_invlpg(self, node: ast.Call) -> TV:
        (va,) = self.args(node, [u64])
        self.asm(ir.VoidType(), "invlpg ($0)", "r,~{memory}", [va])
        return TV(None, void)

    def intr_read_cr3(self, node: ast.Call) -> TV:
        self.args(node, [])
        return TV(self.asm(I64, "mov %cr3, $0", "=r,~{memory}", []), u64)

    def intr_write_cr3(self, node: ast.Call) -> TV:
        (v,) = self.args(node, [u64])
        self.asm(ir.VoidType(), "mov $0, %cr3", "r,~{memory}", [v])
        return TV(None, void)

    def intr_outb(self, node: ast.Call) -> TV:
        port, val = self.args(node, [u16, u8])
        self.asm(ir.VoidType(), "outb %al, %dx", "{dx},{al},~{memory}", [port, val])
        return TV(None, void)

    def intr_inb(self, node: ast.Call) -> TV:
        (port,) = self.args(node, [u16])
        return TV(self.asm(I8, "inb %dx, %al", "={al},{dx},~{memory}", [port]), u8)

    def _v2(self, name: str, node: ast.Call, n: int = 2) -> TV:
        vals = self.args(node, [v128] * n)
        f = self.ml.intrinsic(name, V2I64, [V2I64] * n)
        return TV(self.b.call(f, vals), v128)

    def intr_aesenc(self, node: ast.Call) -> TV:
        return self._v2("llvm.x86.aesni.aesenc", node)

    def intr_aesenclast(self, node: ast.Call) -> TV:
        return self._v2("llvm.x86.aesni.aesenclast", node)

    def intr_aeskeygenassist(self, node: ast.Call) -> TV:
        if len(node.args) != 2:
            raise self.err(node, "aeskeygenassist takes a v128 and a literal rcon")
        v = self.coerce(self.expr(node.args[0]), v128, node.args[0])
        imm = self.literal_arg(node, 1, 0, 255)
        f = self.ml.intrinsic("llvm.x86.aesni.aeskeygenassist", V2I64, [V2I64, I8])
        return TV(self.b.call(f, [v, ir.Constant(I8, imm)]), v128)

    def intr_pclmulqdq(self, node: ast.Call) -> TV:
        if len(node.args) != 3:
            raise self.err(node, "pclmulqdq takes two v128 values and a literal selector")
        a = self.coerce(self.expr(node.args[0]), v128, node.args[0])
        b = self.coerce(self.expr(node.args[1]), v128, node.args[1])
        imm = self.literal_arg(node, 2, 0, 255)
        f = self.ml.intrinsic("llvm.x86.pclmulqdq", V2I64, [V2I64, V2I64, I8])
        return TV(self.b.call(f, [a, b, ir.Constant(I8, imm)]), v128)

    def intr_pshufb(self, node: ast.Call) -> TV:
        v, m = self.args(node, [v128, v128])
        f = self.ml.intrinsic("llvm.x86.ssse3.pshuf.b.128", V16I8, [V16I8, V16I8])
        r = self.b.call(f, [self.b.bitcast(v, V16I8), self.b.bitcast(m, V16I8)])
        return TV(self.b.bitcast(r, V2I64), v128)

    def intr_pshufd(self, node: ast.Call) -> TV:
        if len(node.args) != 2:
            raise self.err(node, "pshufd takes a v128 and a literal selector")
        v = self.b.bitcast(self.coerce(self.expr(node.args[0]), v128, node.args[0]), V4I32)
        imm = self.literal_arg(node, 1, 0, 255)
        mask = ir.Constant(V4I32, [(imm >> (2 * i)) & 3 for i in range(4)])
        r = self.b.shuffle_vector(v, v, mask)
        return TV(self.b.bitcast(r, V2I64), v128)

    def intr_v128_make(self, node: ast.Call) -> TV:
        lo, hi = self.args(node, [u64, u64])
        v = ir.Constant(V2I64, None)
        v = self.b.insert_element(v, lo, ir.Constant(I32, 0))
        return TV(self.b.insert_element(v, hi, ir.Constant(I32, 1)), v128)

    def intr_v128_lo(self, node: ast.Call) -> TV:
        (v,) = self.args(node, [v128])
        return TV(self.b.extract_element(v, ir.Constant(I32, 0)), u64)

    def intr_v128_hi(self, node: ast.Call) -> TV:
        (v,) = self.args(node, [v128])
        return TV(self.b.extract_element(v, ir.Constant(I32, 1)), u64)

    def intr_v128_load(self, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, "v128_load takes one pointer")
        p = self.ptr_arg(node, 0)
        return TV(self.b.load(p.v, typ=V2I64, align=1), v128)

    def intr_v128_store(self, node: ast.Call) -> TV:
        if len(node.args) != 2:
            raise self.err(node, "v128_store takes a pointer and a v128")
        p = self.ptr_arg(node, 0)
        v = self.coerce(self.expr(node.args[1]), v128, node.args[1])
        self.store(v, LV(p.v, v128))  # builder.store rejects GEP pointers typed i8
        return TV(None, void)

    def _lane_shift(self, node: ast.Call, left: bool) -> TV:
        if len(node.args) != 2:
            raise self.err(node, "lane shifts take a v128 and a literal count")
        v = self.coerce(self.expr(node.args[0]), v128, node.args[0])
        n = self.literal_arg(node, 1, 0, 63)
        amt = ir.Constant(V2I64, [n, n])
        return TV(self.b.shl(v, amt) if left else self.b.lshr(v, amt), v128)

    def intr_v128_shl64(self, node: ast.Call) -> TV:
        return self._lane_shift(node, True)

    def intr_v128_shr64(self, node: ast.Call) -> TV:
        return self._lane_shift(node, False)

    def _byte_shift(self, node: ast.Call, left: bool) -> TV:
        if len(node.args) != 2:
            raise self.err(node, "byte shifts take a v128 and a literal count")
        v = self.b.bitcast(self.coerce(self.expr(node.args[0]), v128, node.args[0]), V16I8)
        n = self.literal_arg(node, 1, 0, 16)
        zero = ir.Constant(V16I8, None)
        # shuffle indices: 0..15 select v, 16..31 select zero
        if left:  # pslldq: byte i takes byte i-n, zeros shift in at the bottom
            idx = [16 if i < n else i - n for i in range(16)]
        else:  # psrldq: byte i takes byte i+n, zeros shift in at the top
            idx = [min(16, i + n) for i in range(16)]
        r = self.b.shuffle_vector(v, zero, ir.Constant(ir.VectorType(I32, 16), idx))
        return TV(self.b.bitcast(r, V2I64), v128)

    def intr_v128_bsl(self, node: ast.Call) -> TV:
        return self._byte_shift(node, True)

    def intr_v128_bsr(self, node: ast.Call) -> TV:
        return self._byte_shift(node, False)


def _fold(op: ast.operator, a: int, b: int, node: ast.AST, fl: FunctionLowerer) -> int:
    """Constant-fold two untyped literals (rules in types.fold_literals, shared with interp)."""
    try:
        return fold_literals(op, a, b)
    except (ZeroDivisionError, ValueError) as e:
        raise fl.err(node, str(e)) from None


def lower_functions(roots: list[Function], name: str = "helper",
                    keep: tuple[tuple[str, Static], ...] = ()) -> ir.Module:
    """Lower `roots` and every DSL function they call into one LLVM module; `keep` names
    statics (symbol, static) that must be in the image even if no code reads them."""
    return ModuleLowerer(name).lower(roots, keep)
