"""Emulator for the migration helper: unicorn vCPUs in long mode whose TLB is filled by
a Python page walk (C-bit aware, GPAs beyond 40 bits), a simulated SEV memory controller over one
shared DRAM buffer, KVM-style VMs with memslots (mirror VMs share the key), exits through a
per-VM handler table, and a UEFI stand-in that loads and starts the helper's PE32+ file.

Modules, in the order data flows through them:
memctl (DRAM, keys, page views) · mmu (the page walk) · machine (VM, VCpu core, run loop) ·
tlb (translation for a vCPU) · exits (the exit table and the hooks that catch exits) ·
faults (crash reports) · rdrand / seeds (every random stream from one seed) · cpuid ·
flat (a ready-made guest) · uefi (the firmware stand-in) · host (QEMU/KVM model) · mirror
(mirror-VM creation) · workload (the guest's DSL program) · guest (its loader) · mailbox,
stream, migration (the host side of a live migration).
"""
