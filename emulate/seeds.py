"""One seed, many named streams: every emulated VM's RDRAND, the DRAM keys and the transport key.

Why: a run must be replayable from the one `--seed` it prints, and no two consumers may
share a stream by accident (the mirror VM's RDRAND must not repeat the main VM's, the source and
the destination must not get the same memory key). Each consumer asks for its own name; the
value is SHAKE-256 over a domain tag, the seed and the path of names, so adding a consumer never
shifts the values the others get.
"""

from __future__ import annotations

import hashlib
import random

_DOMAIN = b"helperfw-emulate-seed/1"
TRANSPORT_KEY_BYTES = 32  # the guest owner's AES-256 transport key (docs/INTEGRATION.md)


class Seeds:
    """Named sub-seeds of one root seed. `child(name)` scopes further names (one per host or VM)."""

    def __init__(self, seed: int | bytes, path: tuple[str, ...] = ()) -> None:
        if isinstance(seed, int) and seed < 0:
            raise ValueError(f"seed {seed} is negative")
        self.seed = seed
        self.path = path

    def child(self, name: str) -> Seeds:
        return Seeds(self.seed, (*self.path, name))

    def derive(self, name: str, n: int = 32) -> bytes:
        """`n` bytes that depend on the root seed, the path and `name` only."""
        root = self.seed if isinstance(self.seed, bytes) else str(self.seed).encode()
        h = hashlib.shake_256(_DOMAIN)
        for part in (root, *(p.encode() for p in self.path), name.encode()):
            h.update(len(part).to_bytes(4, "little") + part)  # length-prefixed: no ambiguity
        return h.digest(n)

    def number(self, name: str, bits: int = 64) -> int:
        """A `bits`-bit integer for `name`."""
        return int.from_bytes(self.derive(name, (bits + 7) // 8), "little") >> (-bits % 8)

    def rng(self, name: str) -> random.Random:
        """A deterministic PRNG for `name` (layout choices, key material of the memory model)."""
        return random.Random(self.derive(name))

    def __repr__(self) -> str:
        return f"Seeds({self.seed!r}{''.join(f'/{p}' for p in self.path)})"


def transport_key(seed: int | bytes) -> bytes:
    """The transport key a migration run with `seed` provisions on both hosts (same on both)."""
    return Seeds(seed).derive("transport-key", TRANSPORT_KEY_BYTES)
