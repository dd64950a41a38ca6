"""Every built-in intrinsic: one entry each (typing rule, LLVM lowering, interpreter semantics,
doc line), registered in helperfw/intrinsics/registry.py's INTRINSICS in docs/DSL.md's order.

Each entry is a decorated LLVM lowering whose Python name is the intrinsic's DSL name; the
module-level names are what `from helperfw import cpuid` imports. Special forms (arguments that
are places, types, names, strings or any pointer) bring their own typing rule; the fixed ones
spell their signature, which is also their doc line.
"""

from __future__ import annotations

import ast
from typing import Any

from llvmlite import ir

from ..codegen import llvm_compat
from ..dsl import Function, Routine
from ..frontend import TV, FrontEnd
from ..structs import StructType
from ..types import PtrType, Type, VecType, u64, v128, v256, void
from . import x86
from .registry import (
    IMAGE,
    INTRINSICS,
    MEMORY,
    PLATFORM,
    SIMD,
    WIDE,
    Checked,
    Emitter,
    Machine,
    ask_env,
    form,
    intrinsic,
    pure,
)

I8, I32, I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
V2I64, V16I8, V4I32 = ir.VectorType(I64, 2), ir.VectorType(I8, 16), ir.VectorType(I32, 4)
V4I64, V32I8, V8I32 = ir.VectorType(I64, 4), ir.VectorType(I8, 32), ir.VectorType(I32, 8)
VOID = ir.VoidType()


def _read(machine: Machine) -> Any:
    return machine.read


# -- memory -----------------------------------------------------------------------------------

@form(group=MEMORY, spelling="(lvalue) -> Ptr[T]", doc="address of a variable, field or element")
def addr(fe: FrontEnd, node: ast.Call) -> TV:
    if len(node.args) != 1:
        raise fe.err(node, "addr takes one argument")
    lv = fe.lvalue(node.args[0])
    return TV(fe.address_of(lv, node), PtrType(lv.ty))


def _scalar_pointer(fe: FrontEnd, node: ast.Call, what: str) -> TV:
    p = fe.ptr_arg(node, 0)
    if not p.ty.pointee.is_scalar:
        raise fe.err(node, f"{what} of a {p.ty.pointee}")
    return p


def _vload_rule(fe: FrontEnd, node: ast.Call) -> Checked:
    if len(node.args) != 1:
        raise fe.err(node, "vload takes one pointer")
    p = _scalar_pointer(fe, node, "vload")
    return Checked([p.ty.pointee, p], p.ty.pointee)


@intrinsic(typing=_vload_rule, spelling="(p: Ptr[T]) -> T", group=MEMORY, evaluate=_read,
           doc="volatile load (shared memory: read exactly once)")
def vload(em: Emitter, t: Type, p: ir.Value) -> ir.Value:
    return em.mem_load(p, t, volatile=True)


def _vstore_rule(fe: FrontEnd, node: ast.Call) -> Checked:
    if len(node.args) != 2:
        raise fe.err(node, "vstore takes a pointer and a value")
    p = _scalar_pointer(fe, node, "vstore")
    return Checked([p.ty.pointee, p, fe.typed(node.args[1], p.ty.pointee)], void)


@intrinsic(typing=_vstore_rule, spelling="(p: Ptr[T], v: T)", group=MEMORY,
           evaluate=lambda machine: machine.write, doc="volatile store (shared memory)")
def vstore(em: Emitter, t: Type, p: ir.Value, v: ir.Value) -> None:
    em.mem_store(p, t, v, volatile=True)


@form(group=MEMORY, spelling="(T) -> literal", doc="size in bytes of a DSL type")
def sizeof(fe: FrontEnd, node: ast.Call) -> TV:
    if len(node.args) != 1:
        raise fe.err(node, "sizeof takes one type")
    return TV(fe.fn.eval_type(node.args[0]).size, None)


@form(group=MEMORY, spelling="(S, 'field') -> literal", doc="byte offset of a struct field")
def offsetof(fe: FrontEnd, node: ast.Call) -> TV:
    if len(node.args) != 2 or not isinstance(node.args[1], ast.Constant):
        raise fe.err(node, "offsetof takes a struct type and a field name string")
    t = fe.fn.eval_type(node.args[0])
    if not isinstance(t, StructType) or node.args[1].value not in t.fields:
        raise fe.err(node, f"{t} has no field {node.args[1].value!r}")
    return TV(t.offset(node.args[1].value), None)


# -- the image --------------------------------------------------------------------------------

def _symbol_addr_rule(fe: FrontEnd, node: ast.Call) -> Checked:
    if len(node.args) != 1 or not isinstance(node.args[0], ast.Constant) or not isinstance(
            node.args[0].value, str):
        raise fe.err(node, "symbol_addr takes a symbol name string")
    return Checked([node.args[0].value], u64)


@intrinsic(typing=_symbol_addr_rule, spelling="('name') -> u64", group=IMAGE,
           evaluate=ask_env(), doc="run-time address of a linker symbol (`__image_start`, "
           "`__image_end`, `__<section>_start/_end` for text, rodata, data, bss)")
def symbol_addr(em: Emitter, name: str) -> ir.Value:
    return em.b.ptrtoint(em.extern_symbol(name), I64)


