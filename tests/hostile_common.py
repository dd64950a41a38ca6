"""Shared pieces of the hostile-host suite (tests/test_hostile_*.py): status names, a forger
that knows the transport key, and the plaintext-leak scanner.

The forger builds protocol-v2 records and tokens (docs/PROTOCOL.md) with `cryptography`'s
AES-GCM-SIV for any field values, so tests can hand the helper *authentic* records that are wrong
in exactly one non-cryptographic way (stale epoch, seq outside the window, another ram_addr...).
A real host does not know the key; a test that does is strictly stronger.
"""

from __future__ import annotations

import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from helperfw.runtime import protocol as P
from tests.session_host import session_keys, set_hash

PAGE = P.PAGE_SIZE
ST = {name: val for name, (val, _doc) in P.STATUS.items()}
ST_NAME = {val: name for name, val in ST.items()}
DOCUMENTED = frozenset(ST.values())
STATES = frozenset({P.ST_IDLE, P.ST_SENDING, P.ST_RECEIVING, P.ST_DONE, P.ST_ABORTED})
FINISH_EPOCH = P.FINISH_EPOCH

_ENV = struct.Struct("<IIQQIIQQ")  # Envelope without the tag
_TOK = struct.Struct("<IIQQQ16sQQ")  # EpochToken without the tag
assert _ENV.size == P.ENVELOPE_AAD_LEN and _TOK.size == P.TOKEN_AAD_LEN


def name(st: int | None) -> str:
    return "None" if st is None else ST_NAME.get(st, f"UNDOCUMENTED({st})")


class Forger:
    """Seals records and tokens under K_s(key, session_id, challenge) as a source helper would."""

    def __init__(self, key: bytes, session_id: int, challenge: int) -> None:
        self.key, self.sid, self.challenge = key, session_id, challenge
        self.ks, self.ka = session_keys(key, session_id, challenge)
        self.aead = AESGCMSIV(self.ks)

    def record(self, ram_addr: int, plaintext: bytes, *, epoch: int, seq: int,
               magic: int = P.ENVELOPE_MAGIC, flags: int = 0, sid: int | None = None,
               lane: int = 0, challenge: int | None = None,
               nonce: tuple[int, int] | None = None) -> bytes:
        sid = self.sid if sid is None else sid
        ch = self.challenge if challenge is None else challenge
        aad = _ENV.pack(magic, flags, ram_addr, sid, epoch, lane, seq, ch)
        ne, ns = nonce or (epoch, seq)
        ct = self.aead.encrypt(struct.pack("<IQ", ne, ns), plaintext, aad)
        return aad + ct[-16:] + ct[:-16]

    def token(self, *, epoch: int, count: int, first_seq: int, set_hash: bytes, total: int,
              magic: int = P.TOKEN_MAGIC, sid: int | None = None, challenge: int | None = None,
              nonce_epoch: int | None = None, lane: int = 0) -> bytes:
        """Lane `lane`'s token: its nonce's seq half is lane << LANE_SHIFT."""
        sid = self.sid if sid is None else sid
        ch = self.challenge if challenge is None else challenge
        aad = _TOK.pack(magic, epoch, sid, count, first_seq, set_hash, total, ch)
        if nonce_epoch is None:
            nonce_epoch = FINISH_EPOCH if magic == P.FINISH_MAGIC else epoch
        return aad + self.aead.encrypt(struct.pack("<IQ", nonce_epoch, lane << P.LANE_SHIFT), b"",
                                         aad)

    def open(self, record: bytes) -> bytes | None:
        """The plaintext of a record, or None if it does not verify under this session."""
        env = record[:P.ENVELOPE_AAD_LEN]
        epoch, seq = struct.unpack_from("<I", env, 0x18)[0], struct.unpack_from("<Q", env, 0x20)[0]
        try:
            return self.aead.decrypt(struct.pack("<IQ", epoch, seq),
                                     record[64:64 + PAGE] + record[48:64], env)
        except InvalidTag:
            return None


def open_recv(h, sid: int, key: bytes, ram_size: int) -> Forger:
    """RECV_BEGIN on MirrorHost `h`, then a forger for session `sid` bound to the challenge the
    helper drew (the test's RECV-family commands name `sid`)."""
    r = h.command(P.OP_RECV_BEGIN, ram_size=ram_size)
    assert r.status == 0, name(r.status)
    challenge = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size)).challenge
    return Forger(key, sid, challenge)


class LeakScanner:
    """Finds private plaintext in shared memory.

    Every 16-byte-aligned block of every private page (and each 16-byte half of key material)
    goes into a set, keyed by its first 8 bytes; a scan looks at the 8-byte word at *every* byte
    offset of the bytes it is given (eight `memoryview.cast("Q")` passes, all in C), and confirms
    a candidate with the full 16 bytes. A copy of at least 31 bytes of private plaintext to any
    offset of shared memory therefore always contains one whole block and is found."""

    def __init__(self) -> None:
        self.first: set[int] = set()
        self.blocks: set[bytes] = set()

    def add(self, data: bytes) -> None:
        for i in range(0, len(data) - 15, 16):
            blk = data[i:i + 16]
            if len(set(blk)) < 4:
                continue  # constant-ish blocks (zeros...) legitimately occur in shared memory
            self.blocks.add(blk)
            self.first.add(int.from_bytes(blk[:8], "little"))

    def scan(self, data: bytes) -> list[int]:
        """Offsets in `data` where a private block starts (empty: no leak)."""
        hits = []
        n = len(data)
        for k in range(8):
            m = (n - k) // 8
            if m <= 0:
                continue
            words = memoryview(data[k:k + 8 * m]).cast("Q").tolist()
            if self.first.isdisjoint(words):
                continue
            for j, w in enumerate(words):
                if w in self.first:
                    off = k + 8 * j
                    if data[off:off + 16] in self.blocks:
                        hits.append(off)
        return sorted(hits)


def finish_epoch_one(dst, key: bytes, f: Forger, pages: list[int]) -> None:
    """Close epoch 1 of a destination that received `pages` at seqs 1.. and finish the session,
    with the tokens `f` forges (it holds the session's keys): both must be accepted."""
    n = len(pages)
    tok = f.token(epoch=1, count=n, first_seq=1, total=n,
                  set_hash=set_hash(key, f.sid, f.challenge, [(a, 1 + i) for i, a in enumerate(pages)]))
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok) == 0
    fin = f.token(epoch=1, count=0, first_seq=1 + n, total=n, set_hash=bytes(16),
                  magic=P.FINISH_MAGIC)
    assert dst.put_token(P.OP_RECV_FINISH, fin) == 0
