"""VM exits as a table: one entry per exit kind, each a swappable handler.

Every VM carries its own table (`VM.exits`), and a vCPU routes each exit through it. A VM without
SEV-ES gets `host_exit_table()`: the entries do what KVM and QEMU do, the host emulates the
instruction with full view of the registers and the guest continues after it. An SEV-ES VM gets
`sev_es_exit_table()`: every non-automatic exit (an entry with `svm_exit_code` and not
`automatic`) raises #VC in the guest instead (error code = the SVM exit code; RDMSR/WRMSR of
MSR_AMD64_SEV, of the GHCB MSR and of the CPU's own MSRs are no intercept), VMGEXIT exits to
the host with the GHCB MSR (`emulate.ghcb`), and HLT stays an automatic exit.

Entries and what their handler gets (`handle(vcpu, event)`):

| kind | event | returns |
|---|---|---|
| cpuid, rdmsr, wrmsr, rdrand, hlt, vmmcall, wbinvd, vmgexit | `Insn` (before it executes) | the RIP to continue at, or None: the CPU executes the instruction itself |
| io | `PortIo` (during the IN/OUT); under SEV-ES an `Insn` (before it) | None; an IN handler sets `event.value` |
| fault | `GuestFault` | the RIP the guest continues at once the fault is delivered, or None: the run ends with it |

The default "fault" entry delivers the exception through the guest's IDT (`emulate.idt`); with
no IDT or a bad gate the run ends as a triple fault with the crash dump.

How each is caught, since unicorn has no intercepts: vmmcall and VMGEXIT (`rep vmmcall`) raise
invalid-instruction; IN/OUT have unicorn instruction hooks; the rest get a code hook at every
address of a fetched page where such an instruction may start (`Intercepts`), so their handlers
run before the instruction and decide where execution goes. IN/OUT hooks fire inside the
instruction and cannot redirect RIP, so for an SEV-ES VM (where an IN/OUT must become a #VC
before it executes) their opcodes join the scan. Not for other VMs: their one-byte opcodes are
common inside other instructions and cost hundreds of hooks per image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import capstone
from unicorn import UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR, Uc
from unicorn.x86_const import UC_X86_INS_IN, UC_X86_INS_OUT

from emulate import idt
from emulate.memctl import PAGE
from emulate.mmu import PageFault
from helperfw.runtime.platform import (
    DEBUG_PORT,
    MSR_AMD64_SEV,
    MSR_AMD64_SEV_ES_GHCB,
    MSR_KVM_MIGRATION_CONTROL,
    SVM_EXIT_CPUID,
    SVM_EXIT_HLT,
    SVM_EXIT_IOIO,
    SVM_EXIT_MSR,
    SVM_EXIT_VMMCALL,
    SVM_EXIT_WBINVD,
)

if TYPE_CHECKING:
    from emulate.machine import VM, VCpu

MASK32 = 0xFFFF_FFFF

# MSRs unicorn/QEMU implement itself; anything else not emulated here is a #GP.
NATIVE_MSRS = frozenset({
    0x10, 0x1B, 0x174, 0x175, 0x176, 0x277, 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083,
    0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103,
})

VMMCALL = b"\x0f\x01\xd9"  # AMD APM vol. 3
VMGEXIT = b"\xf3" + VMMCALL  # `rep vmmcall`; a VMMCALL outside SEV-ES guests
# Opcodes the scan hooks (after optional REX/0x66 prefixes); the decode then names the kind.
SCAN_OPCODES = (b"\xf4", b"\x0f\x30", b"\x0f\x32", b"\x0f\xa2", b"\x0f\xc7", b"\x0f\x09",
                b"\x0f\x22", b"\x0f\x01")  # the last two: MOV to CRn, INVLPG (TLB flushes)
RDRAND_OPCODE = b"\x0f\xc7"  # 0F C7 /6 with a register operand (ModRM mod=11, reg=6)
# opcode -> (ModRM mod == 11, ModRM reg or None): what the ModRM of a candidate must be
MODRM_RULES: dict[bytes, tuple[bool, int | None]] = {
    RDRAND_OPCODE: (True, 6), b"\x0f\x22": (True, None), b"\x0f\x01": (False, 7)}
# IN/OUT (imm8 and DX forms, an optional 0x66 for 16 bits), scanned for SEV-ES VMs only. Not
# INS/OUTS: their opcodes (0x6C-0x6F) are frequent bytes of other instructions, and nothing
# here uses string I/O; under SEV-ES one ends the run with an error instead of a #VC.
IO_OPCODES = frozenset(range(0xE4, 0xE8)) | frozenset(range(0xEC, 0xF0))
IO_PREFIX = 0x66
MNEMONIC_KIND = {"hlt": "hlt", "rdmsr": "rdmsr", "wrmsr": "wrmsr", "cpuid": "cpuid",
                 "rdrand": "rdrand", "wbinvd": "wbinvd"}
IO_MNEMONICS = frozenset({"in", "out"})

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
    """The MSRs the host models; the CPU's own run natively (the GHCB MSR of an SEV-ES vCPU
    too); any other MSR is a #GP."""
    msr = v.regs["ecx"] & MASK32
    if msr in NATIVE_MSRS:
        return None
    if msr == MSR_KVM_MIGRATION_CONTROL:
        value = v.vm.msr_read(msr)
    elif msr == MSR_AMD64_SEV:
        value = v.vm.sev_status
    elif msr == MSR_AMD64_SEV_ES_GHCB and v.vm.sev_es:
        value = v.ghcb_msr
    else:
        return v.raise_fault("#GP", insn.addr, f"rdmsr of unknown MSR {msr:#x}")
    v.regs["rax"], v.regs["rdx"] = value & MASK32, (value >> 32) & MASK32
    return insn.next