def _func_addr_rule(fe: FrontEnd, node: ast.Call) -> Checked:
    if len(node.args) != 1 or not isinstance(node.args[0], ast.Name):
        raise fe.err(node, "func_addr takes a DSL function or routine name")
    g = fe.lookup_global(node.args[0].id)
    if not isinstance(g, Function | Routine):
        raise fe.err(node, f"{node.args[0].id!r} is not a DSL function or assembly routine")
    return Checked([g], u64)


@intrinsic(typing=_func_addr_rule, spelling="(f) -> u64", group=IMAGE, evaluate=ask_env(),
           doc="run-time address of a DSL function or an assembly `routine`")
def func_addr(em: Emitter, fn: Function | Routine) -> ir.Value:
    ref = em.routine_ref(fn) if isinstance(fn, Routine) else em.function_ref(fn)
    return em.b.ptrtoint(ref, I64)


def _efi_call_rule(fe: FrontEnd, node: ast.Call) -> Checked:
    if not node.args:
        raise fe.err(node, "efi_call needs a function pointer")
    args = [fe.typed(node.args[0], u64)]
    for a in node.args[1:]:  # EFIAPI arguments are 64-bit registers: u64 or a pointer
        v = fe.expr(a)
        if isinstance(v.ty, PtrType):
            args.append(TV(fe.emit_cast("ptr_to_int", v.v, v.ty, u64), u64))
        elif v.ty is None or v.ty == u64:
            args.append(TV(fe.coerce(v, u64, a), u64))
        else:
            raise fe.err(a, f"efi_call arguments are u64 or pointers, got {v.ty}")
    return Checked(args, u64)


@intrinsic(typing=_efi_call_rule, spelling="(fnptr: u64, args...) -> u64", group=IMAGE,
           evaluate=ask_env(), doc="call through a pointer with EFIAPI (win64)")
def efi_call(em: Emitter, fp: ir.Value, *args: ir.Value) -> ir.Value:
    fty = ir.FunctionType(I64, [I64] * len(args))
    callee = llvm_compat.indirect_callee(em.b.inttoptr(fp, ir.PointerType()), fty)
    return em.b.call(callee, list(args), cconv="win64cc")


def _trap_rule(fe: FrontEnd, node: ast.Call) -> Checked:
    if node.args:
        raise fe.err(node, "trap takes no arguments")
    return Checked([f"{fe.fn.file}:{node.lineno}"], void)


@intrinsic(typing=_trap_rule, spelling="()", group=IMAGE,
           evaluate=lambda machine: machine.trap,
           doc="ud2; marks a state that must never be reached")
def trap(em: Emitter, where: str) -> None:
    em.b.call(em.llvm_intrinsic("llvm.trap", VOID, []), [])


# -- privileged / platform instructions -------------------------------------------------------

@intrinsic("(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32)", group=PLATFORM,
           evaluate=ask_env(), doc="eax, ebx, ecx, edx of a CPUID leaf",
           unpack_reason="cpuid returns four values: a, b, c, d = cpuid(leaf, sub)")
def cpuid(em: Emitter, leaf: ir.Value, sub: ir.Value) -> list[ir.Value]:
    st = ir.LiteralStructType([I32] * 4)
    r = em.asm(st, "cpuid", "={eax},={ebx},={ecx},={edx},{eax},{ecx}", [leaf, sub])
    return [em.b.extract_value(r, i) for i in range(4)]


@intrinsic("(xcr: u32) -> u64", group=PLATFORM, evaluate=ask_env(),
           doc="read an extended control register (0: XCR0, the register state the OS "
           "enabled); #UD unless CR4.OSXSAVE, so check CPUID.1:ECX.OSXSAVE first")
def xgetbv(em: Emitter, xcr: ir.Value) -> ir.Value:
    return _edx_eax(em, em.asm(ir.LiteralStructType([I32, I32]), "xgetbv",
                               "={eax},={edx},{ecx}", [xcr]))


def _edx_eax(em: Emitter, r: ir.Value) -> ir.Value:
    """The u64 an instruction returns in edx:eax (an asm result struct {eax, edx})."""
    lo = em.b.zext(em.b.extract_value(r, 0), I64)
    hi = em.b.zext(em.b.extract_value(r, 1), I64)
    return em.b.or_(lo, em.b.shl(hi, ir.Constant(I64, 32)))


@intrinsic("(msr: u32) -> u64", group=PLATFORM, evaluate=ask_env(),
           doc="read a model-specific register")
def rdmsr(em: Emitter, msr: ir.Value) -> ir.Value:
    return _edx_eax(em, em.asm(ir.LiteralStructType([I32, I32]), "rdmsr",
                               "={eax},={edx},{ecx}", [msr]))


@intrinsic("(msr: u32, value: u64)", group=PLATFORM, evaluate=ask_env(),
           doc="write a model-specific register")
def wrmsr(em: Emitter, msr: ir.Value, val: ir.Value) -> None:
    lo = em.b.trunc(val, I32)
    hi = em.b.trunc(em.b.lshr(val, ir.Constant(I64, 32)), I32)
    em.asm(VOID, "wrmsr", "{ecx},{eax},{edx},~{memory}", [msr, lo, hi])


