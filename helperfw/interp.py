"""Reference interpreter of the DSL: the compiler's semantics, executed in Python.

It reads the same AST as codegen/lower.py and mirrors it rule for rule, so a differential test can
hold the compiled code to it: integers wrap; `//` and `%` truncate toward zero; shift counts are
taken modulo the width; comparisons and `>>` follow signedness; untyped literals take the other
operand's type (DEFAULT_INT when nothing decides); `a if c else b` evaluates both arms (it lowers
to a select); `and`/`or` short-circuit; pointer arithmetic scales by the pointee size.

Like the compiler it works in two steps. A function is first *prepared*: its AST is walked in the
compiler's order (the same local declarations, literal typing and dead-code skipping) into Python
closures; each call then runs those closures. Type errors are the compiler's business: the
preparation raises DslError on anything it does not model, and never guesses.

Memory is flat, little-endian and explicit (`Memory`): pointers are plain ints, locals whose
address is taken and aggregate locals live in a stack region, statics in a statics region. Tests
can map their own bytearray at a chosen address, so side effects land in the caller's buffer.
Privileged instructions go to an `Env` whose methods a test overrides; the SSE/AES-NI/PCLMULQDQ
intrinsics are computed here exactly like the x86 instructions.
"""

from __future__ import annotations

import ast
import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import dsl
from .dsl import Const, DslError, Function, Intrinsic, Static
from .structs import StructType
from .types import (
    DEFAULT_INT,
    ArrayType,
    BoolType,
    IntType,
    PtrType,
    Type,
    V128Type,
    bool_,
    fold_literals,
    literal_value,
    trunc_div,
    trunc_rem,
    u8,
    u16,
    u32,
    u64,
    v128,
    void,
)

MASK64 = (1 << 64) - 1
MASK128 = (1 << 128) - 1
STACK_TOP = 0x7FFF_0000_0000  # default regions; any free addresses would do
STACK_SIZE = 1 << 20
STATIC_BASE = 0x6000_0000_0000


class InterpError(Exception):
    """The interpreted program did something with no defined result (or nothing models it)."""


class MemoryFault(InterpError):
    def __init__(self, addr: int, size: int, kind: str) -> None:
        super().__init__(f"{kind} of {size} bytes at {addr:#x}: not mapped"
                         if kind != "write to read-only" else f"write of {size} bytes at "
                         f"{addr:#x}: read-only memory")
        self.addr, self.size, self.kind = addr, size, kind


class Trap(InterpError):
    """trap() was executed (ud2 in the compiled code)."""


# ---------------------------------------------------------------------------------------------
# memory


class Memory:
    """A flat little-endian address space made of mapped regions (nothing else is accessible).

    `map(addr, size)` creates zeroed memory; `map(addr, buffer)` maps a caller's bytearray (or
    writable memoryview) in place, so writes by the program are visible in that buffer."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[tuple[int, int, Any, bool]] = []  # (start, end, buffer, readonly)
        self._last: tuple[int, int, Any, bool] = (0, 0, b"", True)

    def map(self, addr: int, size_or_buffer: int | bytearray | memoryview,
            readonly: bool = False) -> Any:
        buf = (bytearray(size_or_buffer) if isinstance(size_or_buffer, int)
               else size_or_buffer)
        end = addr + len(buf)
        if addr < 0 or end > 1 << 64 or len(buf) == 0:
            raise ValueError(f"bad region {addr:#x}+{len(buf):#x}")
        i = bisect.bisect_right(self._starts, addr)
        if (i > 0 and self._regions[i - 1][1] > addr) or (
                i < len(self._starts) and self._starts[i] < end):
            raise ValueError(f"region {addr:#x}..{end:#x} overlaps a mapped region")
        self._starts.insert(i, addr)
        self._regions.insert(i, (addr, end, buf, readonly))
        return buf

    def unmap(self, addr: int) -> None:
        i = self._starts.index(addr)
        del self._starts[i], self._regions[i]
        self._last = (0, 0, b"", True)

    def _region(self, addr: int, size: int, kind: str) -> tuple[int, int, Any, bool]:
        r = self._last
        if r[0] <= addr and addr + size <= r[1]:
            return r
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._regions[i]
            if addr + size <= r[1]:
                self._last = r
                return r
        raise MemoryFault(addr, size, kind)

    def read(self, addr: int, size: int) -> bytes:
        start, _, buf, _ = self._region(addr, size, "read")
        return bytes(buf[addr - start: addr - start + size])

    def write(self, addr: int, data: bytes) -> None:
        start, _, buf, ro = self._region(addr, len(data), "write")
        if ro:
            raise MemoryFault(addr, len(data), "write to read-only")
        buf[addr - start: addr - start + len(data)] = data

    def read_int(self, addr: int, size: int) -> int:
        start, _, buf, _ = self._region(addr, size, "read")
        o = addr - start
        return int.from_bytes(buf[o: o + size], "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        start, _, buf, ro = self._region(addr, size, "write")
        if ro:
            raise MemoryFault(addr, size, "write to read-only")
        o = addr - start
        buf[o: o + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


# ---------------------------------------------------------------------------------------------
# the x86 vector instructions, bit-exact


def _gf_mul(a: int, b: int) -> int:
    """Multiply in GF(2^8) modulo the AES polynomial x^8 + x^4 + x^3 + x + 1."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a = (a << 1) ^ (0x11B if a & 0x80 else 0)
        b >>= 1
    return r


def _make_sbox() -> bytes:
    """FIPS-197 §5.1.1: multiplicative inverse in GF(2^8), then the affine map with 0x63."""
    inv = [0] * 256
    for a in range(1, 256):
        for b in range(1, 256):
            if _gf_mul(a, b) == 1:
                inv[a] = b
                break
    out = bytearray(256)
    for x in range(256):
        b = inv[x]
        s = b
        for k in range(1, 5):
            s ^= ((b << k) | (b >> (8 - k))) & 0xFF
        out[x] = s ^ 0x63
    return bytes(out)


SBOX = _make_sbox()


def _bytes16(v: int) -> bytearray:
    return bytearray(v.to_bytes(16, "little"))


def _int16(b: bytes | bytearray) -> int:
    return int.from_bytes(b, "little")


def _shift_sub(v: int) -> bytearray:
    """ShiftRows then SubBytes on an AES state held like an XMM register (byte 4c+r = row r,
    column c)."""
    s = _bytes16(v)
    return bytearray(SBOX[s[r + 4 * ((c + r) % 4)]] for c in range(4) for r in range(4))


