"""A vCPU's address translation: unicorn's TLB filled from the Python page walk.

Why: unicorn honours only 40 physical-address bits, so with C-bit 47/51 or mirror GPAs at 2^42+
its own walker faults. The vCPU runs with UC_TLB_VIRTUAL and this UC_HOOK_TLB_FILL walks the
guest's tables (emulate.mmu), resolves the GPA through the VM's memslots to a host-physical
address, makes the memory controller present the page in the view the C-bit asks for, and hands
unicorn that HPA (DRAM is mapped 1:1 at HPA in every Uc instance). A failed walk is kept as the
pending page fault the run loop reports.

Two more jobs ride on the fill: fetched pages are passed to the vCPU's intercept scanner (which
hooks the instructions that exit), and the VM may narrow the permissions (KVM's dirty-log write
protection). The park page (PARK_VA → a page of HLT bytes) lets an exit handler end a run at once.

Kept translations: unicorn's TLB is small and direct-mapped, so a batch's 64 guest pages evict
the slots, stack and code of the last batch, and each refill was a Python walk holding the GIL
(the one serial part of several lanes). Like a CPU's TLB, the walks' results are kept per CR3
(large leaves once for their whole span) until the TLB is flushed: by the emulator (`forget`
from every VCpu.flush_tlb: memslots, dirty-log re-arming, a restored machine), by the host
writing a page a walk read entries from (it could flush the guest's TLB too: a replayed page
table takes effect at once), or by the guest (MOV to CR0/CR3/CR4, INVLPG, WRMSR: the intercept
scanner hooks them). A page-state change only refills unicorn's entries: a kept translation
still has its page's view made and its permissions narrowed on every fill.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from unicorn import (
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_MEM_WRITE,
    UC_PROT_ALL,
    UC_PROT_EXEC,
    UC_PROT_READ,
    UC_PROT_WRITE,
    Uc,
)
from unicorn.unicorn_py3.unicorn import uclib
from unicorn.x86_const import UC_X86_REG_CR3

from emulate.memctl import PAGE, RAW
from emulate.mmu import (
    ACCESS_FETCH,
    ACCESS_READ,
    ACCESS_WRITE,
    PAGE_1G,
    PAGE_2M,
    PageFault,
    Translation,
    walk,
)

if TYPE_CHECKING:
    from emulate.machine import VCpu

# Park page: a VA the fill hook maps to a page of HLT bytes. Moving RIP there ends a run at once
# (emu_stop only takes effect at the end of a translation block); unicorn also probes the page of
# `until - 1` at the end of a run, so `until` is placed right after it.
PARK_VA = 0xFFFF_FFFF_FFFF_E000
UNTIL_VA = PARK_VA + PAGE
HLT = b"\xf4"
KEPT_SIZES = (PAGE_2M, PAGE, PAGE_1G)  # most fills are in the 2 MiB-mapped RAM window


class Tlb:
    """Translation for one vCPU: `translate`, guest-virtual reads/writes, and the fill hook."""

    def __init__(self, vcpu: VCpu) -> None:
        self.vcpu = vcpu
        self.vm = vcpu.vm
        self.mc = vcpu.vm.mc
        self.fills = 0
        self.walks = 0  # fills that needed a page walk (no kept translation)
        self._cr3 = ctypes.c_uint64()
        self._cr3_ref = ctypes.byref(self._cr3)
        self._kept: dict[tuple[int, str, int, int], Translation] = {}
        self.pending_pf: PageFault | None = None  # the first failed walk of the current run
        uc = vcpu.uc
        self.park_hpa = self.mc.size  # one page just above DRAM, private to this Uc
        uc.mem_map(self.park_hpa, PAGE, UC_PROT_ALL)
        uc.mem_write(self.park_hpa, HLT * PAGE)
        uc.hook_add(UC_HOOK_TLB_FILL, self.on_fill)

    def _read_qword(self, gpa: int, encrypted: bool) -> int:
        hpa = self.vm.gpa_to_hpa(gpa)
        if hpa is None:
            raise PageFault(gpa, ACCESS_READ, 0, f"page-table GPA {gpa:#x} not in any memslot",
                            gpa_missing=gpa)
        mc = self.mc
        mc.table_pages.add(hpa & ~(PAGE - 1))
        if mc.state[hpa // PAGE] == (self.vm.key_id if encrypted else RAW):  # the usual case
            return int.from_bytes(mc.mem[hpa : hpa + 8], "little")
        return int.from_bytes(mc.guest_read(hpa, 8, self.vm.key_id, encrypted), "little")

    def translate(self, va: int, access: str = ACCESS_READ,
                  cr3: int | None = None) -> tuple[Translation, int]:
        """(translation, hpa) for `va` with `cr3` (default: the vCPU's); raises PageFault."""
        cr3 = self.vcpu.regs["cr3"] if cr3 is None else cr3
        t = walk(self._read_qword, cr3, va, access, self.vm.layout)
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
        """Write guest-virtual memory as the guest would (the VM's dirty log sees it)."""
        pos = 0
        while pos < len(data):
            ln = min(PAGE - (va + pos) % PAGE, len(data) - pos)
            t, hpa = self.translate(va + pos, ACCESS_WRITE)
            self.mc.guest_write(hpa, data[pos : pos + ln], self.vm.key_id, t.encrypted)
            self.vm.note_write(hpa, ln)
            pos += ln

    def forget(self) -> None:
        """Drop the kept translations (a TLB flush)."""
        self._kept.clear()

    def _kept_translation(self, cr3: int, va: int, access: str) -> tuple[Translation, int] | None:
        for size in KEPT_SIZES:
            t = self._kept.get((cr3, access, size, va // size))
            if t is not None:
                gpa = t.gpa + va % size
                hpa = self.vm.gpa_to_hpa(gpa)
                return None if hpa is None else (t, hpa)
        return None

    def _walk_and_keep(self, cr3: int, va: int, access: str) -> tuple[Translation, int]:
        self.walks += 1
        t, hpa = self.translate(va, access, cr3)
        size = t.page_size
        base = Translation(t.gpa - va % size, t.encrypted, t.writable, t.executable, size)
        self._kept[(cr3, access, size, va // size)] = base
        return t, hpa

    def on_fill(self, uc: Uc, va: int, kind: int, entry: object, _ud: object) -> bool:
        """UC_HOOK_TLB_FILL: walk (or a kept translation), convert the page's view, set
        paddr/perms (False: #PF)."""
        self.fills += 1
        page_va = va & ~(PAGE - 1)
        if page_va == PARK_VA:
            entry.paddr, entry.perms = self.park_hpa, UC_PROT_READ | UC_PROT_EXEC  # type: ignore[attr-defined]
            return True
        access = ACCESS_FETCH if kind == UC_MEM_FETCH else (
            ACCESS_WRITE if kind == UC_MEM_WRITE else ACCESS_READ)
        # the fill runs with the GIL held, so lanes wait on it: CR3 through unicorn's C call
        # (Uc.reg_read's Python dispatch was a third of a fill), the view only if it changes
        uclib.uc_reg_read(uc._uch, UC_X86_REG_CR3, self._cr3_ref)
        cr3 = self._cr3.value
        found = self._kept_translation(cr3, va, access)
        if found is None:
            try:
                found = self._walk_and_keep(cr3, va, access)
            except PageFault as pf:
                if self.pending_pf is None:
                    self.pending_pf = pf
                return False
        t, hpa = found
        page_hpa = hpa & ~(PAGE - 1)
        if not self.mc.page_view_ready(page_hpa, self.vm.key_id, t.encrypted):
            self.mc.make_state(page_hpa, PAGE, self.vm.key_id, t.encrypted)
        perms = UC_PROT_READ | (UC_PROT_WRITE if t.writable else 0) | (
            UC_PROT_EXEC if t.executable else 0)
        if t.executable:
            self.mc.exec_pages.add(page_hpa)
        if access == ACCESS_FETCH:
            self.vcpu.intercepts.page_fetched(page_va, page_hpa)
        entry.paddr = page_hpa  # type: ignore[attr-defined]
        entry.perms = self.vm.fill_permissions(page_hpa, kind == UC_MEM_WRITE, perms)  # type: ignore[attr-defined]
        return True
