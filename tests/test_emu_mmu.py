"""The Python page walk: unit checks per rule, C-bit handling, fault reports, and a differential
test against unicorn's own x86 walker (CPU TLB mode) for mappings below bit 40."""

from __future__ import annotations

import random

import pytest
from unicorn import (
    UC_ARCH_X86,
    UC_HOOK_INTR,
    UC_MODE_64,
    UC_PROT_ALL,
    Uc,
    UcError,
)
from unicorn import x86_const as X

from emulate.cpuid import CpuidModel
from emulate.flat import FlatGuest
from emulate.machine import VM
from emulate.memctl import MemoryController
from emulate.mmu import (
    PAGE_1G,
    PAGE_2M,
    PFEC_I,
    PFEC_P,
    PFEC_RSVD,
    PFEC_W,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PageFault,
    PhysLayout,
    walk,
)
from helperfw.codegen.emit import assemble

SEED = 20240611


class Tables:
    """Sparse fake guest-physical memory holding page tables for walk() unit tests."""

    def __init__(self) -> None:
        self.mem: dict[int, int] = {}
        self.reads: list[tuple[int, bool]] = []

    def read(self, gpa: int, enc: bool) -> int:
        self.reads.append((gpa, enc))
        return self.mem.get(gpa, 0)

    def chain(self, va: int, leaf_level: int, leaf: int, c: int = 0, upper: int = PTE_P | PTE_RW
              ) -> int:
        """Entries for va down to leaf_level (0=PML4E..3=PTE); tables at 0x1000*(level+1)."""
        for lvl in range(leaf_level + 1):
            shift = 39 - 9 * lvl
            slot = 0x1000 * (lvl + 1) + ((va >> shift) & 0x1FF) * 8
            self.mem[slot] = leaf if lvl == leaf_level else (0x1000 * (lvl + 2)) | upper | c
        return 0x1000 | c


@pytest.mark.parametrize("cbit,maxphy", [(47, 48), (51, 52)])
def test_cbit_stripped_and_tables_read_encrypted(cbit: int, maxphy: int) -> None:
    lay = PhysLayout(maxphyaddr=maxphy, cbit=cbit, reduction=5)
    t = Tables()
    c = 1 << cbit
    high = 1 << (maxphy - 5 - 1)  # highest usable address bit, like the mirror RAM_BASE
    cr3 = t.chain(0x7000_1000, 3, high | 0x5000 | PTE_P | PTE_RW | c, c=c)
    tr = walk(t.read, cr3, 0x7000_1234, "read", lay)
    assert tr.gpa == high | 0x5234 and tr.encrypted and tr.writable and tr.executable
    assert all(enc for _, enc in t.reads), "tables reached through C=1 entries are private"
    # the same mapping without the C-bit is shared
    cr3 = t.chain(0x7000_1000, 3, 0x5000 | PTE_P, c=0)
    tr = walk(t.read, cr3, 0x7000_1000, "read", lay)
    assert not tr.encrypted and not tr.writable


@pytest.mark.parametrize("bit", [48, 50, 51, 44])
def test_reserved_bits_fault(bit: int) -> None:
    lay = PhysLayout(maxphyaddr=48, cbit=47, reduction=5)  # usable bits 0..42
    t = Tables()
    cr3 = t.chain(0x1000, 3, (1 << bit) | 0x5000 | PTE_P)
    with pytest.raises(PageFault) as e:
        walk(t.read, cr3, 0x1000, "read", lay)
    assert e.value.error_code == PFEC_P | PFEC_RSVD
    # a reserved bit in an upper level faults too
    t = Tables()
    cr3 = t.chain(0x1000, 3, 0x5000 | PTE_P, upper=PTE_P | (1 << bit))
    with pytest.raises(PageFault):
        walk(t.read, cr3, 0x1000, "read", lay)


def test_large_pages_and_their_reserved_bits() -> None:
    lay = PhysLayout(maxphyaddr=52, cbit=51, reduction=5)
    t = Tables()
    cr3 = t.chain(0x4020_0000, 2, 0x60_0000 | PTE_P | PTE_PS)
    tr = walk(t.read, cr3, 0x4020_1234 + 0x1000, "fetch", lay)
    assert tr.page_size == PAGE_2M and tr.gpa == 0x60_2234
    t = Tables()
    cr3 = t.chain(0x8000_0000, 1, (3 << 30) | PTE_P | PTE_PS | PTE_RW)
    tr = walk(t.read, cr3, 0x8012_3456, "write", lay)
    assert tr.page_size == PAGE_1G and tr.gpa == (3 << 30) | 0x12_3456
    for level, bad in ((2, 0x60_0000 | (1 << 13)), (1, (3 << 30) | (1 << 20))):
        t = Tables()
        cr3 = t.chain(0x8000_0000, level, bad | PTE_P | PTE_PS)
        with pytest.raises(PageFault) as e:
            walk(t.read, cr3, 0x8000_0000, "read", lay)
        assert e.value.error_code & PFEC_RSVD
    t = Tables()  # PS in a PML4E is reserved
    cr3 = t.chain(0x8000_0000, 0, 0x2000 | PTE_P | PTE_PS)
    with pytest.raises(PageFault):
        walk(t.read, cr3, 0x8000_0000, "read", lay)


