"""Mirror-VM creation: what the host does once the helper has announced its BootInfo
(docs/PROTOCOL.md, "Address-space options").

KVM_CREATE_VM + KVM_CAP_VM_COPY_ENC_CONTEXT_FROM(main VM): the mirror shares the main VM's key
(and its SEV-ES mode), gets the memslots its option asks for, the RAM window
`ram_base + ram_addr` over every RAM block (unplugged ones too), and one vCPU in 64-bit mode at
the announced RIP/CR3/RSP: its initial state (under SEV-ES the VMSA, built from BootInfo and
nothing else, LAUNCH_UPDATE_VMSA) is launched at once, after which an SEV-ES host can no longer
read or write its registers:

* shift: the guest's low 4 GiB mapped 1:1;
* tuples: each helper region (code, rodata, data, mailbox) mapped at its mirror GPA;
* isolated: as tuples, but every region except the mailbox is first copied into mirror-only DRAM
  by a modelled PSP copy, so the running helper shares nothing with the guest but the RAM window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from emulate.machine import VM, VCpu
from emulate.memctl import PAGE, MemoryController
from emulate.rdrand import RdrandSource
from helperfw.runtime import protocol as P

if TYPE_CHECKING:
    from emulate.host import Host

FOUR_GIB = 1 << 32
ENTRY_SYMBOL = "mh_entry"  # the mirror's entry point (BootInfo.entry_rip) in the link map
REGION_LABELS = {P.REGION_CODE: "helper code", P.REGION_RODATA: "helper rodata",
                 P.REGION_DATA: "helper data", P.REGION_MAILBOX: "mailbox"}


@dataclass
class HelperInfo:
    """What MH_HC_ANNOUNCE told the host (BootInfo, parsed), plus the host's view of it."""

    bootinfo_gpa: int
    bootinfo: object  # construct Container of P.BootInfo
    regions: list = field(default_factory=list)

    @property
    def option(self) -> int:
        return int(self.bootinfo.option)  # type: ignore[attr-defined]


@dataclass
class Mirror:
    """A mirror VM (same key as the main VM), its vCPU, and where the host reaches the mailbox."""

    vm: VM
    vcpu: VCpu
    info: HelperInfo
    mailbox_hpa: int
    ram_base: int
    ram_max: int
    copied_bytes: int = 0  # isolated: bytes moved by the modelled PSP copy


def psp_copy(mc: MemoryController, key_id: int, src_hpa: int, dst_hpa: int,
             length: int) -> None:
    """Modelled PSP copy (SEV SEND/RECEIVE_UPDATE_DATA style): decrypt with the VM's key at the
    old location, re-encrypt for the new one, so the copy reads back correctly."""
    for off in range(0, length, PAGE):
        n = min(PAGE, length - off)
        mc.guest_write(dst_hpa + off, mc.guest_read(src_hpa + off, n, key_id, True), key_id, True)


class _Slots:
    """Numbers the mirror's memslots in the order they are added."""

    def __init__(self, vm: VM) -> None:
        self.vm, self.next = vm, 0

    def add(self, gpa: int, size: int, hpa: int, label: str) -> None:
        self.vm.set_user_memory_region(self.next, gpa, size, hpa, label)
        self.next += 1


def _map_low_4g(host: Host, slots: _Slots) -> None:
    for b in host.blocks:
        if b.gpa is not None and b.gpa < FOUR_GIB:
            slots.add(b.gpa, min(b.size, FOUR_GIB - b.gpa), b.hpa, f"low 4 GiB: {b.name}")


def _map_regions(host: Host, info: HelperInfo, slots: _Slots, isolated: bool) -> int:
    """Map each helper region at its mirror GPA; isolated: copy it first. Returns bytes copied."""
    copied = 0
    for r in info.regions:
        length = -(-r.length // PAGE) * PAGE
        src = host.vm.gpa_to_hpa(r.main_gpa)
        if src is None or host.vm.gpa_to_hpa(r.main_gpa + length - 1) != src + length - 1:
            raise ValueError(f"region {r.main_gpa:#x}+{length:#x} not in one memslot")
        hpa, what = src, "shared with the guest"
        if isolated and r.kind != P.REGION_MAILBOX:
            hpa, what = host.alloc_mirror_only(length), "PSP copy"
            psp_copy(host.mc, host.vm.key_id, src, hpa, length)
            copied += length
        slots.add(r.mirror_gpa, length, hpa, f"{REGION_LABELS.get(r.kind, r.kind)} ({what})")
    return copied


def create_mirror(host: Host) -> Mirror:
    """Build the mirror VM for the helper `host` announced, with its vCPU launched."""
    info = host.info
    if info is None:
        raise RuntimeError("no helper announced")
    bi = info.bootinfo
    option = info.option
    if option not in (P.OPT_SHIFT, P.OPT_TUPLES, P.OPT_ISOLATED):
        raise ValueError(f"unknown option {option}")
    ram_base, ram_max = int(bi.ram_base), int(bi.ram_max)  # type: ignore[attr-defined]
    if host.ram_size > ram_max:
        raise ValueError(f"guest RAM {host.ram_size:#x} exceeds the helper's window {ram_max:#x}")
    mailbox_hpa = host.vm.gpa_to_hpa(bi.mailbox_gpa)  # type: ignore[attr-defined]
    if mailbox_hpa is None:
        raise ValueError(f"mailbox GPA {bi.mailbox_gpa:#x} outside guest RAM")  # type: ignore[attr-defined]
    name = f"{host.name}-mirror"
    vm = VM(host.mc, mirror_of=host.vm, name=name,
            rdrand=RdrandSource(host.seeds.derive("rdrand:mirror")))
    slots = _Slots(vm)
    copied = 0
    if option == P.OPT_SHIFT:
        _map_low_4g(host, slots)
    else:
        copied = _map_regions(host, info, slots, option == P.OPT_ISOLATED)
    for b in host.blocks:
        slots.add(ram_base + b.offset, b.size, b.hpa, f"RAM window: {b.name}")
    entry = int(bi.entry_rip)  # type: ignore[attr-defined]
    # the helper's image sits at entry_rip - rva(mh_entry) in the mirror (tuples and isolated
    # run it at other VAs than the main VM does)
    entry_rva = host.uefi.symbol_rva(ENTRY_SYMBOL)
    symbolize = host.uefi.symbolize if entry_rva is None else host.uefi.image_symbolizer(
        entry - entry_rva)
    vcpu = vm.create_vcpu(rip=entry, cr3=bi.cr3, rsp=bi.rsp,  # type: ignore[attr-defined]
                          symbolize=symbolize)
    vcpu.launch()
    return Mirror(vm, vcpu, info, mailbox_hpa, ram_base, ram_max, copied)
