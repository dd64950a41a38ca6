"""Guest fault reports: what went wrong, where, and the instruction that did it.

Why: a helper bug shows up as a #PF/#GP deep in generated code; a report with a symbolised RIP,
CR2, the access kind and the disassembly is what makes it debuggable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import capstone

_CS = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


def disassemble_one(code: bytes, rip: int) -> str:
    """Capstone text of the first instruction in `code` (at address `rip`), or a hex dump."""
    for insn in _CS.disasm(code, rip, 1):
        return f"{insn.mnemonic} {insn.op_str}".strip()
    return f"<undecodable {code[:8].hex()}>"


@dataclass
class GuestFault(Exception):
    """An architectural fault the guest took (#PF, #GP, #UD, ...) or a nested-paging miss ("NPF").

    `access` is "read", "write" or "fetch" for memory faults; `error_code` is the x86 error code."""

    kind: str
    rip: int
    reason: str
    cr2: int | None = None
    access: str | None = None
    error_code: int = 0
    disasm: str = ""
    symbol: str = ""

    def __post_init__(self) -> None:
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.rip:#x}" + (f" <{self.symbol}>" if self.symbol else "")
        parts = [f"{self.kind} at RIP {where}: {self.reason}"]
        if self.cr2 is not None:
            parts.append(f"CR2={self.cr2:#x}")
        if self.access:
            parts.append(f"access={self.access}")
        if self.kind in ("#PF", "#GP"):
            parts.append(f"error_code={self.error_code:#x}")
        if self.disasm:
            parts.append(f"insn: {self.disasm}")
        return "; ".join(parts)


Symbolizer = Callable[[int], str]


class BudgetExhausted(Exception):
    """The per-run instruction budget ran out (a looping or runaway guest)."""

    def __init__(self, rip: int, budget: int, symbol: str = "") -> None:
        self.rip, self.budget, self.symbol = rip, budget, symbol
        sym = f" <{symbol}>" if symbol else ""
        super().__init__(f"budget exhausted ({budget} instructions) at RIP {rip:#x}{sym}")
