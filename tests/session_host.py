"""A minimal in-process host for the helper's mailbox protocol (native runs of the DSL code).

The compiled session code runs on the host CPU against ctypes buffers standing in for the
mailbox, the guest RAM window and the helper's private context: the protocol logic is tested at
native speed; the emulator tests run the same code inside a mirror VM.
"""

from __future__ import annotations

import ctypes
import struct

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from helperfw.codegen.pipeline import build
from helperfw.native import NativeImage
from helperfw.runtime import protocol as P
from helperfw.runtime import session as S

PAGE = P.PAGE_SIZE


def _aligned(size: int) -> tuple[ctypes.Array, int]:
    raw = (ctypes.c_uint8 * (size + PAGE))()
    return raw, (ctypes.addressof(raw) + PAGE - 1) & ~(PAGE - 1)


_IMAGE: NativeImage | None = None


def image() -> NativeImage:
    global _IMAGE
    if _IMAGE is None:
        _IMAGE = NativeImage(build([S.mh_test_process, S.mh_test_ctx_init]).image)
    return _IMAGE


def _kdf_pair(key: bytes, x: int, label: int) -> bytes:
    """AES256_key(x ‖ label ‖ 0) ‖ AES256_key(x ‖ label ‖ 1): docs/PROTOCOL.md's key schedule."""
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(b"".join(struct.pack("<QII", x, label, i) for i in (0, 1))) + enc.finalize()


def session_keys(key: bytes, session_id: int, challenge: int) -> tuple[bytes, bytes]:
    """(K_s, K_a) of a session, computed from the protocol document alone."""
    k1 = _kdf_pair(key, session_id, P.KDF_LABEL_K1)
    return _kdf_pair(k1, challenge, P.KDF_LABEL_KS), _kdf_pair(k1, challenge, P.KDF_LABEL_KA)


def set_hash(key: bytes, session_id: int, challenge: int, records: list[tuple[int, int]]) -> bytes:
    ka = session_keys(key, session_id, challenge)[1]
    enc = Cipher(algorithms.AES(ka), modes.ECB()).encryptor()
    acc = 0
    for ram_addr, seq in records:
        acc ^= int.from_bytes(enc.update(struct.pack("<QQ", ram_addr, seq)), "little")
    return acc.to_bytes(16, "little")


