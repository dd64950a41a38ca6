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
        _IMAGE = NativeImage(build([S.mh_test_process, S.mh_test_ctx_init,
                                    S.mh_test_lane_process, S.mh_test_lane_init]).image)
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
    """One helper instance: private context, mailbox and a RAM window of `ram_pages` pages;
    with `lanes` > 1 also lanes 1.. (each its own LaneCtx and mailbox, as the driver sets up)."""

    def __init__(self, key: bytes, ram_pages: int = 64, self_pages: tuple[int, int] = (0, 0),
                 lanes: int = 1):
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
        self.session_id = 0  # the session RECV-family commands name
        self.lane_ctx = [self.ctx + S.LANE0]
        self.mailboxes = [self.mailbox]
        self.bells = [0] * lanes
        self._keep: list[ctypes.Array] = []
        for lane in range(1, lanes):
            raw_c, lc = _aligned(S.LaneCtx.size)
            raw_m, mb = _aligned(P.MAILBOX_PAGES * PAGE)
            self._keep += [raw_c, raw_m]
            self.img.call("mh_test_lane_init", self.ctx, lane, lc, mb, restype=None)
            self.lane_ctx.append(lc)
            self.mailboxes.append(mb)

    # -- raw memory -------------------------------------------------------------------------
    def read(self, addr: int, n: int) -> bytes:
        return ctypes.string_at(addr, n)

    def write(self, addr: int, data: bytes) -> None:
        ctypes.memmove(addr, data, len(data))

    def page(self, ram_addr: int) -> bytes:
        return self.read(self.ram + ram_addr, PAGE)

    def set_page(self, ram_addr: int, data: bytes) -> None:
        self.write(self.ram + ram_addr, data)

    def slot(self, i: int, lane: int = 0) -> int:
        return self.mailboxes[lane] + P.SLOTS_OFFSET + i * P.SLOT_SIZE

    @property
    def bell(self) -> int:
        """Lane 0's doorbell (tests that ring by hand set it)."""
        return self.bells[0]

    @bell.setter
    def bell(self, value: int) -> None:
        self.bells[0] = value

    # -- the doorbell ------------------------------------------------------------------------
    def command(self, op: int, entries=(), lane: int = 0, **fields) -> tuple[int, list[int]]:
        """Write lane `lane`'s Command (RECV-family ops name self.session_id unless given),
        ring its doorbell, process the batch on its context."""
        ents = [{"ram_addr": a, "flags": f, "status": 0} for a, f in entries]
        count = fields.pop("count", len(ents))
        if op in (P.OP_RECV, P.OP_RECV_END_EPOCH, P.OP_RECV_FINISH):
            fields.setdefault("session_id", self.session_id)
        fields = {"session_id": 0, "epoch": 0, "version": P.PROTOCOL_VERSION.value,
                  "ram_size": 0, "challenge": 0, **fields}
        ents += [{"ram_addr": 0, "flags": 0, "status": 0}] * (P.MAX_SLOTS - len(ents))
        raw = P.Command.build(op=op, count=count, entries=ents, **fields)
        mb = self.mailboxes[lane]
        self.write(mb + P.COMMAND_OFFSET, raw)
        self.bells[lane] += 1
        self.write(mb + P.CONTROL_OFFSET, struct.pack("<Q", self.bells[lane]))
        status = self.img.call("mh_test_lane_process", self.lane_ctx[lane],
                               restype=ctypes.c_int32)
        ctl = P.Control.parse(self.read(mb + P.CONTROL_OFFSET, P.Control.size))
        assert ctl.completed == self.bells[lane] and ctl.status == status
        cmd = P.Command.parse(self.read(mb + P.COMMAND_OFFSET, P.Command.size))
        return status, [cmd.entries[i].status for i in range(len(entries))]

    def reply(self, lane: int = 0) -> P.HelloReply:
        return P.HelloReply.parse(self.read(self.slot(0, lane), P.HelloReply.size))

    def join(self, lane: int, challenge: int) -> int:
        """JOIN on lane `lane`: the session lane 0 published under `challenge`."""
        return self.command(P.OP_JOIN, lane=lane, challenge=challenge)[0]

    def lane_state(self, lane: int, name: str) -> int:
        """A field of lane `lane`'s private LaneCtx (what a test may inspect or roll back)."""
        f = S.LaneCtx.fields[name]
        return int.from_bytes(self.read(self.lane_ctx[lane] + f.offset, f.type.size), "little")

    def set_lane_state(self, lane: int, name: str, value: int) -> None:
        """Overwrite one field of lane `lane`'s LaneCtx (a white-box test of one check)."""
        f = S.LaneCtx.fields[name]
        self.write(self.lane_ctx[lane] + f.offset, value.to_bytes(f.type.size, "little"))

    def lane_snapshot(self, lane: int) -> bytes:
        """Lane `lane`'s whole private state (a host's snapshot of its pages)."""
        return self.read(self.lane_ctx[lane], S.LaneCtx.size)

    def lane_restore(self, lane: int, saved: bytes) -> None:
        self.write(self.lane_ctx[lane], saved)

    # -- source side -------------------------------------------------------------------------
    def send_begin(self, challenge: int, lanes: int = 1) -> int:
        """SEND_BEGIN on lane 0 for `lanes` lanes, then JOIN on lanes 1.."""
        st, _ = self.command(P.OP_SEND_BEGIN, ram_size=self.ram_size, challenge=challenge,
                             count=lanes)
        assert st == 0, st
        self.session_id = self.reply().session_id
        for lane in range(1, lanes):
            st = self.join(lane, challenge)
            assert st == 0, (lane, st)
        return self.session_id

    def send(self, ram_addrs: list[int], lane: int = 0) -> tuple[list[int], list[bytes]]:
        st, statuses = self.command(P.OP_SEND, [(a, 0) for a in ram_addrs], lane=lane)
        assert st == 0
        return statuses, [self.read(self.slot(i, lane), P.SLOT_SIZE)
                          for i in range(len(ram_addrs))]

    def token(self, op: int, lane: int = 0) -> tuple[int, bytes]:
        st, _ = self.command(op, lane=lane)
        return st, self.read(self.slot(0, lane), P.EpochToken.size)

    # -- destination side --------------------------------------------------------------------
    def recv_begin(self, lanes: int = 1) -> tuple[int, int]:
        """(status, challenge): RECV_BEGIN on lane 0 for `lanes` lanes, then JOIN on the rest."""
        st = self.command(P.OP_RECV_BEGIN, ram_size=self.ram_size, count=lanes)[0]
        ch = self.reply().challenge if st == 0 else 0
        for lane in range(1, lanes if st == 0 else 1):
            j = self.join(lane, ch)
            assert j == 0, (lane, j)
        return st, ch

    def recv(self, records: list[tuple[int, bytes]], lane: int = 0) -> list[int]:
        for i, (_, rec) in enumerate(records):
            self.write(self.slot(i, lane), rec)
        st, statuses = self.command(P.OP_RECV, [(a, 0) for a, _ in records], lane=lane)
        assert st == 0, st
        return statuses

    def put_token(self, op: int, token: bytes, lane: int = 0) -> int:
        self.write(self.slot(0, lane), token)
        return self.command(op, lane=lane)[0]