def test_permission_faults() -> None:
    lay = PhysLayout(maxphyaddr=48, cbit=47, reduction=5)
    t = Tables()
    cr3 = t.chain(0x1000, 3, 0x5000 | PTE_P | PTE_NX)
    assert not walk(t.read, cr3, 0x1000, "read", lay).executable
    with pytest.raises(PageFault) as e:
        walk(t.read, cr3, 0x1000, "fetch", lay)
    assert e.value.error_code == PFEC_P | PFEC_I
    with pytest.raises(PageFault) as e:
        walk(t.read, cr3, 0x1000, "write", lay)
    assert e.value.error_code == PFEC_P | PFEC_W
    # NX or read-only in an upper level applies to the whole subtree
    t = Tables()
    cr3 = t.chain(0x1000, 3, 0x5000 | PTE_P | PTE_RW, upper=PTE_P | PTE_NX)
    with pytest.raises(PageFault):
        walk(t.read, cr3, 0x1000, "fetch", lay)
    t = Tables()
    cr3 = t.chain(0x1000, 3, 0x5000 | PTE_P)  # not present at the leaf
    t.mem[0x4000 + 8] = 0
    with pytest.raises(PageFault) as e:
        walk(t.read, cr3, 0x1000, "write", lay)
    assert e.value.error_code == PFEC_W
    with pytest.raises(PageFault, match="non-canonical"):
        walk(t.read, cr3, 1 << 50, "read", lay)


def test_fault_report_in_guest() -> None:
    """A guest write to a read-only private page: RIP (symbolised), CR2, access, disassembly."""
    vm = VM(MemoryController(8 << 20), cpuid=CpuidModel(cbit=51))
    g = FlatGuest(vm, ram_size=8 << 20)
    ro = g.place(b"\x11" * 4096, writable=False, executable=False)
    code = assemble(f"""
        movabs ${ro}, %rdi
        movq (%rdi), %rax
        movl $7, 8(%rdi)
        hlt
    """)
    rip = g.place(code)
    v = g.vcpu(rip, symbolize=lambda a: f"snippet+{a - rip:#x}")
    ex = v.run()
    assert ex.reason == "fault"
    f = ex.fault
    assert f is not None and f.kind == "#PF"
    assert f.cr2 == ro + 8 and f.access == "write" and f.error_code == PFEC_P | PFEC_W
    assert f.rip == rip + 13 and f.symbol == "snippet+0xd"
    assert f.disasm.startswith("mov dword ptr [rdi + 8], 7")
    assert v.get("rax") == 0x1111111111111111
    assert "CR2=" in str(f) and "snippet+0xd" in str(f)


def test_fetch_from_nx_and_npf() -> None:
    vm = VM(MemoryController(8 << 20), cpuid=CpuidModel(cbit=47))
    g = FlatGuest(vm, ram_size=8 << 20)
    data = g.place(b"\xf4" * 16, writable=True, executable=False)
    g.map(0x40_0000_0000, 0x40_0000_0000, 4096)  # GPA with no memslot
    for target, kind, access in ((data, "#PF", "fetch"), (0x40_0000_0000, "NPF", "read")):
        insn = "jmp *%rdi" if access == "fetch" else "mov (%rdi), %rax"
        v = g.vcpu(g.place(assemble(f"movabs ${target}, %rdi\n{insn}\nhlt")))
        ex = v.run()
        assert ex.fault is not None and ex.fault.kind == kind, ex
        assert ex.fault.cr2 == target and ex.fault.access == access


REMAP_VA = 0x40_0000_0000


def _remap_guest():
    """A guest with REMAP_VA mapped read-only to a page of 0x11 bytes, a page of 0x22 bytes
    beside it, and the GPA of REMAP_VA's PTE: (vm, guest, old, new, pte, page table GPA)."""
    vm = VM(MemoryController(8 << 20), cpuid=CpuidModel(cbit=47))
    g = FlatGuest(vm, ram_size=8 << 20)
    old = g.place(b"\x11" * 4096, writable=True, executable=False)
    new = g.place(b"\x22" * 4096, writable=True, executable=False)
    g.map(REMAP_VA, old, 4096, writable=False, executable=False)
    table, cm = g.pt.root, vm.layout.c_mask
    for shift in (39, 30, 21):
        table = vm.read_u64(table + ((REMAP_VA >> shift) & 0x1FF) * 8) & vm.layout.addr_mask & ~cm
    return vm, g, old, new, table + ((REMAP_VA >> 12) & 0x1FF) * 8, table


