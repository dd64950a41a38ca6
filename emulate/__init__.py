"""Emulator for the migration helper (SPEC §7): unicorn vCPUs in long mode whose TLB is filled by
a Python page walk (C-bit aware, GPAs beyond 40 bits), a simulated SEV memory controller over one
shared DRAM buffer, KVM-style VMs with memslots (mirror VMs share the key), Python-handled exits,
and a UEFI stand-in that loads and starts the helper's PE32+ file.

Entry points: MemoryController (emulate.memctl), VM / VCpu / Exit (emulate.machine),
CpuidModel (emulate.cpuid), FlatGuest (emulate.flat), UefiStandIn (emulate.uefi),
walk / PhysLayout / PageTableBuilder (emulate.mmu), GuestFault (emulate.faults).
"""
