"""The crash dump of a guest fault: summary line, registers, the memory map with each range's
C-bit view (memslots and page states), and the last mailbox commands, pinned line by line."""

from __future__ import annotations

import random

import pytest

from emulate.cpuid import CpuidModel
from emulate.faults import GuestFault
from emulate.flat import FlatGuest
from emulate.machine import COMMAND_HISTORY, VM
from emulate.memctl import PAGE, MemoryController
from helperfw.codegen.emit import assemble

SEED = 5
WINDOW = 1 << 40  # a second memslot far above unicorn's 40-bit limit

EXPECTED = """\
#PF at RIP 0x5025 <snippet+0x25>: PML4E not present; CR2=0x7fff00000018; access=write; \
error_code=0x2; insn: mov qword ptr [rax + 0x18], 1; triple fault: no IDT loaded (IDTR limit 0)
vCPU of dump-vm:
  rax=0x00007fff00000000  rbx=0x1111111111111111  rcx=0x2222222222222222  rdx=0x0000000000000000
  rsi=0x0000000000000000  rdi=0x0000000000000000  rbp=0x0000000000000000  rsp=0x0000000000015ff8
  r8=0x0000000000000000  r9=0x0000000000000000  r10=0x0000000000000000  r11=0x0000000000000000
  r12=0x0000000000005000  r13=0x0000000000000000  r14=0x0000000000000000  r15=0x0000000000000000
  rip=0x0000000000005025  rflags=0x0000000000000002  cr0=0x0000000080010011  cr3=0x0008000000000000
  cr4=0x0000000000050220
memory map (own key 1; C=1 key N: plaintext view of key N, C=0: raw DRAM):
  slot 0 pc.ram: gpa 0x0+0x200000 -> hpa 0x0
      0x0-0x1000 C=1 key 1
      0x1000-0x2000 C=0
      0x2000-0x16000 C=1 key 1
      0x16000-0x200000 C=0
  slot 1 RAM window: gpa 0x10000000000+0x100000 -> hpa 0x200000
      0x10000000000-0x10000003000 C=0
      0x10000003000-0x10000004000 C=1 key 1
      0x10000004000-0x10000100000 C=0
last 8 mailbox commands (oldest first):
  SEND count=2
  SEND count=3
  SEND count=4
  SEND count=5
  SEND count=6
  SEND count=7
  SEND count=8
  SEND count=9"""


def faulting_guest():
    """C-bit 51 guest: page-table root at GPA 0, a shared page at 0x1000 (C=0), private code
    and stack, a private page in the high RAM window; the code stores through an unmapped VA."""
    print("seed", SEED)
    mc = MemoryController(4 << 20, rng=random.Random(SEED).randbytes)
    vm = VM(mc, cpuid=CpuidModel(cbit=51), name="dump-vm")
    g = FlatGuest(vm, ram_size=2 << 20, label="pc.ram")
    vm.set_user_memory_region(1, WINDOW, 1 << 20, 2 << 20, label="RAM window")
    vm.write(WINDOW + 3 * PAGE, b"secret", encrypted=True)
    shared = g.pages.alloc(1, encrypted=False)
    g.map(shared, shared, PAGE, writable=True, executable=False, encrypted=False)
    code = assemble("""
        movabs $0x1111111111111111, %rbx
        movabs $0x2222222222222222, %rcx
        mov $0x5000, %r12
        movabs $0x7fff00000000, %rax
        movq $1, 0x18(%rax)
        hlt
    """)
    rip = g.place(code)
    v = g.vcpu(rip, symbolize=lambda a: f"snippet+{a - rip:#x}")
    for i in range(COMMAND_HISTORY + 2):  # the ring keeps the last COMMAND_HISTORY
        vm.note_command(f"SEND count={i}")
    return v


def test_crash_dump_content_is_pinned() -> None:
    v = faulting_guest()
    ex = v.run()
    assert ex.reason == "fault" and ex.fault is not None
    assert ex.fault.dump() == EXPECTED
    assert str(ex.fault) == EXPECTED.splitlines()[0], "str() stays the one-line summary"


def test_crash_dump_travels_with_the_exception() -> None:
    """run_to_hlt raises the fault; a traceback shows the dump (the exception's note)."""
    v = faulting_guest()
    with pytest.raises(GuestFault) as info:
        v.run_to_hlt()
    assert info.value.__notes__ == [EXPECTED.split("\n", 1)[1]]
