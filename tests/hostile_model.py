"""A reference model of the helper's protocol v2 state machine, in Python, for the hostile suite.

Written from docs/PROTOCOL.md (the session state machine, the transport contract) and the order
in which helperfw/runtime/session.py makes its checks, it decides for every command and every
entry whether the helper must accept or refuse, and with which status; which state, `processed`
count and per-entry statuses it must publish; the exact bytes of every record, token and
HelloReply it writes (except the RDRAND values, which it takes from the helper's reply); and
exactly which guest pages a RECV installs, with which plaintext. It holds the transport key, so
it can tell apart refusals a keyless host can only observe in aggregate: an authentic record
with a wrong session_id, lane field or duplicated seq, a token whose count, first seq,
total, set-hash or epoch is wrong but whose tag is right.

The model is exact while it is *in sync* with the helper's private state. A host that rolls
that state back (tests/hostile_fuzz.py does) puts it out of sync; the fuzzer then either rolls
the model back with it (native: the whole context is restored, and so is a copy of the model
taken at the same moment) or suspends exact agreement until a resync point: a successful
`*_BEGIN` resets every field a decision depends on, and the new session id or challenge comes
from the helper's own reply.
"""

from __future__ import annotations

import copy
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from helperfw.runtime import protocol as P
from tests.hostile_common import ST, Forger

M32, M64 = 2**32 - 1, 2**64 - 1
PAGE = P.PAGE_SIZE
SLOT = P.SLOT_SIZE
PAGE_2M = 2 << 20
CMD_HDR = struct.Struct("<IIQIIQQ")  # Command: op, count, session_id, epoch, version, ram_size,
#                                      challenge
ENTRY = struct.Struct("<QIi")
ENV = struct.Struct("<IIQQIIQQ")  # Envelope without the tag
TOK = struct.Struct("<IIQQQ16sQQ")  # EpochToken without the tag
RECV_OPS = (P.OP_RECV, P.OP_RECV_END_EPOCH, P.OP_RECV_FINISH)
SLOTS_OFF = P.SLOTS_OFFSET
OK = ST["OK"]


@dataclass(frozen=True)
class Region:
    main_gpa: int
    length: int
    mirror_gpa: int


@dataclass(frozen=True)
class Platform:
    """What the model must know of one helper instance (the driver's set-up, BootInfo)."""

    key: bytes
    ram_base: int
    ram_max: int
    regions: tuple[Region, ...]
    option: int
    c_bit: int
    slots: int = P.DEFAULT_SLOTS
    pool_safe: int = 1 << 30  # a window up to this size always fits the table pool


@dataclass
class Command:
    op: int
    count: int
    session_id: int
    version: int
    ram_size: int
    challenge: int
    entries: list[tuple[int, int]]  # (ram_addr, flags) of all MAX_SLOTS entries

    @classmethod
    def parse(cls, raw: bytes) -> Command:
        op, count, sid, _epoch, version, ram_size, challenge = CMD_HDR.unpack_from(raw, 0)
        entries = [ENTRY.unpack_from(raw, CMD_HDR.size + i * ENTRY.size)[:2]
                   for i in range(P.MAX_SLOTS)]
        return cls(op, count, sid, version, ram_size, challenge, entries)


@dataclass
class Expect:
    """What the helper must publish for one batch."""

    status: int
    state: int = 0
    entries: list[int] = field(default_factory=list)  # statuses of entries 0..n-1
    processed: int = 0
    slots: dict[int, bytes] = field(default_factory=dict)  # exact bytes written at slot i
    reply: dict[str, int] | None = None  # HelloReply fields (the RDRAND one absent)
    rng_field: str | None = None  # "session_id" / "challenge": from the helper's reply
    installs: dict[int, bytes] = field(default_factory=dict)  # ram_addr -> plaintext
    uncertain: str | None = None  # a decision the model could not make (then taken as seen)


@dataclass
class Keys:
    """K_s and K_a of a session, with what the model needs of them."""

    sid: int
    challenge: int
    forger: Forger
    aead: AESGCMSIV
    ka_ecb: object

    @classmethod
    def derive(cls, key: bytes, sid: int, challenge: int) -> Keys:
        f = Forger(key, sid, challenge)
        return cls(sid, challenge, f, f.aead,
                   Cipher(algorithms.AES(f.ka), modes.ECB()).encryptor())

    def set_hash_term(self, ram_addr: int, seq: int) -> int:
        return int.from_bytes(self.ka_ecb.update(struct.pack("<QQ", ram_addr, seq)), "little")

    def __deepcopy__(self, memo):  # keys are immutable: share them between model copies
        return self


def overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    """session.overlaps in u64 arithmetic."""
    return a < (b + blen) & M64 and b < (a + alen) & M64


class HelperModel:
    """The helper's private state as the protocol defines it, and its transitions."""

    def __init__(self, plat: Platform) -> None:
        self.plat = plat
        self.state = P.ST_IDLE
        self.discarded = False
        self.session_id = 0
        self.challenge = 0
        self.keys: Keys | None = None
        self.bound = False
        self.installed_any = False
        self.poisoned = False
        self.ram_size = 0
        self.window_mapped = 0
        self.pool_known = True  # False once a window may have exhausted the table pool
        self.epoch = 0
        self.next_seq = 0
        self.epoch_first = 0
        self.epoch_count = 0
        self.total = 0
        self.set_hash = 0
        self.seen: set[int] = set()
        self.installed: set[int] = set()
        self._refused = 0
        self._observed: int | None = None
        self._rng_field: str | None = None  # what the last *_BEGIN's RDRAND value is

    def snapshot(self) -> HelperModel:
        return copy.deepcopy(self)

    # -- one batch ---------------------------------------------------------------------------------
    def step(self, cmd_raw: bytes, mailbox: bytes, page: Callable[[int], bytes],
             observed_status: int | None = None) -> Expect:
        """The expected outcome of the batch whose Command (as the helper copies it) is
        `cmd_raw`, with the mailbox as it was when the doorbell rang and guest pages read by
        `page(ram_addr)`. `observed_status` only settles decisions the model cannot make (a
        window that may not fit the page-table pool)."""
        cmd = Command.parse(cmd_raw)
        self._refused = 0
        self._observed = observed_status
        self._rng_field = None
        x = Expect(OK)
        x.status = self._dispatch(cmd, mailbox, page, x)
        if self.state == P.ST_RECEIVING and cmd.op in RECV_OPS and (
                x.status != OK or self._refused):
            self.poisoned = True
            if self.installed_any:
                self.discarded = True
        x.state = self.state
        return x

    def absorb_rng(self, value: int) -> None:
        """The RDRAND value the last successful *_BEGIN returned in its reply: SEND_BEGIN's
        session id (the session keys follow) or RECV_BEGIN's challenge."""
        if self._rng_field == "session_id":
            self.session_id = value
            self.keys = Keys.derive(self.plat.key, self.session_id, self.challenge)
        elif self._rng_field == "challenge":
            self.challenge = value
        self._rng_field = None

    def _dispatch(self, cmd: Command, mb: bytes, page, x: Expect) -> int:
        op = cmd.op
        if op == P.OP_HELLO:
            if cmd.version != P.PROTOCOL_VERSION.value:
                return ST["E_VERSION"]
            x.reply = self._reply()
            return OK
        if op == P.OP_ABORT:
            self._end(P.ST_ABORTED)
            return OK
        if op == P.OP_JOIN:  # the model is lane 0, which creates sessions and never joins
            return ST["E_LANE"]
        if self.state == P.ST_ABORTED and op not in (P.OP_SEND_BEGIN, P.OP_RECV_BEGIN):
            return ST["E_ABORTED"]
        handler = {P.OP_SEND_BEGIN: self._send_begin, P.OP_SEND: self._send,
                   P.OP_SEND_END_EPOCH: self._send_end_epoch,
                   P.OP_SEND_FINISH: self._send_finish, P.OP_RECV_BEGIN: self._recv_begin,
                   P.OP_RECV: self._recv, P.OP_RECV_END_EPOCH: self._recv_end_epoch,
                   P.OP_RECV_FINISH: self._recv_finish}.get(op)
        if handler is None:
            return ST["E_BAD_OP"]
        return handler(cmd, mb, page, x)

    def _reply(self) -> dict[str, int]:
        p = self.plat
        return {"version": P.PROTOCOL_VERSION.value, "slots": p.slots, "option": p.option,
                "c_bit": p.c_bit, "capabilities": P.CAP_GCM_SIV,
                "session_id": self.session_id, "challenge": self.challenge}

    # -- sessions ------------------------------------------------------------------------------
    def _end(self, state: int) -> None:
        if self.state == P.ST_RECEIVING and self.installed_any and state != P.ST_DONE:
            self.discarded = True
        self.keys = None
        self.bound = False
        self.state = state

    def _may_begin(self) -> int:
        if self.discarded:
            return ST["E_DISCARDED"]
        if self.state in (P.ST_SENDING, P.ST_RECEIVING):
            return ST["E_BAD_STATE"]
        return OK

    def _begin(self, cmd: Command, state: int, x: Expect) -> int:
        if cmd.version != P.PROTOCOL_VERSION.value:
            return ST["E_VERSION"]
        st = self._window(cmd.ram_size, x)
        if st != OK:
            return st
        self.epoch = P.FIRST_EPOCH
        self.next_seq = self.epoch_first = P.FIRST_SEQ
        self.epoch_count = self.total = self.set_hash = 0
        self.poisoned = self.bound = self.installed_any = False
        self.seen, self.installed = set(), set()
        self.state = state
        return OK

    def _window(self, size: int, x: Expect) -> int:
        p = self.plat
        if size == 0 or size % PAGE_2M or size > p.ram_max:
            return ST["E_BAD_ARG"]
        for r in p.regions:
            if overlaps(p.ram_base, size, r.mirror_gpa, r.length) or overlaps(
                    p.ram_base, size, r.main_gpa, r.length):
                return ST["E_BAD_ARG"]
        if size > self.window_mapped:
            if size > p.pool_safe or not self.pool_known:
                x.uncertain = f"window of {size:#x} bytes may exhaust the table pool"
                if self._observed == ST["E_BAD_ARG"]:
                    self.pool_known = False
                    return ST["E_BAD_ARG"]
            self.window_mapped = size
        self.ram_size = size
        return OK

    def _send_begin(self, cmd: Command, mb, page, x: Expect) -> int:
        st = self._may_begin()
        if st != OK:
            return st
        if cmd.challenge == 0:
            return ST["E_BAD_ARG"]
        st = self._begin(cmd, P.ST_SENDING, x)
        if st != OK:
            return st
        self.challenge = cmd.challenge
        self._rng_field = x.rng_field = "session_id"
        x.reply = {k: v for k, v in self._reply().items() if k != "session_id"}
        return OK

    def _recv_begin(self, cmd: Command, mb, page, x: Expect) -> int:
        if self.state == P.ST_RECEIVING:
            self._end(P.ST_ABORTED)
        st = self._may_begin()
        if st != OK:
            return st
        st = self._begin(cmd, P.ST_RECEIVING, x)
        if st != OK:
            return st
        self.session_id = 0
        self._rng_field = x.rng_field = "challenge"
        x.reply = {k: v for k, v in self._reply().items() if k != "challenge"}
        return OK

    # -- the checks of an entry ----------------------------------------------------------------
    def check_ram_addr(self, ram_addr: int, flags: int) -> int:
        p = self.plat
        if flags & P.ENTRY_F_SHARED:
            return ST["E_SHARED"]
        if flags:
            return ST["E_BAD_ARG"]
        if ram_addr & (PAGE - 1) or ram_addr >= self.ram_size:
            return ST["E_RANGE"]
        gpa = (p.ram_base + ram_addr) & M64
        for r in p.regions:
            if overlaps(ram_addr, PAGE, r.main_gpa, r.length) or overlaps(
                    gpa, PAGE, r.mirror_gpa, r.length) or overlaps(
                    gpa, PAGE, r.main_gpa, r.length):
                return ST["E_SELF"]
        return OK

    def _count_ok(self, cmd: Command) -> bool:
        return 1 <= cmd.count <= self.plat.slots

    # -- SEND ----------------------------------------------------------------------------------
    def _send(self, cmd: Command, mb, page, x: Expect) -> int:
        if self.state != P.ST_SENDING:
            return ST["E_BAD_STATE"]
        if not self._count_ok(cmd):
            return ST["E_BAD_COUNT"]
        assert self.keys is not None
        for i in range(cmd.count):
            ram_addr, flags = cmd.entries[i]
            st = self.check_ram_addr(ram_addr, flags)
            if st == OK and self.epoch_count >= P.EPOCH_RECORDS_MAX:
                st = ST["E_EXHAUSTED"]
            if st == OK:
                seq = self.next_seq
                self.next_seq += 1
                x.slots[i] = self.keys.forger.record(ram_addr, page(ram_addr), epoch=self.epoch,
                                                     seq=seq)
                self._count(ram_addr, seq)
                x.processed += 1
            x.entries.append(st)
        return OK

    def _count(self, ram_addr: int, seq: int) -> None:
        assert self.keys is not None
        self.set_hash ^= self.keys.set_hash_term(ram_addr, seq)
        self.epoch_count += 1
        self.total += 1

    def _next_epoch(self) -> None:
        self.epoch = (self.epoch + 1) & M32
        self.epoch_first += self.epoch_count
        self.epoch_count = 0
        self.set_hash = 0
        self.seen, self.installed = set(), set()

    def _seal_token(self, magic: int, epoch: int, count: int, first: int, set_hash: int,
                    nonce_epoch: int) -> bytes:
        assert self.keys is not None
        return self.keys.forger.token(epoch=epoch, count=count, first_seq=first,
                                      set_hash=set_hash.to_bytes(16, "little"), total=self.total,
                                      magic=magic, nonce_epoch=nonce_epoch)

    def _send_end_epoch(self, cmd, mb, page, x: Expect) -> int:
        if self.state != P.ST_SENDING:
            return ST["E_BAD_STATE"]
        if self.epoch >= P.FINISH_EPOCH - 1:
            return ST["E_EXHAUSTED"]
        x.slots[0] = self._seal_token(P.TOKEN_MAGIC, self.epoch, self.epoch_count,
                                      self.epoch_first, self.set_hash, self.epoch)
        self._next_epoch()
        return OK

    def _send_finish(self, cmd, mb, page, x: Expect) -> int:
        if self.state != P.ST_SENDING:
            return ST["E_BAD_STATE"]
        if self.epoch_count != 0:
            return ST["E_INCOMPLETE"]
        x.slots[0] = self._seal_token(P.FINISH_MAGIC, (self.epoch - 1) & M32, 0, self.next_seq,
                                      0, P.FINISH_EPOCH)
        self._end(P.ST_DONE)
        return OK

    # -- RECV ----------------------------------------------------------------------------------
    def _bind(self, cmd: Command) -> int:
        if self.state != P.ST_RECEIVING:
            return ST["E_BAD_STATE"]
        if self.bound:
            return OK if cmd.session_id == self.session_id else ST["E_REPLAY"]
        if cmd.session_id == 0:
            return ST["E_BAD_ARG"]
        self.session_id = cmd.session_id
        self.keys = Keys.derive(self.plat.key, self.session_id, self.challenge)
        self.bound = True
        return OK

    def _recv(self, cmd: Command, mb: bytes, page, x: Expect) -> int:
        st = self._bind(cmd)
        if st != OK:
            return st
        if not self._count_ok(cmd):
            return ST["E_BAD_COUNT"]
        for i in range(cmd.count):
            ram_addr, flags = cmd.entries[i]
            st = self.check_ram_addr(ram_addr, flags)
            if st == OK:
                slot = mb[SLOTS_OFF + i * SLOT: SLOTS_OFF + (i + 1) * SLOT]
                st, plain = self.open_record(ram_addr, slot)
                if st == OK:
                    x.installs[ram_addr] = plain
            if st == OK:
                x.processed += 1
            else:
                self._refused += 1
            x.entries.append(st)
        return OK

    def open_record(self, ram_addr: int, slot: bytes) -> tuple[int, bytes | None]:
        """The destination's decision on one record for `ram_addr` (and its plaintext)."""
        magic, flags, env_addr, sid, epoch, lane, seq, challenge = ENV.unpack_from(slot)
        if magic != P.ENVELOPE_MAGIC or flags or lane:  # the model is lane 0 of one lane
            return ST["E_HEADER"], None
        if env_addr != ram_addr:
            return ST["E_HEADER"], None
        if sid != self.session_id or challenge != self.challenge or epoch != self.epoch:
            return ST["E_REPLAY"], None
        if seq < self.epoch_first or seq - self.epoch_first >= P.EPOCH_RECORDS_MAX:
            return ST["E_REPLAY"], None
        if seq in self.seen or ram_addr in self.installed:
            return ST["E_REPLAY"], None
        assert self.keys is not None
        try:
            plain = self.keys.aead.decrypt(struct.pack("<IQ", self.epoch, seq),
                                           slot[64:64 + PAGE] + slot[48:64], slot[:48])
        except InvalidTag:
            return ST["E_AUTH"], None
        self.installed_any = True
        self.seen.add(seq)
        self.installed.add(ram_addr)
        self._count(ram_addr, seq)
        return OK, plain

    def _open_token(self, cmd: Command, mb: bytes, magic: int, finish: bool):
        st = self._bind(cmd)
        if st != OK:
            return st, None
        raw = mb[SLOTS_OFF: SLOTS_OFF + P.EpochToken.size]
        t = TOK.unpack_from(raw)
        if t[0] != magic:
            return ST["E_HEADER"], None
        if t[2] != self.session_id or t[7] != self.challenge:
            return ST["E_REPLAY"], None
        assert self.keys is not None
        try:
            self.keys.aead.decrypt(struct.pack("<IQ", P.FINISH_EPOCH if finish else t[1], 0),
                                   raw[64:80], raw[:64])
        except InvalidTag:
            return ST["E_AUTH"], None
        return OK, t

    def _recv_end_epoch(self, cmd: Command, mb: bytes, page, x: Expect) -> int:
        st, t = self._open_token(cmd, mb, P.TOKEN_MAGIC, False)
        if st != OK:
            return st
        _magic, epoch, _sid, count, first, h, total, _ch = t
        if epoch != self.epoch:
            return ST["E_REPLAY"]
        if count != self.epoch_count or first != self.epoch_first or total != self.total or \
                int.from_bytes(h, "little") != self.set_hash:
            return ST["E_EPOCH"]
        self._next_epoch()
        return OK

    def _recv_finish(self, cmd: Command, mb: bytes, page, x: Expect) -> int:
        st, t = self._open_token(cmd, mb, P.FINISH_MAGIC, True)
        if st != OK:
            return st
        _magic, epoch, _sid, count, first, h, total, _ch = t
        if self.poisoned or self.epoch_count != 0 or epoch != (self.epoch - 1) & M32 or \
                count != 0 or total != self.total or first != self.epoch_first or any(h):
            return ST["E_INCOMPLETE"]
        self._end(P.ST_DONE)
        return OK

    # -- what a source would send next (for generators) --------------------------------------------
    def honest_token(self, finish: bool) -> bytes:
        """The token a source whose records this destination accepted would send now."""
        if finish:
            return self._seal_token(P.FINISH_MAGIC, (self.epoch - 1) & M32, 0, self.epoch_first,
                                    0, P.FINISH_EPOCH)
        return self._seal_token(P.TOKEN_MAGIC, self.epoch, self.epoch_count, self.epoch_first,
                                self.set_hash, self.epoch)


def platform_native(key: bytes, ram_base: int, ram_max: int, self_gpa: int,
                    self_len: int) -> Platform:
    """The platform `session.mh_test_ctx_init` sets up (one own region, identity mirror)."""
    return Platform(key, ram_base, ram_max, (Region(self_gpa, self_len, self_gpa),),
                    option=1, c_bit=47)


def platform_of_bootinfo(key: bytes, bi) -> Platform:
    """The platform the driver set up, from the BootInfo it announced."""
    regs = tuple(Region(r.main_gpa, r.length, r.mirror_gpa) for r in list(bi.regions)[:bi.nregions])
    return Platform(key, bi.ram_base, bi.ram_max, regs, option=bi.option, c_bit=bi.c_bit,
                    slots=bi.slots)


def resynced(plat: Platform) -> HelperModel:
    """A model for a helper whose private state the host rolled back in ways the model could
    not follow, to be brought back in sync by a successful *_BEGIN: every field a decision
    depends on is reset by it, except how much of the RAM window the page tables hold (a
    rolled-back context may under-count it, so larger windows become undecidable)."""
    m = HelperModel(plat)
    m.pool_known = False
    return m
