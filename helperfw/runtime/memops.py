"""Copying, wiping and comparing memory: the image has no memcpy, memset or memcmp.

`wipe` uses volatile stores so the compiler cannot drop the erasure of dead key material;
`bytes_eq` has no early exit, so its time does not depend on where two buffers differ.
"""

from __future__ import annotations

from helperfw import Ptr, function, u8, u64, v128, v128_load, v128_make, v128_store, vstore


@function(small=True, noinline=True)  # envelopes, tokens, the command, key material: not hot
def copy_mem(dst: Ptr[u8], src: Ptr[u8], n: u64) -> None:
    """Copy n bytes, 16 at a time; every source byte is read once."""
    off: u64 = 0
    while n - off >= 16:
        v128_store(dst + off, v128_load(src + off))
        off += 16
    while off < n:
        dst[off] = src[off]
        off += 1


@function(noinline=True)  # key schedules, scratch pages, per-record keys: one copy
def wipe(dst: Ptr[u8], n: u64) -> None:
    """Zero n bytes with volatile stores (16 at a time), so the erasure is never optimised out."""
    z = v128_make(0, 0)
    off: u64 = 0
    while n - off >= 16:
        vstore(Ptr[v128](dst + off), z)
        off += 16
    while off < n:
        vstore(dst + off, 0)
        off += 1


@function(small=True)
def bytes_eq(a: Ptr[u8], b: Ptr[u8], n: u64) -> bool:
    """Compare without an early exit (the same time whatever the data)."""
    diff: u8 = 0
    for i in range(n):
        diff |= a[i] ^ b[i]
    return diff == 0
