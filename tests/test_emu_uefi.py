"""UEFI stand-in: PE32+ loading at a random base with DIR64 relocations, boot services through
the win64 trap page, configuration tables, ConOut, the SEV launch-secret table."""

from __future__ import annotations

import re
import struct
import uuid

import pytest

from emulate.cpuid import CpuidModel
from emulate.machine import VM
from emulate.memctl import MemoryController
from emulate.uefi import (
    ALLOCATE_ADDRESS,
    ALLOCATE_MAX_ADDRESS,
    EFI_RUNTIME_SERVICES_DATA,
    EFI_SUCCESS,
    PeError,
    UefiStandIn,
)
from helperfw.codegen.emit import assemble
from helperfw.codegen.image import Symbol
from helperfw.runtime import efi

SEED = 1_000_003
TEST_GUID = uuid.UUID("8d1c6a3e-1f2b-4c5d-9e8f-0a1b2c3d4e5f")
IMAGE_BASE = 0x1_4000_0000


def build_pe(text: bytes, reloc_rvas: list[int], entry_rva: int, *, machine: int = 0x8664,
             magic: int = 0x20B, subsystem: int = 12) -> bytes:
    """Minimal PE32+: headers, .text at RVA 0x1000 (RWX), .reloc with DIR64 entries."""
    fa, sa = 0x200, 0x1000

    def align(n: int, a: int) -> int:
        return -(-n // a) * a

    blocks = b""
    pages: dict[int, list[int]] = {}
    for rva in sorted(reloc_rvas):
        pages.setdefault(rva & ~0xFFF, []).append(rva & 0xFFF)
    for page, offs in pages.items():
        ents = [(10 << 12) | o for o in offs]
        if len(ents) % 2:
            ents.append(0)  # IMAGE_REL_BASED_ABSOLUTE padding
        blocks += struct.pack("<II", page, 8 + 2 * len(ents)) + struct.pack(f"<{len(ents)}H", *ents)
    text_rva, text_raw = 0x1000, 0x400
    reloc_rva = text_rva + align(len(text), sa)
    reloc_raw = text_raw + align(len(text), fa)
    size_of_image = reloc_rva + align(max(len(blocks), 1), sa)
    dirs = [(0, 0)] * 16
    dirs[5] = (reloc_rva, len(blocks))
    opt = struct.pack("<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", magic, 14, 0, align(len(text), fa),
                      align(len(blocks), fa), 0, entry_rva, text_rva, IMAGE_BASE, sa, fa,
                      0, 0, 0, 0, 0, 0, 0, size_of_image, 0x400, 0, subsystem, 0,
                      0x100000, 0x1000, 0x100000, 0x1000, 0, 16)
    opt += b"".join(struct.pack("<II", *d) for d in dirs)
    coff = struct.pack("<HHIIIHH", machine, 2, 0, 0, 0, len(opt), 0x22)
    sec = struct.pack("<8sIIIIIIHHI", b".text", len(text), text_rva, align(len(text), fa),
                      text_raw, 0, 0, 0, 0, 0xE0000020)
    sec += struct.pack("<8sIIIIIIHHI", b".reloc", len(blocks), reloc_rva,
                       align(len(blocks), fa), reloc_raw, 0, 0, 0, 0, 0x42000040)
    hdr = bytearray(b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40) + b"PE\0\0" + coff + opt + sec)
    img = bytes(hdr).ljust(text_raw, b"\0") + text.ljust(align(len(text), fa), b"\0")
    return img + blocks.ljust(align(len(blocks), fa), b"\0")


