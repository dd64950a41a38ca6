"""Guest fault reports: what went wrong, where, and the machine state around it.

Why: a helper bug shows up as a #PF/#GP deep in generated code, often in the middle of a batch the
host drove. The one-line summary (`str(fault)`) names the fault, RIP as symbol+offset from the
link map, CR2, the access kind and the disassembled instruction; the crash dump (`fault.dump()`,
also attached as the exception's note so tracebacks show it) adds the registers, the VM's memory
map with each range's C-bit view, and the last mailbox commands the host sent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import capstone

from emulate.memctl import PAGE
from emulate.mmu import ACCESS_FETCH, PageFault
from helperfw.codegen.image import Symbol, SymbolTable

if TYPE_CHECKING:
    from emulate.machine import VCpu

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS_DETAIL = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
_CS_DETAIL.detail = True

Symbolizer = Callable[[int], str]
"""symbolize(rip) -> "name+0xoff", or "" when the address is not in a known image."""

DUMP_REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                  *(f"r{i}" for i in range(8, 16)), "rip", "rflags", "cr0", "cr3", "cr4")
ERROR_CODE_KINDS = ("#PF", "#GP", "#VC")  # exceptions that push an error code worth showing
# Exception vectors by mnemonic (AMD APM vol. 2 §8.2); "vector N" names any other.
VECTORS = {"#DE": 0, "#DB": 1, "#BP": 3, "#OF": 4, "#BR": 5, "#UD": 6, "#NM": 7, "#DF": 8,
           "#TS": 10, "#NP": 11, "#SS": 12, "#GP": 13, "#PF": 14, "#MF": 16, "#AC": 17,
           "#MC": 18, "#XM": 19, "#VE": 20, "#CP": 21, "#VC": 29, "#SX": 30}
MAX_RUNS_PER_SLOT = 8  # page-view runs listed per memslot before "(+N more)"


def disassemble_one(code: bytes, rip: int) -> str:
    """Capstone text of the first instruction in `code` (at address `rip`), or a hex dump."""
    for insn in _CS.disasm(code, rip, 1):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    return f"<undecodable {code[:8].hex()}>"


def vector_of(kind: str) -> int | None:
    """The exception vector a fault kind raises in the guest; None for what is no guest
    exception (a nested-paging miss "NPF", an emulator error)."""
    if kind in VECTORS:
        return VECTORS[kind]
    if kind.startswith("vector ") and kind[7:].isdigit():
        return int(kind[7:])
    return None


def capture_fault(v: VCpu, kind: str, rip: int, reason: str, **kw: object) -> GuestFault:
    """The crash report of vCPU `v` taking fault `kind` at `rip`: its registers, the
    instruction, symbol+offset, its VM's memory map and recent mailbox commands."""
    regs = v.regs.snapshot()
    regs["rip"] = rip
    code = _code_at(v, rip)
    return GuestFault(kind, rip, reason,  # type: ignore[arg-type]
                      disasm="<RIP not mapped>" if code is None else disassemble_one(code, rip),
                      symbol=v.symbolize(rip) if v.symbolize else "", vm=v.vm.name,
                      registers=regs, memory_map=v.vm.memory_map(), key_id=v.vm.key_id,
                      commands=list(v.vm.commands), **kw)


def _code_at(v: VCpu, rip: int) -> bytes | None:
    """Up to 15 bytes at `rip` (fewer at the end of a mapping), None if RIP is unmapped."""
    for n in (15, PAGE - rip % PAGE):
        try:
            return v.read_virt(rip, n)
        except PageFault:
            continue
    return None


def fault_address(v: VCpu, pf: PageFault, rip: int) -> int:
    """The exact faulting address (CR2) of walk failure `pf` of the instruction at `rip`.

    unicorn hands the TLB-fill hook only the page, so this recomputes the address from the
    faulting instruction's memory operand; it falls back to the page address when the
    instruction cannot be read or has no operand in that page."""
    page = pf.va & ~(PAGE - 1)
    if pf.access == ACCESS_FETCH:
        return rip if rip & ~(PAGE - 1) == page else pf.va
    reg = v.regs.__getitem__
    for insn in _CS_DETAIL.disasm(_code_at(v, rip) or b"", rip, 1):
        for op in insn.operands:
            if op.type != capstone.x86.X86_OP_MEM:
                continue
            m = op.mem
            ea = m.disp
            if m.base == capstone.x86.X86_REG_RIP:
                ea += rip + insn.size
            elif m.base:
                ea += reg(insn.reg_name(m.base))
            if m.index:
                ea += reg(insn.reg_name(m.index)) * m.scale
            ea &= 2**64 - 1
            if ea & ~(PAGE - 1) == page:
                return ea
            if (ea + op.size - 1) & ~(PAGE - 1) == page:
                return page  # access straddling into the faulting page
    return pf.va


