"""SEV memory controller: views by C-bit and key, mirror VMs, relocation to garbage, guest code at
C=1 and C=0 over the same page, and VMs aliasing RAM at high GPAs."""

from __future__ import annotations

import random

from emulate.cpuid import CpuidModel
from emulate.flat import FlatGuest
from emulate.machine import VM
from emulate.memctl import PAGE, RAW, MemoryController
from helperfw.codegen.emit import assemble

SEED = 7_340_033


def _mc(seed: int = SEED) -> MemoryController:
    print("seed", seed)
    rng = random.Random(seed)
    return MemoryController(8 << 20, rng=rng.randbytes)


def test_private_page_is_ciphertext_in_dram() -> None:
    mc = _mc()
    vm = VM(mc)
    vm.set_user_memory_region(0, 0, 4 << 20, 0)
    secret = b"top secret page!" * 256
    vm.write(0x3000, secret, encrypted=True)
    assert vm.read(0x3000, PAGE, encrypted=True) == secret
    raw = mc.host_read(0x3000, PAGE)
    assert raw != secret and secret[:16] not in raw
    assert vm.read(0x3000, PAGE, encrypted=False) == raw, "C=0 sees the DRAM bytes"
    assert vm.read(0x3000, PAGE, encrypted=True) == secret, "and back after a host read"


def test_mirror_shares_key_other_vm_sees_garbage() -> None:
    mc = _mc()
    main = VM(mc, name="main")
    main.set_user_memory_region(0, 0, 4 << 20, 0)
    mirror = VM(mc, mirror_of=main, name="mirror")
    mirror.set_user_memory_region(0, (1 << 42), 4 << 20, 0)  # same HPAs at a high GPA
    other = VM(mc, name="dest")
    other.set_user_memory_region(0, 0, 4 << 20, 0)
    data = bytes(range(256)) * 16
    main.write(0x5000, data)
    assert mirror.read((1 << 42) + 0x5000, PAGE) == data
    garbage = other.read(0x5000, PAGE)
    assert garbage != data and garbage != mc.host_read(0x5000, PAGE)
    # the destination writing with its own key makes the main VM read garbage
    other.write(0x6000, data)
    assert main.read(0x6000, PAGE) != data and other.read(0x6000, PAGE) == data


def test_moved_ciphertext_decrypts_to_garbage() -> None:
    mc = _mc()
    vm = VM(mc)
    vm.set_user_memory_region(0, 0, 4 << 20, 0)
    data = b"\x5a" * PAGE
    vm.write(0x7000, data)
    ct = mc.host_read(0x7000, PAGE)
    mc.host_write(0x9000, ct)  # host copies ciphertext to another HPA
    assert vm.read(0x9000, PAGE) != data
    mc.host_write(0x7000, ct)  # ... and back to where it belongs
    assert vm.read(0x7000, PAGE) == data