def driver_image() -> bytes:
    """Entry point: OutputString via a relocated pointer, AllocatePages(RuntimeServicesData),
    InstallConfigurationTable(TEST_GUID, page), write the table count to port 0x402."""
    st, bs, to = efi.EfiSystemTable, efi.EfiBootServices, efi.EfiSimpleTextOutput
    guid = ",".join(str(b) for b in TEST_GUID.bytes_le)
    text = assemble(f"""
        push %rbx
        push %r12
        push %r13
        sub $0x40, %rsp
        mov %rdx, %rbx
        mov {st.offset("ConOut")}(%rbx), %rcx
        mov ptr(%rip), %rdx
        call *{to.offset("OutputString")}(%rcx)
        mov {st.offset("BootServices")}(%rbx), %r12
        xor %ecx, %ecx
        mov $6, %edx
        mov $1, %r8d
        lea 0x30(%rsp), %r9
        call *{bs.offset("AllocatePages")}(%r12)
        test %rax, %rax
        jnz 1f
        mov 0x30(%rsp), %rax
        movq $0x5eed, (%rax)
        lea guid(%rip), %rcx
        mov 0x30(%rsp), %rdx
        call *{bs.offset("InstallConfigurationTable")}(%r12)
        test %rax, %rax
        jnz 1f
        mov {st.offset("NumberOfTableEntries")}(%rbx), %rax
        mov $0x402, %dx
        out %al, %dx
        xor %eax, %eax
    1:
        add $0x40, %rsp
        pop %r13
        pop %r12
        pop %rbx
        ret
    .p2align 3
    ptr:
        .quad 0x1122334455667788
    guid:
        .byte {guid}
    msg:
        .short 0x48, 0x69, 0x21, 0
    """)
    ptr_off = text.index((0x1122334455667788).to_bytes(8, "little"))
    msg_off = text.index("Hi!\0".encode("utf-16-le"))
    text = bytearray(text)
    text[ptr_off : ptr_off + 8] = (IMAGE_BASE + 0x1000 + msg_off).to_bytes(8, "little")
    return build_pe(bytes(text), [0x1000 + ptr_off], 0x1000)


def stand_in(seed: int, cbit: int = 47) -> UefiStandIn:
    print("seed", seed)
    vm = VM(MemoryController(64 << 20), cpuid=CpuidModel(cbit=cbit))
    return UefiStandIn(vm, ram_size=64 << 20, seed=seed)


@pytest.mark.parametrize("seed,cbit", [(SEED, 47), (SEED + 1, 51)])
def test_start_image_relocated_services_and_tables(seed: int, cbit: int) -> None:
    u = stand_in(seed, cbit)
    r = u.start_image(driver_image())
    assert r.ok, r.exit
    assert r.image.base % 4096 == 0 and r.image.base != IMAGE_BASE
    assert r.image.relocations_applied == 1
    assert r.conout == "Hi!"
    assert r.debug_log == b"\x01"
    table = u.config_table(TEST_GUID)
    assert table is not None and u.allocations[table] == (1, EFI_RUNTIME_SERVICES_DATA)
    assert u.vm.read_u64(table) == 0x5EED
    # the system table's array really holds the entry (as the helper would read it)
    st = efi.EfiSystemTable
    n = u.vm.read_u64(u.system_table + st.offset("NumberOfTableEntries"))
    arr = u.vm.read_u64(u.system_table + st.offset("ConfigurationTable"))
    assert n == 1
    assert u.vm.read(arr, 16) == TEST_GUID.bytes_le and u.vm.read_u64(arr + 16) == table
    assert u.calls == ["ConOut.OutputString", "AllocatePages", "InstallConfigurationTable"]
    # the call log names every argument from the service's parameter spec
    out, alloc, install = map(str, u.call_log)
    assert out == f"ConOut.OutputString(This={u.conout_proto:#x}, String='Hi!') = EFI_SUCCESS"
    assert re.fullmatch(r"AllocatePages\(Type=AllocateAnyPages, MemoryType=EfiRuntimeServicesData, "
                        r"Pages=1, Memory=0x[0-9a-f]+\) = EFI_SUCCESS", alloc), alloc
    assert install == f"InstallConfigurationTable(Guid={TEST_GUID}, Table={table:#x}) = EFI_SUCCESS"
    # private memory: the image is not visible as plaintext to the host
    assert b"H\0i\0!\0" not in u.vm.mc.host_read(r.image.base, r.image.size)


def test_random_base_differs_by_seed() -> None:
    bases = {stand_in(SEED + i).load_image(driver_image()).base for i in range(3)}
    assert len(bases) == 3


