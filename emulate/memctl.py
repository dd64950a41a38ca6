"""Simulated SEV memory controller over one shared DRAM buffer.

Model: true DRAM of a private page = AES-XTS_{K, tweak=HPA}(plaintext), K a 64-byte per-VM key
(AES-256-XTS, one 4 KiB data unit per page). A C=1 access by a VM with key K sees the plaintext;
a C=0 access, or the host, sees the DRAM bytes (ciphertext). Moving ciphertext to another HPA or
reading it with another key decrypts to garbage, as on hardware.

Why this representation: guest code must run at native unicorn speed, with no per-access
callback. The DRAM buffer is mapped into every Uc instance with mem_map_ptr; each page has a state
RAW (buffer = true DRAM bytes) or PLAIN(key) (buffer = plaintext under that key). The TLB fill hook
converts a page on first use with the other view and flushes every registered vCPU's TLB, so all
cached translations keep pointing at a buffer with the right view. Between conversions, accesses
hit the buffer directly.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from helperfw.runtime.platform import PAGE_SIZE

PAGE = PAGE_SIZE
RAW = 0  # page state: the buffer holds the true DRAM bytes; other states are key ids


def _pages(hpa: int, n: int) -> Iterator[tuple[int, int, int]]:
    """(page_hpa, offset_in_page, length) chunks covering [hpa, hpa+n)."""
    end = hpa + n
    while hpa < end:
        page = hpa & ~(PAGE - 1)
        off = hpa - page
        ln = min(PAGE - off, end - hpa)
        yield page, off, ln
        hpa += ln


class MemoryController:
    """DRAM + per-page encryption state + key table. HPAs start at 0.

    `register_flush(fn)` adds a vCPU's TLB-flush callback; every state change calls all of them."""

    def __init__(self, size: int, *, rng: Callable[[int], bytes] = os.urandom) -> None:
        if size % PAGE:
            raise ValueError("DRAM size must be page aligned")
        self.size = size
        self._buf = ctypes.create_string_buffer(size)
        self.ptr = ctypes.addressof(self._buf)
        self.mem = memoryview(self._buf).cast("B")
        self.state = [RAW] * (size // PAGE)
        self._keys: dict[int, bytes] = {}
        self._rng = rng
        self._flushers: list[Callable[[], None]] = []
        self._code_invalidators: list[Callable[[], None]] = []
        # Pages some vCPU mapped executable: only byte changes there can make translated code
        # stale, so only they trigger a TB flush (mailbox and data writes stay cheap).
        self.exec_pages: set[int] = set()
        # Pages some vCPU's walk read page-table entries from: the TLB fill hook keeps walked
        # translations (emulate/tlb.py), and bytes changed there behind the guest's back (the
        # host, who may also flush the guest's TLB whenever it likes) drop them all.
        self.table_pages: set[int] = set()
        self._forgetters: list[Callable[[], None]] = []
        self.conversions = 0

    # ---- keys -----------------------------------------------------------------------------
    def new_key(self, key: bytes | None = None) -> int:
        """Allocate a key slot (like an SEV ASID) with a random or given 64-byte XTS key."""
        key = key if key is not None else self._rng(64)
        if len(key) != 64 or key[:32] == key[32:]:
            raise ValueError("need 64 bytes with distinct halves (AES-256-XTS)")
        kid = len(self._keys) + 1
        self._keys[kid] = key
        return kid

    def register_flush(self, flush_tlb: Callable[[], None],
                       invalidate_code: Callable[[], None] | None = None,
                       forget_translations: Callable[[], None] | None = None) -> None:
        """Called by each vCPU: flush_tlb on every page state change; invalidate_code (deferred
        TB flush) when bytes change behind the guest's back (host writes, Python guest writes);
        forget_translations when such bytes are page-table entries a walk read."""
        self._flushers.append(flush_tlb)
        if invalidate_code is not None:
            self._code_invalidators.append(invalidate_code)
        if forget_translations is not None:
            self._forgetters.append(forget_translations)

    # ---- crypto ---------------------------------------------------------------------------
    def _xts(self, kid: int, hpa: int, data: bytes, encrypt: bool) -> bytes:
        c = Cipher(algorithms.AES(self._keys[kid]), modes.XTS(hpa.to_bytes(16, "little")))
        op = c.encryptor() if encrypt else c.decryptor()
        return op.update(data) + op.finalize()

    def _check(self, hpa: int, n: int) -> None:
        if hpa < 0 or n < 0 or hpa + n > self.size:
            raise ValueError(f"HPA range {hpa:#x}+{n:#x} outside DRAM")

    # ---- page state -----------------------------------------------------------------------
    def _set_state(self, page: int, new: int) -> bool:
        """Convert one page's buffer to state `new`; returns True if anything changed."""
        idx = page // PAGE
        old = self.state[idx]
        if old == new:
            return False
        view = self.mem[page : page + PAGE]
        raw = bytes(view) if old == RAW else self._xts(old, page, bytes(view), True)
        view[:] = raw if new == RAW else self._xts(new, page, raw, False)
        self.state[idx] = new
        self.conversions += 1
        if page in self.exec_pages:
            self._invalidate_code()
        return True

    def _flush_all(self) -> None:
        for f in self._flushers:
            f()

    def make_state(self, hpa: int, n: int, kid: int, encrypted: bool) -> None:
        """Ensure the pages of [hpa, hpa+n) present the view of key `kid` (C=1) or RAW (C=0)."""
        self._check(hpa, n)
        target = kid if encrypted else RAW
        changed = False
        for page, _, _ in _pages(hpa, n):
            changed |= self._set_state(page, target)
        if changed:
            self._flush_all()

    def page_view_ready(self, page: int, kid: int, encrypted: bool) -> bool:
        return self.state[page // PAGE] == (kid if encrypted else RAW)

    def _invalidate_code(self) -> None:
        for f in self._code_invalidators:
            f()

    def _bytes_changed(self, hpa: int, n: int) -> None:
        """Bytes of [hpa, hpa+n) changed behind unicorn's back: drop translated code if any of
        those pages was ever mapped executable, kept translations if any held page tables."""
        pages = [page for page, _, _ in _pages(hpa, n)]
        if any(page in self.exec_pages for page in pages):
            self._invalidate_code()
        if any(page in self.table_pages for page in pages):
            for f in self._forgetters:
                f()

    # ---- guest-context access (what a VM with key `kid` sees through a C=0/C=1 mapping) ----
    def guest_read(self, hpa: int, n: int, kid: int, encrypted: bool) -> bytes:
        """Read as the VM would, without changing page states (used by the page walk)."""
        self._check(hpa, n)
        out = bytearray()
        for page, off, ln in _pages(hpa, n):
            st = self.state[page // PAGE]
            want = kid if encrypted else RAW
            if st == want:
                out += self.mem[page + off : page + off + ln]
                continue
            buf = bytes(self.mem[page : page + PAGE])
            raw = buf if st == RAW else self._xts(st, page, buf, True)
            view = raw if not encrypted else self._xts(kid, page, raw, False)
            out += view[off : off + ln]
        return bytes(out)

    def guest_write(self, hpa: int, data: bytes, kid: int, encrypted: bool) -> None:
        """Write as the VM would (converting the pages to that view first)."""
        self.make_state(hpa, len(data), kid, encrypted)
        self.mem[hpa : hpa + len(data)] = data
        self._bytes_changed(hpa, len(data))

    # ---- host access: raw DRAM bytes only --------------------------------------------------
    def host_read(self, hpa: int, n: int) -> bytes:
        """What the host (QEMU) reads: true DRAM bytes, i.e. ciphertext of private pages."""
        self.make_state(hpa, n, RAW, False)
        return bytes(self.mem[hpa : hpa + n])

    def host_write(self, hpa: int, data: bytes) -> None:
        """Host store of raw DRAM bytes (e.g. copying ciphertext, filling shared pages)."""
        self.make_state(hpa, len(data), RAW, False)
        self.mem[hpa : hpa + len(data)] = data
        self._bytes_changed(hpa, len(data))