@intrinsic("(nr: u64, a0: u64, a1: u64, a2: u64, a3: u64) -> u64", group=PLATFORM,
           evaluate=ask_env(), doc="KVM hypercall (rax=nr, rbx, rcx, rdx, rsi)")
def vmmcall(em: Emitter, *vals: ir.Value) -> ir.Value:
    return em.asm(I64, "vmmcall", "={rax},{rax},{rbx},{rcx},{rdx},{rsi},~{memory}", list(vals))


def _alone(em: Emitter, text: str) -> None:
    """An instruction with no operands that must stay where it is among memory accesses."""
    em.asm(VOID, text, "~{memory}", [])


@intrinsic("()", group=PLATFORM, evaluate=ask_env(),
           doc="halt; in the mirror VM this exits to the host")
def hlt(em: Emitter) -> None:
    _alone(em, "hlt")


@intrinsic("()", group=PLATFORM, evaluate=ask_env(idle=True), doc="spin-loop hint")
def pause(em: Emitter) -> None:
    _alone(em, "pause")


@intrinsic("()", group=PLATFORM, evaluate=ask_env(),
           doc="VMGEXIT (`rep vmmcall`): SEV-ES exit to the host through the GHCB MSR and page")
def vmgexit(em: Emitter) -> None:
    _alone(em, "rep vmmcall")


_SCRATCH_GPRS = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")


@intrinsic("()", group=PLATFORM, evaluate=ask_env(idle=True),
           doc="zero xmm0-15 and the caller-saved GPRs: no key or plaintext is left in a "
               "register when the vCPU exits")
def clear_scratch_regs(em: Emitter) -> None:
    regs = [f"xmm{i}" for i in range(16)]
    text = "\n\t".join([f"xorps %{r}, %{r}" for r in regs] +
                        [f"xorl %{r}d, %{r}d" if r.startswith("r") and r[1:].isdigit() else
                         f"xorl %e{r[1:]}, %e{r[1:]}" for r in _SCRATCH_GPRS])
    clobbers = ",".join(f"~{{{r}}}" for r in (*regs, *_SCRATCH_GPRS, "flags", "memory"))
    em.asm(VOID, text, clobbers, [])


@intrinsic("(base: u64, size: u64)", group=PLATFORM, evaluate=ask_env(idle=True),
           doc="zero the dead part of the stack, from base (8-aligned) up to the current RSP, "
               "if RSP lies within size bytes above base (rep stosq: the wipe needs no stack)")
def wipe_stack_below(em: Emitter, base: ir.Value, size: ir.Value) -> None:
    em.asm(VOID, "movq %rsp, %rcx\n\tsubq $0, %rcx\n\tcmpq $1, %rcx\n\tja 1f\n\t"
                 "shrq $$3, %rcx\n\tmovq $0, %rdi\n\txorl %eax, %eax\n\trep stosq\n1:",
           "r,r,~{rax},~{rcx},~{rdi},~{flags},~{dirflag},~{memory}", [base, size])


@intrinsic("(lo: u64, hi: u64)", group=PLATFORM, evaluate=ask_env(),
           doc="set the 128-bit staging-mask key (mm6:mm7; compiled code never uses MMX) and "
               "restart the serial (mm5 = 0)")
def mask_key(em: Emitter, lo: ir.Value, hi: ir.Value) -> None:
    em.asm(VOID, "movq $0, %mm6\n\tmovq $1, %mm7\n\tpxor %mm5, %mm5", "r,r,~{mm5},~{mm6},~{mm7}",
           [lo, hi])


@intrinsic("()", group=PLATFORM, evaluate=ask_env(),
           doc="advance the staging-mask serial (mm5): every record's masks differ")
def mask_next(em: Emitter) -> None:
    em.asm(VOID, "movq %mm5, %rax\n\tincq %rax\n\tmovq %rax, %mm5", "~{rax},~{mm5},~{flags}", [])


@intrinsic("(va: u64)", group=PLATFORM, evaluate=ask_env(),
           doc="hold a record's page address in mm4: every later use reads it from there, "
               "so no rewound memory can redirect the record to another page")
def bind_page(em: Emitter, va: ir.Value) -> None:
    em.asm(VOID, "movq $0, %mm4", "r,~{mm4}", [va])


@intrinsic("() -> u64", group=PLATFORM, evaluate=ask_env(), doc="the address bind_page() holds")
def bound_page(em: Emitter) -> ir.Value:
    return em.asm(I64, "movq %mm4, $0", "=r", [])


_MASK_BLOCK = (
    "movq2dq %mm6, $1", "movq2dq %mm7, $2", "punpcklqdq $2, $1",  # t1 = the key
    "movq $5, $2", "movq2dq %mm5, $3", "punpcklqdq $3, $2",  # t2 = id | serial << 64
    "pxor $1, $2", "aesenc $1, $2",  # t2 = M
    "pxor $2, $0")


@intrinsic("(x: v128, id: u64) -> v128", group=PLATFORM, evaluate=ask_env(),
           doc="x ^ M, M = an AES round keyed by mm6:mm7 over (id, mm5): a mask no host "
               "can compute or roll back (the key and serial exist only in MMX registers)")
def mask_block(em: Emitter, x: ir.Value, blk: ir.Value) -> ir.Value:
    st = ir.LiteralStructType([x.type, x.type, x.type, x.type])
    r = em.asm(st, "\n\t".join(_MASK_BLOCK), "=x,=&x,=&x,=&x,0,r", [x, blk])
    return em.b.extract_value(r, 0)


