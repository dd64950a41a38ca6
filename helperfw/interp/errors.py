"""What the reference interpreter raises when the program does something with no defined
result, faults on memory, or executes trap()."""

from __future__ import annotations


class InterpError(Exception):
    """The interpreted program did something with no defined result (or nothing models it)."""


class MemoryFault(InterpError):
    def __init__(self, addr: int, size: int, kind: str) -> None:
        super().__init__(f"{kind} of {size} bytes at {addr:#x}: not mapped"
                         if kind != "write to read-only" else f"write of {size} bytes at "
                         f"{addr:#x}: read-only memory")
        self.addr, self.size, self.kind = addr, size, kind


class Trap(InterpError):
    """trap() was executed (ud2 in the compiled code)."""

