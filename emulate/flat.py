"""A ready-to-run guest: one RAM memslot, a bump page allocator and Python-built page tables.

Why: tests, the benchmark and the UEFI stand-in all need "some RAM, page tables, code, a stack";
this is that setup once, built through the VM's own (encrypted) view of memory.
"""

from __future__ import annotations

from emulate.machine import VM, VCpu
from emulate.memctl import PAGE
from emulate.mmu import PageTableBuilder


class PageAllocator:
    """Bump allocator over guest-physical [base, base+size); pages are zeroed in the VM's view."""

    def __init__(self, vm: VM, base: int, size: int) -> None:
        self.vm, self.next, self.end = vm, base, base + size

    def alloc(self, pages: int = 1, align: int = PAGE, *, encrypted: bool | None = None) -> int:
        gpa = -(-self.next // align) * align
        if gpa + pages * PAGE > self.end:
            raise MemoryError("guest RAM exhausted")
        self.next = gpa + pages * PAGE
        self.vm.write(gpa, bytes(pages * PAGE), encrypted=encrypted)
        return gpa


class FlatGuest:
    """VM with RAM at GPA `ram_gpa` (HPA `hpa`), page tables in that RAM, and helpers to place code.

    With SEV the tables and all pages mapped by `map` default to C=1 (private). `skip` bytes at
    the start of RAM are left out of the allocator (e.g. page 0, kept unmapped for NULL checks)."""

    def __init__(self, vm: VM, *, ram_gpa: int = 0, ram_size: int = 16 << 20, hpa: int = 0,
                 slot: int = 0, skip: int = 0, label: str = "ram") -> None:
        self.vm = vm
        vm.set_user_memory_region(slot, ram_gpa, ram_size, hpa, label)
        self.ram_gpa, self.ram_size = ram_gpa, ram_size
        self.pages = PageAllocator(vm, ram_gpa + skip, ram_size - skip)
        self.pt = PageTableBuilder(self.pages.alloc, vm.read_u64, vm.write_u64,
                                   cbit=vm.layout.cbit)

    def map(self, va: int, gpa: int, length: int, *, writable: bool = True,
            executable: bool = True, encrypted: bool | None = None) -> None:
        enc = self.vm.sev if encrypted is None else encrypted
        self.pt.map_range(va, gpa, length, writable=writable, executable=executable,
                          encrypted=enc)

    def place(self, data: bytes, *, va: int | None = None, writable: bool = False,
              executable: bool = True, encrypted: bool | None = None) -> int:
        """Copy `data` into fresh pages, map them (identity unless `va`), return the VA."""
        n = max(1, -(-len(data) // PAGE))
        gpa = self.pages.alloc(n, encrypted=encrypted)
        self.vm.write(gpa, data, encrypted=encrypted)
        va = gpa if va is None else va
        self.map(va, gpa, n * PAGE, writable=writable, executable=executable, encrypted=encrypted)
        return va

    def stack(self, size: int = 64 << 10) -> int:
        """Map a private RW NX stack; returns its top (16-byte aligned)."""
        gpa = self.pages.alloc(size // PAGE)
        self.map(gpa, gpa, size, writable=True, executable=False)
        return gpa + size

    def vcpu(self, rip: int, *, rsp: int | None = None, **kw: object) -> VCpu:
        rsp = self.stack() - 8 if rsp is None else rsp
        return self.vm.create_vcpu(rip=rip, cr3=self.pt.cr3, rsp=rsp, **kw)  # type: ignore[arg-type]
