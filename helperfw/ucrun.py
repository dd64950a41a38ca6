"""Run a LinkedImage's `abi="c"` functions under unicorn: the third leg of the differential tests.

Deliberately minimal (the full machine lives in emulate/): identity-mapped memory in unicorn's
64-bit mode, no page tables, no firmware. The flat image is loaded at `base` with its sections'
permissions, a stack and a stop page are mapped, and a call puts SysV arguments in
rdi/rsi/rdx/rcx/r8/r9 with the stop address as the return address. Buffers for pointer
arguments are mapped at addresses the caller chooses. An optional `Env` (the interpreter's) answers
cpuid, in and out, so both sides see the same platform.
"""

from __future__ import annotations

import capstone
import unicorn as uc
from unicorn import x86_const as x86

from .codegen.image import PAGE, LinkedImage

ARG_REGS = (x86.UC_X86_REG_RDI, x86.UC_X86_REG_RSI, x86.UC_X86_REG_RDX, x86.UC_X86_REG_RCX,
            x86.UC_X86_REG_R8, x86.UC_X86_REG_R9)
PROT = {"r": uc.UC_PROT_READ, "rw": uc.UC_PROT_READ | uc.UC_PROT_WRITE,
        "rx": uc.UC_PROT_READ | uc.UC_PROT_EXEC}
HLT = b"\xf4"
MASK64 = (1 << 64) - 1


class UcRunError(Exception):
    """The call faulted or ran out of budget; the message says where (symbol, instruction)."""


def _page_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


class UcRunner:
    def __init__(self, image: LinkedImage, base: int = 0x4000_0000, *,
                 stack_top: int = 0x7000_0000, stack_size: int = 0x4_0000,
                 stop: int = 0x6FF0_0000, env: object | None = None) -> None:
        self.image, self.base, self.stop, self.env = image, base, stop, env
        self.stack_top = stack_top
        self.mu = uc.Uc(uc.UC_ARCH_X86, uc.UC_MODE_64)
        # a model with AES-NI and PCLMULQDQ (the default qemu64 has neither)
        self.mu.ctl_set_cpu_model(x86.UC_CPU_X86_EPYC_ROME)
        flat = bytes(image.flat(base))
        self.mu.mem_map(base, len(flat), uc.UC_PROT_READ)
        self.mu.mem_write(base, flat)
        for s in image.sections:
            self.mu.mem_protect(base + s.rva, _page_up(s.vsize), PROT[s.perms])
        self.mu.mem_map(stack_top - stack_size, stack_size, PROT["rw"])
        self.mu.mem_map(stop, PAGE, PROT["rx"])
        self.mu.mem_write(stop, HLT)
        self._md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        if env is not None:
            self.mu.hook_add(uc.UC_HOOK_INSN, self._cpuid, None, 1, 0, x86.UC_X86_INS_CPUID)
            self.mu.hook_add(uc.UC_HOOK_INSN, self._in, None, 1, 0, x86.UC_X86_INS_IN)
            self.mu.hook_add(uc.UC_HOOK_INSN, self._out, None, 1, 0, x86.UC_X86_INS_OUT)

    # -- memory -----------------------------------------------------------------------------
    def map(self, addr: int, size_or_data: int | bytes | bytearray, perms: str = "rw") -> None:
        """Map zeroed pages at `addr` (page aligned), optionally filled with `data`."""
        data = b"" if isinstance(size_or_data, int) else bytes(size_or_data)
        size = size_or_data if isinstance(size_or_data, int) else len(data)
        if addr % PAGE:
            raise ValueError(f"{addr:#x} is not page aligned")
        self.mu.mem_map(addr, _page_up(max(size, 1)), PROT[perms])
        if data:
            self.mu.mem_write(addr, data)

    def write(self, addr: int, data: bytes | bytearray) -> None:
        self.mu.mem_write(addr, bytes(data))

    def read(self, addr: int, size: int) -> bytes:
        return bytes(self.mu.mem_read(addr, size))

    def address(self, symbol: str) -> int:
        return self.base + self.image.symbol(symbol).rva

    # -- calls ------------------------------------------------------------------------------
    def call(self, name: str, *args: int, budget: int = 10_000_000) -> int:
        """Call `name` (SysV, up to six integer/pointer arguments); returns rax as a u64."""
        if len(args) > len(ARG_REGS):
            raise ValueError("only register arguments are supported")
        mu = self.mu
        for reg, a in zip(ARG_REGS, args):
            mu.reg_write(reg, int(a) & MASK64)
        rsp = (self.stack_top - 64) & ~15
        rsp -= 8  # at entry (rsp + 8) is 16-byte aligned, as after a call
        mu.mem_write(rsp, self.stop.to_bytes(8, "little"))
        mu.reg_write(x86.UC_X86_REG_RSP, rsp)
        try:
            mu.emu_start(self.address(name), self.stop, count=budget)
        except uc.UcError as e:
            raise UcRunError(f"{name}: {e} at {self.where()}") from None
        rip = mu.reg_read(x86.UC_X86_REG_RIP)
        if rip != self.stop:
            raise UcRunError(f"{name}: stopped after {budget} instructions at {self.where()}")
        return mu.reg_read(x86.UC_X86_REG_RAX)

    def where(self) -> str:
        """RIP as symbol+offset with the instruction there, for fault messages."""
        rip = self.mu.reg_read(x86.UC_X86_REG_RIP)
        sym = self.image.symbolize(rip - self.base) if rip >= self.base else f"{rip:#x}"
        try:
            code = bytes(self.mu.mem_read(rip, 16))
            insn = next(self._md.disasm(code, rip), None)
            text = f"{insn.mnemonic} {insn.op_str}" if insn else "?"
        except uc.UcError:
            text = "<unmapped>"
        return f"rip={rip:#x} ({sym}): {text}"

    # -- platform hooks ---------------------------------------------------------------------
    def _cpuid(self, mu: uc.Uc, _: object) -> int:
        leaf = mu.reg_read(x86.UC_X86_REG_EAX) & 0xFFFFFFFF
        sub = mu.reg_read(x86.UC_X86_REG_ECX) & 0xFFFFFFFF
        regs = (x86.UC_X86_REG_RAX, x86.UC_X86_REG_RBX, x86.UC_X86_REG_RCX, x86.UC_X86_REG_RDX)
        for reg, v in zip(regs, self.env.cpuid(leaf, sub)):  # type: ignore[union-attr]
            mu.reg_write(reg, v & 0xFFFFFFFF)
        return 1  # skip unicorn's own cpuid

    def _in(self, mu: uc.Uc, port: int, size: int, _: object) -> int:
        if size != 1:
            raise UcRunError(f"in of {size} bytes from port {port:#x}")
        return self.env.inb(port) & 0xFF  # type: ignore[union-attr]

    def _out(self, mu: uc.Uc, port: int, size: int, value: int, _: object) -> None:
        if size != 1:
            raise UcRunError(f"out of {size} bytes to port {port:#x}")
        self.env.outb(port, value & 0xFF)  # type: ignore[union-attr]
