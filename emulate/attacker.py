"""The hostile host's hands: everything the threat model (docs/SECURITY.md) lets QEMU/KVM do to a
machine, as one API. The hostile tests use nothing else to attack the helper.

On SEV and SEV-ES memory is encrypted but has neither integrity nor freshness: the host reads the
DRAM ciphertext of any private page and can write it back later at the same host-physical
address, where the guest then reads its *old* plaintext (the memory controller binds ciphertext
to key and address, not to time). The host also reads and writes every shared page at any
moment, decides when a vCPU runs and for how many instructions (preemption at any instruction
boundary), and, on plain SEV only, reads and writes every register at every exit. Every
register access here goes through the vCPU's host API (`VCpu.get`, `save_state`...), which
refuses a launched SEV-ES vCPU: its VMSA is encrypted and integrity-checked, so a snapshot of
an SEV-ES machine keeps DRAM but cannot keep (or put back) its registers.

Everything here works on host-physical addresses (HPAs: offsets into the MemoryController's
DRAM) because that is the host's view; `page_hpas` turns a guest range into them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from emulate.machine import VM, Exit, VCpu
from emulate.memctl import PAGE, MemoryController

Stop = Callable[[VCpu, int], None]
"""stop(vcpu, instructions_so_far): the host's action while the vCPU is preempted."""


@dataclass
class PageSnapshot:
    """The DRAM ciphertext of some pages at one moment: hpa -> 4096 bytes."""

    pages: dict[int, bytes] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pages)


@dataclass
class MachineSnapshot:
    """A machine at one moment: DRAM with the memory controller's page views (all of it, or
    the pages a caller knows can change) and the vCPUs' architectural state: a host that saves
    and restores the entire VM."""

    pages: dict[int, tuple[bytes, int]]  # page hpa -> (buffer bytes, page view); {} = all
    dram: bytes
    states: list[int]
    contexts: list[tuple[VCpu, object]]


class HostHands:
    """What a hostile host can do to the machine behind one MemoryController."""

    def __init__(self, mc: MemoryController) -> None:
        self.mc = mc

    # -- shared memory (plaintext to everyone) ---------------------------------------------------
    def read(self, hpa: int, n: int) -> bytes:
        """DRAM bytes: plaintext of shared pages, ciphertext of private ones."""
        return self.mc.host_read(hpa, n)

    def write(self, hpa: int, data: bytes) -> None:
        self.mc.host_write(hpa, data)

    # -- replay of private memory ----------------------------------------------------------------
    @staticmethod
    def page_hpas(vm: VM, gpa: int, length: int) -> list[int]:
        """HPAs of the pages backing [gpa, gpa + length) in `vm`'s memslots."""
        out = []
        for g in range(gpa & ~(PAGE - 1), gpa + length, PAGE):
            hpa = vm.gpa_to_hpa(g)
            if hpa is None:
                raise ValueError(f"GPA {g:#x} is not backed by DRAM in {vm.name}")
            out.append(hpa)
        return out

    def snapshot(self, hpas: Iterable[int]) -> PageSnapshot:
        """Copy the ciphertext of these pages (what the host can read of private memory)."""
        return PageSnapshot({h & ~(PAGE - 1): self.mc.host_read(h & ~(PAGE - 1), PAGE)
                             for h in hpas})

    def restore(self, snap: PageSnapshot, hpas: Iterable[int] | None = None) -> None:
        """Write saved ciphertext back at the same HPAs (all of `snap`, or only `hpas`): the
        guest then reads the plaintext those pages held when the snapshot was taken."""
        for h in snap.pages if hpas is None else [h & ~(PAGE - 1) for h in hpas]:
            self.mc.host_write(h, snap.pages[h])

    def snapshot_machine(self, vcpus: Iterable[VCpu],
                         hpas: Iterable[int] | None = None) -> MachineSnapshot:
        """All of DRAM, or only the pages `hpas` (faster; valid when nothing else changes)."""
        mc = self.mc
        ctxs = [(v, v.save_state()) for v in vcpus]
        if hpas is None:
            return MachineSnapshot({}, bytes(mc.mem), list(mc.state), ctxs)
        pages = {h & ~(PAGE - 1): (bytes(mc.mem[h & ~(PAGE - 1):(h & ~(PAGE - 1)) + PAGE]),
                                   mc.state[h // PAGE]) for h in hpas}
        return MachineSnapshot(pages, b"", [], ctxs)

    def restore_machine(self, snap: MachineSnapshot) -> None:
        """Put DRAM, page views and vCPU state back exactly (translated code is dropped)."""
        mc = self.mc
        if snap.pages:
            for h, (data, state) in snap.pages.items():
                mc.mem[h:h + PAGE] = data
                mc.state[h // PAGE] = state
        else:
            mc.mem[:] = snap.dram
            mc.state[:] = snap.states
        for v, ctx in snap.contexts:
            v.restore_state(ctx)
        for v, _ in snap.contexts:
            v.flush_tlb()
            v._mark_code_dirty()

    # -- registers (plain SEV: the host sees and sets them at every exit) ------------------------
    @staticmethod
    def registers(vcpu: VCpu, names: Iterable[str]) -> dict[str, int]:
        """Raises RegisterAccessDenied for a launched SEV-ES vCPU."""
        return {n: vcpu.get(n) for n in names}

    @staticmethod
    def xmm(vcpu: VCpu) -> list[bytes]:
        """The sixteen XMM registers, as the host of a plain-SEV guest reads them at an exit."""
        return [vcpu.get(f"xmm{i}").to_bytes(16, "little") for i in range(16)]

    # -- scheduling --------------------------------------------------------------------------------
    @staticmethod
    def run_preempted(vcpu: VCpu, stops: list[tuple[int, Stop]], *,
                      budget: int = 50_000_000) -> Exit:
        """Run until HLT, stopping after each listed instruction count (ascending) to act.

        unicorn counts instructions exactly when given a budget, so each stop lands on the
        instruction boundary it names; the run then continues where it stopped."""
        done = 0
        for at, act in sorted(stops, key=lambda s: s[0]):
            if at <= done:
                continue
            ex = vcpu.run(at - done)
            if ex.reason != "budget":
                return ex  # finished (or faulted) before this stop
            done = at
            act(vcpu, done)
        return vcpu.run(max(1, budget - done))