@pytest.mark.parametrize("flush", ["mov-cr3", "invlpg"])
def test_a_remap_is_seen_after_the_guests_tlb_flush(flush: str) -> None:
    """The fill hook keeps walked translations as a TLB does (emulate/tlb.py): a guest that
    points a PTE at another page and flushes (MOV to CR3, INVLPG) reads the new page at once;
    the kept translation of the old one is dropped with unicorn's own entries."""
    vm, g, old, new, pte, table = _remap_guest()
    va, cm = REMAP_VA, vm.layout.c_mask
    g.map(table, table, 4096, writable=True, executable=False)  # the guest may write its PT
    entry = vm.read_u64(pte)
    assert entry & vm.layout.addr_mask & ~cm == old
    do_flush = {"mov-cr3": "movq %cr3, %rcx\nmovq %rcx, %cr3", "invlpg": "invlpg (%rdi)"}[flush]
    code = assemble(f"""
        movabs ${va}, %rdi
        movq (%rdi), %rax
        movabs ${pte}, %rsi
        movabs ${entry - old + new}, %rdx
        movq %rdx, (%rsi)
        {do_flush}
        hlt
        movq (%rdi), %rbx
        hlt
    """)
    v = g.vcpu(g.place(code))
    assert v.run().reason == "hlt" and v.get("rax") == 0x1111111111111111
    assert v.run().reason == "hlt"  # a second run: kept translations outlive runs
    assert v.get("rbx") == 0x2222222222222222, "the old page through a dropped translation"
    assert v.tlb.walks >= 2


def test_a_host_write_to_a_page_table_drops_kept_translations() -> None:
    """The host rewrites a PTE between runs (a host may also flush the guest's TLB whenever it
    likes, so a replayed or forged table takes effect at once): the next run walks again."""
    vm, g, old, new, pte, _table = _remap_guest()
    va = REMAP_VA
    v = g.vcpu(g.place(assemble(f"movabs ${va}, %rdi\nmovq (%rdi), %rax\nhlt\n"
                                f"movq (%rdi), %rbx\nhlt")))
    assert v.run().reason == "hlt" and v.get("rax") == 0x1111111111111111
    entry = vm.read_u64(pte)
    vm.write_u64(pte, entry - old + new)  # through the VM's view, as a host with the key would
    assert v.run().reason == "hlt" and v.get("rbx") == 0x2222222222222222


# ---- differential test against unicorn's walker -------------------------------------------
RAM = 8 << 20
CODE_GPA = 0x10000
DATA_GPAS = [0x100000 + i * 0x1000 for i in range(64)] + [0x200000, 0x400000]


def _random_tables(rng: random.Random) -> tuple[bytearray, int, list[int]]:
    """Random 4-level tables in a RAM image (GPA == HPA, no C-bit): returns ram, cr3, VAs."""
    ram = bytearray(RAM)
    for gpa in DATA_GPAS:
        ram[gpa : gpa + 0x1000] = b"\xf4" * 0x1000
    ram[0x400000 : 0x600000] = b"\xf4" * 0x200000
    ram[CODE_GPA : CODE_GPA + 0x1000] = b"\xf4" * 0x1000
    next_table = [0x20000]

    def alloc() -> int:
        next_table[0] += 0x1000
        return next_table[0]

    def entry_at(table: int, idx: int) -> int:
        return int.from_bytes(ram[table + idx * 8 : table + idx * 8 + 8], "little")

    def put(table: int, idx: int, v: int) -> None:
        ram[table + idx * 8 : table + idx * 8 + 8] = v.to_bytes(8, "little")

    root = alloc()

    def mapva(va: int, leaf_lvl: int, leaf: int, flags_upper: int) -> None:
        table = root
        for lvl in range(4):
            idx = (va >> (39 - 9 * lvl)) & 0x1FF
            if lvl == leaf_lvl:
                put(table, idx, leaf)
                return
            e = entry_at(table, idx)
            if not e & PTE_P or e & PTE_PS:
                e = alloc() | PTE_P | flags_upper
                put(table, idx, e)
            table = e & 0xFFFFFFFFF000

    # code: identity 4K, RX
    mapva(CODE_GPA, 3, CODE_GPA | PTE_P, PTE_RW)
    vas = []
    for i in range(24):
        lvl = rng.choice([3, 3, 3, 2, 1])
        region = rng.choice([0x7F00_0000_0000, 0x0000_4000_0000, 0xFFFF_8000_0000_0000])
        size = 1 << (39 - 9 * lvl)
        va = region + rng.randrange(0, 64) * size
        if lvl == 3:
            gpa = rng.choice(DATA_GPAS[:64])
        elif lvl == 2:
            gpa = rng.choice([0x200000, 0x400000])
        else:
            gpa = 0
        flags = PTE_P if rng.random() > 0.15 else 0
        flags |= PTE_RW if rng.random() > 0.4 else 0
        flags |= PTE_NX if rng.random() > 0.5 else 0
        flags |= PTE_PS if lvl < 3 else 0
        upper = (PTE_RW if rng.random() > 0.2 else 0) | (PTE_NX if rng.random() > 0.8 else 0)
        mapva(va, lvl, gpa | flags, upper)
        off = rng.randrange(0, min(size, 0x1000 if lvl == 3 else 0x1F_F000)) & ~7
        vas.append(va + off)
    vas.append(0x5555_0000_0000)  # unmapped
    return ram, root, vas


