"""A VM's RDRAND: a deterministic stream per VM, with the AMD errata a test can switch on.

Why a source object: the helper's session ids and challenges come from RDRAND, so each VM's stream
must derive from the run's seed (replayable, and different for the main VM, its mirror and the
other host). And the helper must survive a broken RDRAND (docs/SECURITY.md): parts have shipped that return
a constant with CF=1 (all ones after resume on some family 15h/16h and Zen 2 firmware) or keep
failing with CF=0; a stuck generator may also hand back the previous value. Tests inject each of
these here, for a number of draws or until `heal()`.
"""

from __future__ import annotations

import random

from emulate.seeds import Seeds

ALL_ONES = 2**64 - 1

NORMAL, STUCK, FAIL, REPEAT = "normal", "stuck", "fail", "repeat"


class RdrandSource:
    """`draw(bits) -> (value, cf)` for one RDRAND of a 16/32/64-bit register."""

    def __init__(self, seed: int | bytes = 0) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self.mode = NORMAL
        self._left: int | None = None  # draws the injected mode still affects (None: all)
        self._constant = ALL_ONES
        self.last: int | None = None  # the last value returned with CF=1 (64 bits)
        self.draws = 0

    def fork(self, label: str) -> RdrandSource:
        """An independent stream derived from this one's seed (e.g. a mirror VM's own)."""
        return RdrandSource(Seeds(self.seed).derive("rdrand-fork:" + label))

    # ---- errata injection -----------------------------------------------------------------
    def stuck(self, value: int = ALL_ONES, times: int | None = None) -> None:
        """Return `value` (truncated to the operand) with CF=1: the errata's constant."""
        self._inject(STUCK, times)
        self._constant = value & ALL_ONES

    def fail(self, times: int | None = None) -> None:
        """Return 0 with CF=0 ("no random number available"), `times` draws or always."""
        self._inject(FAIL, times)

    def repeat(self, times: int | None = None) -> None:
        """Return the previous value again with CF=1 (a generator that stopped advancing)."""
        self._inject(REPEAT, times)

    def heal(self) -> None:
        self.mode, self._left = NORMAL, None

    def _inject(self, mode: str, times: int | None) -> None:
        if times is not None and times <= 0:
            raise ValueError(f"times must be positive, not {times}")
        self.mode, self._left = mode, times

    # ---- the instruction --------------------------------------------------------------------
    def draw(self, bits: int) -> tuple[int, bool]:
        """One RDRAND of width `bits`: (value, CF). The stream advances by 64 bits per normal
        draw whatever the width, so a program's later values do not depend on operand sizes."""
        self.draws += 1
        mode = self.mode
        if self._left is not None:
            self._left -= 1
            if self._left == 0:
                self.heal()
        mask = (1 << bits) - 1
        if mode == FAIL:
            return 0, False
        if mode == STUCK:
            return self._constant & mask, True
        if mode == REPEAT and self.last is not None:
            return self.last & mask, True
        self.last = self._rng.getrandbits(64)
        return self.last & mask, True
