"""What a session leaves behind: its secrets, recomputed outside the helper, and a search for
them in the helper's private memory (tests/test_hostile_wipe.py).

A session's secrets are everything derived from the transport key K for it: K_1, the AEAD key
K_s and the set-hash key K_a (each as the helper holds it: an AES-256 key schedule, whose first
two round keys are the key itself), the last record's GCM-SIV keys (record-authentication key H
and the record-encryption key's schedule, RFC 8452 §4), and the plaintext of the pages it
sealed or opened. All are computed here from docs/PROTOCOL.md with `cryptography`.
"""

from __future__ import annotations

import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from helperfw.runtime import protocol as P
from tests.hostile_common import LeakScanner
from tests.session_host import _kdf_pair, session_keys

_SBOX: list[int] = []


def _sbox() -> list[int]:
    """The AES S-box (FIPS-197 §5.1.1), computed: the inverse in GF(2^8) (by powers of the
    generator 3), then the affine map."""
    if not _SBOX:
        exp, log = [0] * 255, [0] * 256
        x = 1
        for i in range(255):
            exp[i], log[x] = x, i
            x ^= ((x << 1) ^ 0x11B) if x & 0x80 else x << 1  # x * 3
        for a in range(256):
            v = exp[(255 - log[a]) % 255] if a else 0
            s = v
            for k in range(1, 5):
                s ^= ((v << k) | (v >> (8 - k))) & 0xFF
            _SBOX.append(s ^ 0x63)
    return _SBOX


def aes256_round_keys(key: bytes) -> list[bytes]:
    """The 15 round keys of AES-256 (FIPS-197 §5.2), as the helper's Aes256Key holds them."""
    sbox = _sbox()
    w = [key[4 * i:4 * i + 4] for i in range(8)]
    rcon = 1
    for i in range(8, 60):
        t = w[i - 1]
        if i % 8 == 0:
            t = bytes(sbox[b] for b in t[1:] + t[:1])
            t = bytes([t[0] ^ rcon]) + t[1:]
            rcon = ((rcon << 1) ^ 0x11B) if rcon & 0x80 else rcon << 1
        elif i % 8 == 4:
            t = bytes(sbox[b] for b in t)
        w.append(bytes(a ^ b for a, b in zip(w[i - 8], t, strict=True)))
    return [b"".join(w[4 * r:4 * r + 4]) for r in range(15)]


def record_keys(ks: bytes, epoch: int, seq: int) -> tuple[bytes, bytes]:
    """(H, record-encryption key) of the record (epoch, seq) under K_s (RFC 8452 §4)."""
    nonce = struct.pack("<IQ", epoch, seq)
    enc = Cipher(algorithms.AES(ks), modes.ECB()).encryptor()
    blocks = [enc.update(struct.pack("<I", i) + nonce) for i in range(6)]
    return blocks[0][:8] + blocks[1][:8], b"".join(b[:8] for b in blocks[2:6])


class SessionSecrets:
    """The secrets of one session (K, session id, challenge), named, for a memory search."""

    def __init__(self, key: bytes, sid: int, challenge: int) -> None:
        self.named: dict[str, bytes] = {}
        k1 = _kdf_pair(key, sid, P.KDF_LABEL_K1)
        ks, ka = session_keys(key, sid, challenge)
        self.ks = ks
        for label, k in (("K_1", k1), ("K_s", ks), ("K_a", ka)):
            for r, rk in enumerate(aes256_round_keys(k)):
                self.named[f"{label} round key {r}"] = rk

    def add_record(self, epoch: int, seq: int) -> None:
        """The per-record keys of one record (the helper wipes them after each)."""
        h, enc = record_keys(self.ks, epoch, seq)
        self.named[f"H of ({epoch}, {seq})"] = h
        for r, rk in enumerate(aes256_round_keys(enc)):
            self.named[f"record key ({epoch}, {seq}) round {r}"] = rk

    def add_plaintext(self, label: str, data: bytes) -> None:
        for off in range(0, len(data) - 15, 16):
            blk = data[off:off + 16]
            if len(set(blk)) >= 4:  # zeros and patterns occur anyway
                self.named[f"{label}+{off:#x}"] = blk

    def find(self, memory: bytes) -> dict[int, str]:
        """offset -> name of every secret block found in `memory`."""
        scan = LeakScanner()
        by_block = {}
        for n, blk in self.named.items():
            scan.add(blk)
            by_block.setdefault(blk, n)
        return {off: by_block[memory[off:off + 16]] for off in scan.scan(memory)}