def _mask8_text() -> str:
    """mask_block for 8 values, the key and serial fetched once: ids id..id+7."""
    head = ["movq2dq %mm6, $8", "movq2dq %mm7, $10", "punpcklqdq $10, $8",  # $8 = the key
            "movq2dq %mm5, $9", "pslldq $$8, $9",  # $9 = serial << 64
            "mov $20, $11"]  # $11 = the id
    body = []
    for j in range(8):
        body += ["movq $11, $10", "por $9, $10", "pxor $8, $10", "aesenc $8, $10",
                 f"pxor $10, ${j}"]
        if j < 7:
            body.append("inc $11")
    return "\n\t".join(head + body)


_V8 = ", ".join(f"x{j}: v128" for j in range(8))


@intrinsic(f"({_V8}, id: u64) -> (v128, v128, v128, v128, v128, v128, v128, v128)",
           group=PLATFORM, evaluate=ask_env(),
           doc="mask_block of 8 values for ids id..id+7 (same masks, fewer instructions)",
           unpack_reason="mask8 returns eight values: a, b, ... = mask8(...)")
def mask8(em: Emitter, *vals: ir.Value) -> list[ir.Value]:
    xs, blk = list(vals[:8]), vals[8]
    t = xs[0].type
    st = ir.LiteralStructType([t] * 11 + [I64])
    cons = ",".join(["=x"] * 8 + ["=&x"] * 3 + ["=&r"] + [str(j) for j in range(8)] + ["r"])
    r = em.asm(st, _mask8_text(), cons + ",~{flags}", [*xs, blk])
    return [em.b.extract_value(r, j) for j in range(8)]


@intrinsic("()", group=PLATFORM, evaluate=ask_env(idle=True),
           doc="EMMS: mark the x87 stack free again (native test entry points, after MMX use)")
def emms(em: Emitter) -> None:
    _alone(em, "emms")


@intrinsic("(p: u64)", group=PLATFORM, evaluate=ask_env(),
           doc="load the IDT register from the 10-byte limit/base at p")
def lidt(em: Emitter, p: ir.Value) -> None:
    em.asm(VOID, "lidt ($0)", "r,~{memory}", [p])


@intrinsic("() -> u64", group=PLATFORM, evaluate=ask_env(), doc="the faulting address of a #PF")
def read_cr2(em: Emitter) -> ir.Value:
    return em.asm(I64, "mov %cr2, $0", "=r", [])


@intrinsic("() -> u16", group=PLATFORM, evaluate=ask_env(), doc="the code segment selector")
def read_cs(em: Emitter) -> ir.Value:
    return em.asm(ir.IntType(16), "mov %cs, $0", "=r", [])


@intrinsic("(rsp: u64, rip: u64)", group=PLATFORM, evaluate=ask_env(),
           doc="continue at rip on the stack rsp, never returning (leave an exception handler)")
def resume_at(em: Emitter, rsp: ir.Value, rip: ir.Value) -> None:
    em.asm(VOID, "mov $0, %rsp\n\tjmp *$1", "r,r,~{memory}", [rsp, rip])
    em.b.unreachable()
    em.b.position_at_end(em.b.block.parent.append_basic_block("after_resume"))


@intrinsic("() -> (u64, bool)", group=PLATFORM, evaluate=ask_env(),
           doc="a hardware random number and whether the CPU had one",
           unpack_reason="rdrand64 returns two values: value, ok = rdrand64()")
def rdrand64(em: Emitter) -> list[ir.Value]:
    st = ir.LiteralStructType([I64, I8])
    r = em.asm(st, "rdrand $0\n\tsetc $1", "=r,=r,~{flags}", [])
    ok = em.b.icmp_unsigned("!=", em.b.extract_value(r, 1), ir.Constant(I8, 0))
    return [em.b.extract_value(r, 0), ok]


@intrinsic("(va: u64)", group=PLATFORM, evaluate=ask_env(),
           doc="drop the TLB entry of the page holding `va`")
def invlpg(em: Emitter, va: ir.Value) -> None:
    em.asm(VOID, "invlpg ($0)", "r,~{memory}", [va])


@intrinsic("() -> u64", group=PLATFORM, evaluate=ask_env(), doc="the page-table root")
def read_cr3(em: Emitter) -> ir.Value:
    return em.asm(I64, "mov %cr3, $0", "=r,~{memory}", [])


@intrinsic("(value: u64)", group=PLATFORM, evaluate=ask_env(),
           doc="switch page tables (flushes non-global TLB entries)")
def write_cr3(em: Emitter, v: ir.Value) -> None:
    em.asm(VOID, "mov $0, %cr3", "r,~{memory}", [v])


@intrinsic("(port: u16, value: u8)", group=PLATFORM, evaluate=ask_env(),
           doc="write a byte to an I/O port")
def outb(em: Emitter, port: ir.Value, val: ir.Value) -> None:
    em.asm(VOID, "outb %al, %dx", "{dx},{al},~{memory}", [port, val])


@intrinsic("(port: u16) -> u8", group=PLATFORM, evaluate=ask_env(),
           doc="read a byte from an I/O port")
