"""Reference interpreter of the DSL: the compiler's semantics, executed in Python.

It follows the same front end as codegen/lower.py (helperfw/frontend.py: names, literal typing,
casts, intrinsic signatures and every DslError come from there), so a differential test can hold
the compiled code to it; what is left here is evaluation: integers wrap; `//` and `%` truncate
toward zero; shift counts are taken modulo the width; comparisons and `>>` follow signedness;
`a if c else b` evaluates both arms (it lowers to a select); `and`/`or` short-circuit; pointer
arithmetic scales by the pointee size.

Like the compiler it works in two steps. A function is first *prepared*: the front end walks its
AST in the compiler's order (the same local declarations, literal typing and dead-code skipping)
and this module turns each step into a Python closure; each call then runs those closures. Type
errors are the compiler's business: preparation raises the front end's DslError on anything the
DSL refuses, and never guesses.

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

from .dsl import Function, Static
from .frontend import COMPARISONS, TV, FrontEnd, check_signature
from .types import (
    BoolType,
    IntType,
    PtrType,
    Type,
    V128Type,
    trunc_div,
    trunc_rem,
    u32,
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


# the vector instructions and the platform, by intrinsic name (arguments already checked against
# frontend.SIGNATURES; immediates arrive as ints)
_PURE: dict[str, Callable[..., int]] = {
    "aesenc": aesenc,
    "aesenclast": aesenclast,
    "aeskeygenassist": aeskeygenassist,
    "pclmulqdq": pclmulqdq,
    "pshufb": pshufb,
    "pshufd": pshufd,
    "v128_make": lambda lo, hi: lo | (hi << 64),
    "v128_lo": lambda v: v & MASK64,
    "v128_hi": lambda v: v >> 64,
    "v128_shl64": lambda v, n: lane_shift(v, n, True),
    "v128_shr64": lambda v, n: lane_shift(v, n, False),
    "v128_bsl": lambda v, n: byte_shift(v, n, True),
    "v128_bsr": lambda v, n: byte_shift(v, n, False),
}
_ON_ENV = ("rdmsr", "wrmsr", "vmmcall", "hlt", "pause", "mfence", "lfence", "sfence", "invlpg",
           "read_cr3", "write_cr3", "outb", "inb")


class _Preparer(FrontEnd):
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
        st = _store(self.it, lv, lv.ty)

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
        rd, wr, addr = _reader(self.mem, lv.ty), _writer(self.mem, lv.ty), lv.addr
        areg = self.hidden_reg()  # carries the address from the load to the store
        f = compute(TV(lambda fr: rd(fr.regs[areg]), lv.ty))

        def run_mem(fr: Frame) -> None:
            fr.regs[areg] = addr(fr)
            wr(fr.regs[areg], f(fr))
        return run_mem

    def emit_return(self, v: Run | None) -> Run:
        if v is None:
            def run_void(fr: Frame) -> int:
                return _RETURN
            return run_void

        def run(fr: Frame) -> int:
            fr.ret = v(fr)
            return _RETURN
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
                if r == _BREAK:
                    break
                if r == _RETURN:
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
        setvar = _store(self.it, r.var, r.ty)
        body, _ = self.loop_body(s.body)
        wrap = r.ty.wrap
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
        self.enclosing_loop(s, "break").append(True)
        self.terminated = True
        return lambda fr: _BREAK

    def stmt_Continue(self, s: ast.Continue) -> Run:
        self.enclosing_loop(s, "continue")
        self.terminated = True
        return lambda fr: _CONTINUE

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
        return TV(_load(self.it, lv), lv.ty)

    # -- values -----------------------------------------------------------------------------
    def constant(self, t: Type, value: int) -> Run:
        return _const(value)

    def int_constant(self, t: IntType, value: int) -> Run:
        return _const(t.wrap(value))

    def emit_unary(self, op: ast.unaryop, t: Type, f: Run) -> Run:
        if isinstance(t, V128Type):  # ~v
            return lambda fr: f(fr) ^ MASK128
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
        if isinstance(op, ast.BitXor):  # bool or v128
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

    # -- intrinsics -------------------------------------------------------------------------
    def emit_intrinsic(self, name: str, args: list[Any], ret: Any) -> Any:
        fs = [_const(a) if isinstance(a, int) else a for a in args]  # immediates are ints
        if name in _PURE:
            op = _PURE[name]
            return lambda fr: op(*(f(fr) for f in fs))
        if name in _ON_ENV:
            method = getattr(self.it.env, name)
            if ret is void:
                def run_void(fr: Frame) -> None:
                    method(*(f(fr) for f in fs))
                return run_void
            wrap = ret.wrap
            return lambda fr: wrap(method(*(f(fr) for f in fs)))
        return super().emit_intrinsic(name, fs, ret)

    def intr_vload(self, p: TV) -> Run:
        rd, pf = _reader(self.mem, p.ty.pointee), p.v
        return lambda fr: rd(pf(fr))

    def intr_vstore(self, p: TV, val: Run) -> Run:
        wr, pf = _writer(self.mem, p.ty.pointee), p.v

        def run(fr: Frame) -> None:
            a = pf(fr)
            wr(a, val(fr))
        return run

    def intr_symbol_addr(self, name: str) -> Run:
        env = self.it.env
        return lambda fr: env.symbol_addr(name) & MASK64

    def intr_func_addr(self, g: Function) -> Run:
        env = self.it.env
        return lambda fr: env.func_addr(g) & MASK64

    def intr_efi_call(self, fp: Run, args: list[Run]) -> Run:
        env = self.it.env

        def run(fr: Frame) -> int:
            p = fp(fr)
            return env.efi_call(p, *(f(fr) for f in args)) & MASK64
        return run

    def intr_trap(self, node: ast.Call) -> Run:
        where = f"{self.fn.file}:{node.lineno}"

        def run(fr: Frame) -> None:
            raise Trap(f"{where}: trap()")
        return run

    def intr_cpuid(self, leaf: Run, sub: Run) -> tuple[Run, list[Run]]:
        env = self.it.env
        return self._park(lambda fr: [u32.wrap(x) for x in env.cpuid(leaf(fr), sub(fr))], 4)

    def intr_rdrand64(self) -> tuple[Run, list[Run]]:
        env = self.it.env

        def evaluate(fr: Frame) -> list[int]:
            v, ok = env.rdrand64()
            return [v & MASK64, int(bool(ok))]
        return self._park(evaluate, 2)

    def intr_v128_load(self, p: TV) -> Run:
        pf, rd = p.v, self.mem.read_int
        return lambda fr: rd(pf(fr), 16)

    def intr_v128_store(self, p: TV, v: Run) -> Run:
        pf, wr = p.v, self.mem.write_int

        def run(fr: Frame) -> None:
            a = pf(fr)
            wr(a, 16, v(fr))
        return run


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