class NativeHelper:
    """One helper instance: private context, mailbox and a RAM window of `ram_pages` pages."""

    def __init__(self, key: bytes, ram_pages: int = 64, self_pages: tuple[int, int] = (0, 0)):
        self.img = image()
        self._ctx_raw, self.ctx = _aligned(S.HelperCtx.size)
        self._mb_raw, self.mailbox = _aligned(P.MAILBOX_PAGES * PAGE)
        self.ram_size = ((ram_pages * PAGE + (2 << 20) - 1) // (2 << 20)) * (2 << 20)
        self._ram_raw, self.ram = _aligned(self.ram_size)
        self._pool_raw, self.pool = _aligned(32 * PAGE)
        keybuf = ctypes.create_string_buffer(key, 32)
        r = self.img.call("mh_test_ctx_init", self.ctx, ctypes.addressof(keybuf), self.mailbox,
                          self.ram, 1 << 40, self.pool, 32, self_pages[0] * PAGE,
                          self_pages[1] * PAGE, restype=ctypes.c_int32)
        assert r == 0
        self.bell = 0
        self.session_id = 0  # the session RECV-family commands name

    # -- raw memory -------------------------------------------------------------------------
    def read(self, addr: int, n: int) -> bytes:
        return ctypes.string_at(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        ctypes.memmove(addr, data, len(data))

    def page(self, ram_addr: int) -> bytes:
        return self.read(self.ram + ram_addr, PAGE)

    def set_page(self, ram_addr: int, data: bytes) -> None:
        self.write(self.ram + ram_addr, data)

    def slot(self, i: int) -> int:
        return self.mailbox + P.SLOTS_OFFSET + i * P.SLOT_SIZE

    # -- the doorbell ------------------------------------------------------------------------
    def command(self, op: int, entries=(), **fields) -> tuple[int, list[int]]:
        """Write Command (RECV-family ops name self.session_id unless given), ring, process."""
        ents = [{"ram_addr": a, "flags": f, "status": 0} for a, f in entries]
        count = fields.pop("count", len(ents))
        if op in (P.OP_RECV, P.OP_RECV_END_EPOCH, P.OP_RECV_FINISH):
            fields.setdefault("session_id", self.session_id)
        fields = {"session_id": 0, "epoch": 0, "version": P.PROTOCOL_VERSION.value,
                  "ram_size": 0, "challenge": 0, **fields}
        ents += [{"ram_addr": 0, "flags": 0, "status": 0}] * (P.MAX_SLOTS - len(ents))
        raw = P.Command.build(op=op, count=count, entries=ents, **fields)
        self.write(self.mailbox + P.COMMAND_OFFSET, raw)
        self.bell += 1
        self.write(self.mailbox + P.CONTROL_OFFSET, struct.pack("<Q", self.bell))
        status = self.img.call("mh_test_process", self.ctx, restype=ctypes.c_int32)
        ctl = P.Control.parse(self.read(self.mailbox + P.CONTROL_OFFSET, P.Control.size))
        assert ctl.completed == self.bell and ctl.status == status
        cmd = P.Command.parse(self.read(self.mailbox + P.COMMAND_OFFSET, P.Command.size))
        return status, [cmd.entries[i].status for i in range(len(entries))]

    def reply(self) -> P.HelloReply:
        return P.HelloReply.parse(self.read(self.slot(0), P.HelloReply.size))

    # -- source side -------------------------------------------------------------------------
    def send_begin(self, challenge: int) -> int:
        st, _ = self.command(P.OP_SEND_BEGIN, ram_size=self.ram_size, challenge=challenge)
        assert st == 0, st
        self.session_id = self.reply().session_id
        return self.session_id

    def send(self, ram_addrs: list[int]) -> tuple[list[int], list[bytes]]:
        st, statuses = self.command(P.OP_SEND, [(a, 0) for a in ram_addrs])
        assert st == 0
        return statuses, [self.read(self.slot(i), P.SLOT_SIZE) for i in range(len(ram_addrs))]

    def token(self, op: int) -> tuple[int, bytes]:
        st, _ = self.command(op)
        return st, self.read(self.slot(0), P.EpochToken.size)

    # -- destination side --------------------------------------------------------------------
    def recv_begin(self) -> tuple[int, int]:
        """(status, challenge)."""
        st = self.command(P.OP_RECV_BEGIN, ram_size=self.ram_size)[0]
        return st, (self.reply().challenge if st == 0 else 0)

    def recv(self, records: list[tuple[int, bytes]]) -> list[int]:
        for i, (_, rec) in enumerate(records):
            self.write(self.slot(i), rec)
        st, statuses = self.command(P.OP_RECV, [(a, 0) for a, _ in records])
        assert st == 0, st
        return statuses

    def put_token(self, op: int, token: bytes) -> int:
        self.write(self.slot(0), token)
        return self.command(op)[0]


def open_record(key: bytes, session_id: int, challenge: int,
                record: bytes) -> tuple[P.Envelope, bytes]:
    """Check a sealed page with an outside AES-GCM-SIV (the documented transport contract)."""
    env = P.Envelope.parse(record[:64])
    ks = session_keys(key, session_id, challenge)[0]
    nonce = struct.pack("<IQ", env.epoch, env.seq)
    pt = AESGCMSIV(ks).decrypt(nonce, record[64:64 + PAGE] + bytes(env.tag),
                               record[:P.ENVELOPE_AAD_LEN])
    return env, pt