def inb(em: Emitter, port: ir.Value) -> ir.Value:
    return em.asm(I8, "inb %dx, %al", "={al},{dx},~{memory}", [port])


@intrinsic("()", group=PLATFORM, evaluate=ask_env(idle=True),
           doc="full fence: earlier loads and stores complete first")
def mfence(em: Emitter) -> None:
    _alone(em, "mfence")


@intrinsic("()", group=PLATFORM, evaluate=ask_env(idle=True),
           doc="load fence: later instructions wait for earlier loads (stops speculation)")
def lfence(em: Emitter) -> None:
    _alone(em, "lfence")


@intrinsic("()", group=PLATFORM, evaluate=ask_env(idle=True),
           doc="store fence: earlier stores complete first")
def sfence(em: Emitter) -> None:
    _alone(em, "sfence")


# -- 128-bit SSE / AES-NI / PCLMULQDQ ---------------------------------------------------------

def _v2(em: Emitter, name: str, *vals: ir.Value) -> ir.Value:
    """Call an LLVM x86 intrinsic on <2 x i64> operands."""
    return em.b.call(em.llvm_intrinsic(name, V2I64, [V2I64] * len(vals)), list(vals))


@intrinsic("(state: v128, round_key: v128) -> v128", group=SIMD, evaluate=pure(x86.aesenc),
           doc="one AES encryption round (ShiftRows, SubBytes, MixColumns, AddRoundKey)")
def aesenc(em: Emitter, v: ir.Value, k: ir.Value) -> ir.Value:
    return _v2(em, "llvm.x86.aesni.aesenc", v, k)


@intrinsic("(state: v128, round_key: v128) -> v128", group=SIMD,
           evaluate=pure(x86.aesenclast), doc="the last AES round (no MixColumns)")
def aesenclast(em: Emitter, v: ir.Value, k: ir.Value) -> ir.Value:
    return _v2(em, "llvm.x86.aesni.aesenclast", v, k)


@intrinsic("(v: v128, rcon: imm8) -> v128", group=SIMD, evaluate=pure(x86.aeskeygenassist),
           arity_reason="aeskeygenassist takes a v128 and a literal rcon",
           doc="AES key-expansion assist")
def aeskeygenassist(em: Emitter, v: ir.Value, imm: int) -> ir.Value:
    f = em.llvm_intrinsic("llvm.x86.aesni.aeskeygenassist", V2I64, [V2I64, I8])
    return em.b.call(f, [v, ir.Constant(I8, imm)])


@intrinsic("(a: v128, b: v128, imm: imm8) -> v128", group=SIMD, evaluate=pure(x86.pclmulqdq),
           arity_reason="pclmulqdq takes two v128 values and a literal selector",
           doc="carry-less multiply of the quadwords imm selects (bit 0: a's, bit 4: b's)")
def pclmulqdq(em: Emitter, a: ir.Value, b: ir.Value, imm: int) -> ir.Value:
    f = em.llvm_intrinsic("llvm.x86.pclmulqdq", V2I64, [V2I64, V2I64, I8])
    return em.b.call(f, [a, b, ir.Constant(I8, imm)])


@intrinsic("(v: v128, mask: v128) -> v128", group=SIMD, evaluate=pure(x86.pshufb),
           doc="byte shuffle (a mask byte with bit 7 set gives 0)")
def pshufb(em: Emitter, v: ir.Value, m: ir.Value) -> ir.Value:
    f = em.llvm_intrinsic("llvm.x86.ssse3.pshuf.b.128", V16I8, [V16I8, V16I8])
    r = em.b.call(f, [em.b.bitcast(v, V16I8), em.b.bitcast(m, V16I8)])
    return em.b.bitcast(r, V2I64)


@intrinsic("(v: v128, imm: imm8) -> v128", group=SIMD, evaluate=pure(x86.pshufd),
           arity_reason="pshufd takes a v128 and a literal selector",
           doc="dword shuffle: dword i is v's dword (imm >> 2i) & 3")
def pshufd(em: Emitter, v: ir.Value, imm: int) -> ir.Value:
    v = em.b.bitcast(v, V4I32)
    mask = ir.Constant(V4I32, [(imm >> (2 * i)) & 3 for i in range(4)])
    return em.b.bitcast(em.b.shuffle_vector(v, v, mask), V2I64)


@intrinsic("(lo: u64, hi: u64) -> v128", group=SIMD,
           evaluate=pure(lambda lo, hi: lo | (hi << 64)), doc="a v128 from two quadwords")
def v128_make(em: Emitter, lo: ir.Value, hi: ir.Value) -> ir.Value:
    v = ir.Constant(V2I64, None)
    v = em.b.insert_element(v, lo, ir.Constant(I32, 0))
    return em.b.insert_element(v, hi, ir.Constant(I32, 1))


@intrinsic("(v: v128) -> u64", group=SIMD, evaluate=pure(lambda v: v & x86.MASK64),
           doc="the low quadword")
def v128_lo(em: Emitter, v: ir.Value) -> ir.Value:
    return em.b.extract_element(v, ir.Constant(I32, 0))


@intrinsic("(v: v128) -> u64", group=SIMD, evaluate=pure(lambda v: v >> 64),
           doc="the high quadword")
