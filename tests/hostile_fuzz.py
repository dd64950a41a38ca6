"""Mailbox fuzzer for the hostile-host suite: one generator, two targets.

    python -m tests.hostile_fuzz native --seed S --commands N     # replay a native run
    python -m tests.hostile_fuzz emu --option tuples --seed S --commands N

Generator: a seeded host that mixes well-formed traffic with mutations, so the fuzz gets past
the first validation into every op's deep paths. It keeps a model of the sessions it started
and mints *authentic* records and tokens with the transport key (tests.hostile_common.Forger):
fresh valid records, valid-but-wrong ones (stale epoch, seq outside the window, other session or
challenge, re-addressed), replays of records and tokens the helper itself produced, bit flips,
random and truncated bytes; counts, ram_addrs, flags, window sizes, challenges and op codes are
drawn from boundary values and random words. It also rolls the helper's private memory back:
between batches it restores an earlier copy of the context (native) or of random pages of the
helper's data region (emulator), as a host replaying DRAM ciphertext would; a helper found
discarded (one-shot destination) is replaced by a freshly booted one.

Targets:
* `NativeTarget`: the compiled session code (tests.session_host.image()) called in-process on
  mmap'd buffers with PROT_NONE guard pages between context, mailbox, RAM and table pool; the
  RAM is read-only except, during a RECV, the pages that batch names; the image's .rodata is
  read-only. A stray write is a SIGSEGV: the run is a subprocess, and the index of the command
  in flight sits in a progress file, so the parent reports which command crashed.
* `EmuTarget`: the built .efi in its mirror VM (tests.mirror_host), per-batch instruction
  budget, fault exits, and write tracking of every DRAM byte outside the helper's data region
  and the mailbox.

Invariants after every command (`Fuzzer.check`): completion and documented status; entries
past the batch untouched; `processed` = OK entries; the mailbox changed only where the op may
write; no private plaintext (or key material) in what changed; every SEND output is exactly the
AES-GCM-SIV record of the page it names under a session the helper had, with the next seq
(unless memory was rolled back); guest RAM changed only on pages of OK RECV entries, each equal
to the plaintext of its authentic record; and (emulator) the batch ended in HLT within budget
with no write outside the allowed DRAM.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from helperfw.runtime import protocol as P
from tests.hostile_common import DOCUMENTED, ST, STATES, Forger, LeakScanner, name
from tests.mirror_host import pack_command
from tests.session_host import image, set_hash

PAGE = P.PAGE_SIZE
SLOT = P.SLOT_SIZE
MB_SIZE = P.MAILBOX_PAGES * PAGE
CMD_OFF = PAGE
ENTRIES_OFF = PAGE + P.Command.offset("entries")
CTL_OFF = P.CONTROL_OFFSET
SLOTS_OFF = 2 * PAGE
SENTINEL = 0x5A5A5A5A  # written into every entry's status: not a documented status
KEY = bytes(range(7, 39))
_CTL = struct.Struct("<QQiIII")

OPS = [  # (op, weight)
    (P.OP_HELLO, 4), (P.OP_SEND_BEGIN, 6), (P.OP_SEND, 18), (P.OP_SEND_END_EPOCH, 5),
    (P.OP_SEND_FINISH, 3), (P.OP_RECV_BEGIN, 7), (P.OP_RECV, 30), (P.OP_RECV_END_EPOCH, 8),
    (P.OP_RECV_FINISH, 4), (P.OP_ABORT, 2), (None, 3),
]


STATE_OPS = {
    P.ST_SENDING: [P.OP_SEND] * 6 + [P.OP_SEND_END_EPOCH] * 2 + [P.OP_SEND_FINISH],
    P.ST_RECEIVING: [P.OP_RECV] * 6 + [P.OP_RECV_END_EPOCH] * 2 + [P.OP_RECV_FINISH],
    P.ST_IDLE: [P.OP_SEND_BEGIN, P.OP_RECV_BEGIN, P.OP_RECV_BEGIN],
    P.ST_DONE: [P.OP_SEND_BEGIN, P.OP_RECV_BEGIN, P.OP_RECV_BEGIN],
    P.ST_ABORTED: [P.OP_SEND_BEGIN, P.OP_RECV_BEGIN, P.OP_RECV_BEGIN],
}


class Violation(AssertionError):
    pass


@dataclass
class Outcome:
    """What a target reports for one batch."""

    ok_exit: bool
    exit_detail: str
    before: bytes  # mailbox before the doorbell (after the host wrote the command)
    after: bytes  # mailbox after the batch
    changed_pages: dict[int, bytes] = field(default_factory=dict)  # ram_addr -> new content
    bad_writes: list = field(default_factory=list)


# -- targets ---------------------------------------------------------------------------------------
class NativeTarget:
    """The session code in-process, on guarded buffers."""

    RAM_PAGES = 512  # 2 MiB window (ram_max): the whole RAM is random private plaintext
    SELF = (500, 4)  # the helper's own pages inside low RAM (ram_addr == GPA): E_SELF
    POOL_PAGES = 32

    def __init__(self, key: bytes, rng: random.Random, progress_path: str | None = None):
        self.img = image()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        ctx_pages = -(-__import__("helperfw.runtime.session", fromlist=["x"]).HelperCtx.size
                      // PAGE)
        layout = [("ctx", ctx_pages), ("mailbox", P.MAILBOX_PAGES), ("ram", self.RAM_PAGES),
                  ("pool", self.POOL_PAGES)]
        total = 1 + sum(n + 1 for _, n in layout)
        self.arena = mmap.mmap(-1, total * PAGE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.arena))
        self.addr = {}
        cur = base + PAGE
        self._protect(base, PAGE, 0)
        for nm, n in layout:
            self.addr[nm] = cur
            cur += n * PAGE
            self._protect(cur, PAGE, 0)  # guard page
            cur += PAGE
        self.ram, self.mb = self.addr["ram"], self.addr["mailbox"]
        self.ram_max = self.RAM_PAGES * PAGE
        self.pages = [ram_addr * PAGE for ram_addr in range(self.RAM_PAGES)]
        self.self_pages = [(self.SELF[0] + i) * PAGE for i in range(self.SELF[1])]
        ctypes.memmove(self.ram, rng.randbytes(self.ram_max), self.ram_max)
        self.ctx_size = ctx_pages * PAGE
        self.key = key
        self.reboot()
        ro = self.img.image.section(".rodata")
        self._protect(self.img.base + ro.rva, -(-ro.vsize // PAGE) * PAGE, mmap.PROT_READ)
        self._protect(self.ram, self.ram_max, mmap.PROT_READ)
        self.progress = None
        if progress_path:
            fd = os.open(progress_path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, 8)
            self.progress = mmap.mmap(fd, 8)
            os.close(fd)
        self.bell = 0
        self._process = self.img.function("mh_test_process", ctypes.c_int32, [ctypes.c_uint64])

    def reboot(self) -> None:
        """A freshly loaded helper (a new VM): zeroed context, set up as the driver does."""
        ctypes.memset(self.addr["ctx"], 0, self.ctx_size)
        keybuf = ctypes.create_string_buffer(self.key, 32)
        r = self.img.call("mh_test_ctx_init", self.addr["ctx"], ctypes.addressof(keybuf),
                          self.mb, self.ram, self.ram_max, self.addr["pool"], self.POOL_PAGES,
                          self.SELF[0] * PAGE, self.SELF[1] * PAGE, restype=ctypes.c_int32)
        assert r == 0
        self.bell = 0
        ctypes.memmove(self.mb + CTL_OFF, bytes(8), 8)

    def snapshot(self, rng: random.Random) -> object:
        """The host copies private memory: here the whole context (its DRAM ciphertext)."""
        return ctypes.string_at(self.addr["ctx"], self.ctx_size)

    def rollback(self, snap: object, rng: random.Random) -> None:
        """... and writes it back later: the helper reads its old state."""
        ctypes.memmove(self.addr["ctx"], snap, self.ctx_size)

    def _protect(self, a: int, n: int, prot: int) -> None:
        if self.libc.mprotect(a, n, prot) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")

    def private_pages(self) -> list[bytes]:
        return [ctypes.string_at(self.ram, self.ram_max)]

    def page(self, ram_addr: int) -> bytes:
        return ctypes.string_at(self.ram + ram_addr, PAGE)

    def run(self, index: int, command: bytes, slots: dict[int, bytes],
            writable: list[int]) -> Outcome:
        if self.progress is not None:
            struct.pack_into("<Q", self.progress, 0, index)
        ctypes.memmove(self.mb + CMD_OFF, command, len(command))
        for i, data in slots.items():
            ctypes.memmove(self.mb + SLOTS_OFF + i * SLOT, data, len(data))
        self.bell += 1
        ctypes.memmove(self.mb + CTL_OFF, struct.pack("<Q", self.bell), 8)
        before = ctypes.string_at(self.mb, MB_SIZE)
        old = {a: self.page(a) for a in writable}
        for a in writable:
            self._protect(self.ram + a, PAGE, mmap.PROT_READ | mmap.PROT_WRITE)
        self._process(self.addr["ctx"])
        for a in writable:
            self._protect(self.ram + a, PAGE, mmap.PROT_READ)
        changed = {a: p for a in writable if (p := self.page(a)) != old[a]}
        return Outcome(True, "", before, ctypes.string_at(self.mb, MB_SIZE), changed)


class EmuTarget:
    """The built image in its mirror VM (tests.mirror_host.MirrorHost)."""

    def __init__(self, key: bytes, rng: random.Random, option: int, cbit: int = 47,
                 npages: int = 96):
        from tests.mirror_host import RAM, MirrorHost

        self.h = MirrorHost(cbit, option, key=key, seed=rng.randrange(1 << 30))
        self.ram_max = RAM  # what the host maps; larger windows would only NPF (host's doing)
        base = 0x400000
        self.pages = sorted({base + rng.randrange(RAM // PAGE - base // PAGE) * PAGE
                             for _ in range(npages)} | {0, RAM - PAGE})
        self.pages = [a for a in self.pages if self._outside(a)]
        self.self_pages = sorted({r.main_gpa for r in self.h.regions} |
                                 {r.main_gpa + r.length - PAGE for r in self.h.regions} |
                                 {self.h.symbol_gpa("CTX") & ~(PAGE - 1)})
        # pages the running helper legitimately writes (its data region, unless `isolated`
        # runs a mirror-only copy of it, and the mailbox): not guest RAM for the checks below
        own = [r for r in self.h.regions if r.kind == P.REGION_MAILBOX or
               (r.kind == P.REGION_DATA and option != P.OPT_ISOLATED)]
        self.own = {r.main_gpa + o for r in own for o in range(0, r.length, PAGE)}
        self._private = []
        for a in self.pages:
            data = rng.randbytes(PAGE)
            self.h.set_guest_page(a, data)
            self._private.append(data)
        # the secret part of the helper's own data: the transport key as the helper holds it
        # (the rest of its data region is addresses and tables the host knows anyway)
        from helperfw.runtime.session import HelperCtx

        data = self.h.region(P.REGION_DATA)
        ctx = self.h.symbol_gpa("CTX") - data.main_gpa + data.mirror_gpa
        self._private.append(self.h.mirror.read(ctx + HelperCtx.offset("key"), 32,
                                                encrypted=True))
        self.booted = self.h.save()
        self.data_hpas = self.h.private_hpas(data.main_gpa, data.length)

    def reboot(self) -> None:
        """A freshly booted helper: the machine as it was after the driver loaded."""
        self.h.restore(self.booted)

    def snapshot(self, rng: random.Random) -> object:
        """Ciphertext of a random handful of the helper's private pages (context, stack,
        tables...): what a host can copy out of DRAM."""
        pages = rng.sample(self.data_hpas, min(len(self.data_hpas), rng.randrange(1, 12)))
        return self.h.hands.snapshot(pages)

    def rollback(self, snap: object, rng: random.Random) -> None:
        self.h.hands.restore(snap)  # type: ignore[arg-type]

    def _outside(self, a: int) -> bool:
        return all(not (r.main_gpa <= a < r.main_gpa + r.length) for r in self.h.regions)

    def private_pages(self) -> list[bytes]:
        return self._private

    def page(self, ram_addr: int) -> bytes:
        return self.h.guest_page(ram_addr)

    def run(self, index: int, command: bytes, slots: dict[int, bytes],
            writable: list[int]) -> Outcome:
        h = self.h
        h.mc.host_write(h.mb + CMD_OFF, command)
        for i, data in slots.items():
            h.write_slot(i, data)
        before = h.read_mailbox()
        before = before[:CTL_OFF] + struct.pack("<Q", h.bell + 1) + before[CTL_OFF + 8:]
        old = {a: self.page(a) for a in writable}
        r = h.batch(command, None)
        out = Outcome(r.exit.reason == "hlt", str(r.exit), before, h.read_mailbox(),
                      bad_writes=r.bad_writes)
        for a in (r.window_pages_written | set(writable)) - self.own:
            p = self.page(a)
            if p != old.get(a):
                out.changed_pages[a] = p
        return out


# -- the fuzzer ------------------------------------------------------------------------------------
@dataclass
class RecvModel:
    """The fuzzer's view of the helper's receiving session."""

    challenge: int
    sid: int = 0  # 0 until the first RECV-family command binds the session
    forger: Forger | None = None
    epoch: int = P.FIRST_EPOCH
    first: int = P.FIRST_SEQ
    next_seq: int = P.FIRST_SEQ
    accepted: list = field(default_factory=list)  # (ram_addr, seq) this epoch
    total: int = 0


RECV_OPS = (P.OP_RECV, P.OP_RECV_END_EPOCH, P.OP_RECV_FINISH)
ROLLBACK_RATE = 0.02  # batches preceded by a restore of earlier private memory
REPLY_SID = P.HelloReply.offset("session_id")
REPLY_CHALLENGE = P.HelloReply.offset("challenge")


class Fuzzer:
    def __init__(self, target, seed: int, key: bytes = KEY) -> None:
        self.t = target
        self.key = key
        self.rng = random.Random(seed)
        self.seed = seed
        self.pool = [self.rng.randbytes(PAGE) for _ in range(16)]  # what minted records carry
        self.scan = LeakScanner()
        for blob in target.private_pages() + self.pool:
            self.scan.add(blob)
        self.scan.add(key)
        self.stats: Counter = Counter()
        self.statuses: Counter = Counter()
        self.sids: list[int] = [self.rng.getrandbits(64)]
        self.challenges: list[int] = [self.rng.getrandbits(64) | 1]
        self.send: Forger | None = None  # the sending session's keys
        self.send_seq = P.FIRST_SEQ
        self.recv: RecvModel | None = None
        self.sessions: list[Forger] = []  # every session the helper had: who may have sealed
        self.window = 0  # ram_size of the last successful *_BEGIN
        self.state = P.ST_IDLE  # Control.state after the last batch
        self.records: list[tuple[int, bytes]] = []  # records seen (SEND outputs, minted)
        self.tokens: list[bytes] = []
        self.snaps: list[object] = []  # copies of the helper's private memory
        self.desync = False  # memory was rolled back: the model's counters may be stale

    # -- choices ---------------------------------------------------------------------------------
    def _addr(self) -> int:
        r = self.rng.random()
        pages = self.t.pages
        if r < 0.70:
            return self.rng.choice(pages)
        if r < 0.80:
            return self.rng.choice(self.t.self_pages)
        if r < 0.85 and self.window:
            return self.window - PAGE if self.rng.random() < 0.5 else self.window
        return self.rng.choice([self.rng.choice(pages) + self.rng.randrange(1, PAGE),
                                self.rng.getrandbits(64) & ~0xFFF, 2**64 - PAGE,
                                self.t.ram_max, 1 << self.rng.randrange(12, 64)])

    def _flags(self) -> int:
        r = self.rng.random()
        if r < 0.92:
            return 0
        return self.rng.choice([P.ENTRY_F_SHARED, 2, 3, 0x80000000, self.rng.getrandbits(32)])

    def _count(self) -> int:
        r = self.rng.random()
        if r < 0.75:
            return min(int(self.rng.expovariate(1 / 4)) + 1, P.MAX_SLOTS)
        if r < 0.93:
            return P.MAX_SLOTS
        return -1  # the header's count field will be mutated

    def _ram_size(self) -> int:
        r = self.rng.random()
        two = 2 << 20
        if r < 0.5:
            return self.t.ram_max
        if r < 0.8:
            return two * self.rng.randrange(1, self.t.ram_max // two + 1)
        return self.rng.choice([0, PAGE, two + PAGE, two - PAGE, 2**64 - two, 2**63,
                                self.rng.getrandbits(64), (1 << 47) + two])

    def _session_id(self) -> int:
        """Command.session_id of a RECV-family command: mostly the session's."""
        m, rng = self.recv, self.rng
        if m is not None and rng.random() < 0.93:
            if m.sid == 0:
                m.sid = rng.choice(self.sids)  # the host picks the session to bind
            return m.sid
        return rng.choice([0, rng.getrandbits(64), *self.sids])

    def _mint(self, ram_addr: int) -> bytes:
        m = self.recv
        rng = self.rng
        r = rng.random()
        if m is None or m.forger is None or r < 0.08:
            return rng.choice([bytes(SLOT), rng.randbytes(SLOT)])
        plain = rng.choice(self.pool)
        if r < 0.58:
            seq = m.next_seq
            m.next_seq += 1
            rec = m.forger.record(ram_addr, plain, epoch=m.epoch, seq=seq)
        elif r < 0.72:
            how = rng.randrange(7)
            seq = m.next_seq
            m.next_seq += 1
            kw = {"epoch": m.epoch, "seq": seq}
            if how == 0:
                kw["epoch"] = m.epoch + rng.choice([-1, 1])
            elif how == 1:
                kw["seq"] = rng.choice([0, m.first - 1, m.first + P.EPOCH_RECORDS_MAX,
                                        rng.getrandbits(64)])
            elif how == 2:
                kw["sid"] = rng.choice(self.sids)
            elif how == 3:
                ram_addr = rng.choice(self.t.pages)
            elif how == 4:
                kw["nonce"] = (m.epoch, seq + 1)
            elif how == 5:
                kw["challenge"] = rng.choice(self.challenges)
            else:
                kw[rng.choice(["flags", "lane", "magic"])] = rng.getrandbits(32)
            rec = m.forger.record(ram_addr, plain, **kw)
        elif r < 0.87 and self.records:
            rec = rng.choice(self.records)[1]
        else:
            seq = m.next_seq
            m.next_seq += 1
            rec = bytearray(m.forger.record(ram_addr, plain, epoch=m.epoch, seq=seq))
            for _ in range(rng.randrange(1, 4)):
                rec[rng.randrange(SLOT)] ^= 1 << rng.randrange(8)
            if rng.random() < 0.2:
                cut = rng.randrange(SLOT)
                rec[cut:] = bytes(SLOT - cut)
            rec = bytes(rec)
        self._remember(ram_addr, rec)
        return rec

    def _remember(self, ram_addr: int, rec: bytes) -> None:
        if len(self.records) < 256:
            self.records.append((ram_addr, rec))
        else:
            self.records[self.rng.randrange(256)] = (ram_addr, rec)

    def _token(self, finish: bool) -> bytes:
        m = self.recv
        rng = self.rng
        r = rng.random()
        if m is None or m.forger is None or r < 0.1:
            return rng.choice([bytes(P.EpochToken.size), rng.randbytes(P.EpochToken.size)])
        if r < 0.6:
            tok = self._honest_token(m, finish)
        elif r < 0.75 and self.tokens:
            tok = rng.choice(self.tokens)
        else:
            kw = {"epoch": m.epoch, "count": len(m.accepted), "first_seq": m.first,
                  "set_hash": set_hash(self.key, m.sid, m.challenge, m.accepted),
                  "total": m.total}
            field_ = rng.choice([*kw, "challenge"])
            if field_ == "challenge":
                kw["challenge"] = rng.choice(self.challenges)
            else:
                kw[field_] = (rng.getrandbits(128).to_bytes(16, "little")
                              if field_ == "set_hash" else
                              rng.choice([0, kw[field_] + 1, kw[field_] - 1,
                                          rng.getrandbits(32)]) & 0xFFFFFFFF)
            tok = bytearray(m.forger.token(**kw))
            if rng.random() < 0.3:
                tok[rng.randrange(len(tok))] ^= 1 << rng.randrange(8)
            tok = bytes(tok)
        return tok

    def _honest_token(self, m: RecvModel, finish: bool) -> bytes:
        if finish:
            return m.forger.token(epoch=m.epoch - 1, count=0, first_seq=m.first,
                                  set_hash=bytes(16), total=m.total, magic=P.FINISH_MAGIC)
        return m.forger.token(epoch=m.epoch, count=len(m.accepted), first_seq=m.first,
                              set_hash=set_hash(self.key, m.sid, m.challenge, m.accepted),
                              total=m.total)

    # -- one command ---------------------------------------------------------------------------
    def _maybe_rollback(self) -> None:
        """A host replaying DRAM: keep copies of the helper's private memory, and now and then
        write an earlier one back before a batch."""
        rng = self.rng
        if rng.random() < ROLLBACK_RATE * 2:
            self.snaps = [*self.snaps[-7:], self.t.snapshot(rng)]
        if self.snaps and rng.random() < ROLLBACK_RATE:
            self.t.rollback(rng.choice(self.snaps), rng)
            self.desync = True
            self.stats["rollbacks"] += 1

    def step(self, index: int) -> None:
        rng = self.rng
        self._maybe_rollback()
        if rng.random() < 0.6 and self.state in STATE_OPS:  # mostly ops that fit the state
            op = rng.choice(STATE_OPS[self.state])
        else:
            op = rng.choices([o for o, _ in OPS], [w for _, w in OPS])[0]
        if op is None:
            op = rng.choice([0, 11, 12, 0xFF, 0x80000000, rng.getrandbits(32)])
        fields = {"version": P.PROTOCOL_VERSION.value if rng.random() < 0.9 else
                  rng.getrandbits(32)}
        entries: list[tuple[int, int]] = []
        slots: dict[int, bytes] = {}
        count = None
        if op in (P.OP_SEND_BEGIN, P.OP_RECV_BEGIN):
            fields["ram_size"] = self._ram_size()
        if op == P.OP_SEND_BEGIN:
            fields["challenge"] = rng.choice(self.challenges) if rng.random() < 0.93 else \
                rng.choice([0, rng.getrandbits(64)])
        if op in RECV_OPS:
            fields["session_id"] = self._session_id()
        if op in (P.OP_SEND, P.OP_RECV):
            n = self._count()
            if n < 0:
                n = rng.randrange(1, P.MAX_SLOTS + 1)
                count = rng.choice([0, P.MAX_SLOTS + 1, 0xFFFFFFFF, rng.getrandbits(32), n])
            entries = [(self._addr(), self._flags()) for _ in range(n)]
            if op == P.OP_RECV:
                self._bind(fields["session_id"])
                slots = {i: self._mint(a) for i, (a, _) in enumerate(entries)}
        if op in (P.OP_RECV_END_EPOCH, P.OP_RECV_FINISH):
            self._bind(fields["session_id"])
            slots = {0: self._token(op == P.OP_RECV_FINISH)}
        if rng.random() < 0.03:  # garbage in the fields nobody should read
            fields["epoch"] = rng.getrandbits(32)
            if op != P.OP_SEND_BEGIN:
                fields["challenge"] = rng.getrandbits(64)
        raw = bytearray(pack_command(op & 0xFFFFFFFF, entries, count=count, **fields))
        for i in range(P.MAX_SLOTS):  # sentinel statuses: the helper must write only its own
            struct.pack_into("<I", raw, ENTRIES_OFF - PAGE + 16 * i + 12, SENTINEL)
        n_eff = len(entries) if count is None else count
        writable = []
        if op == P.OP_RECV:
            writable = sorted({a for a, _ in entries if a % PAGE == 0 and a < self.t.ram_max})
        out = self.t.run(index, bytes(raw), slots, writable)
        self.stats[op if op in dict(OPS) else "bad-op"] += 1
        try:
            self.check(op, entries, n_eff, slots, out)
        except Violation as e:
            raise Violation(f"command {index} (seed {self.seed}) op {op}: {e}") from None

    def _bind(self, sid: int) -> None:
        """Mirror the helper: the first RECV-family command with a session id binds it."""
        m = self.recv
        if m is not None and m.forger is None and sid != 0 and self.state == P.ST_RECEIVING:
            m.sid = sid
            m.forger = Forger(self.key, sid, m.challenge)
            self._new_keys(m.forger)

    # -- invariants ----------------------------------------------------------------------------
    def check(self, op: int, entries, n_eff: int, slots, out: Outcome) -> None:
        if not out.ok_exit:
            raise Violation(f"batch did not end in HLT: {out.exit_detail}")
        if out.bad_writes:
            raise Violation(f"writes outside RAM window/own data/mailbox: {out.bad_writes[:4]}")
        _, completed, status, state, processed, _ = _CTL.unpack_from(out.after, CTL_OFF)
        if completed != _CTL.unpack_from(out.before, CTL_OFF)[0]:
            raise Violation(f"completed {completed} != doorbell")
        if status not in DOCUMENTED or state not in STATES:
            raise Violation(f"undocumented status {status} / state {state}")
        self.statuses[name(status)] += 1
        self.state = state
        batch = op in (P.OP_SEND, P.OP_RECV) and status == 0
        n = n_eff if batch else 0
        if batch and not 1 <= n_eff <= P.MAX_SLOTS:
            raise Violation(f"batch OK with count {n_eff}")
        est = [struct.unpack_from("<i", out.after, ENTRIES_OFF + 16 * i + 12)[0] for i in range(n)]
        for s in est:
            if s not in DOCUMENTED:
                raise Violation(f"undocumented entry status {s}")
            self.statuses["entry:" + name(s)] += 1
        if processed != sum(1 for s in est if s == 0):
            raise Violation(f"processed {processed} != OK entries {est}")
        allowed = self._check_mailbox(op, status, n, est, out)
        self._check_leaks(n, allowed, out)
        self._update_model(op, status, entries, n, est, slots, out)
        if status == ST["E_DISCARDED"]:  # one-shot destination: this helper is done for
            self.t.reboot()
            self.state, self.recv, self.send, self.snaps = P.ST_IDLE, None, None, []
            self.stats["reboots"] += 1

    def _check_mailbox(self, op, status, n, est, out) -> list[tuple[int, int]]:
        """The mailbox changed only where the op may write; returns those ranges."""
        allowed = [(CTL_OFF + 8, CTL_OFF + 28)]
        allowed += [(ENTRIES_OFF + 16 * i + 12, ENTRIES_OFF + 16 * i + 16) for i in range(n)]
        if status == 0:
            if op in (P.OP_HELLO, P.OP_SEND_BEGIN, P.OP_RECV_BEGIN):
                allowed.append((SLOTS_OFF, SLOTS_OFF + P.HelloReply.size))
            elif op in (P.OP_SEND_END_EPOCH, P.OP_SEND_FINISH):
                allowed.append((SLOTS_OFF, SLOTS_OFF + P.EpochToken.size))
            elif op == P.OP_SEND:
                allowed += [(SLOTS_OFF + i * SLOT, SLOTS_OFF + (i + 1) * SLOT)
                            for i in range(n) if est[i] == 0]
        masked = bytearray(out.after)
        for a, b in allowed:
            masked[a:b] = out.before[a:b]
        if masked != out.before:
            off = next(i for i in range(len(masked)) if masked[i] != out.before[i])
            raise Violation(f"mailbox byte {off:#x} changed outside what op {op} may write")
        return allowed

    def _check_leaks(self, n, allowed, out) -> None:
        """Leak scan of what changed: Control, the entry array, each written slot."""
        scan = [(CTL_OFF, CTL_OFF + P.Control.size), (ENTRIES_OFF, ENTRIES_OFF + 16 * n)]
        scan += [(a, b) for a, b in allowed if a >= SLOTS_OFF]
        for a, b in scan:
            if out.after[a:b] != out.before[a:b]:
                hits = self.scan.scan(out.after[a:b])
                if hits:
                    raise Violation(f"private plaintext in shared memory at {a + hits[0]:#x}")

    def _opener(self, rec: bytes) -> tuple[Forger, bytes] | None:
        """(session, plaintext) of a record authentic under a session the helper had."""
        for f in reversed(self.sessions):
            plain = f.open(rec)
            if plain is not None:
                return f, plain
        return None

    def _update_model(self, op, status, entries, n, est, slots, out) -> None:
        if status == 0 and op == P.OP_SEND_BEGIN:
            sid = _u64(out.after, SLOTS_OFF + REPLY_SID)
            challenge = _u64(out.before, CMD_OFF + P.Command.offset("challenge"))
            self.send = Forger(self.key, sid, challenge)
            self._new_keys(self.send)
            self.send_seq = P.FIRST_SEQ
            self.sids.append(sid)
            self.window = _u64(out.before, CMD_OFF + 24)
            self.desync = False
        if op == P.OP_SEND and status == 0:
            for i in range(n):
                if est[i] != 0:
                    continue
                rec = out.after[SLOTS_OFF + i * SLOT: SLOTS_OFF + (i + 1) * SLOT]
                ra, seq = _u64(rec, 8), _u64(rec, 0x20)
                got = self._opener(rec)
                if ra != entries[i][0] or got is None or got[1] != self.t.page(ra):
                    raise Violation(f"SEND slot {i}: not the sealed page {entries[i][0]:#x}")
                if not self.desync and (got[0] is not self.send or seq != self.send_seq):
                    raise Violation(f"SEND seq {seq} / session, expected seq {self.send_seq}")
                self.send_seq = seq + 1
                self._remember(ra, rec)
        if status == 0 and op in (P.OP_SEND_END_EPOCH, P.OP_SEND_FINISH):
            self.tokens = [*self.tokens[-31:], out.after[SLOTS_OFF: SLOTS_OFF + P.EpochToken.size]]
        if status == 0 and op == P.OP_RECV_BEGIN:
            challenge = _u64(out.after, SLOTS_OFF + REPLY_CHALLENGE)
            if challenge in (0, 2**64 - 1) or challenge in self.challenges:
                raise Violation(f"RECV_BEGIN challenge {challenge:#x} is not fresh")
            self.challenges.append(challenge)
            self.recv = RecvModel(challenge)
            self.window = _u64(out.before, CMD_OFF + 24)
            self.desync = False
        ok_pages = {}
        if op == P.OP_RECV and status == 0:
            for i in range(n):
                if est[i] != 0:
                    continue
                a = entries[i][0]
                got = self._opener(slots[i])
                if got is None or _u64(slots[i], 8) != a:
                    raise Violation(f"RECV slot {i} accepted an unauthentic or re-addressed "
                                    "record")
                ok_pages[a] = got[1]
                if self.recv is not None:
                    self.recv.accepted.append((a, _u64(slots[i], 0x20)))
                    self.recv.total += 1
        for a in out.changed_pages:
            if a not in ok_pages:
                raise Violation(f"guest page {a:#x} changed without an OK RECV entry")
        for a, plain in ok_pages.items():
            if out.changed_pages.get(a, self.t.page(a)) != plain:
                raise Violation(f"page {a:#x} is not exactly its record's plaintext")
        if op == P.OP_RECV_END_EPOCH and status == 0 and self.recv:
            m = self.recv
            m.epoch += 1
            m.first += len(m.accepted)
            m.accepted = []
        if op == P.OP_RECV_FINISH and status == 0:
            self.stats["finished"] += 1
        if self.state != P.ST_RECEIVING:
            self.recv = None if self.state in (P.ST_ABORTED, P.ST_DONE) else self.recv

    def _new_keys(self, f: Forger) -> None:
        self.sessions = [*self.sessions[-15:], f]
        self.scan.add(f.ks)
        self.scan.add(f.ka)


def _u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def fuzz(target, seed: int, commands: int, *, key: bytes = KEY) -> Fuzzer:
    f = Fuzzer(target, seed, key)
    for i in range(commands):
        f.step(i)
    return f


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("target", choices=["native", "emu"])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--commands", type=int, required=True)
    ap.add_argument("--option", default="tuples", choices=list(P.OPTION_NAMES.values()))
    ap.add_argument("--cbit", type=int, default=47)
    ap.add_argument("--progress", help="file receiving the index of the command in flight")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    rng = random.Random(a.seed ^ 0x7A11)
    if a.target == "native":
        target = NativeTarget(KEY, rng, a.progress)
    else:
        opt = {v: k for k, v in P.OPTION_NAMES.items()}[a.option]
        target = EmuTarget(KEY, rng, opt, a.cbit)
    f = fuzz(target, a.seed, a.commands)
    dt = time.perf_counter() - t0
    print(f"FUZZ {a.target} seed={a.seed} commands={a.commands} seconds={dt:.1f} "
          f"finished_sessions={f.stats['finished']}")
    print("STATUSES " + " ".join(f"{k}={v}" for k, v in sorted(f.statuses.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
_ = ST