def test_guest_code_views_and_state_changes() -> None:
    """Guest code writes through C=1 and reads the same HPA through a C=0 alias: it must see
    ciphertext, then plaintext again via C=1 (page converted back and forth, TLBs flushed)."""
    mc = _mc()
    vm = VM(mc, cpuid=CpuidModel(cbit=51))
    g = FlatGuest(vm, ram_size=8 << 20)
    page = g.pages.alloc(1)
    g.map(page, page, PAGE, writable=True, executable=False, encrypted=True)
    alias = 0x7F00_0000_0000
    g.map(alias, page, PAGE, writable=True, executable=False, encrypted=False)
    code = assemble(f"""
        movabs ${page}, %rdi
        movabs ${alias}, %rsi
        movabs $0x0123456789abcdef, %rax
        mov %rax, (%rdi)
        mov (%rsi), %rbx
        mov (%rdi), %rcx
        mov (%rsi), %rdx
        hlt
    """)
    v = g.vcpu(g.place(code))
    assert v.run().reason == "hlt"
    hpa = vm.gpa_to_hpa(page)
    assert hpa is not None
    ct = mc.host_read(hpa, 8)
    assert v.get("rcx") == 0x0123456789ABCDEF
    assert v.get("rbx") == int.from_bytes(ct, "little") == v.get("rdx") != v.get("rcx")
    assert mc.state[hpa // PAGE] == RAW


def test_two_vms_share_dram_with_mirror_at_high_gpa() -> None:
    """The main VM writes private data; a mirror vCPU (same key) reads it at 2^42 + offset
    through its own page tables and copies it to a shared (C=0) page the host can read."""
    mc = MemoryController(16 << 20)
    main = VM(mc, cpuid=CpuidModel(cbit=47))
    gm = FlatGuest(main, ram_size=8 << 20)
    data_gpa = gm.pages.alloc(1)
    main.write(data_gpa, b"guest-private-42" * 256)
    mirror = VM(mc, mirror_of=main, name="mirror")
    ram_base = 1 << 42
    mirror.set_user_memory_region(1, ram_base, 8 << 20, 0)  # alias of the main VM's RAM
    gx = FlatGuest(mirror, ram_gpa=0, ram_size=4 << 20, hpa=8 << 20, slot=0)
    mailbox = gx.pages.alloc(1, encrypted=False)
    gx.map(ram_base, ram_base, 8 << 20, writable=False, executable=False, encrypted=True)
    gx.map(mailbox, mailbox, PAGE, writable=True, executable=False, encrypted=False)
    src = ram_base + data_gpa
    code = assemble(f"""
        movabs ${src}, %rsi
        movabs ${mailbox}, %rdi
        mov $4096, %rcx
        rep movsb
        hlt
    """)
    v = gx.vcpu(gx.place(code))
    ex = v.run()
    assert ex.reason == "hlt", ex
    mb_hpa = mirror.gpa_to_hpa(mailbox)
    assert mb_hpa is not None
    assert mc.host_read(mb_hpa, 32) == b"guest-private-42" * 2
    # the main VM's view of its own page is unchanged, the host sees only ciphertext there
    assert main.read(data_gpa, 16) == b"guest-private-42"
    assert b"guest-private" not in mc.host_read(main.gpa_to_hpa(data_gpa) or 0, PAGE)


def test_cross_vcpu_tlb_flush_on_state_change() -> None:
    """vCPU A (key K) keeps a TLB entry for a private page; vCPU B of another VM (key K2) then
    uses the same HPA with C=1. When A runs again it must see its own plaintext, which only
    works if B's conversion flushed A's TLB (A's run does not flush it)."""
    mc = _mc()
    a_vm = VM(mc, cpuid=CpuidModel(cbit=47), name="A")
    ga = FlatGuest(a_vm, ram_size=4 << 20)
    page = ga.pages.alloc(1)
    a_vm.write(page, b"A" * PAGE)
    ga.map(0x6000_0000, page, PAGE, writable=True, executable=False)
    a = ga.vcpu(ga.place(assemble("""
        movabs $0x60000000, %rdi
    1:  mov (%rdi), %rax
        hlt
        jmp 1b
    """)))
    b_vm = VM(mc, cpuid=CpuidModel(cbit=47), name="B")
    gb = FlatGuest(b_vm, ram_gpa=0, ram_size=4 << 20, hpa=4 << 20, slot=0)  # B's own RAM ...
    b_vm.set_user_memory_region(1, 1 << 30, PAGE, a_vm.gpa_to_hpa(page) or 0)  # ... + A's page
    gb.map(1 << 30, 1 << 30, PAGE, writable=True, executable=False)
    b = gb.vcpu(gb.place(assemble("""
        movabs $0x40000000, %rdi
    1:  mov (%rdi), %rax
        hlt
        jmp 1b
    """)))
    for _ in range(2):
        assert a.run().reason == "hlt" and a.get("rax") == int.from_bytes(b"A" * 8, "little")
        assert b.run().reason == "hlt" and b.get("rax") != int.from_bytes(b"A" * 8, "little")
    fills = a.fills
    assert a.run().reason == "hlt" and a.get("rax") == int.from_bytes(b"A" * 8, "little")
    assert a.fills > fills, "A refilled its TLB after B converted the page"