def image_symbolizer(symbols: Mapping[str, Symbol] | SymbolTable, base: int,
                     size: int) -> Symbolizer:
    """Name addresses of an image loaded at `base`: "sym+0xoff" from the link map, "image+0xrva"
    inside the image but outside every symbol, "" outside the image."""
    table = symbols if isinstance(symbols, SymbolTable) else SymbolTable(symbols.values())

    def symbolize(rip: int) -> str:
        rva = rip - base
        if not 0 <= rva < size:
            return ""
        return table.symbolize(rva) or f"image+{rva:#x}"

    return symbolize


@dataclass(frozen=True)
class MemRange:
    """A run of pages of one memslot with the same view in the memory controller.

    view: "C=1 key N" (the page holds plaintext for VM key N: private memory in use), or "C=0"
    (raw DRAM: a shared page, or private ciphertext nobody read through C=1 since)."""

    slot: int
    label: str  # what the slot is (RAM block, helper region, ...), "" if unnamed
    gpa: int
    size: int
    hpa: int
    view: str


@dataclass
class GuestFault(Exception):
    """An architectural fault the guest took (#PF, #GP, #UD, ...) or a nested-paging miss ("NPF").

    `access` is "read", "write" or "fetch" for memory faults; `error_code` is the x86 error code.
    The crash-dump fields are filled by the vCPU that took the fault."""

    kind: str
    rip: int
    reason: str
    cr2: int | None = None
    access: str | None = None
    error_code: int = 0
    disasm: str = ""
    symbol: str = ""
    vm: str = ""
    registers: dict[str, int] = field(default_factory=dict)
    memory_map: list[MemRange] = field(default_factory=list)
    key_id: int = 0  # the faulting VM's key: its own pages read "C=1 key <key_id>"
    commands: list[str] = field(default_factory=list)  # last mailbox commands, oldest first
    delivery: str = ""  # why the guest could not take it (no IDT, bad gate, ...): a triple fault

    @property
    def vector(self) -> int | None:
        return vector_of(self.kind)

    def __post_init__(self) -> None:
        super().__init__(str(self))
        if self.registers or self.memory_map or self.commands:
            self.add_note(self.details())

    def __str__(self) -> str:
        where = f"{self.rip:#x}" + (f" <{self.symbol}>" if self.symbol else "")
        parts = [f"{self.kind} at RIP {where}: {self.reason}"]
        if self.cr2 is not None:
            parts.append(f"CR2={self.cr2:#x}")
        if self.access:
            parts.append(f"access={self.access}")
        if self.kind in ERROR_CODE_KINDS:
            parts.append(f"error_code={self.error_code:#x}")
        if self.disasm:
            parts.append(f"insn: {self.disasm}")
        if self.delivery:
            parts.append(f"triple fault: {self.delivery}")
        return "; ".join(parts)

    def dump(self) -> str:
        """The whole crash report: the summary line, then `details()`."""
        return f"{self}\n{self.details()}"

    def details(self) -> str:
        """Registers, memory map and recent mailbox commands, one item per line."""
        out = [f"vCPU of {self.vm or '?'}:"]
        regs = [f"{r}={self.registers[r]:#018x}" for r in DUMP_REGISTERS if r in self.registers]
        out += ["  " + "  ".join(regs[i : i + 4]) for i in range(0, len(regs), 4)]
        if self.memory_map:
            out.append(f"memory map (own key {self.key_id}; C=1 key N: plaintext view of key N, "
                       "C=0: raw DRAM):")
            out += _memory_lines(self.memory_map)
        if self.commands:
            out.append(f"last {len(self.commands)} mailbox commands (oldest first):")
            out += [f"  {c}" for c in self.commands]
        return "\n".join(out)


def _memory_lines(ranges: list[MemRange]) -> list[str]:
    """One line per memslot, then its view runs (capped at MAX_RUNS_PER_SLOT)."""
    out: list[str] = []
    slot = None
    shown = hidden = 0
    for r in ranges:
        if r.slot != slot:
            if hidden:
                out.append(f"      (+{hidden} more runs)")
            slot, shown, hidden = r.slot, 0, 0
            total = sum(x.size for x in ranges if x.slot == r.slot)
            label = f" {r.label}" if r.label else ""
            out.append(f"  slot {r.slot}{label}: gpa {r.gpa:#x}+{total:#x} -> hpa {r.hpa:#x}")
        if shown < MAX_RUNS_PER_SLOT:
            out.append(f"      {r.gpa:#x}-{r.gpa + r.size:#x} {r.view}")
            shown += 1
        else:
            hidden += 1
    if hidden:
        out.append(f"      (+{hidden} more runs)")
    return out


class BudgetExhausted(Exception):
    """The per-run instruction budget ran out (a looping or runaway guest)."""

    def __init__(self, rip: int, budget: int, symbol: str = "") -> None:
        self.rip, self.budget, self.symbol = rip, budget, symbol
        sym = f" <{symbol}>" if symbol else ""
        super().__init__(f"budget exhausted ({budget} instructions) at RIP {rip:#x}{sym}")
