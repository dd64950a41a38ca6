"""VM exits as a table: one entry per exit kind, each a swappable handler.

Every VM carries its own table (`VM.exits`, built by `host_exit_table()`), and a vCPU routes each
exit through it. The default entries do what KVM and QEMU do: the host emulates the instruction
with full view of the registers and the guest continues after it. Because the choice is one
entry per kind and per VM, an SEV-ES VM can replace the entries of non-automatic exits (those
with `svm_exit_code` and not `automatic`) by handlers that raise #VC in the guest instead, while
HLT (an automatic exit) and the rest stay.

Entries and what their handler gets (`handle(vcpu, event)`):

| kind | event | returns |
|---|---|---|
| cpuid, rdmsr, wrmsr, rdrand, hlt, vmmcall | `Insn` (before it executes) | the RIP to continue at, or None: the CPU executes the instruction itself |
| io | `PortIo` (during the IN/OUT) | None; an IN handler sets `event.value` |
| fault | `GuestFault` | the RIP the guest continues at once the fault is delivered, or None: the run ends with it |

How each is caught, since unicorn has no intercepts: vmmcall raises invalid-instruction; IN/OUT
have unicorn instruction hooks; the rest get a code hook at every address of a fetched page where
such an instruction may start (`Intercepts`), so their handlers run before the instruction and
decide where execution goes. (IN/OUT hooks fire inside the instruction and cannot redirect RIP:
an entry that must stop an IN/OUT from completing, such as a #VC, needs their opcodes added to
the scan. Not done by default: their one-byte opcodes are common inside other instructions and
would cost hundreds of hooks per image.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import capstone
from unicorn import UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, Uc
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT

from emulate.memctl import PAGE
from emulate.mmu import PageFault
from helperfw.runtime.platform import (
    DEBUG_PORT,
    MSR_AMD64_SEV,
    MSR_KVM_MIGRATION_CONTROL,
    SVM_EXIT_CPUID,
    SVM_EXIT_HLT,
    SVM_EXIT_IOIO,
    SVM_EXIT_MSR,
    SVM_EXIT_VMMCALL,
)

if TYPE_CHECKING:
    from emulate.faults import GuestFault
    from emulate.machine import VCpu

MASK32 = 0xFFFF_FFFF

# MSRs unicorn/QEMU implement itself; anything else not emulated here is a #GP.
NATIVE_MSRS = frozenset({
    0x10, 0x1B, 0x174, 0x175, 0x176, 0x277, 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083,
    0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103,
})

VMMCALL = b"\x0f\x01\xd9"  # AMD APM vol. 3
# Opcodes the scan hooks (after optional REX/0x66 prefixes); the decode then names the kind.
SCAN_OPCODES = (b"\xf4", b"\x0f\x30", b"\x0f\x32", b"\x0f\xa2", b"\x0f\xc7")
RDRAND_OPCODE = b"\x0f\xc7"  # 0F C7 /6 with a register operand (ModRM mod=11, reg=6)
MNEMONIC_KIND = {"hlt": "hlt", "rdmsr": "rdmsr", "wrmsr": "wrmsr", "cpuid": "cpuid",
                 "rdrand": "rdrand"}

# RDRAND destination: register name -> (64-bit register, operand width)
SUBREGS: dict[str, tuple[str, int]] = {}
for _n in ("ax", "bx", "cx", "dx", "si", "di", "bp", "sp"):
    SUBREGS.update({"r" + _n: ("r" + _n, 64), "e" + _n: ("r" + _n, 32), _n: ("r" + _n, 16)})
for _i in range(8, 16):
    SUBREGS.update({f"r{_i}": (f"r{_i}", 64), f"r{_i}d": (f"r{_i}", 32), f"r{_i}w": (f"r{_i}", 16)})

EFLAGS_CF = 1 << 0
EFLAGS_RDRAND_CLEARED = 0x8D5  # OF SF ZF AF PF CF: RDRAND clears all but CF (SDM vol. 2B)


class Insn(NamedTuple):
    """A decoded instruction at `addr`."""

    addr: int
    size: int
    mnemonic: str
    op_str: str

    @property
    def next(self) -> int:
        return self.addr + self.size


@dataclass
class PortIo:
    """One IN or OUT of `size` bytes at `port`; `value` is the data (an IN handler sets it)."""

    rip: int
    port: int
    size: int
    value: int
    write: bool


Handler = Callable[..., "int | None"]


@dataclass(frozen=True)
class ExitHandler:
    """One entry of a VM's exit table.

    svm_exit_code: the SVM intercept this exit is (what the host sees; the #VC error code under
    SEV-ES), None if the instruction is no intercept on hardware (RDRAND) or for faults.
    automatic: an exit SEV-ES still takes to the host (HLT) rather than a #VC."""

    kind: str
    svm_exit_code: int | None
    handle: Handler
    automatic: bool = False