def v128_hi(em: Emitter, v: ir.Value) -> ir.Value:
    return em.b.extract_element(v, ir.Constant(I32, 1))


def _vec_load_rule(t: VecType):
    """`v128_load(p)` / `v256_load(p)`: any pointer (the bytes at p, whatever their type)."""
    def rule(fe: FrontEnd, node: ast.Call) -> Checked:
        if len(node.args) != 1:
            raise fe.err(node, f"{t}_load takes one pointer")
        return Checked([t, fe.ptr_arg(node, 0)], t)
    return rule


def _vec_store_rule(t: VecType):
    def rule(fe: FrontEnd, node: ast.Call) -> Checked:
        if len(node.args) != 2:
            raise fe.err(node, f"{t}_store takes a pointer and a {t}")
        p = fe.ptr_arg(node, 0)
        return Checked([t, p, fe.typed(node.args[1], t)], void)
    return rule


def _store(machine: Machine) -> Any:
    return machine.write


@intrinsic(typing=_vec_load_rule(v128), spelling="(p: Ptr[T]) -> v128", group=SIMD,
           evaluate=_read, doc="unaligned 16-byte load")
def v128_load(em: Emitter, t: Type, p: ir.Value) -> ir.Value:
    return em.mem_load(p, t)


@intrinsic(typing=_vec_store_rule(v128), spelling="(p: Ptr[T], v: v128)", group=SIMD,
           evaluate=_store, doc="unaligned 16-byte store")
def v128_store(em: Emitter, t: Type, p: ir.Value, v: ir.Value) -> None:
    em.mem_store(p, t, v)


_LANE_SHIFT = "lane shifts take a v128 and a literal count"
_BYTE_SHIFT = "byte shifts take a v128 and a literal count"


def _lane_shift(em: Emitter, v: ir.Value, n: int, left: bool) -> ir.Value:
    amt = ir.Constant(V2I64, [n, n])
    return em.b.shl(v, amt) if left else em.b.lshr(v, amt)


@intrinsic("(v: v128, n: imm(0, 63)) -> v128", group=SIMD, arity_reason=_LANE_SHIFT,
           evaluate=pure(lambda v, n: x86.lane_shift(v, n, True)),
           doc="shift each 64-bit lane left (psllq)")
def v128_shl64(em: Emitter, v: ir.Value, n: int) -> ir.Value:
    return _lane_shift(em, v, n, True)


@intrinsic("(v: v128, n: imm(0, 63)) -> v128", group=SIMD, arity_reason=_LANE_SHIFT,
           evaluate=pure(lambda v, n: x86.lane_shift(v, n, False)),
           doc="shift each 64-bit lane right, logically (psrlq)")
def v128_shr64(em: Emitter, v: ir.Value, n: int) -> ir.Value:
    return _lane_shift(em, v, n, False)


def _byte_shift(em: Emitter, v: ir.Value, n: int, left: bool) -> ir.Value:
    v = em.b.bitcast(v, V16I8)
    zero = ir.Constant(V16I8, None)
    # shuffle indices: 0..15 select v, 16..31 select zero
    if left:  # pslldq: byte i takes byte i-n, zeros shift in at the bottom
        idx = [16 if i < n else i - n for i in range(16)]
    else:  # psrldq: byte i takes byte i+n, zeros shift in at the top
        idx = [min(16, i + n) for i in range(16)]
    r = em.b.shuffle_vector(v, zero, ir.Constant(ir.VectorType(I32, 16), idx))
    return em.b.bitcast(r, V2I64)


@intrinsic("(v: v128, n: imm(0, 16)) -> v128", group=SIMD, arity_reason=_BYTE_SHIFT,
           evaluate=pure(lambda v, n: x86.byte_shift(v, n, True)),
           doc="shift the whole value left by n bytes (pslldq)")
def v128_bsl(em: Emitter, v: ir.Value, n: int) -> ir.Value:
    return _byte_shift(em, v, n, True)


@intrinsic("(v: v128, n: imm(0, 16)) -> v128", group=SIMD, arity_reason=_BYTE_SHIFT,
           evaluate=pure(lambda v, n: x86.byte_shift(v, n, False)),
           doc="shift the whole value right by n bytes (psrldq)")
def v128_bsr(em: Emitter, v: ir.Value, n: int) -> ir.Value:
    return _byte_shift(em, v, n, False)


# -- 256-bit AVX2 / VAES / VPCLMULQDQ (a function with @function(features=...)) ---------------
# The AES, carry-less multiply, shuffles and byte shifts act on each 128-bit lane alone, like two
# of the 128-bit instructions side by side (x86.py's per_lane). Their semantics in the reference
# interpreter are those models; natively they run only on a CPU that has the features.

AVX2, VAES, VPCLMUL = ("avx2",), ("vaes",), ("vpclmulqdq",)


def _v4(em: Emitter, name: str, *vals: ir.Value) -> ir.Value:
    """Call an LLVM x86 intrinsic on <4 x i64> operands."""
    return em.b.call(em.llvm_intrinsic(name, V4I64, [V4I64] * len(vals)), list(vals))


def _shuffle(em: Emitter, a: ir.Value, b: ir.Value, idx: list[int]) -> ir.Value:
    return em.b.shuffle_vector(a, b, ir.Constant(ir.VectorType(I32, len(idx)), idx))