def _xtime(b: int) -> int:
    return ((b << 1) ^ (0x1B if b & 0x80 else 0)) & 0xFF


def aesenc(state: int, round_key: int) -> int:
    """AESENC: ShiftRows, SubBytes, MixColumns, then XOR the round key."""
    s = _shift_sub(state)
    out = bytearray(16)
    for c in range(4):
        a = s[4 * c: 4 * c + 4]
        for r in range(4):
            out[4 * c + r] = (_xtime(a[r]) ^ _xtime(a[(r + 1) % 4]) ^ a[(r + 1) % 4]
                              ^ a[(r + 2) % 4] ^ a[(r + 3) % 4])
    return _int16(out) ^ round_key


def aesenclast(state: int, round_key: int) -> int:
    """AESENCLAST: ShiftRows, SubBytes, XOR the round key (no MixColumns)."""
    return _int16(_shift_sub(state)) ^ round_key


def aeskeygenassist(v: int, rcon: int) -> int:
    """AESKEYGENASSIST: SubWord of dwords 1 and 3, each also rotated right 8 and XORed with
    rcon."""

    def subword(w: int) -> int:
        return _int16(bytes(SBOX[b] for b in w.to_bytes(4, "little")))

    def rot(w: int) -> int:
        return ((w >> 8) | (w << 24)) & 0xFFFFFFFF

    x1, x3 = subword((v >> 32) & 0xFFFFFFFF), subword((v >> 96) & 0xFFFFFFFF)
    dw = (x1, rot(x1) ^ rcon, x3, rot(x3) ^ rcon)
    return sum(d << (32 * i) for i, d in enumerate(dw))


def clmul64(a: int, b: int) -> int:
    """Carry-less (GF(2)[x]) product of two 64-bit values: up to 127 bits."""
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        b >>= 1
    return r


def pclmulqdq(a: int, b: int, imm: int) -> int:
    """PCLMULQDQ: imm bit 0 picks a's quadword, bit 4 picks b's."""
    qa = (a >> (64 if imm & 0x01 else 0)) & MASK64
    qb = (b >> (64 if imm & 0x10 else 0)) & MASK64
    return clmul64(qa, qb)


def pshufb(v: int, mask: int) -> int:
    """PSHUFB: byte i = 0 if mask[i] has bit 7 set, else v[mask[i] & 15]."""
    s, m = _bytes16(v), _bytes16(mask)
    return _int16(bytes(0 if k & 0x80 else s[k & 15] for k in m))


def pshufd(v: int, imm: int) -> int:
    """PSHUFD: dword i = v's dword (imm >> 2i) & 3."""
    d = [(v >> (32 * i)) & 0xFFFFFFFF for i in range(4)]
    return sum(d[(imm >> (2 * i)) & 3] << (32 * i) for i in range(4))


def lane_shift(v: int, n: int, left: bool) -> int:
    """PSLLQ/PSRLQ by an immediate: each 64-bit lane shifted alone."""
    lanes = (v & MASK64, v >> 64)
    out = [((q << n) if left else (q >> n)) & MASK64 for q in lanes]
    return out[0] | (out[1] << 64)


def byte_shift(v: int, n: int, left: bool) -> int:
    """PSLLDQ/PSRLDQ: the whole register shifted by n bytes, zeros shifted in."""
    return ((v << (8 * n)) if left else (v >> (8 * n))) & MASK128


# ---------------------------------------------------------------------------------------------
# the platform