def test_services_through_trap_page_with_stack_args() -> None:
    u = stand_in(SEED)
    bs = efi.EfiBootServices
    fn = lambda name: u.vm.read_u64(u.boot_services + bs.offset(name))
    out = u.allocate_pool(64, EFI_RUNTIME_SERVICES_DATA)
    # AllocateMaxAddress below 8 MiB
    u.vm.write_u64(out, (8 << 20) - 1)
    status, ex = u.call(fn("AllocatePages"), ALLOCATE_MAX_ADDRESS, 6, 2, out)
    assert status == EFI_SUCCESS, ex
    got = u.vm.read_u64(out)
    assert got + 2 * 4096 <= 8 << 20 and u.allocations[got] == (2, 6)
    # AllocateAddress on a taken range fails, on a free one succeeds
    u.vm.write_u64(out, got)
    status, _ = u.call(fn("AllocatePages"), ALLOCATE_ADDRESS, 6, 1, out)
    assert status == efi.EFI_NOT_FOUND.value
    status, _ = u.call(fn("FreePages"), got, 2)
    assert status == EFI_SUCCESS and got not in u.allocations
    # CreateEventEx: 6 arguments, the last two on the stack at [rsp+0x28], [rsp+0x30]
    status, _ = u.call(fn("CreateEventEx"), 0x200, 8, 0x1234, 0x5678, 0, out + 8)
    assert status == EFI_SUCCESS and u.events == [(0x200, 8, 0x1234, 0x5678)]
    assert u.vm.read_u64(out + 8) != 0
    # AllocatePool / FreePool
    status, _ = u.call(fn("AllocatePool"), 4, 100, out + 16)
    pool = u.vm.read_u64(out + 16)
    assert status == EFI_SUCCESS and u.pools[pool] == 100
    assert u.call(fn("FreePool"), pool)[0] == EFI_SUCCESS and pool not in u.pools
    assert u.call(fn("GetMemoryMap"), 0, 0, 0, 0, 0)[0] == efi.EFI_UNSUPPORTED.value
    log = [str(c) for c in u.call_log]
    assert log[0] == (f"AllocatePages(Type=AllocateMaxAddress, MemoryType=EfiRuntimeServicesData, "
                      f"Pages=2, Memory={out:#x}) = EFI_SUCCESS")
    assert log[1] == (f"AllocatePages(Type=AllocateAddress, MemoryType=EfiRuntimeServicesData, "
                      f"Pages=1, Memory={out:#x}) = EFI_NOT_FOUND")
    assert log[3] == (f"CreateEventEx(Type=0x200, NotifyTpl=8, NotifyFunction=0x1234, "
                      f"NotifyContext=0x5678, EventGroup=NULL, Event={out + 8:#x}) = EFI_SUCCESS")
    assert log[-1] == "GetMemoryMap(...) = EFI_UNSUPPORTED", "no spec: arguments not read"


def test_launch_secret_table_layout() -> None:
    u = stand_in(SEED)
    g1, g2 = uuid.UUID(int=1), uuid.UUID(int=2)
    base = u.install_launch_secret([(g1, b"abc"), (g2, b"\x00" * 32)])
    loc = u.config_table(efi.CONFIDENTIAL_COMPUTING_SECRET_GUID)
    assert loc is not None
    assert u.vm.read_u64(loc) == base and u.vm.read_u64(loc + 8) >= 20 + 23 + 52
    hdr = u.vm.read(base, 20)
    assert hdr[:16] == efi.guid_bytes(efi.SECRET_TABLE_HEADER_GUID)
    assert struct.unpack("<I", hdr[16:])[0] == 20 + 23 + 52
    e1 = u.vm.read(base + 20, 23)
    assert e1[:16] == g1.bytes_le and struct.unpack("<I", e1[16:20])[0] == 23 and e1[20:] == b"abc"
    assert u.vm.read(base + 43, 16) == g2.bytes_le
    assert b"abc" not in u.vm.mc.host_read(base, 4096), "secret area is private"


@pytest.mark.parametrize("kw,msg", [({"machine": 0x14C}, "AMD64"), ({"magic": 0x10B}, "PE32+")])
def test_rejects_non_amd64_or_pe32(kw: dict, msg: str) -> None:
    u = stand_in(SEED)
    with pytest.raises(PeError, match=msg):
        u.load_image(build_pe(b"\xc3", [], 0x1000, **kw))
    with pytest.raises(PeError):
        u.load_image(b"not a PE file at all" * 4)


def test_entry_fault_is_reported_with_image_symbol() -> None:
    u = stand_in(SEED)
    text = assemble("xor %eax, %eax\nmov (%rax), %rax\nret")
    u.symbols = {"DriverEntry": Symbol("DriverEntry", 0x1000, len(text), ".text", "func")}
    r = u.start_image(build_pe(text, [], 0x1000))
    assert r.status is None and r.exit.fault is not None
    assert r.exit.fault.symbol == "DriverEntry+0x2" and r.exit.fault.cr2 == 0