@intrinsic(typing=_vec_load_rule(v256), spelling="(p: Ptr[T]) -> v256", group=WIDE,
           evaluate=_read, features=AVX2, doc="unaligned 32-byte load")
def v256_load(em: Emitter, t: Type, p: ir.Value) -> ir.Value:
    return em.mem_load(p, t)


@intrinsic(typing=_vec_store_rule(v256), spelling="(p: Ptr[T], v: v256)", group=WIDE,
           evaluate=_store, features=AVX2, doc="unaligned 32-byte store")
def v256_store(em: Emitter, t: Type, p: ir.Value, v: ir.Value) -> None:
    em.mem_store(p, t, v)


@intrinsic("(v: v128) -> v256", group=WIDE, features=AVX2,
           evaluate=pure(lambda v: x86.join(v, v)), doc="v in both lanes (vbroadcasti128)")
def v256_broadcast(em: Emitter, v: ir.Value) -> ir.Value:
    return _shuffle(em, v, v, [0, 1, 0, 1])


@intrinsic("(lo: v128, hi: v128) -> v256", group=WIDE, features=AVX2, evaluate=pure(x86.join),
           doc="a v256 from its lanes: lane 0 = lo (vinserti128)")
def v256_make(em: Emitter, lo: ir.Value, hi: ir.Value) -> ir.Value:
    return _shuffle(em, lo, hi, [0, 1, 2, 3])


@intrinsic("(v: v256) -> v128", group=WIDE, features=AVX2,
           evaluate=pure(lambda v: x86.lanes(v)[0]), doc="lane 0 (the low 16 bytes)")
def v256_lo(em: Emitter, v: ir.Value) -> ir.Value:
    return _shuffle(em, v, v, [0, 1])


@intrinsic("(v: v256) -> v128", group=WIDE, features=AVX2,
           evaluate=pure(lambda v: x86.lanes(v)[1]), doc="lane 1 (vextracti128)")
def v256_hi(em: Emitter, v: ir.Value) -> ir.Value:
    return _shuffle(em, v, v, [2, 3])


@intrinsic("(state: v256, round_key: v256) -> v256", group=WIDE, features=VAES,
           evaluate=pure(x86.vaesenc256), doc="one AES encryption round on each lane")
def vaesenc256(em: Emitter, v: ir.Value, k: ir.Value) -> ir.Value:
    return _v4(em, "llvm.x86.aesni.aesenc.256", v, k)


@intrinsic("(state: v256, round_key: v256) -> v256", group=WIDE, features=VAES,
           evaluate=pure(x86.vaesenclast256), doc="the last AES round on each lane")
def vaesenclast256(em: Emitter, v: ir.Value, k: ir.Value) -> ir.Value:
    return _v4(em, "llvm.x86.aesni.aesenclast.256", v, k)


@intrinsic("(a: v256, b: v256, imm: imm8) -> v256", group=WIDE, features=VPCLMUL,
           evaluate=pure(x86.vpclmulqdq256),
           arity_reason="vpclmulqdq256 takes two v256 values and a literal selector",
           doc="in each lane, the carry-less product of the quadwords imm selects")
def vpclmulqdq256(em: Emitter, a: ir.Value, b: ir.Value, imm: int) -> ir.Value:
    f = em.llvm_intrinsic("llvm.x86.pclmulqdq.256", V4I64, [V4I64, V4I64, I8])
    return em.b.call(f, [a, b, ir.Constant(I8, imm)])


@intrinsic("(v: v256, mask: v256) -> v256", group=WIDE, features=AVX2,
           evaluate=pure(x86.vpshufb256), doc="byte shuffle within each lane")
def vpshufb256(em: Emitter, v: ir.Value, m: ir.Value) -> ir.Value:
    f = em.llvm_intrinsic("llvm.x86.avx2.pshuf.b", V32I8, [V32I8, V32I8])
    r = em.b.call(f, [em.b.bitcast(v, V32I8), em.b.bitcast(m, V32I8)])
    return em.b.bitcast(r, V4I64)


@intrinsic("(v: v256, imm: imm8) -> v256", group=WIDE, features=AVX2,
           evaluate=pure(x86.vpshufd256),
           arity_reason="vpshufd256 takes a v256 and a literal selector",
           doc="dword shuffle within each lane, like pshufd")
def vpshufd256(em: Emitter, v: ir.Value, imm: int) -> ir.Value:
    v = em.b.bitcast(v, V8I32)
    sel = [(imm >> (2 * i)) & 3 for i in range(4)]
    return em.b.bitcast(_shuffle(em, v, v, sel + [4 + s for s in sel]), V4I64)


@intrinsic("(a: v256, b: v256) -> v256", group=WIDE, features=AVX2,
           evaluate=pure(lambda a, b: x86.add32(a, b, 256)),
           doc="add each 32-bit lane alone, wrapping (vpaddd: counter blocks)")
def v256_add32(em: Emitter, a: ir.Value, b: ir.Value) -> ir.Value:
    return em.b.bitcast(em.b.add(em.b.bitcast(a, V8I32), em.b.bitcast(b, V8I32)), V4I64)


_LANE_SHIFT256 = "lane shifts take a v256 and a literal count"
_BYTE_SHIFT256 = "byte shifts take a v256 and a literal count"


