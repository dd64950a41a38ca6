"""The emulated machine: shared DRAM, VMs with memslots, vCPUs (unicorn) and their exits.

Layering (why): DRAM and its encryption state live in one MemoryController shared by all VMs, so a
mirror VM can alias the main VM's pages (same HPAs, same key) and a destination VM can hold other
pages under another key. A VM is a key plus KVM_SET_USER_MEMORY_REGION-style slots (gpa, size,
hpa). A VCpu is one unicorn instance in long mode whose TLB is filled by the Python page walk
(emulate.mmu) through the VM's slots, so GPAs far above unicorn's 40-bit limit work.

Exits handled in Python: vmmcall (KVM hypercall ABI), rdmsr/wrmsr (hooked: unicorn drops unknown
MSRs), cpuid, OUT to the debug port, rdrand (deterministic), hlt, faults, instruction budget.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import capstone
from unicorn import (
    UC_ARCH_X86,
    UC_CTL_IO_WRITE,
    UC_CTL_TLB_FLUSH,
    UC_ERR_EXCEPTION,
    UC_ERR_INSN_INVALID,
    UC_HOOK_CODE,
    UC_HOOK_INSN,
    UC_HOOK_INSN_INVALID,
    UC_HOOK_INTR,
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_WRITE,
    UC_MODE_64,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
    Uc,
    UcError,
)
from unicorn import x86_const as X

from emulate.cpuid import CpuidModel
from emulate.faults import BudgetExhausted, GuestFault, Symbolizer, disassemble_one
from emulate.memctl import PAGE, MemoryController
from emulate.mmu import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    PageFault,
    PhysLayout,
    Translation,
    walk,
)
from helperfw.runtime.platform import (
    DEBUG_PORT,
    KVM_ENOSYS,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    MSR_AMD64_SEV,
    MSR_KVM_MIGRATION_CONTROL,
)

# MSRs unicorn/QEMU implement itself; anything else not emulated here is a #GP.
NATIVE_MSRS = frozenset({
    0x10, 0x1B, 0x174, 0x175, 0x176, 0x277, 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083,
    0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102, 0xC0000103,
})

DEFAULT_BUDGET = 50_000_000

# Control-register bits (SDM vol. 3A §2.5) for a long-mode, paged, NX-enabled vCPU.
CR0_PE, CR0_WP, CR0_PG = 1 << 0, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
EFER_MSR = 0xC0000080
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11

# Park page: a VA the fill hook maps to a page of HLT bytes. Moving RIP there ends a run at once
# (emu_stop only takes effect at the end of a translation block); unicorn also probes the page of
# `until - 1` at the end of a run, so `until` is placed right after it.
PARK_VA = 0xFFFF_FFFF_FFFF_E000
UNTIL_VA = PARK_VA + PAGE

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS.detail = True

_GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
          *(f"r{i}" for i in range(8, 16)))
_SUBREG: dict[str, tuple[str, int]] = {}
for _i, _n in enumerate(("ax", "bx", "cx", "dx", "si", "di", "bp", "sp")):
    _SUBREG["r" + _n] = ("r" + _n, 64)
    _SUBREG["e" + _n] = ("r" + _n, 32)
    _SUBREG[_n] = ("r" + _n, 16)
for _i in range(8, 16):
    _SUBREG[f"r{_i}"] = (f"r{_i}", 64)
    _SUBREG[f"r{_i}d"] = (f"r{_i}", 32)
    _SUBREG[f"r{_i}w"] = (f"r{_i}", 16)


def _reg_id(name: str) -> int:
    return getattr(X, "UC_X86_REG_" + name.upper())


@dataclass(frozen=True)
class MemSlot:
    """KVM_SET_USER_MEMORY_REGION: guest-physical [gpa, gpa+size) backed by DRAM at hpa."""

    gpa: int
    size: int
    hpa: int


@dataclass
class Exit:
    """Why `VCpu.run` returned: "hlt", "fault" (see .fault), "budget" or "stop" (a handler asked)."""

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
        return 0 if nr == KVM_HC_MAP_GPA_RANGE else (-KVM_ENOSYS) & (2**64 - 1)

    @property
    def map_gpa_ranges(self) -> list[tuple[int, int, bool, int]]:
        """(gpa, pages, encrypted, page_size_code) for each KVM_HC_MAP_GPA_RANGE call."""
        return [(a0, a1, bool(a2 & KVM_MAP_GPA_RANGE_ENCRYPTED), a2 & 0xF)
                for nr, a0, a1, a2, _ in self.calls if nr == KVM_HC_MAP_GPA_RANGE]


class VM:
    """One KVM VM: an encryption key (own, or the main VM's for a mirror), memslots, CPUID, and
    the host callbacks for hypercalls and MSR_KVM_MIGRATION_CONTROL."""

    def __init__(self, mc: MemoryController, *, cpuid: CpuidModel | None = None,
                 mirror_of: VM | None = None, key: bytes | None = None, name: str = "vm",
                 rdrand_seed: int = 0) -> None:
        self.mc = mc
        self.name = name
        self.cpuid = cpuid or (mirror_of.cpuid if mirror_of else CpuidModel())
        self.key_id = mirror_of.key_id if mirror_of else mc.new_key(key)
        self.mirror_of = mirror_of
        self.slots: dict[int, MemSlot] = {}
        self.debug_log = bytearray()
        self.io_log: list[tuple[int, int, int]] = []
        self.hypercall_log = HypercallLog()
        self.hypercall: HypercallHandler = self.hypercall_log
        self.migration_control = 0
        self.msr_read: Callable[[int], int] = lambda msr: self.migration_control
        self.msr_write: Callable[[int, int], None] = self._default_msr_write
        self.rdrand = random.Random(rdrand_seed)
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

    # ---- memslots -------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, gpa: int, size: int, hpa: int) -> None:
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
            self.slots[slot] = MemSlot(gpa, size, hpa)
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
        self.write(gpa, (value & (2**64 - 1)).to_bytes(8, "little"), encrypted=encrypted)

    def create_vcpu(self, *, rip: int = 0, cr3: int = 0, rsp: int = 0,
                    symbolize: Symbolizer | None = None) -> VCpu:
        return VCpu(self, rip=rip, cr3=cr3, rsp=rsp, symbolize=symbolize)


class VCpu:
    """A vCPU of `vm` in 64-bit long mode with paging (CR0.PG|WP, CR4.PAE, EFER.LME|LMA|NXE).

    `run()` executes until hlt, a fault, a handler's `request_stop`, or the instruction budget,
    and returns an Exit. `symbolize(rip) -> str` names addresses in fault reports."""

    def __init__(self, vm: VM, *, rip: int, cr3: int, rsp: int,
                 symbolize: Symbolizer | None = None) -> None:
        self.vm = vm
        self.mc = vm.mc
        self.symbolize = symbolize
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
        uc.mem_map_ptr(0, self.mc.size, UC_PROT_ALL, self.mc.ptr)
        self._park_hpa = self.mc.size
        uc.mem_map(self._park_hpa, PAGE, UC_PROT_ALL)
        uc.mem_write(self._park_hpa, b"\xf4" * PAGE)
        self._hooks = [
            uc.hook_add(UC_HOOK_TLB_FILL, self._on_tlb_fill),
            uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID),
            uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT),
            uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid),
            uc.hook_add(UC_HOOK_INTR, self._on_intr),
        ]
        self._scanned: set[tuple[int, int]] = set()
        self._special_hooks: dict[int, int] = {}
        self._decoded: dict[int, tuple[str, int, str]] = {}
        self._code_dirty = False
        self._fault: GuestFault | None = None
        self._pending_pf: PageFault | None = None
        self._stop_reason: str | None = None
        self._resume_rip: int | None = None
        self._hlt_at: int | None = None
        self.fills = 0
        cr4 = uc.reg_read(X.UC_X86_REG_CR4)
        uc.reg_write(X.UC_X86_REG_CR4, cr4 | CR4_PAE)
        uc.msr_write(EFER_MSR, EFER_LME | EFER_LMA | EFER_NXE)
        uc.reg_write(X.UC_X86_REG_CR0, CR0_PE | CR0_WP | CR0_PG | 0x10)
        self.set("cr3", cr3)
        self.set("rip", rip)
        self.set("rsp", rsp)
        vm.vcpus.append(self)
        self.mc.register_flush(self.flush_tlb, self._mark_code_dirty)

    # ---- registers ------------------------------------------------------------------------
    def get(self, reg: str) -> int:
        return self.uc.reg_read(_reg_id(reg))

    def set(self, reg: str, value: int) -> None:
        self.uc.reg_write(_reg_id(reg), value & (2**64 - 1))

    def flush_tlb(self) -> None:
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _mark_code_dirty(self) -> None:
        self._code_dirty = True

    # ---- translation ----------------------------------------------------------------------
    def _read_qword(self, gpa: int, encrypted: bool) -> int:
        hpa = self.vm.gpa_to_hpa(gpa)
        if hpa is None:
            raise PageFault(gpa, ACCESS_READ, 0, f"page-table GPA {gpa:#x} not in any memslot",
                            gpa_missing=gpa)
        return int.from_bytes(self.mc.guest_read(hpa, 8, self.vm.key_id, encrypted), "little")

    def translate(self, va: int, access: str = ACCESS_READ) -> tuple[Translation, int]:
        """(translation, hpa) for `va` with this vCPU's CR3; raises PageFault."""
        t = walk(self._read_qword, self.get("cr3"), va, access, self.vm.layout)
        hpa = self.vm.gpa_to_hpa(t.gpa)
        if hpa is None:
            raise PageFault(va, access, 0, f"GPA {t.gpa:#x} not in any memslot",
                            gpa_missing=t.gpa)
        return t, hpa

    def read_virt(self, va: int, n: int) -> bytes:
        """Read guest-virtual memory as the guest sees it (Python walk; no state change)."""
        out = bytearray()
        end = va + n
        while va < end:
            ln = min(PAGE - va % PAGE, end - va)
            t, hpa = self.translate(va)
            out += self.mc.guest_read(hpa, ln, self.vm.key_id, t.encrypted)
            va += ln
        return bytes(out)

    def write_virt(self, va: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            ln = min(PAGE - (va + pos) % PAGE, len(data) - pos)
            t, hpa = self.translate(va + pos, ACCESS_WRITE)
            self.mc.guest_write(hpa, data[pos : pos + ln], self.vm.key_id, t.encrypted)
            pos += ln

    def _on_tlb_fill(self, uc: Uc, va: int, kind: int, entry: object, _ud: object) -> bool:
        self.fills += 1
        page_va = va & ~(PAGE - 1)
        if page_va == PARK_VA:
            entry.paddr, entry.perms = self._park_hpa, UC_PROT_READ | UC_PROT_EXEC  # type: ignore[attr-defined]
            return True
        access = ACCESS_FETCH if kind == UC_MEM_FETCH else (
            ACCESS_WRITE if kind == UC_MEM_WRITE else ACCESS_READ)
        try:
            t, hpa = self.translate(va, access)
        except PageFault as pf:
            if self._pending_pf is None:
                self._pending_pf = pf
            return False
        page_hpa = hpa & ~(PAGE - 1)
        self.mc.make_state(page_hpa, PAGE, self.vm.key_id, t.encrypted)
        perms = UC_PROT_READ | (UC_PROT_WRITE if t.writable else 0) | (
            UC_PROT_EXEC if t.executable else 0)
        entry.paddr, entry.perms = page_hpa, perms  # type: ignore[attr-defined]
        if t.executable:
            self.mc.exec_pages.add(page_hpa)
        if access == ACCESS_FETCH and (page_va, page_hpa) not in self._scanned:
            self._scanned.add((page_va, page_hpa))
            self._scan_code(page_va, bytes(self.mc.mem[page_hpa : page_hpa + PAGE]))
        return True

    # ---- special instructions found by scanning fetched pages --------------------------------
    def _scan_code(self, page_va: int, code: bytes) -> None:
        """Hook every address that may start hlt/rdmsr/wrmsr/rdrand (opcode bytes, allowing a
        REX/66 prefix). A hook at a false candidate never fires, or its decode check rejects it."""
        cands: set[int] = set()
        i = code.find(b"\xf4")
        while i >= 0:
            cands.add(i)
            i = code.find(b"\xf4", i + 1)
        for pat in (b"\x0f\x30", b"\x0f\x32", b"\x0f\xc7"):
            i = code.find(pat)
            while i >= 0:
                if pat != b"\x0f\xc7" or (i + 2 < len(code) and (code[i + 2] & 0xF8) == 0xF0):
                    cands.add(i)
                    j = i - 1
                    while j >= 0 and j >= i - 2 and (0x40 <= code[j] <= 0x4F or code[j] == 0x66):
                        cands.add(j)
                        j -= 1
                i = code.find(pat, i + 1)
        for off in cands:
            addr = page_va + off
            if addr not in self._special_hooks:
                self._special_hooks[addr] = self.uc.hook_add(
                    UC_HOOK_CODE, self._on_special, None, addr, addr)

    def _decode(self, addr: int) -> tuple[str, int, str]:
        d = self._decoded.get(addr)
        if d is None:
            try:
                code = self.read_virt(addr, 15)
            except PageFault:
                code = self.read_virt(addr, PAGE - addr % PAGE)
            d = ("", 0, "")
            for insn in _CS.disasm(code, addr, 1):
                d = (insn.mnemonic, insn.size, insn.op_str)
            self._decoded[addr] = d
        return d

    def _on_special(self, uc: Uc, addr: int, size: int, _ud: object) -> None:
        mnem, isize, ops = self._decode(addr)
        if mnem == "hlt":
            self._hlt_at = addr
        elif mnem == "rdmsr":
            self._rdmsr(addr)
        elif mnem == "wrmsr":
            self._wrmsr(addr)
        elif mnem == "rdrand":
            self._rdrand(addr, isize, ops)

    def _rdmsr(self, addr: int) -> None:
        msr = self.get("ecx") & 0xFFFFFFFF
        if msr in NATIVE_MSRS:
            return
        if msr == MSR_KVM_MIGRATION_CONTROL:
            value = self.vm.msr_read(msr)
        elif msr == MSR_AMD64_SEV:
            value = 1 if self.vm.sev else 0
        else:
            self._raise_gp(addr, f"rdmsr of unknown MSR {msr:#x}")
            return
        self.set("rax", value & 0xFFFFFFFF)
        self.set("rdx", (value >> 32) & 0xFFFFFFFF)
        self._advance(addr + 2)

    def _wrmsr(self, addr: int) -> None:
        msr = self.get("ecx") & 0xFFFFFFFF
        if msr in NATIVE_MSRS:
            return
        value = (self.get("rdx") & 0xFFFFFFFF) << 32 | (self.get("rax") & 0xFFFFFFFF)
        if msr == MSR_KVM_MIGRATION_CONTROL:
            self.vm.msr_write(msr, value)
        else:
            self._raise_gp(addr, f"wrmsr of unknown MSR {msr:#x} value {value:#x}")
            return
        self._advance(addr + 2)

    def _advance(self, next_rip: int) -> None:
        """Continue at next_rip, or park (ending the run) if a host callback asked to stop."""
        if self._stop_reason is not None:
            self._resume_rip = next_rip
            next_rip = PARK_VA
        self.set("rip", next_rip)

    def _rdrand(self, addr: int, isize: int, ops: str) -> None:
        full, bits = _SUBREG[ops.strip()]
        value = self.vm.rdrand.getrandbits(bits)
        if bits == 16:
            value |= self.get(full) & ~0xFFFF
        self.set(full, value)
        eflags = self.get("eflags") & ~0x8D5  # clear OF SF ZF AF PF CF
        self.set("eflags", eflags | 1)  # CF=1: a random value was returned
        self.set("rip", addr + isize)

    def _raise_gp(self, addr: int, reason: str) -> None:
        self._fault = self._make_fault("#GP", addr, reason)
        self.set("rip", PARK_VA)

    # ---- instruction exits ------------------------------------------------------------------
    def _on_cpuid(self, uc: Uc, _ud: object) -> bool:
        a, b, c, d = self.vm.cpuid.query(self.get("eax") & 0xFFFFFFFF, self.get("ecx") & 0xFFFFFFFF)
        self.set("rax", a)
        self.set("rbx", b)
        self.set("rcx", c)
        self.set("rdx", d)
        return True

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _ud: object) -> None:
        if port == DEBUG_PORT:
            self.vm.debug_log += (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        else:
            self.vm.io_log.append((port, size, value))

    def _on_invalid(self, uc: Uc, _ud: object) -> bool:
        rip = self.get("rip")
        try:
            code = self.read_virt(rip, 3)
        except PageFault:
            code = b""
        if code != b"\x0f\x01\xd9":  # vmmcall (AMD APM vol. 3)
            self._fault = self._make_fault("#UD", rip, "invalid instruction")
            return False
        nr = self.get("rax")
        args = (self.get("rbx"), self.get("rcx"), self.get("rdx"), self.get("rsi"))
        result = self.vm.hypercall(self, nr, *args)
        self.set("rax", result)
        if self._stop_reason is not None or self._fault is not None:
            self._resume_rip = rip + 3
            self.set("rip", PARK_VA)
        else:
            self.set("rip", rip + 3)
        return True

    def _on_intr(self, uc: Uc, intno: int, _ud: object) -> None:
        if self._fault is None:
            rip = self.get("rip")
            if intno == 3:
                rip -= 1  # int3 is a trap: RIP is past it
            self._fault = self._make_fault(f"vector {intno}", rip, "guest exception")
        uc.emu_stop()

    def request_stop(self, reason: str = "stop") -> None:
        """From a handler (hypercall, MSR callback): end the current run after this exit; the
        next run resumes after the instruction."""
        self._stop_reason = reason

    # ---- run loop ---------------------------------------------------------------------------
    def _make_fault(self, kind: str, rip: int, reason: str, **kw: object) -> GuestFault:
        try:
            disasm = disassemble_one(self.read_virt(rip, 15), rip)
        except PageFault:
            try:
                disasm = disassemble_one(self.read_virt(rip, PAGE - rip % PAGE), rip)
            except PageFault:
                disasm = "<RIP not mapped>"
        sym = self.symbolize(rip) if self.symbolize else ""
        return GuestFault(kind, rip, reason, disasm=disasm, symbol=sym, **kw)  # type: ignore[arg-type]

    def _cr2(self, pf: PageFault, rip: int) -> int:
        """The exact faulting address: unicorn hands the fill hook only the page, so recompute it
        from the faulting instruction's memory operand (falls back to the page address)."""
        page = pf.va & ~(PAGE - 1)
        if pf.access == ACCESS_FETCH:
            return rip if rip & ~(PAGE - 1) == page else pf.va
        try:
            code = self.read_virt(rip, 15)
        except PageFault:
            return pf.va
        for insn in _CS.disasm(code, rip, 1):
            for op in insn.operands:
                if op.type != capstone.x86.X86_OP_MEM:
                    continue
                m = op.mem
                ea = m.disp
                if m.base == capstone.x86.X86_REG_RIP:
                    ea += rip + insn.size
                elif m.base:
                    ea += self.get(insn.reg_name(m.base))
                if m.index:
                    ea += self.get(insn.reg_name(m.index)) * m.scale
                ea &= 2**64 - 1
                if ea & ~(PAGE - 1) == page:
                    return ea
                if (ea + op.size - 1) & ~(PAGE - 1) == page:
                    return page  # access straddling into the faulting page
        return pf.va

    def run(self, budget: int | None = DEFAULT_BUDGET) -> Exit:
        """Run from the current RIP. budget: max instructions (None = unlimited)."""
        if self._code_dirty:
            self.uc.ctl_flush_tb()
            self._scanned.clear()
            self._decoded.clear()
            self._code_dirty = False
            self.flush_tlb()
        # No TLB flush otherwise: page-state changes and memslot updates flush every vCPU.
        self._fault = self._pending_pf = None
        self._stop_reason = self._resume_rip = self._hlt_at = None
        start = self.get("rip")
        err: UcError | None = None
        try:
            self.uc.emu_start(start, UNTIL_VA, count=budget or 0)
        except UcError as e:
            err = e
        rip = self.get("rip")
        if self._fault is not None:
            if self._fault.kind == "#GP":
                self.set("rip", self._fault.rip)
            return Exit("fault", self._fault.rip, self._fault)
        if err is not None:
            if err.errno == UC_ERR_EXCEPTION and self._pending_pf is not None:
                pf = self._pending_pf
                kind = "NPF" if pf.gpa_missing is not None else "#PF"
                f = self._make_fault(kind, rip, pf.reason, cr2=self._cr2(pf, rip), access=pf.access,
                                     error_code=pf.error_code)
            elif err.errno == UC_ERR_INSN_INVALID:
                f = self._make_fault("#UD", rip, "invalid instruction")
            else:
                f = self._make_fault("error", rip, f"unicorn: {err}")
            return Exit("fault", rip, f)
        if self._stop_reason is not None:
            assert self._resume_rip is not None
            self.set("rip", self._resume_rip)
            return Exit("stop", self._resume_rip, detail=self._stop_reason)
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