def exit_wrmsr(v: VCpu, insn: Insn) -> int | None:
    msr = v.regs["ecx"] & MASK32
    if msr in NATIVE_MSRS:
        return None
    value = (v.regs["rdx"] & MASK32) << 32 | (v.regs["rax"] & MASK32)
    if msr == MSR_AMD64_SEV_ES_GHCB and v.vm.sev_es:
        v.ghcb_msr = value
        return insn.next
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


def exit_wbinvd(v: VCpu, insn: Insn) -> int:
    """KVM intercepts WBINVD; with no device DMA to flush for, it completes as a no-op."""
    return insn.next


def port_io(vm: VM, io: PortIo) -> None:
    """The host's port model (what an IN/OUT exit and the GHCB's IOIO exit both reach): OUT to
    the debug port appends to the VM's debug log, other OUTs are logged; IN reads the VM's
    port model."""
    if not io.write:
        io.value = vm.port_read(io.port, io.size)
    elif io.port == DEBUG_PORT:
        vm.debug_log += (io.value & ((1 << 8 * io.size) - 1)).to_bytes(io.size, "little")
    else:
        vm.io_log.append((io.port, io.size, io.value))


def exit_io(v: VCpu, io: PortIo) -> None:
    port_io(v.vm, io)


def exit_vmgexit(v: VCpu, insn: Insn) -> int:
    """VMGEXIT: the host reads the GHCB MSR (and the GHCB page it names) and serves the request
    (emulate.ghcb); the guest continues after the instruction unless the run ends there."""
    v.vm.ghcb.vmgexit(v)
    return insn.next


def host_exit_table() -> dict[str, ExitHandler]:
    """The table of a VM whose exits all go to the host (no SEV, or plain SEV). There VMGEXIT
    is a VMMCALL (the REP prefix is ignored)."""
    entries = [
        ExitHandler("cpuid", SVM_EXIT_CPUID, exit_cpuid),
        ExitHandler("rdmsr", SVM_EXIT_MSR, exit_rdmsr),
        ExitHandler("wrmsr", SVM_EXIT_MSR, exit_wrmsr),
        ExitHandler("io", SVM_EXIT_IOIO, exit_io),
        ExitHandler("vmmcall", SVM_EXIT_VMMCALL, exit_vmmcall),
        ExitHandler("wbinvd", SVM_EXIT_WBINVD, exit_wbinvd),
        ExitHandler("hlt", SVM_EXIT_HLT, exit_hlt, automatic=True),
        ExitHandler("vmgexit", None, exit_vmmcall),
        ExitHandler("rdrand", None, exit_rdrand),
        ExitHandler("fault", None, idt.deliver),
    ]
    return {e.kind: e for e in entries}


# ---- SEV-ES: #VC instead of the exit ----------------------------------------------------------
ES_NO_INTERCEPT_MSRS = NATIVE_MSRS | {MSR_AMD64_SEV, MSR_AMD64_SEV_ES_GHCB}


def raise_vc(v: VCpu, insn: Insn, kind: str, code: int) -> int | None:
    """#VC at the instruction (it does not execute): error code = the SVM exit code."""
    return v.raise_fault("#VC", insn.addr, f"{kind} under SEV-ES", error_code=code)


def vc_entry(e: ExitHandler) -> ExitHandler:
    """An SEV-ES entry for intercept `e`: the guest gets #VC instead of the host an exit."""
    code = e.svm_exit_code
    assert code is not None

    def handle(v: VCpu, event: Insn | PortIo) -> int | None:
        if isinstance(event, PortIo):  # INS/OUTS (not scanned): it is already executing
            return v.raise_fault("error", event.rip, "string I/O under SEV-ES is not modelled "
                                 "(an INS/OUTS would be a #VC)")
        return raise_vc(v, event, e.kind, code)

    return ExitHandler(e.kind, code, handle)


def vc_msr_entry(e: ExitHandler) -> ExitHandler:
    """RDMSR/WRMSR under SEV-ES: a #VC, except for the MSRs KVM does not intercept (the CPU's
    own, MSR_AMD64_SEV, the GHCB MSR), which keep the default behaviour."""
    code = e.svm_exit_code
    assert code is not None

    def handle(v: VCpu, insn: Insn) -> int | None:
        if v.regs["ecx"] & MASK32 in ES_NO_INTERCEPT_MSRS:
            return e.handle(v, insn)
        return raise_vc(v, insn, e.kind, code)

    return ExitHandler(e.kind, code, handle)