def open_record(key: bytes, session_id: int, challenge: int,
                record: bytes) -> tuple[P.Envelope, bytes]:
    """Check a sealed page with an outside AES-GCM-SIV (the documented transport contract)."""
    env = P.Envelope.parse(record[:64])
    ks = session_keys(key, session_id, challenge)[0]
    nonce = struct.pack("<IQ", env.epoch, env.seq)
    pt = AESGCMSIV(ks).decrypt(nonce, record[64:64 + PAGE] + bytes(env.tag),
                               record[:P.ENVELOPE_AAD_LEN])
    return env, pt


def sealed_pair(key: bytes, n: int, rng) -> tuple[NativeHelper, NativeHelper, int, int,
                                                  list[int], list[bytes]]:
    """A native source and destination in one session, the source having sealed n random pages
    (ram_addr PAGE.. n*PAGE) in epoch 1: (src, dst, session id, challenge, pages, records)."""
    src, dst = NativeHelper(key), NativeHelper(key)
    addrs = [i * PAGE for i in range(1, n + 1)]
    for a in addrs:
        src.set_page(a, rng.randbytes(PAGE))
    status, ch = dst.recv_begin()
    assert status == 0
    sid = src.send_begin(ch)
    dst.session_id = sid
    statuses, recs = src.send(addrs)
    assert statuses == [0] * n
    return src, dst, sid, ch, addrs, recs
