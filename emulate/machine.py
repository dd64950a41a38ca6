"""The emulated machine: VMs with memslots over shared DRAM, and their vCPUs (unicorn).

Layering (why): DRAM and its encryption state live in one MemoryController shared by all VMs, so a
mirror VM can alias the main VM's pages (same HPAs, same key) and a destination VM can hold other
pages under another key. A VM is a key plus KVM_SET_USER_MEMORY_REGION-style slots (gpa, size,
hpa), its CPUID, its MSR_AMD64_SEV value, its RDRAND source and its exit table. A VCpu is one
unicorn instance in long mode; this module keeps its core (set-up, registers, the run loop and
how faults end a run). Translation is `emulate.tlb`, the exits are the VM's table in
`emulate.exits`, crash reports are `emulate.faults`, exception delivery through the guest's IDT
is `emulate.idt`, and an SEV-ES VM's VMGEXITs are served by `emulate.ghcb`.

SEV-ES per VM (`VM(sev_es=True)`): the exit table raises #VC for every non-automatic exit, the
vCPU holds the GHCB MSR, a VMGEXIT exits to the host (the VM's `ghcb`), a vCPU can wait in the
AP reset hold until the host wakes it (`VCpu.sipi`), and after launch the host API refuses its
registers (`VCpu.get/set`, `save_state/restore_state`).
"""

from __future__ import annotations

import functools
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_EXCEPTION,
    UC_ERR_INSN_INVALID,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn import x86_const as X

from emulate.cpuid import CpuidModel
from emulate.exits import (
    ExitHandler,
    Insn,
    Intercepts,
    PortIo,
    host_exit_table,
    sev_es_exit_table,
)
from emulate.faults import (
    DUMP_REGISTERS,
    BudgetExhausted,
    GuestFault,
    MemRange,
    Symbolizer,
    capture_fault,
    fault_address,
)
from emulate.ghcb import GhcbHost
from emulate.memctl import PAGE, RAW, MemoryController
from emulate.mmu import PageFault, PhysLayout, Translation
from emulate.rdrand import RdrandSource
from emulate.tlb import PARK_VA, UNTIL_VA, Tlb
from helperfw.runtime.platform import (
    GHCB_MSR_AP_RESET_HOLD_RESP,
    KVM_ENOSYS,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_MASK,
    MSR_AMD64_SEV_ENABLED,
    MSR_AMD64_SEV_ES_ENABLED,
    SVM_EXIT_NPF,
)

DEFAULT_BUDGET = 50_000_000
MASK64 = 2**64 - 1
COMMAND_HISTORY = 8  # mailbox commands a VM remembers for crash dumps

# Control-register bits (SDM vol. 3A §2.5) for a long-mode, paged, NX-enabled vCPU.
CR0_PE, CR0_ET, CR0_WP, CR0_PG = 1 << 0, 1 << 4, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_MSR = 0xC0000080
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11


@dataclass(frozen=True)
class MemSlot:
    """KVM_SET_USER_MEMORY_REGION: guest-physical [gpa, gpa+size) backed by DRAM at hpa.
    `label` says what it holds, for crash dumps."""

    gpa: int
    size: int
    hpa: int
    label: str = ""


@dataclass
class Exit:
    """Why `VCpu.run` returned: "hlt", "fault" (see .fault), "budget", "stop" (a handler asked),
    or, under SEV-ES, "reset_hold" (the vCPU waits in the AP reset hold for `VCpu.sipi`),
    "terminate" (the guest asked the host to end it) or "invalid" (a VMGEXIT the host cannot
    serve: KVM fails KVM_RUN)."""

    reason: str
    rip: int
    fault: GuestFault | None = None
    detail: str = ""

    def __str__(self) -> str:
        if self.fault:
            return str(self.fault)
        return f"{self.reason} at RIP {self.rip:#x}" + (f": {self.detail}" if self.detail else "")


HypercallHandler = Callable[["VCpu", int, int, int, int, int], int]
"""handler(vcpu, nr, a0=rbx, a1=rcx, a2=rdx, a3=rsi) -> value for rax."""