# ---- the default handlers: the host emulates, the guest continues ----------------------------
def exit_cpuid(v: VCpu, insn: Insn) -> int:
    """CPUID from the VM's model (unicorn's own has no SEV leaf)."""
    r = v.regs
    a, b, c, d = v.vm.cpuid.query(r["eax"] & MASK32, r["ecx"] & MASK32)
    r["rax"], r["rbx"], r["rcx"], r["rdx"] = a, b, c, d
    return insn.next


def exit_rdmsr(v: VCpu, insn: Insn) -> int | None:
    """The MSRs the host models; the CPU's own run natively; any other MSR is a #GP."""
    msr = v.regs["ecx"] & MASK32
    if msr in NATIVE_MSRS:
        return None
    if msr == MSR_KVM_MIGRATION_CONTROL:
        value = v.vm.msr_read(msr)
    elif msr == MSR_AMD64_SEV:
        value = v.vm.sev_status
    else:
        return v.raise_fault("#GP", insn.addr, f"rdmsr of unknown MSR {msr:#x}")
    v.regs["rax"], v.regs["rdx"] = value & MASK32, (value >> 32) & MASK32
    return insn.next


def exit_wrmsr(v: VCpu, insn: Insn) -> int | None:
    msr = v.regs["ecx"] & MASK32
    if msr in NATIVE_MSRS:
        return None
    value = (v.regs["rdx"] & MASK32) << 32 | (v.regs["rax"] & MASK32)
    if msr != MSR_KVM_MIGRATION_CONTROL:
        return v.raise_fault("#GP", insn.addr, f"wrmsr of unknown MSR {msr:#x} value {value:#x}")
    v.vm.msr_write(msr, value)
    return insn.next


def exit_rdrand(v: VCpu, insn: Insn) -> int:
    """RDRAND from the VM's source: its value (0 on failure) and CF, other arithmetic flags 0."""
    full, bits = SUBREGS[insn.op_str.strip()]
    value, ok = v.vm.rdrand.draw(bits)
    if bits == 16:
        value |= v.regs[full] & ~0xFFFF
    v.regs[full] = value
    v.regs["rflags"] = (v.regs["rflags"] & ~EFLAGS_RDRAND_CLEARED) | (EFLAGS_CF if ok else 0)
    return insn.next


def exit_hlt(v: VCpu, insn: Insn) -> None:
    """HLT ends the run: the CPU executes it (unicorn stops there) and the run reports "hlt"."""
    v.note_hlt(insn.addr)


def exit_vmmcall(v: VCpu, insn: Insn) -> int:
    """KVM hypercall ABI: nr in rax, a0-a3 in rbx, rcx, rdx, rsi; the result goes to rax."""
    r = v.regs
    r["rax"] = v.vm.hypercall(v, r["rax"], r["rbx"], r["rcx"], r["rdx"], r["rsi"])
    return insn.next


def exit_io(v: VCpu, io: PortIo) -> None:
    """OUT to the debug port appends to the VM's debug log, other OUTs are logged; IN reads the
    VM's port model."""
    if not io.write:
        io.value = v.vm.port_read(io.port, io.size)
    elif io.port == DEBUG_PORT:
        v.vm.debug_log += (io.value & ((1 << 8 * io.size) - 1)).to_bytes(io.size, "little")
    else:
        v.vm.io_log.append((io.port, io.size, io.value))


def report_fault(v: VCpu, fault: GuestFault) -> None:
    """No IDT is modelled: every exception ends the run and reaches the host as a crash report
    (a triple fault, as far as the VM is concerned)."""


def host_exit_table() -> dict[str, ExitHandler]:
    """The table of a VM whose exits all go to the host (no SEV, or plain SEV)."""
    entries = [
        ExitHandler("cpuid", SVM_EXIT_CPUID, exit_cpuid),
        ExitHandler("rdmsr", SVM_EXIT_MSR, exit_rdmsr),
        ExitHandler("wrmsr", SVM_EXIT_MSR, exit_wrmsr),
        ExitHandler("io", SVM_EXIT_IOIO, exit_io),
        ExitHandler("vmmcall", SVM_EXIT_VMMCALL, exit_vmmcall),
        ExitHandler("hlt", SVM_EXIT_HLT, exit_hlt, automatic=True),
        ExitHandler("rdrand", None, exit_rdrand),
        ExitHandler("fault", None, report_fault),
    ]
    return {e.kind: e for e in entries}