def sev_es_exit_table() -> dict[str, ExitHandler]:
    """The table of an SEV-ES VM: non-automatic exits become #VC, VMGEXIT exits to the host."""
    table = host_exit_table()
    for kind, e in table.items():
        if e.svm_exit_code is None or e.automatic:
            continue
        table[kind] = vc_msr_entry(e) if kind in ("rdmsr", "wrmsr") else vc_entry(e)
    table["vmgexit"] = ExitHandler("vmgexit", None, exit_vmgexit, automatic=True)
    return table


# ---- finding the intercepted instructions ----------------------------------------------------
def scan_io_candidates(code: bytes) -> set[int]:
    """Offsets in `code` where an IN/OUT may start: each of their opcode bytes, and a 0x66
    operand-size prefix before it."""
    cands: set[int] = set()
    for i, b in enumerate(code):
        if b in IO_OPCODES:
            cands.add(i)
            if i and code[i - 1] == IO_PREFIX:
                cands.add(i - 1)
    return cands


def _modrm_fits(pat: bytes, code: bytes, i: int) -> bool:
    """The ModRM byte after a two-byte opcode that needs one: RDRAND (0F C7 /6, a register),
    MOV to CRn (0F 22, a register), INVLPG (0F 01 /7, a memory operand). Fewer false
    candidates: each is a code hook, and unicorn checks every code hook at each instruction of
    a run with an instruction budget."""
    if pat not in MODRM_RULES:
        return True
    if i + 2 >= len(code):
        return False
    m = code[i + 2]
    register, reg = MODRM_RULES[pat]
    return (m & 0xC0 == 0xC0) == register and (reg is None or (m >> 3) & 7 == reg)


def scan_candidates(code: bytes) -> set[int]:
    """Offsets in `code` where an intercepted instruction may start: each opcode of
    SCAN_OPCODES and up to two REX/0x66 prefix bytes before it. A false candidate is harmless:
    a hook there never fires (not an instruction start) or its decode names no exit."""
    cands: set[int] = set()
    for pat in SCAN_OPCODES:
        i = code.find(pat)
        while i >= 0:
            if _modrm_fits(pat, code, i):
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
        self.scan_io = vcpu.vm.sev_es  # an IN/OUT must become a #VC before it executes
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
        code = bytes(self.vcpu.mc.mem[page_hpa : page_hpa + PAGE])
        cands = scan_candidates(code)
        if self.scan_io:
            cands |= scan_io_candidates(code)
        for off in cands:
            addr = page_va + off
            if addr not in self._hooks:
                self._hooks[addr] = self.vcpu.uc.hook_add(UC_HOOK_CODE, self._on_code, None,
                                                           addr, addr)

    def reset(self) -> None:
        """Code bytes changed (the TLB is flushed with the translated code): drop every hook and
        decode; each page is scanned again on its next fetch. Why drop the hooks: unicorn checks
        every code hook at each instruction of a run with an instruction budget, so hooks of
        code that no longer runs (a driver's load-time code) would slow all later runs."""
        for h in self._hooks.values():
            self.vcpu.uc.hook_del(h)
        self._hooks.clear()
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
        if kind == "wrmsr" or insn.mnemonic == "invlpg" or (
                insn.mnemonic == "mov" and insn.op_str.startswith("cr")):
            self.vcpu.tlb.forget()  # the CPU flushes its TLB (EFER.NXE, CR0.WP may change too)
        if kind is None and self.scan_io and insn.mnemonic in IO_MNEMONICS:
            kind = "io"
        if kind is not None:
            self.vcpu.dispatch(kind, insn)

    def _on_out(self, uc: object, port: int, size: int, value: int, _ud: object) -> None:
        self.vcpu.dispatch_io(PortIo(self.vcpu.regs["rip"], port, size, value, write=True))

    def _on_in(self, uc: object, port: int, size: int, _ud: object) -> int:
        io = PortIo(self.vcpu.regs["rip"], port, size, 0, write=False)
        self.vcpu.dispatch_io(io)
        return io.value & ((1 << 8 * size) - 1)

    def _on_invalid(self, uc: object, _ud: object) -> bool:
        """unicorn has no VMMCALL nor VMGEXIT: it raises invalid-instruction; anything else is
        a #UD."""
        v = self.vcpu
        rip = v.regs["rip"]
        code = b""
        for n in (len(VMGEXIT), len(VMMCALL)):
            try:
                code = v.read_virt(rip, n)
                break
            except PageFault:
                continue
        if code[: len(VMMCALL)] == VMMCALL:
            v.dispatch("vmmcall", Insn(rip, len(VMMCALL), "vmmcall", ""))
            return True
        if code == VMGEXIT:
            v.dispatch("vmgexit", Insn(rip, len(VMGEXIT), "vmgexit", ""))
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