class Env:
    """What the interpreter cannot compute: privileged instructions and link-time addresses.

    Override the methods a test needs; the defaults model nothing and raise, except the hints
    and fences, which have no architectural effect on a single thread."""

    def _none(self, what: str) -> InterpError:
        return InterpError(f"{what}: the interpreter's Env models no {what}; override it")

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        raise self._none("cpuid")

    def rdmsr(self, msr: int) -> int:
        raise self._none("rdmsr")

    def wrmsr(self, msr: int, value: int) -> None:
        raise self._none("wrmsr")

    def vmmcall(self, nr: int, a0: int, a1: int, a2: int, a3: int) -> int:
        raise self._none("vmmcall")

    def hlt(self) -> None:
        raise self._none("hlt")

    def rdrand64(self) -> tuple[int, bool]:
        raise self._none("rdrand64")

    def invlpg(self, va: int) -> None:
        raise self._none("invlpg")

    def read_cr3(self) -> int:
        raise self._none("read_cr3")

    def write_cr3(self, value: int) -> None:
        raise self._none("write_cr3")

    def outb(self, port: int, value: int) -> None:
        raise self._none("outb")

    def inb(self, port: int) -> int:
        raise self._none("inb")

    def efi_call(self, fnptr: int, *args: int) -> int:
        raise self._none("efi_call")

    def symbol_addr(self, name: str) -> int:
        raise self._none("symbol_addr")

    def func_addr(self, fn: Function) -> int:
        raise self._none("func_addr")

    def pause(self) -> None:
        pass

    def mfence(self) -> None:
        pass

    def lfence(self) -> None:
        pass

    def sfence(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# prepared code: closures over a frame

Run = Callable[["Frame"], Any]
_BREAK, _CONTINUE, _RETURN = 1, 2, 3


class Frame:
    __slots__ = ("base", "regs", "ret")

    def __init__(self, nregs: int, base: int) -> None:
        self.regs: list[Any] = [0] * nregs
        self.base = base
        self.ret: Any = None


@dataclass
class TV:
    """A prepared expression: `v` is a closure Frame -> value, or for an untyped literal
    (`ty is None`) the Python int itself."""

    v: Any
    ty: Type | None


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
    fn: Function
    params: list[tuple[str, Type]]
    ret: Type
    nregs: int
    frame_size: int
    param_slots: list[LV]
    body: Run


class Interpreter:
    """Runs DSL functions over a `Memory` (its own by default) with an `Env` for the platform."""

    def __init__(self, memory: Memory | None = None, env: Env | None = None, *,
                 stack_top: int = STACK_TOP, stack_size: int = STACK_SIZE,
                 static_base: int = STATIC_BASE) -> None:
        self.memory = memory if memory is not None else Memory()
        self.env = env if env is not None else Env()
        self.memory.map(stack_top - stack_size, stack_size)
        self.stack_limit = stack_top - stack_size
        self.sp = stack_top
        self._static_next = static_base
        self._statics: dict[int, tuple[Static, int]] = {}
        self._prepared: dict[Function, Prepared] = {}

    # -- public -----------------------------------------------------------------------------
    def call(self, fn: Function, *args: int) -> int | None:
        """Run `fn` with Python ints (each wrapped to its parameter's type, like a C call
        truncates a register); returns the typed result (signed types as negative ints),
        or None for a void function."""
        p = self.prepare(fn)
        if len(args) != len(p.params):
            raise TypeError(f"{fn.name} takes {len(p.params)} arguments, got {len(args)}")
        return self._invoke(p, [_wrap_arg(a, t) for a, (_, t) in zip(args, p.params)])

    def static_addr(self, s: Static) -> int:
        """Where static `s` lives in this interpreter's memory (allocated on first use)."""
        key = id(s)
        if key not in self._statics:
            addr = (self._static_next + s.align - 1) // s.align * s.align
            size = max(s.type.size, 1)
            buf = self.memory.map(addr, size, readonly=s.readonly)
            if s.init is not None:
                buf[:] = s.init
            self._statics[key] = (s, addr)
            self._static_next = (addr + size + 15) // 16 * 16
        return self._statics[key][1]

    def read_static(self, s: Static) -> bytes:
        return self.memory.read(self.static_addr(s), s.type.size)

    def prepare(self, fn: Function) -> Prepared:
        if fn not in self._prepared:
            self._prepared[fn] = _Preparer(self, fn).prepare()
        return self._prepared[fn]

    # -- calls ------------------------------------------------------------------------------
    def _invoke(self, p: Prepared, args: list[Any]) -> Any:
        old_sp = self.sp
        base = (old_sp - p.frame_size) & ~15
        if base - 16 < self.stack_limit:
            raise InterpError(f"stack overflow calling {p.fn.name}")
        self.sp = base - 16  # the return-address slot a real call would use
        try:
            if p.frame_size:
                self.memory.write(base, bytes(p.frame_size))
            fr = Frame(p.nregs, base)
            for slot, a in zip(p.param_slots, args):
                _store(self, slot, slot.ty)(fr, a)
            r = p.body(fr)
            if r == _RETURN:
                return fr.ret
            if p.ret is not void:
                raise InterpError(f"{p.fn.name} fell off its end")
            return None
        finally:
            self.sp = old_sp


def _wrap_arg(a: int, t: Type) -> Any:
    if isinstance(t, IntType):
        return t.wrap(a)
    if isinstance(t, PtrType):
        return int(a) & MASK64
    if isinstance(t, BoolType):
        return int(bool(a))
    if isinstance(t, V128Type):
        return int(a) & MASK128
    raise TypeError(f"cannot pass a {t}")


def _reader(mem: Memory, t: Type) -> Callable[[int], Any]:
    rd = mem.read_int
    if isinstance(t, IntType):
        size, wrap = t.size, t.wrap
        if t.signed:
            return lambda a: wrap(rd(a, size))
        return lambda a: rd(a, size)
    if isinstance(t, PtrType):
        return lambda a: rd(a, 8)
    if isinstance(t, BoolType):
        return lambda a: rd(a, 1) & 1  # an i1 load: only bit 0 is the value
    if isinstance(t, V128Type):
        return lambda a: rd(a, 16)
    raise InterpError(f"cannot load a {t}")


def _writer(mem: Memory, t: Type) -> Callable[[int, Any], None]:
    wr = mem.write_int
    if not t.is_scalar:
        raise InterpError(f"cannot store a {t}")
    size = t.size
    return lambda a, v: wr(a, size, v)


def _load(it: Interpreter, lv: LV) -> Run:
    if lv.reg is not None:
        i = lv.reg
        return lambda fr: fr.regs[i]
    rd, addr = _reader(it.memory, lv.ty), lv.addr
    return lambda fr: rd(addr(fr))


def _store(it: Interpreter, lv: LV, t: Type) -> Callable[[Frame, Any], None]:
    if lv.reg is not None:
        i = lv.reg

        def st(fr: Frame, v: Any) -> None:
            fr.regs[i] = v
        return st
    wr, addr = _writer(it.memory, lv.ty), lv.addr
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


class _Preparer:
    """Walks one function's AST in lower.py's order and builds its closures."""

    def __init__(self, it: Interpreter, fn: Function) -> None:
        self.it = it
        self.mem = it.memory
        self.fn = fn
        self.params, self.ret = fn.signature
        self.locals: dict[str, LV] = {}
        self.nregs = 0
        self.frame_size = 0
        self.loops: list[list[bool]] = []
        self.terminated = False
        # scalars whose address is taken live in the frame's memory, like every aggregate
        self.in_memory = {
            n.args[0].id for n in ast.walk(fn.tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "addr"
            and len(n.args) == 1 and isinstance(n.args[0], ast.Name)
        }

    def err(self, node: ast.AST, reason: str) -> DslError:
        return self.fn.error(node, reason)

    def new_local(self, name: str, t: Type) -> LV:
        if t.is_scalar and name not in self.in_memory:
            lv = LV(t, reg=self.nregs)
            self.nregs += 1
        else:
            a = max(t.align, 1)
            off = (self.frame_size + a - 1) // a * a
            self.frame_size = off + t.size
            lv = LV(t, addr=lambda fr, off=off: fr.base + off)
        return lv

    def prepare(self) -> Prepared:
        for pname, pt in self.params:
            if not pt.is_scalar:
                raise self.err(self.fn.tree, f"parameter {pname!r}: pass {pt} by Ptr")
        slots = []
        for pname, pt in self.params:
            self.locals[pname] = self.new_local(pname, pt)
            slots.append(self.locals[pname])
        body = self.stmts(self.fn.tree.body)
        if not self.terminated and self.ret is not void:
            raise self.err(self.fn.tree, f"function {self.fn.name} can reach its end without "
                                         "return")
        frame = (self.frame_size + 15) // 16 * 16
        return Prepared(self.fn, self.params, self.ret, self.nregs, frame, slots, body)

    # -- statements -------------------------------------------------------------------------
    def stmts(self, body: list[ast.stmt]) -> Run:
        runs = []
        for s in body:
            if self.terminated:
                break  # dead code after return/break/continue is not compiled either
            r = self.stmt(s)
            if r is not None:
                runs.append(r)
        if not runs:
            return lambda fr: None
        return _seq(runs)

    def stmt(self, s: ast.stmt) -> Run | None:
        m = getattr(self, "stmt_" + type(s).__name__, None)
        if m is None:
            raise self.err(s, f"unsupported statement: {type(s).__name__}")
        return m(s)

    def stmt_Expr(self, s: ast.Expr) -> Run | None:
        if isinstance(s.value, ast.Constant) and isinstance(s.value.value, str):
            return None
        if not isinstance(s.value, ast.Call):
            raise self.err(s, "an expression statement must be a call")
        e = self.expr(s.value, allow_void=True)
        if e.ty is None:
            return None  # a literal-valued call (sizeof...) has no effect
        f = e.v

        def run(fr: Frame) -> None:
            f(fr)
        return run

    def stmt_Pass(self, s: ast.Pass) -> None:
        return None

    def stmt_AnnAssign(self, s: ast.AnnAssign) -> Run | None:
        if not isinstance(s.target, ast.Name):
            raise self.err(s, "annotated assignment needs a plain name")
        name = s.target.id
        t = self.fn.eval_type(s.annotation)
        if name in self.locals:
            raise self.err(s, f"local {name!r} is already declared")
        if isinstance(self.lookup_global(name), (Static, Function)):
            raise self.err(s, f"local {name!r} shadows a module-level name")
        lv = self.locals[name] = self.new_local(name, t)
        if s.value is None:
            return None
        if not t.is_scalar:
            raise self.err(s, f"cannot initialise {t} with a value")
        val = self.coerce(self.expr(s.value), t, s.value)
        st = _store(self.it, lv, t)

        def run(fr: Frame) -> None:
            st(fr, val(fr))
        return run

    def stmt_Assign(self, s: ast.Assign) -> Run:
        if len(s.targets) != 1:
            raise self.err(s, "chained assignment is not supported")
        target = s.targets[0]
        if isinstance(target, ast.Tuple):
            vals = self.expr_multi(s.value)
            evaluate, results = vals[0], vals[1:]
            if len(results) != len(target.elts):
                raise self.err(s, f"cannot unpack {len(results)} values into "
                                  f"{len(target.elts)}")
            parts = [self.assign(t, v, s, given=True) for t, v in zip(target.elts, results)]

            def run(fr: Frame) -> None:  # every value first, then the stores in order
                for p, r in zip(parts, evaluate(fr)):
                    p(fr, r)
            return run
        return self.assign(target, self.expr(s.value), s)

    def assign(self, target: ast.expr, val: TV, s: ast.AST, given: bool = False) -> Any:
        """Prepare a store of `val` into `target`: a closure (fr) that evaluates the value, then
        the target's address, then stores (lower.py's order). With `given`, the value is computed
        elsewhere and the closure is (fr, value); `val` then only carries its type."""
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
        v = self.coerce(val, lv.ty, s)
        st = _store(self.it, lv, lv.ty)
        if given:
            return st

        def run(fr: Frame) -> None:
            st(fr, v(fr))
        return run

    def stmt_AugAssign(self, s: ast.AugAssign) -> Run:
        lv = self.lvalue(s.target)
        if not lv.ty.is_scalar:
            raise self.err(s, f"cannot update a whole {lv.ty}")
        # the address is computed once; the operator sees the loaded value, then the operand
        if lv.reg is not None:
            i = lv.reg
            cur = TV(lambda fr: fr.regs[i], lv.ty)
            res = self.binop(s.op, cur, self.expr(s.value), s)
            f = self.coerce(res, lv.ty, s)

            def run_reg(fr: Frame) -> None:
                fr.regs[i] = f(fr)
            return run_reg
        rd, wr, addr = _reader(self.mem, lv.ty), _writer(self.mem, lv.ty), lv.addr
        # a hidden register carries the address from the load to the store
        areg = self.nregs
        self.nregs += 1
        cur = TV(lambda fr: rd(fr.regs[areg]), lv.ty)
        res = self.binop(s.op, cur, self.expr(s.value), s)
        f = self.coerce(res, lv.ty, s)

        def run_mem(fr: Frame) -> None:
            fr.regs[areg] = addr(fr)
            wr(fr.regs[areg], f(fr))
        return run_mem

    def stmt_Return(self, s: ast.Return) -> Run:
        self.terminated = True
        if s.value is None:
            if self.ret is not void:
                raise self.err(s, f"{self.fn.name} must return a {self.ret}")

            def run_void(fr: Frame) -> int:
                return _RETURN
            return run_void
        if self.ret is void:
            raise self.err(s, f"{self.fn.name} returns nothing")
        v = self.coerce(self.expr(s.value), self.ret, s)

        def run(fr: Frame) -> int:
            fr.ret = v(fr)
            return _RETURN
        return run

    def stmt_If(self, s: ast.If) -> Run:
        cond = self.truth(s.test)
        self.terminated = False
        then = self.stmts(s.body)
        t_term = self.terminated
        self.terminated = False
        other = self.stmts(s.orelse)
        self.terminated = t_term and self.terminated

        def run(fr: Frame) -> Any:
            return then(fr) if cond(fr) else other(fr)
        return run

    def stmt_While(self, s: ast.While) -> Run:
        if s.orelse:
            raise self.err(s, "while/else is not supported")
        forever = isinstance(s.test, ast.Constant) and s.test.value is True
        cond = None if forever else self.truth(s.test)
        body = self.loop_body(s.body)
        self.terminated = forever and not self._last_broke

        def run(fr: Frame) -> Any:
            while cond is None or cond(fr):
                r = body(fr)
                if r == _BREAK:
                    break
                if r == _RETURN:
                    return r
            return None
        return run

    def loop_body(self, body: list[ast.stmt]) -> Run:
        self.loops.append([])
        self.terminated = False
        run = self.stmts(body)
        broke = self.loops.pop()
        self.terminated = False  # lower.finish_loop: only `while True` without break ends
        self._last_broke = bool(broke)
        return run

    def stmt_For(self, s: ast.For) -> Run:
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
        startf, stopf = self.coerce(start, t, it), self.coerce(stop, t, it)
        name = s.target.id
        if name not in self.locals:
            self.locals[name] = self.new_local(name, t)
        var = self.locals[name]
        if var.ty != t:
            raise self.err(s, f"loop variable {name!r} is {var.ty}, range is {t}")
        setvar = _store(self.it, var, t)
        body = self.loop_body(s.body)
        wrap = t.wrap
        up = step > 0

        def run(fr: Frame) -> Any:
            ctr = startf(fr)  # the hidden counter: assigning the variable does not move it
            end = stopf(fr)
            while (ctr < end) if up else (ctr > end):
                setvar(fr, ctr)
                r = body(fr)
                if r == _BREAK:
                    break
                if r == _RETURN:
                    return r
                ctr = wrap(ctr + step)
            return None
        return run

    def stmt_Break(self, s: ast.Break) -> Run:
        if not self.loops:
            raise self.err(s, "break outside a loop")
        self.loops[-1].append(True)
        self.terminated = True
        return lambda fr: _BREAK

    def stmt_Continue(self, s: ast.Continue) -> Run:
        if not self.loops:
            raise self.err(s, "continue outside a loop")
        self.terminated = True
        return lambda fr: _CONTINUE

    # -- names ------------------------------------------------------------------------------
    def lookup_global(self, name: str) -> Any:
        if name in self.fn.globals:
            return self.fn.globals[name]
        if name in dsl.INTRINSICS:
            return dsl.INTRINSICS[name]
        if name in ("min", "max", "range", "True", "False"):
            return name
        return None

    # -- places -----------------------------------------------------------------------------
    def lvalue(self, node: ast.expr) -> LV:
        if isinstance(node, ast.Name):
            if node.id in self.locals:
                return self.locals[node.id]
            g = self.lookup_global(node.id)
            if isinstance(g, Static):
                a = self.it.static_addr(g)
                return LV(g.type, addr=_const(a))
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
            return LV(f.type, addr=_offset(base.addr, f.offset))
        if isinstance(node, ast.Subscript):
            idx = self.expr(node.slice)
            if idx.ty is not None and not isinstance(idx.ty, IntType):
                raise self.err(node, f"index must be an integer, not {idx.ty}")
            ptr, base = self.place(node.value)
            if ptr is not None:
                elem = ptr.ty.pointee
                if elem.size == 0:
                    raise self.err(node, f"cannot index a pointer to {elem}")
                return LV(elem, addr=_index(idx, ptr.v, elem.size))
            if not isinstance(base.ty, ArrayType):
                raise self.err(node, f"cannot index {base.ty}")
            if idx.ty is None and not 0 <= idx.v < base.ty.count:
                raise self.err(node, f"index {idx.v} out of range for {base.ty}")
            return LV(base.ty.elem, addr=_index(idx, base.addr, base.ty.elem.size))
        raise self.err(node, f"cannot assign to or take the address of {ast.unparse(node)}")

    def place(self, node: ast.expr) -> tuple[TV | None, LV | None]:
        """Evaluate `node` once: a pointer value, or else the lvalue of an aggregate."""
        if isinstance(node, (ast.Name, ast.Attribute, ast.Subscript)):
            lv = self.lvalue(node)
            if isinstance(lv.ty, PtrType):
                return TV(_load(self.it, lv), lv.ty), None
            if lv.addr is None:  # a scalar register: indexing it is a type error below
                return None, LV(lv.ty, addr=lambda fr: 0)
            return None, lv
        v = self.expr(node)
        if isinstance(v.ty, PtrType):
            return v, None
        raise self.err(node, f"cannot index or access fields of {v.ty or 'an integer literal'}")

    def aggregate(self, node: ast.expr) -> LV:
        p, lv = self.place(node)
        if p is not None:
            return LV(p.ty.pointee, addr=p.v)
        assert lv is not None
        return lv

    # -- expressions ------------------------------------------------------------------------
    def expr(self, node: ast.expr, allow_void: bool = False) -> TV:
        m = getattr(self, "expr_" + type(node).__name__, None)
        if m is None:
            raise self.err(node, f"unsupported expression: {type(node).__name__}")
        r = m(node)
        if r.ty is void and not allow_void:
            raise self.err(node, "this call returns nothing")
        return r

    def expr_multi(self, node: ast.expr) -> list[Any]:
        """[evaluate-all closure, TV per result] for cpuid(), rdrand64() or a tuple."""
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            g = self.lookup_global(node.func.id) if node.func.id not in self.locals else None
            if isinstance(g, Intrinsic) and g.name in ("cpuid", "rdrand64"):
                return getattr(self, "intr_" + g.name)(node, multi=True)
        if isinstance(node, ast.Tuple):
            parts = [self.expr(e) for e in node.elts]
            fs = [p.v if p.ty is not None else _const(p.v) for p in parts]
            return [lambda fr: [f(fr) for f in fs], *parts]
        raise self.err(node, "only cpuid(), rdrand64() or a tuple can be unpacked")

    def expr_Constant(self, node: ast.Constant) -> TV:
        v = node.value
        if isinstance(v, bool):
            return TV(_const(int(v)), bool_)
        if isinstance(v, int):
            return TV(v, None)
        raise self.err(node, f"unsupported constant {v!r}")

    def expr_Name(self, node: ast.Name) -> TV:
        if node.id in self.locals:
            lv = self.locals[node.id]
            if not lv.ty.is_scalar:
                raise self.err(node, f"{node.id!r} is a {lv.ty}; index it or use addr()")
            return TV(_load(self.it, lv), lv.ty)
        g = self.lookup_global(node.id)
        if g is None:
            raise self.err(node, f"unknown name {node.id!r}")
        if isinstance(g, bool):
            return TV(_const(int(g)), bool_)
        if isinstance(g, int):
            return TV(g, None)
        if isinstance(g, Const):
            return TV(_const(g.type.wrap(g.value)), g.type)
        if isinstance(g, Static):
            lv = self.lvalue(node)
            if not lv.ty.is_scalar:
                raise self.err(node, f"{node.id!r} is a {lv.ty}; index it or use addr()")
            return TV(_load(self.it, lv), lv.ty)
        raise self.err(node, f"{node.id!r} ({type(g).__name__}) cannot be used as a value")

    def expr_Attribute(self, node: ast.Attribute | ast.Subscript) -> TV:
        lv = self.lvalue(node)
        if not lv.ty.is_scalar:
            raise self.err(node, f"{ast.unparse(node)} is a {lv.ty}; index it or use addr()")
        return TV(_load(self.it, lv), lv.ty)

    expr_Subscript = expr_Attribute

    def expr_UnaryOp(self, node: ast.UnaryOp) -> TV:
        if isinstance(node.op, ast.Not):
            c = self.truth(node.operand)
            return TV(lambda fr: 0 if c(fr) else 1, bool_)
        v = self.expr(node.operand)
        if v.ty is None:
            if isinstance(node.op, ast.USub):
                return TV(-v.v, None)
            if isinstance(node.op, ast.UAdd):
                return v
            raise self.err(node, "~ needs a typed operand; cast the literal, e.g. ~u64(0)")
        f, t = v.v, v.ty
        if isinstance(node.op, ast.USub) and isinstance(t, IntType):
            wrap = t.wrap
            return TV(lambda fr: wrap(-f(fr)), t)
        if isinstance(node.op, ast.Invert) and isinstance(t, IntType):
            wrap = t.wrap
            return TV(lambda fr: wrap(~f(fr)), t)
        if isinstance(node.op, ast.Invert) and isinstance(t, V128Type):
            return TV(lambda fr: f(fr) ^ MASK128, t)
        raise self.err(node, f"unsupported unary operator on {t}")

    def expr_BinOp(self, node: ast.BinOp) -> TV:
        return self.binop(node.op, self.expr(node.left), self.expr(node.right), node)

    def binop(self, op: ast.operator, lhs: TV, rhs: TV, node: ast.AST) -> TV:
        if isinstance(op, ast.Div):
            raise self.err(node, "'/' is not integer division; use '//'")
        if isinstance(lhs.ty, PtrType) and isinstance(op, (ast.Add, ast.Sub)):
            if rhs.ty is not None and not isinstance(rhs.ty, IntType):
                raise self.err(node, f"cannot add {rhs.ty} to a pointer")
            size = lhs.ty.pointee.size
            if size == 0:
                raise self.err(node, f"cannot index a pointer to {lhs.ty.pointee}")
            pf = lhs.v
            if rhs.ty is None:  # the index is widened (sign/zero) to 64 bits, then scaled
                d = rhs.v * size * (-1 if isinstance(op, ast.Sub) else 1)
                return TV(lambda fr: (pf(fr) + d) & MASK64, lhs.ty)
            rf = rhs.v
            sign = -1 if isinstance(op, ast.Sub) else 1
            return TV(lambda fr: (pf(fr) + sign * rf(fr) * size) & MASK64, lhs.ty)
        if isinstance(op, (ast.LShift, ast.RShift)) and lhs.ty is not None and rhs.ty is not None:
            if not isinstance(lhs.ty, IntType) or not isinstance(rhs.ty, IntType):
                raise self.err(node, f"cannot shift {lhs.ty} by {rhs.ty}")
            rhs = TV(rhs.v, lhs.ty)  # resized to the lhs width; only its low bits matter
        lhs, rhs = self.unify(lhs, rhs, node)
        if lhs.ty is None:
            try:
                return TV(fold_literals(op, lhs.v, rhs.v), None)
            except (ZeroDivisionError, ValueError) as e:
                raise self.err(node, str(e)) from None
        t = lhs.ty
        a, b = lhs.v, rhs.v
        if isinstance(t, (V128Type, BoolType)):
            if isinstance(op, ast.BitXor):
                return TV(lambda fr: a(fr) ^ b(fr), t)
            if isinstance(op, ast.BitAnd):
                return TV(lambda fr: a(fr) & b(fr), t)
            if isinstance(op, ast.BitOr):
                return TV(lambda fr: a(fr) | b(fr), t)
            if isinstance(t, V128Type):
                raise self.err(node, "v128 supports only ^ & |")
        if not isinstance(t, IntType):
            raise self.err(node, f"arithmetic needs integers, got {t}")
        return TV(_int_op(op, t, a, b, self, node), t)

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

    def coerce(self, v: TV, t: Type, node: ast.AST) -> Run:
        if v.ty is None:
            try:
                lit = literal_value(v.v, t)
            except ValueError as e:
                raise self.err(node, str(e)) from None
            return _const(t.wrap(lit) if isinstance(t, IntType) else lit)
        if v.ty != t:
            raise self.err(node, f"type mismatch: expected {t}, got {v.ty}")
        return v.v

    def expr_Compare(self, node: ast.Compare) -> TV:
        if len(node.ops) != 1:
            raise self.err(node, "chained comparisons are not supported")
        lhs, rhs = self.unify(self.expr(node.left), self.expr(node.comparators[0]), node)
        op = type(node.ops[0])
        cmp = _CMP.get(op)
        if cmp is None:
            raise self.err(node, f"unsupported comparison {op.__name__}")
        if lhs.ty is None:
            return TV(_const(int(cmp(lhs.v, rhs.v))), bool_)
        t = lhs.ty
        if isinstance(t, BoolType) and op not in (ast.Eq, ast.NotEq):
            raise self.err(node, "bools compare only with == and !=")
        if not isinstance(t, (IntType, PtrType, BoolType)):
            raise self.err(node, f"cannot compare {t}")
        # ints hold their signed or unsigned value and pointers are unsigned: Python's
        # comparison is then the signed/unsigned icmp
        a, b = lhs.v, rhs.v
        return TV(lambda fr: int(cmp(a(fr), b(fr))), bool_)

    def truth(self, node: ast.expr) -> Run:
        v = self.expr(node)
        if v.ty is None:
            return _const(int(v.v != 0))
        if isinstance(v.ty, (BoolType, IntType, PtrType)):
            f = v.v
            return lambda fr: f(fr) != 0
        raise self.err(node, f"{v.ty} has no truth value")

    def expr_BoolOp(self, node: ast.BoolOp) -> TV:
        conds = [self.truth(v) for v in node.values]
        if isinstance(node.op, ast.And):
            return TV(lambda fr: int(all(c(fr) for c in conds)), bool_)
        return TV(lambda fr: int(any(c(fr) for c in conds)), bool_)

    def expr_IfExp(self, node: ast.IfExp) -> TV:
        c = self.truth(node.test)
        a, b = self.unify(self.expr(node.body), self.expr(node.orelse), node)
        if a.ty is None:
            a = TV(self.coerce(a, DEFAULT_INT, node), DEFAULT_INT)
            b = TV(self.coerce(b, DEFAULT_INT, node), DEFAULT_INT)
        fa, fb = a.v, b.v

        def run(fr: Frame) -> Any:  # a select: both arms are evaluated, in order
            cond = c(fr)
            x, y = fa(fr), fb(fr)
            return x if cond else y
        return TV(run, a.ty)

    # -- calls ------------------------------------------------------------------------------
    def expr_Call(self, node: ast.Call) -> TV:
        if node.keywords:
            raise self.err(node, "keyword arguments are not supported")
        func = node.func
        if isinstance(func, ast.Subscript):
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
            m = getattr(self, "intr_" + g.name, None)
            if m is None:
                raise self.err(node, f"the interpreter does not model {g.name}")
            return m(node)
        if g in ("min", "max"):
            if len(node.args) != 2:
                raise self.err(node, f"{g} takes two arguments")
            a, b = self.unify(self.expr(node.args[0]), self.expr(node.args[1]), node)
            pick = min if g == "min" else max
            if a.ty is None:
                return TV(pick(a.v, b.v), None)
            if not isinstance(a.ty, IntType):
                raise self.err(node, f"{g} needs integers")
            fa, fb = a.v, b.v
            return TV(lambda fr: pick(fa(fr), fb(fr)), a.ty)
        raise self.err(node, f"{func.id!r} is not callable in the DSL")

    def call(self, g: Function, node: ast.Call) -> TV:
        params, ret = g.signature
        if len(node.args) != len(params):
            raise self.err(node, f"{g.name} takes {len(params)} arguments, got {len(node.args)}")
        args = []
        for (pname, pt), a in zip(params, node.args):
            v = self.expr(a)
            if v.ty is not None and v.ty != pt:
                raise self.err(a, f"argument {pname!r} of {g.name}: expected {pt}, got {v.ty}")
            args.append(self.coerce(v, pt, a))
        it = self.it

        def run(fr: Frame) -> Any:
            vals = [f(fr) for f in args]
            return it._invoke(it.prepare(g), vals)
        return TV(run, ret)

    def cast(self, t: Type, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, f"cast to {t} takes one argument")
        v = self.expr(node.args[0])
        if v.ty is None:
            if isinstance(t, IntType):
                return TV(_const(t.wrap(v.v)), t)
            if isinstance(t, PtrType):
                return TV(_const(v.v & MASK64), t)
            if isinstance(t, BoolType):
                return TV(_const(int(v.v != 0)), t)
            raise self.err(node, f"cannot cast a literal to {t}")
        src, f = v.ty, v.v
        if isinstance(t, IntType):
            if isinstance(src, IntType) or (isinstance(src, PtrType) and t.bits == 64):
                wrap = t.wrap
                return TV(lambda fr: wrap(f(fr)), t)
            if isinstance(src, BoolType):
                return TV(f, t)
        if isinstance(t, PtrType):
            if isinstance(src, PtrType):
                return TV(f, t)
            if isinstance(src, IntType) and src.bits == 64:
                return TV(lambda fr: f(fr) & MASK64, t)
        if isinstance(t, BoolType) and isinstance(src, IntType):
            return TV(lambda fr: int(f(fr) != 0), t)
        raise self.err(node, f"cannot cast {src} to {t}")

    # -- intrinsics -------------------------------------------------------------------------
    def args(self, node: ast.Call, types: list[Type | None]) -> list[Run]:
        name = node.func.id  # type: ignore[attr-defined]
        if len(node.args) != len(types):
            raise self.err(node, f"{name} takes {len(types)} arguments, got {len(node.args)}")
        out = []
        for a, t in zip(node.args, types):
            v = self.expr(a)
            if t is None:
                raise self.err(a, "untyped intrinsic argument")  # lower.py never asks for one
            out.append(self.coerce(v, t, a))
        return out

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

    def intr_addr(self, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, "addr takes one argument")
        lv = self.lvalue(node.args[0])
        if lv.addr is None:
            raise self.err(node, "internal: address of a register local")
        return TV(lv.addr, PtrType(lv.ty))

    def intr_vload(self, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, "vload takes one pointer")
        p = self.ptr_arg(node, 0)
        if not p.ty.pointee.is_scalar:
            raise self.err(node, f"vload of a {p.ty.pointee}")
        rd, pf = _reader(self.mem, p.ty.pointee), p.v
        return TV(lambda fr: rd(pf(fr)), p.ty.pointee)

    def intr_vstore(self, node: ast.Call) -> TV:
        if len(node.args) != 2:
            raise self.err(node, "vstore takes a pointer and a value")
        p = self.ptr_arg(node, 0)
        if not p.ty.pointee.is_scalar:
            raise self.err(node, f"vstore of a {p.ty.pointee}")
        val = self.coerce(self.expr(node.args[1]), p.ty.pointee, node.args[1])
        wr, pf = _writer(self.mem, p.ty.pointee), p.v

        def run(fr: Frame) -> None:
            a = pf(fr)
            wr(a, val(fr))
        return TV(run, void)

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
        name, env = node.args[0].value, self.it.env
        return TV(lambda fr: env.symbol_addr(name) & MASK64, u64)

    def intr_func_addr(self, node: ast.Call) -> TV:
        if len(node.args) != 1 or not isinstance(node.args[0], ast.Name):
            raise self.err(node, "func_addr takes a DSL function name")
        g = self.lookup_global(node.args[0].id)
        if not isinstance(g, Function):
            raise self.err(node, f"{node.args[0].id!r} is not a DSL function")
        env = self.it.env
        return TV(lambda fr: env.func_addr(g) & MASK64, u64)

    def intr_efi_call(self, node: ast.Call) -> TV:
        if not node.args:
            raise self.err(node, "efi_call needs a function pointer")
        fp = self.coerce(self.expr(node.args[0]), u64, node.args[0])
        args = []
        for a in node.args[1:]:
            v = self.expr(a)
            if isinstance(v.ty, PtrType):
                args.append(v.v)
            elif v.ty is None or v.ty == u64:
                args.append(self.coerce(v, u64, a))
            else:
                raise self.err(a, f"efi_call arguments are u64 or pointers, got {v.ty}")
        env = self.it.env

        def run(fr: Frame) -> int:
            p = fp(fr)
            return env.efi_call(p, *(f(fr) for f in args)) & MASK64
        return TV(run, u64)

    def intr_trap(self, node: ast.Call) -> TV:
        def run(fr: Frame) -> None:
            raise Trap(f"{self.fn.file}:{node.lineno}: trap()")
        return TV(run, void)

    def intr_cpuid(self, node: ast.Call, multi: bool = False) -> Any:
        if not multi:
            raise self.err(node, "cpuid returns four values: a, b, c, d = cpuid(leaf, sub)")
        leaf, sub = self.args(node, [u32, u32])
        env = self.it.env

        def run(fr: Frame) -> list[int]:
            return [u32.wrap(x) for x in env.cpuid(leaf(fr), sub(fr))]
        return [run, *(TV(None, u32) for _ in range(4))]

    def intr_rdrand64(self, node: ast.Call, multi: bool = False) -> Any:
        if not multi:
            raise self.err(node, "rdrand64 returns two values: value, ok = rdrand64()")
        self.args(node, [])
        env = self.it.env

        def run(fr: Frame) -> list[int]:
            v, ok = env.rdrand64()
            return [v & MASK64, int(bool(ok))]
        return [run, TV(None, u64), TV(None, bool_)]

    def _platform(self, node: ast.Call, name: str, types: list[Type], ret: Type) -> TV:
        fs = self.args(node, types)
        method = getattr(self.it.env, name)
        if ret is void:
            def run_void(fr: Frame) -> None:
                method(*(f(fr) for f in fs))
            return TV(run_void, void)
        wrap = ret.wrap  # type: ignore[attr-defined]
        return TV(lambda fr: wrap(method(*(f(fr) for f in fs))), ret)

    def intr_rdmsr(self, node: ast.Call) -> TV:
        return self._platform(node, "rdmsr", [u32], u64)

    def intr_wrmsr(self, node: ast.Call) -> TV:
        return self._platform(node, "wrmsr", [u32, u64], void)

    def intr_vmmcall(self, node: ast.Call) -> TV:
        return self._platform(node, "vmmcall", [u64] * 5, u64)

    def intr_hlt(self, node: ast.Call) -> TV:
        return self._platform(node, "hlt", [], void)

    def intr_pause(self, node: ast.Call) -> TV:
        return self._platform(node, "pause", [], void)

    def intr_mfence(self, node: ast.Call) -> TV:
        return self._platform(node, "mfence", [], void)

    def intr_lfence(self, node: ast.Call) -> TV:
        return self._platform(node, "lfence", [], void)

    def intr_sfence(self, node: ast.Call) -> TV:
        return self._platform(node, "sfence", [], void)

    def intr_invlpg(self, node: ast.Call) -> TV:
        return self._platform(node, "invlpg", [u64], void)

    def intr_read_cr3(self, node: ast.Call) -> TV:
        return self._platform(node, "read_cr3", [], u64)

    def intr_write_cr3(self, node: ast.Call) -> TV:
        return self._platform(node, "write_cr3", [u64], void)

    def intr_outb(self, node: ast.Call) -> TV:
        return self._platform(node, "outb", [u16, u8], void)

    def intr_inb(self, node: ast.Call) -> TV:
        return self._platform(node, "inb", [u16], u8)

    def _vec(self, node: ast.Call, n: int, op: Callable[..., int]) -> TV:
        fs = self.args(node, [v128] * n)
        return TV(lambda fr: op(*(f(fr) for f in fs)), v128)

    def _vec_imm(self, node: ast.Call, n: int, hi: int, what: str,
                 op: Callable[..., int]) -> TV:
        if len(node.args) != n + 1:
            raise self.err(node, f"{node.func.id} takes {n} v128 value(s) and a literal {what}")
        fs = [self.coerce(self.expr(a), v128, a) for a in node.args[:n]]
        imm = self.literal_arg(node, n, 0, hi)
        return TV(lambda fr: op(*(f(fr) for f in fs), imm), v128)

    def intr_aesenc(self, node: ast.Call) -> TV:
        return self._vec(node, 2, aesenc)

    def intr_aesenclast(self, node: ast.Call) -> TV:
        return self._vec(node, 2, aesenclast)

    def intr_aeskeygenassist(self, node: ast.Call) -> TV:
        return self._vec_imm(node, 1, 255, "rcon", aeskeygenassist)

    def intr_pclmulqdq(self, node: ast.Call) -> TV:
        return self._vec_imm(node, 2, 255, "selector", pclmulqdq)

    def intr_pshufb(self, node: ast.Call) -> TV:
        return self._vec(node, 2, pshufb)

    def intr_pshufd(self, node: ast.Call) -> TV:
        return self._vec_imm(node, 1, 255, "selector", pshufd)

    def intr_v128_make(self, node: ast.Call) -> TV:
        lo, hi = self.args(node, [u64, u64])
        return TV(lambda fr: lo(fr) | (hi(fr) << 64), v128)

    def intr_v128_lo(self, node: ast.Call) -> TV:
        (v,) = self.args(node, [v128])
        return TV(lambda fr: v(fr) & MASK64, u64)

    def intr_v128_hi(self, node: ast.Call) -> TV:
        (v,) = self.args(node, [v128])
        return TV(lambda fr: v(fr) >> 64, u64)

    def intr_v128_load(self, node: ast.Call) -> TV:
        if len(node.args) != 1:
            raise self.err(node, "v128_load takes one pointer")
        pf, rd = self.ptr_arg(node, 0).v, self.mem.read_int
        return TV(lambda fr: rd(pf(fr), 16), v128)

    def intr_v128_store(self, node: ast.Call) -> TV:
        if len(node.args) != 2:
            raise self.err(node, "v128_store takes a pointer and a v128")
        pf = self.ptr_arg(node, 0).v
        v = self.coerce(self.expr(node.args[1]), v128, node.args[1])
        wr = self.mem.write_int

        def run(fr: Frame) -> None:
            a = pf(fr)
            wr(a, 16, v(fr))
        return TV(run, void)

    def intr_v128_shl64(self, node: ast.Call) -> TV:
        return self._vec_imm(node, 1, 63, "count", lambda v, n: lane_shift(v, n, True))

    def intr_v128_shr64(self, node: ast.Call) -> TV:
        return self._vec_imm(node, 1, 63, "count", lambda v, n: lane_shift(v, n, False))

    def intr_v128_bsl(self, node: ast.Call) -> TV:
        return self._vec_imm(node, 1, 16, "count", lambda v, n: byte_shift(v, n, True))

    def intr_v128_bsr(self, node: ast.Call) -> TV:
        return self._vec_imm(node, 1, 16, "count", lambda v, n: byte_shift(v, n, False))


_CMP: dict[type, Callable[[Any, Any], bool]] = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
}


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


def _int_op(op: ast.operator, t: IntType, a: Run, b: Run, p: _Preparer, node: ast.AST) -> Run:
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
    if isinstance(op, ast.RShift):
        return lambda fr: a(fr) >> (b(fr) & m)  # signed values shift arithmetically
    raise p.err(node, f"unsupported operator {type(op).__name__}")