SNIPPETS = {"read": "mov (%rdi), %rax", "write": "movq $0x5a, (%rdi)", "fetch": "jmp *%rdi"}
OFFSETS = {"read": 0, "write": 0x100, "fetch": 0x200}


def _code() -> bytes:
    code = bytearray(b"\xf4" * 0x300)
    for access, insn in SNIPPETS.items():
        b = assemble(insn + "\nhlt")
        code[OFFSETS[access] : OFFSETS[access] + len(b)] = b
    return bytes(code)


class Native:
    """unicorn's own walker: CPU TLB mode, real CR0.PG/CR4.PAE/EFER, RAM at GPA == HPA."""

    def __init__(self, ram: bytes, cr3: int) -> None:
        uc = self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, RAM, UC_PROT_ALL)
        uc.mem_write(0, bytes(ram))
        uc.reg_write(X.UC_X86_REG_CR4, uc.reg_read(X.UC_X86_REG_CR4) | 0x20)
        uc.msr_write(0xC0000080, 0xD00)
        uc.reg_write(X.UC_X86_REG_CR3, cr3)
        uc.reg_write(X.UC_X86_REG_CR0, 0x80010011)
        self.trapped: list[int] = []
        uc.hook_add(UC_HOOK_INTR, self._intr)
        self.ctx = uc.context_save()  # a delivered #PF leaves the CPU wedged: restore each run

    def _intr(self, uc: Uc, no: int, _ud: object) -> None:
        self.trapped.append(no)
        uc.emu_stop()

    def run(self, access: str, va: int) -> tuple[str, int, int]:
        uc, self.trapped = self.uc, []
        uc.context_restore(self.ctx)
        uc.reg_write(X.UC_X86_REG_RDI, va)
        uc.reg_write(X.UC_X86_REG_RAX, 0)
        try:
            uc.emu_start(CODE_GPA + OFFSETS[access], CODE_GPA + 0xFFF, count=10)
        except UcError:
            self.trapped.append(-1)
        if self.trapped:
            return "fault", uc.reg_read(X.UC_X86_REG_CR2), 0
        return "ok", uc.reg_read(X.UC_X86_REG_RIP), uc.reg_read(X.UC_X86_REG_RAX)


class Mine:
    """The same RAM under emulate: SEV off (no C-bit below bit 40), Python walk via TLB fill."""

    def __init__(self, ram: bytes, cr3: int) -> None:
        mc = MemoryController(RAM)
        self.vm = VM(mc, cpuid=CpuidModel(sev=False))
        self.vm.set_user_memory_region(0, 0, RAM, 0)
        mc.host_write(0, bytes(ram))
        self.v = self.vm.create_vcpu(rip=CODE_GPA, cr3=cr3)

    def run(self, access: str, va: int) -> tuple[str, int, int]:
        v = self.v
        v.set("rdi", va)
        v.set("rax", 0)
        v.set("rip", CODE_GPA + OFFSETS[access])
        ex = v.run(budget=10)
        if ex.reason == "fault":
            assert ex.fault is not None
            return "fault", ex.fault.cr2 or 0, 0
        return "ok", ex.rip, v.get("rax")


@pytest.mark.parametrize("seed", [SEED + i for i in range(6)])
def test_walk_matches_unicorn_walker(seed: int) -> None:
    print("seed", seed)
    rng = random.Random(seed)
    ram, cr3, vas = _random_tables(rng)
    code = _code()
    ram[CODE_GPA : CODE_GPA + len(code)] = code
    native, mine = Native(ram, cr3), Mine(ram, cr3)
    outcomes = set()
    for va in vas:
        for access in ("read", "write", "fetch"):
            theirs = native.run(access, va)
            ours = mine.run(access, va)
            assert ours == theirs, (hex(va), access, ours, theirs)
            outcomes.add(ours[0])
    assert outcomes == {"ok", "fault"}