def _lane_shift256(em: Emitter, v: ir.Value, n: int, left: bool) -> ir.Value:
    amt = ir.Constant(V4I64, [n] * 4)
    return em.b.shl(v, amt) if left else em.b.lshr(v, amt)


@intrinsic("(v: v256, n: imm(0, 63)) -> v256", group=WIDE, features=AVX2,
           arity_reason=_LANE_SHIFT256,
           evaluate=pure(lambda v, n: x86.lane_shift(v, n, True, 256)),
           doc="shift each 64-bit lane left (vpsllq)")
def v256_shl64(em: Emitter, v: ir.Value, n: int) -> ir.Value:
    return _lane_shift256(em, v, n, True)


@intrinsic("(v: v256, n: imm(0, 63)) -> v256", group=WIDE, features=AVX2,
           arity_reason=_LANE_SHIFT256,
           evaluate=pure(lambda v, n: x86.lane_shift(v, n, False, 256)),
           doc="shift each 64-bit lane right, logically (vpsrlq)")
def v256_shr64(em: Emitter, v: ir.Value, n: int) -> ir.Value:
    return _lane_shift256(em, v, n, False)


def _byte_shift256(em: Emitter, v: ir.Value, n: int, left: bool) -> ir.Value:
    """Each 16-byte lane shifted alone; shuffle indices 32..63 select the zero vector."""
    idx = []
    for lane in (0, 16):
        for i in range(16):
            src = i - n if left else i + n
            idx.append(lane + src if 0 <= src < 16 else 32)
    return em.b.bitcast(_shuffle(em, em.b.bitcast(v, V32I8), ir.Constant(V32I8, None), idx),
                        V4I64)


@intrinsic("(v: v256, n: imm(0, 16)) -> v256", group=WIDE, features=AVX2,
           arity_reason=_BYTE_SHIFT256,
           evaluate=pure(lambda v, n: x86.byte_shift256(v, n, True)),
           doc="shift each lane left by n bytes (vpslldq)")
def v256_bsl(em: Emitter, v: ir.Value, n: int) -> ir.Value:
    return _byte_shift256(em, v, n, True)


@intrinsic("(v: v256, n: imm(0, 16)) -> v256", group=WIDE, features=AVX2,
           arity_reason=_BYTE_SHIFT256,
           evaluate=pure(lambda v, n: x86.byte_shift256(v, n, False)),
           doc="shift each lane right by n bytes (vpsrldq)")
def v256_bsr(em: Emitter, v: ir.Value, n: int) -> ir.Value:
    return _byte_shift256(em, v, n, False)



def _mask8_256_text() -> str:
    """mask8 on 8 blocks held two per ymm register ($0..$3, block 2j+l in lane l of $j): the key
    ($4, both lanes) and (id, serial | id + 1, serial) ($5) built once from MMX in VEX encodings,
    then one VAESENC per register; $6 = (2, 0 | 2, 0) steps the ids, $7 and $8 are scratch."""
    head = ["movq %mm6, $8", "vmovq $8, ${4:x}", "movq %mm7, $8", "vpinsrq $$1, $8, ${4:x}, ${4:x}",
            "vinserti128 $$1, ${4:x}, $4, $4",  # $4 = K | K
            "movq %mm5, $8", "vmovq $8, ${7:x}", "vpslldq $$8, ${7:x}, ${7:x}",  # (0, serial)
            "vmovq $13, ${5:x}", "vpor ${7:x}, ${5:x}, ${5:x}",  # (id, serial)
            "lea 1($13), $8", "vmovq $8, ${6:x}", "vpor ${7:x}, ${6:x}, ${6:x}",
            "vinserti128 $$1, ${6:x}, $5, $5",  # $5 = (id, serial | id + 1, serial)
            "mov $$2, $8", "vmovq $8, ${6:x}", "vinserti128 $$1, ${6:x}, $6, $6"]
    body = []
    for j in range(4):
        body += ["vpxor $4, $5, $7", "vaesenc $4, $7, $7", f"vpxor $7, ${j}, ${j}"]
        if j < 3:
            body.append("vpaddq $6, $5, $5")
    return "\n\t".join(head + body)


@intrinsic("(y0: v256, y1: v256, y2: v256, y3: v256, id: u64) -> (v256, v256, v256, v256)",
           group=WIDE, features=VAES, evaluate=ask_env(),
           doc="mask8 of the 8 blocks in four v256 (block 2j+l in lane l of yj), ids "
               "id..id+7: bit-identical masks, one VAESENC per two blocks",
           unpack_reason="mask8_256 returns four values: a, b, c, d = mask8_256(...)")
def mask8_256(em: Emitter, *vals: ir.Value) -> list[ir.Value]:
    ys, blk = list(vals[:4]), vals[4]
    st = ir.LiteralStructType([V4I64] * 8 + [I64])
    cons = ",".join(["=x"] * 4 + ["=&x"] * 4 + ["=&r"] + [str(j) for j in range(4)] + ["r"])
    r = em.asm(st, _mask8_256_text(), cons, [*ys, blk])
    return [em.b.extract_value(r, j) for j in range(4)]


# `from helperfw import *`-style export of every built-in intrinsic (only they are registered
# when this module finishes importing): helperfw/__init__.py re-exports them.
__all__ = list(INTRINSICS)