@dataclass
class HypercallLog:
    """Default host side: records hypercalls, accepts KVM_HC_MAP_GPA_RANGE, -KVM_ENOSYS otherwise."""

    calls: list[tuple[int, int, int, int, int]] = field(default_factory=list)

    def __call__(self, vcpu: VCpu, nr: int, a0: int, a1: int, a2: int, a3: int) -> int:
        self.calls.append((nr, a0, a1, a2, a3))
        return 0 if nr == KVM_HC_MAP_GPA_RANGE else (-KVM_ENOSYS) & MASK64

    @property
    def map_gpa_ranges(self) -> list[tuple[int, int, bool, int]]:
        """(gpa, pages, encrypted, page_size_code) for each KVM_HC_MAP_GPA_RANGE call."""
        return [(a0, a1, bool(a2 & KVM_MAP_GPA_RANGE_ENCRYPTED),
                 a2 & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK)
                for nr, a0, a1, a2, _ in self.calls if nr == KVM_HC_MAP_GPA_RANGE]


class VM:
    """One KVM VM: an encryption key (own, or the main VM's for a mirror), memslots, CPUID, the
    MSR_AMD64_SEV value, an RDRAND source, the exit table, and the host callbacks for hypercalls,
    MSR_KVM_MIGRATION_CONTROL and port reads.

    `sev_status` (MSR_AMD64_SEV) defaults to what CPUID and `sev_es` say but is set on its own, so
    a test can model a host whose CPUID claims SEV while the MSR denies it; `sev_es` defaults to
    what the CPUID model reports. A mirror inherits the main VM's CPUID, SEV status and SEV-ES
    flag, and forks its own RDRAND stream. `ghcb` is the host's side of VMGEXIT (KVM's), with
    the AP jump table the guest registered."""

    def __init__(self, mc: MemoryController, *, cpuid: CpuidModel | None = None,
                 mirror_of: VM | None = None, key: bytes | None = None, name: str = "vm",
                 rdrand_seed: int | bytes = 0, rdrand: RdrandSource | None = None,
                 sev_status: int | None = None, sev_es: bool | None = None) -> None:
        self.mc = mc
        self.name = name
        self.cpuid = cpuid or (mirror_of.cpuid if mirror_of else CpuidModel())
        self.key_id = mirror_of.key_id if mirror_of else mc.new_key(key)
        self.mirror_of = mirror_of
        if sev_es is None:
            sev_es = mirror_of.sev_es if mirror_of else self.cpuid.sev_es
        self.sev_es = sev_es
        if sev_status is None:
            sev_status = mirror_of.sev_status if mirror_of else (
                (MSR_AMD64_SEV_ENABLED if self.cpuid.sev else 0)
                | (MSR_AMD64_SEV_ES_ENABLED if self.sev_es else 0))
        self.sev_status = sev_status
        self.rdrand = rdrand or (mirror_of.rdrand.fork(name) if mirror_of
                                 else RdrandSource(rdrand_seed))
        self.exits: dict[str, ExitHandler] = sev_es_exit_table() if sev_es else host_exit_table()
        self.ghcb = GhcbHost(self)
        self.slots: dict[int, MemSlot] = {}
        self.debug_log = bytearray()
        self.io_log: list[tuple[int, int, int]] = []
        self.commands: deque[str] = deque(maxlen=COMMAND_HISTORY)
        self.hypercall_log = HypercallLog()
        self.hypercall: HypercallHandler = self.hypercall_log
        self.migration_control = 0
        self.msr_read: Callable[[int], int] = lambda msr: self.migration_control
        self.msr_write: Callable[[int, int], None] = self._default_msr_write
        self.port_read: Callable[[int, int], int] = lambda port, size: (1 << 8 * size) - 1
        self.vcpus: list[VCpu] = []
        c = self.cpuid
        assert c.maxphyaddr is not None
        self.layout = PhysLayout(maxphyaddr=c.maxphyaddr, cbit=c.cbit if c.sev else None,
                                 reduction=c.reduction if c.sev else 0)

    def _default_msr_write(self, msr: int, value: int) -> None:
        self.migration_control = value

    @property
    def sev(self) -> bool:
        return self.cpuid.sev

    def note_command(self, text: str) -> None:
        """Remember a mailbox command (one line) for the crash dump of this VM's next fault."""
        self.commands.append(text)

    def note_write(self, hpa: int, n: int) -> None:
        """Guest memory [hpa, hpa+n) was written on the guest's behalf outside unicorn (an
        exception frame the CPU pushed, firmware modelled in Python): KVM's dirty log sees it."""

    def fill_permissions(self, page_hpa: int, write: bool, perms: int) -> int:
        """The unicorn permissions a TLB entry for `page_hpa` gets (a `write` access filled it).
        A plain VM grants what the page tables allow; KVM's dirty log narrows this."""
        return perms

    # ---- memslots -------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, hpa: int,
                               label: str = "") -> None:
        """Create/replace slot `slot`; size 0 deletes it. Page aligned, no overlap (as KVM)."""
        self.slots.pop(slot, None)
        if size:
            if (gpa | size | hpa) % PAGE:
                raise ValueError("memslot not page aligned")
            if hpa + size > self.mc.size:
                raise ValueError("memslot outside DRAM")
            for s in self.slots.values():
                if gpa < s.gpa + s.size and s.gpa < gpa + size:
                    raise ValueError("memslots overlap")
            self.slots[slot] = MemSlot(gpa, size, hpa, label)
        for v in self.vcpus:
            v.flush_tlb()

    def gpa_to_hpa(self, gpa: int) -> int | None:
        for s in self.slots.values():
            if s.gpa <= gpa < s.gpa + s.size:
                return s.hpa + (gpa - s.gpa)
        return None

    def _hpa(self, gpa: int) -> int:
        hpa = self.gpa_to_hpa(gpa)
        if hpa is None:
            raise KeyError(f"GPA {gpa:#x} not in any memslot of {self.name}")
        return hpa

    def memory_map(self) -> list[MemRange]:
        """Every memslot split into runs of pages with the same view in the memory controller
        (C=1 under some key, or C=0 raw), by GPA: the crash dump's memory map."""
        out: list[MemRange] = []
        for n, s in sorted(self.slots.items(), key=lambda kv: kv[1].gpa):
            first = s.hpa // PAGE
            off = 0
            for state, run in itertools.groupby(self.mc.state[first : first + s.size // PAGE]):
                size = sum(1 for _ in run) * PAGE
                view = "C=0" if state == RAW else f"C=1 key {state}"
                out.append(MemRange(n, s.label, s.gpa + off, size, s.hpa + off, view))
                off += size
        return out

    # ---- guest-context memory access (what this VM sees; encrypted = C-bit of the mapping) --
    def read(self, gpa: int, n: int, *, encrypted: bool | None = None) -> bytes:
        enc = self.sev if encrypted is None else encrypted
        out = bytearray()
        end = gpa + n
        while gpa < end:
            ln = min(PAGE - gpa % PAGE, end - gpa)
            out += self.mc.guest_read(self._hpa(gpa), ln, self.key_id, enc)
            gpa += ln
        return bytes(out)

    def write(self, gpa: int, data: bytes, *, encrypted: bool | None = None) -> None:
        enc = self.sev if encrypted is None else encrypted
        pos = 0
        while pos < len(data):
            ln = min(PAGE - (gpa + pos) % PAGE, len(data) - pos)
            self.mc.guest_write(self._hpa(gpa + pos), bytes(data[pos : pos + ln]), self.key_id, enc)
            pos += ln

    def read_u64(self, gpa: int, *, encrypted: bool | None = None) -> int:
        return int.from_bytes(self.read(gpa, 8, encrypted=encrypted), "little")

    def write_u64(self, gpa: int, value: int, *, encrypted: bool | None = None) -> None:
        self.write(gpa, (value & MASK64).to_bytes(8, "little"), encrypted=encrypted)

    def create_vcpu(self, *, rip: int = 0, cr3: int = 0, rsp: int = 0,
                    symbolize: Symbolizer | None = None) -> VCpu:
        return VCpu(self, rip=rip, cr3=cr3, rsp=rsp, symbolize=symbolize)


@functools.cache
def _reg_id(name: str) -> int:
    return getattr(X, "UC_X86_REG_" + name.upper())


_MMX = {f"mm{i}": X.UC_X86_REG_FP0 + i for i in range(8)}


class Registers:
    """The register file as the CPU sees it: exit handlers and code that models guest software
    (the UEFI stand-in) use this. The host's access goes through `VCpu.get/set`, which refuse an
    SEV-ES vCPU after launch."""

    __slots__ = ("_uc",)

    def __init__(self, uc: Uc) -> None:
        self._uc = uc

    def __getitem__(self, name: str) -> int:
        if name in _MMX:  # unicorn reads MMn as 0; the value is x87 register n's mantissa
            return self._uc.reg_read(_MMX[name])[0]
        return self._uc.reg_read(_reg_id(name))

    def __setitem__(self, name: str, value: int) -> None:
        if name in _MMX:
            self._uc.reg_write(_MMX[name], (value & MASK64, 0xFFFF))
            return
        self._uc.reg_write(_reg_id(name), value & MASK64)

    def snapshot(self, names: tuple[str, ...] = DUMP_REGISTERS) -> dict[str, int]:
        return {n: self[n] for n in names}


class RegisterAccessDenied(PermissionError):
    """The host tried to read or write the registers of an SEV-ES vCPU after launch."""


class VCpu:
    """A vCPU of `vm` in 64-bit long mode with paging (CR0.PG|WP, CR4.PAE, EFER.LME|LMA|NXE).

    `run()` executes until hlt, a fault, a handler's `request_stop`, or the instruction budget,
    and returns an Exit. `symbolize(rip) -> str` names addresses in fault reports."""

    def __init__(self, vm: VM, *, rip: int, cr3: int, rsp: int,
                 symbolize: Symbolizer | None = None) -> None:
        self.vm = vm
        self.mc = vm.mc
        self.index = len(vm.vcpus)
        self.symbolize = symbolize
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.mem_map_ptr(0, self.mc.size, UC_PROT_ALL, self.mc.ptr)
        self.regs = Registers(uc)
        self.tlb = Tlb(self)
        self.intercepts = Intercepts(self)  # installs the hooks that catch the exits
        self.launched = False
        self.ghcb_msr = 0  # MSR 0xC0010130: in the (encrypted) VMSA; KVM sees it on VMGEXIT
        self.exceptions_delivered = 0  # faults the guest took through its IDT
        self.hold: tuple[str, int] | None = None  # AP reset hold: ("msr" | "ghcb", GHCB GPA)
        self.terminated: str | None = None  # the guest's termination request, once made
        self._code_dirty = False
        self._fault: GuestFault | None = None
        self._stop_reason: str | None = None
        self._stop_kind = "stop"
        self._resume_rip: int | None = None
        self._hlt_at: int | None = None
        self._long_mode(rip, cr3, rsp)
        vm.vcpus.append(self)
        self.mc.register_flush(self._refill_views, self._mark_code_dirty, self.flush_tlb)

    def _long_mode(self, rip: int, cr3: int, rsp: int) -> None:
        r = self.regs
        r["cr4"] = r["cr4"] | CR4_PAE
        self.uc.msr_write(EFER_MSR, EFER_LME | EFER_LMA | EFER_NXE)
        r["cr0"] = CR0_PE | CR0_ET | CR0_WP | CR0_PG
        r["cr3"], r["rip"], r["rsp"] = cr3, rip, rsp

    # ---- the host's register API ------------------------------------------------------------
    def launch(self) -> None:
        """LAUNCH_UPDATE_VMSA: the initial state is final. From now on an SEV-ES vCPU's
        registers live in its encrypted VMSA; the first `run` launches implicitly."""
        self.launched = True

    def _host_access(self, reg: str, what: str) -> None:
        if self.launched and self.vm.sev_es:
            raise RegisterAccessDenied(
                f"{self.vm.name} vCPU {self.index} is an SEV-ES vCPU: after launch its registers "
                f"are encrypted in the VMSA, the host cannot {what} {reg}")

    def get(self, reg: str) -> int:
        """Host read of a register (KVM_GET_REGS); refused for a launched SEV-ES vCPU."""
        self._host_access(reg, "read")
        return self.regs[reg]

    def set(self, reg: str, value: int) -> None:
        """Host write of a register (KVM_SET_REGS); refused for a launched SEV-ES vCPU."""
        self._host_access(reg, "write")
        self.regs[reg] = value

    def save_state(self) -> object:
        """The whole architectural state (a host that snapshots the VM: KVM_GET_REGS, SREGS,
        FPU, MSRs at once); refused for a launched SEV-ES vCPU (its VMSA is encrypted and
        integrity-checked: the host can neither read it nor put an old one back)."""
        self._host_access("state", "save")
        return self.uc.context_save()

    def restore_state(self, state: object) -> None:
        self._host_access("state", "restore")
        self.uc.context_restore(state)  # type: ignore[arg-type]
        self.flush_tlb()  # CR3, CR0, CR4 and EFER come back too

    def sipi(self) -> None:
        """Wake a vCPU waiting in the AP reset hold (INIT-SIPI under SEV-ES): "start this vCPU
        at its jump table" is all a host can ask, since it cannot set the registers. As KVM
        does, the hold's VMGEXIT completes with a non-zero result (GHCB SwExitInfo2 = 1, or the
        MSR protocol's response bits 63:12 = 1); the guest's own hold loop then jumps through
        the AP jump table it knows."""
        if self.hold is None:
            raise RuntimeError(f"{self.vm.name} vCPU {self.index} is not in the AP reset hold")
        kind, gpa = self.hold
        if kind == "msr":
            self.ghcb_msr = GHCB_MSR_AP_RESET_HOLD_RESP | 1 << 12
        else:
            self.vm.ghcb.wake(gpa)
        self.hold = None

    # ---- translation (emulate.tlb) ------------------------------------------------------------
    @property
    def fills(self) -> int:
        return self.tlb.fills

    def translate(self, va: int, access: str = "read") -> tuple[Translation, int]:
        """(translation, hpa) for `va` with this vCPU's CR3; raises PageFault."""
        return self.tlb.translate(va, access)

    def read_virt(self, va: int, n: int) -> bytes:
        return self.tlb.read_virt(va, n)

    def write_virt(self, va: int, data: bytes) -> None:
        self.tlb.write_virt(va, data)

    def flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        self.tlb.forget()

    def _refill_views(self) -> None:
        """A page changed its view (memory controller): every TLB entry must be filled again,
        where the fill makes each page's view, but no translation changed."""
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _mark_code_dirty(self) -> None:
        self._code_dirty = True

    # ---- exits (the VM's table, emulate.exits) ------------------------------------------------
    def dispatch(self, kind: str, insn: Insn) -> None:
        """An intercepted instruction is about to execute: its table entry decides what happens;
        a fault it raised, or a stop a host callback asked for, ends the run."""
        nxt = self.vm.exits[kind].handle(self, insn)
        if self._fault is not None:
            self.regs["rip"] = PARK_VA
        elif nxt is not None:
            self._advance(nxt)

    def _advance(self, next_rip: int) -> None:
        """Continue at next_rip, or park (ending the run) if a host callback asked to stop."""
        if self._stop_reason is not None:
            self._resume_rip = next_rip
            next_rip = PARK_VA
        self.regs["rip"] = next_rip

    def continue_at(self, next_rip: int) -> None:
        """For guest software modelled in Python (the UEFI stand-in's #VC handler): continue
        the guest at next_rip, or end the run there if the host asked to stop meanwhile."""
        self._advance(next_rip)

    def take_fault(self, kind: str, rip: int, reason: str, **kw: object) -> None:
        """For guest software modelled in Python: the guest takes fault `kind` at `rip` now; it
        continues at the handler its IDT names, or the run ends with the crash report."""
        resume = self.raise_fault(kind, rip, reason, **kw)
        self.regs["rip"] = PARK_VA if resume is None else resume

    def dispatch_io(self, io: PortIo) -> None:
        """An IN/OUT, from inside the instruction: its entry handles it; a fault or a stop ends
        the run at the end of the block (unicorn completes the instruction itself)."""
        self.vm.exits["io"].handle(self, io)
        if self.ending:
            self.uc.emu_stop()

    @property
    def pending_fault(self) -> GuestFault | None:
        """The fault that ends the current run, once one was raised."""
        return self._fault

    @property
    def ending(self) -> bool:
        """A fault or a stop request ends the current run."""
        return self._fault is not None or self._stop_reason is not None

    def note_hlt(self, addr: int) -> None:
        """The HLT at `addr` is about to end the run (a guest HLT, not the park page's)."""
        self._hlt_at = addr

    def request_stop(self, reason: str = "stop", kind: str = "stop") -> None:
        """From a handler (hypercall, MSR callback, VMGEXIT): end the current run after this
        exit with Exit(kind); the next run resumes after the instruction."""
        self._stop_reason = reason
        self._stop_kind = kind

    def enter_reset_hold(self, kind: str, ghcb_gpa: int = 0) -> None:
        """VMGEXIT AP_RESET_HOLD (by the MSR or the GHCB page protocol): the run ends and the
        vCPU waits until the host calls `sipi`."""
        self.hold = (kind, ghcb_gpa)
        self.request_stop("AP reset hold: waiting for INIT-SIPI", kind="reset_hold")

    def terminate(self, reason: str) -> None:
        """The guest asked the host to end it (GHCB termination request): the run ends and the
        vCPU never runs again."""
        self.terminated = reason
        self.request_stop(reason, kind="terminate")

    # ---- faults ---------------------------------------------------------------------------------
    def raise_fault(self, kind: str, rip: int, reason: str, **kw: object) -> int | None:
        """The guest takes a fault at `rip`: the table's "fault" entry delivers it (returns the
        RIP to continue at) or not (returns None; the run ends with the crash report, which is
        only built then: delivered faults, e.g. every #VC of an SEV-ES guest, stay cheap)."""
        event = GuestFault(kind, rip, reason, **kw)  # type: ignore[arg-type]
        resume = self.vm.exits["fault"].handle(self, event)
        if resume is None and self._fault is None:
            self._fault = capture_fault(self, kind, rip, reason, delivery=event.delivery, **kw)
        return resume

    def _memory_fault(self, pf: PageFault, rip: int) -> int | None:
        """The walk failure the TLB fill kept, raised as #PF at `rip`. A GPA without memslot is
        a nested-paging miss: an exit to the host ("NPF", the run ends), except for an SEV-ES
        guest, where KVM's MMIO handling makes it a #VC (error code SVM_EXIT_NPF)."""
        cr2 = fault_address(self, pf, rip)
        if pf.gpa_missing is None:
            return self.raise_fault("#PF", rip, pf.reason, cr2=cr2, access=pf.access,
                                    error_code=pf.error_code)
        if self.vm.sev_es:
            return self.raise_fault("#VC", rip, f"NPF under SEV-ES: {pf.reason}", cr2=cr2,
                                    access=pf.access, error_code=SVM_EXIT_NPF)
        return self.raise_fault("NPF", rip, pf.reason, cr2=cr2, access=pf.access,
                                error_code=pf.error_code)

    # ---- run loop ---------------------------------------------------------------------------
    def _prepare(self) -> None:
        if self._code_dirty:
            self.uc.ctl_flush_tb()
            self.intercepts.reset()
            self._code_dirty = False
            self.flush_tlb()
        # No TLB flush otherwise: page-state changes and memslot updates flush every vCPU.
        self._fault = self.tlb.pending_pf = None
        self._stop_reason = self._resume_rip = self._hlt_at = None
        self._stop_kind = "stop"

    def run(self, budget: int | None = DEFAULT_BUDGET) -> Exit:
        """Run from the current RIP. budget: max instructions (None = unlimited; counted again
        from zero after a fault the guest handles)."""
        self.launch()
        if self.terminated is not None:
            return Exit("terminate", self.regs["rip"], detail=self.terminated)
        if self.hold is not None:
            return Exit("reset_hold", self.regs["rip"], detail="waiting for INIT-SIPI")
        self._prepare()
        while True:
            err: UcError | None = None
            try:
                self.uc.emu_start(self.regs["rip"], UNTIL_VA, count=budget or 0)
            except UcError as e:
                err = e
            ex = self._outcome(err, budget)
            if ex is not None:
                return ex
            self.tlb.pending_pf = None

    def _outcome(self, err: UcError | None, budget: int | None) -> Exit | None:
        """The Exit for how emulation stopped, or None if a fault was delivered in the guest
        and emulation goes on (RIP is then the guest's handler)."""
        rip = self.regs["rip"]
        if self._fault is None and err is not None:
            pf = self.tlb.pending_pf
            if err.errno == UC_ERR_EXCEPTION and pf is not None:
                resume = self._memory_fault(pf, rip)
            elif err.errno == UC_ERR_INSN_INVALID:
                resume = self.raise_fault("#UD", rip, "invalid instruction")
            else:
                resume = self.raise_fault("error", rip, f"unicorn: {err}")
            if resume is not None:
                self.regs["rip"] = resume
                return None
        if self._fault is not None:
            if rip & ~(PAGE - 1) == PARK_VA:
                self.regs["rip"] = self._fault.rip  # parked by a handler: back at the insn
            return Exit("fault", self._fault.rip, self._fault)
        if self._stop_reason is not None:
            resume = rip if self._resume_rip is None else self._resume_rip  # None: an IN/OUT
            self.regs["rip"] = resume
            return Exit(self._stop_kind, resume, detail=self._stop_reason)
        if self._hlt_at is not None and rip == self._hlt_at + 1:
            return Exit("hlt", rip)
        return Exit("budget", rip, detail=f"budget exhausted after {budget} instructions")

    def run_to_hlt(self, budget: int | None = DEFAULT_BUDGET) -> Exit:
        """run(), but a fault raises GuestFault and budget exhaustion raises BudgetExhausted."""
        ex = self.run(budget)
        if ex.fault is not None:
            raise ex.fault
        if ex.reason == "budget":
            sym = self.symbolize(ex.rip) if self.symbolize else ""
            raise BudgetExhausted(ex.rip, budget or 0, sym)
        return ex