# ---- finding the intercepted instructions ----------------------------------------------------
def scan_candidates(code: bytes) -> set[int]:
    """Offsets in `code` where an intercepted instruction may start: each opcode of
    SCAN_OPCODES and up to two REX/0x66 prefix bytes before it. A false candidate is harmless:
    a hook there never fires (not an instruction start) or its decode names no exit."""
    cands: set[int] = set()
    for pat in SCAN_OPCODES:
        i = code.find(pat)
        while i >= 0:
            if pat != RDRAND_OPCODE or (i + 2 < len(code) and (code[i + 2] & 0xF8) == 0xF0):
                cands.add(i)
                j = i - 1
                while j >= max(i - 2, 0) and (0x40 <= code[j] <= 0x4F or code[j] == 0x66):
                    cands.add(j)
                    j -= 1
            i = code.find(pat, i + 1)
    return cands


class Intercepts:
    """The hooks that catch one vCPU's exits and hand them to its dispatch: IN/OUT, invalid
    instructions (VMMCALL, #UD), exceptions, and code hooks on the intercepted instructions of
    every newly fetched page (scanned once, decoded once)."""

    def __init__(self, vcpu: VCpu) -> None:
        self.vcpu = vcpu
        self._cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._scanned: set[tuple[int, int]] = set()
        self._hooks: dict[int, int] = {}
        self._decoded: dict[int, Insn] = {}
        uc = vcpu.uc
        uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)

    def page_fetched(self, page_va: int, page_hpa: int) -> None:
        """Called on every fetch fill; scans a (VA, HPA) pair once until `reset`."""
        if (page_va, page_hpa) in self._scanned:
            return
        self._scanned.add((page_va, page_hpa))
        mem = self.vcpu.mc.mem
        for off in scan_candidates(bytes(mem[page_hpa : page_hpa + PAGE])):
            addr = page_va + off
            if addr not in self._hooks:
                self._hooks[addr] = self.vcpu.uc.hook_add(UC_HOOK_CODE, self._on_code, None,
                                                           addr, addr)

    def reset(self) -> None:
        """Code bytes changed: decode and scan again (existing hooks stay; they re-check)."""
        self._scanned.clear()
        self._decoded.clear()

    def decode(self, addr: int) -> Insn:
        insn = self._decoded.get(addr)
        if insn is None:
            v = self.vcpu
            try:
                code = v.read_virt(addr, 15)
            except PageFault:
                code = v.read_virt(addr, PAGE - addr % PAGE)
            insn = Insn(addr, 0, "", "")
            for i in self._cs.disasm(code, addr, 1):
                insn = Insn(addr, i.size, i.mnemonic, i.op_str)
            self._decoded[addr] = insn
        return insn

    def _on_code(self, uc: object, addr: int, size: int, _ud: object) -> None:
        insn = self.decode(addr)
        kind = MNEMONIC_KIND.get(insn.mnemonic)
        if kind is not None:
            self.vcpu.dispatch(kind, insn)

    def _on_out(self, uc: object, port: int, size: int, value: int, _ud: object) -> None:
        self.vcpu.dispatch_io(PortIo(self.vcpu.regs["rip"], port, size, value, write=True))

    def _on_in(self, uc: object, port: int, size: int, _ud: object) -> int:
        io = PortIo(self.vcpu.regs["rip"], port, size, 0, write=False)
        self.vcpu.dispatch_io(io)
        return io.value & ((1 << 8 * size) - 1)

    def _on_invalid(self, uc: object, _ud: object) -> bool:
        """unicorn has no VMMCALL: it raises invalid-instruction; anything else is a #UD."""
        v = self.vcpu
        rip = v.regs["rip"]
        try:
            code = v.read_virt(rip, len(VMMCALL))
        except PageFault:
            code = b""
        if code == VMMCALL:
            v.dispatch("vmmcall", Insn(rip, len(VMMCALL), "vmmcall", ""))
            return True
        resume = v.raise_fault("#UD", rip, "invalid instruction")
        if resume is None:
            return False
        v.regs["rip"] = resume
        return True

    def _on_intr(self, uc: Uc, intno: int, _ud: object) -> None:
        """An exception unicorn raised itself (int3, #DE, ...)."""
        v = self.vcpu
        if v.pending_fault is None:
            rip = v.regs["rip"] - (1 if intno == 3 else 0)  # int3 is a trap: RIP is past it
            resume = v.raise_fault(f"vector {intno}", rip, "guest exception")
            if resume is not None:
                v.regs["rip"] = resume
                return
        uc.emu_stop()
