"""Mailbox fuzzer for the hostile-host suite: one generator, two targets.

    python -m tests.hostile_fuzz native --seed S --commands N     # replay a native run
    python -m tests.hostile_fuzz emu --option tuples --seed S --commands N

Generator: a seeded host that mixes well-formed traffic with mutations, so the fuzz gets past
the first validation into every op's deep paths. It mints *authentic* records and tokens with
the transport key (tests.hostile_common.Forger): fresh valid records, authentic records wrong in
exactly one checked way (stale epoch, seq outside the window or already seen, another session id
or challenge, re-addressed, a non-zero flags/lane/magic), replays of records and tokens the
helper itself produced, bit flips, random and truncated bytes; genuine epoch and finish tokens
with any one bit flipped (a field or the tag) or re-sealed with one field changed; counts,
ram_addrs, flags, window sizes, challenges and op codes drawn from boundary values and random
words. A third of the sessions it runs honestly to the end (sometimes ending with one tampered
token), so finishes and the finish token's checks are reached. It also rolls the helper's
private memory back: between batches it restores an earlier copy of the context and page
tables (native) or of random pages of the helper's data region (emulator), as a host replaying
DRAM ciphertext would; a helper found discarded (one-shot destination), or disturbed into a
fault by a replay, is replaced by a freshly booted one.

Reference model (tests/hostile_model.py): for every command, the status, state, `processed`,
every entry's status, the exact bytes of every record, token and reply, and the exact set of
pages installed with their plaintext, are the model's; how the model follows rollbacks is in
the `Fuzzer` docstring. A disagreement is a Violation with the command line that replays it.

Targets:
* `NativeTarget`: the compiled session code (tests.session_host.image()) called in-process on
  mmap'd buffers with PROT_NONE guard pages between context, mailbox, RAM and table pool (the
  context placed so that its last byte is the last one before its guard page); the
  RAM is read-only except, during a RECV, the pages that batch names; the image's .rodata is
  read-only. A stray write is a SIGSEGV: the run is a subprocess, and the index of the command
  in flight sits in a progress file, so the parent reports which command crashed.
* `EmuTarget`: the built .efi in its mirror VM (tests.mirror_host), per-batch instruction
  budget, fault exits, and write tracking of every DRAM byte outside the helper's data region
  and the mailbox.

Invariants after every command (`Fuzzer.check`), whatever the model's state: completion and
documented status; entries past the batch untouched; `processed` = OK entries; the mailbox
changed only where the op may write; no private plaintext (or key material) in what changed;
every SEND output an authentic record of the page it names under a session the helper had;
guest RAM changed only on pages of OK RECV entries, each equal to the plaintext of its
authentic record; and (emulator) the batch ended in HLT within budget with no write outside the
allowed DRAM.
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
from tests.hostile_model import (
    HelperModel,
    Keys,
    Platform,
    platform_native,
    platform_of_bootinfo,
    resynced,
)
from tests.mirror_host import pack_command
from tests.session_host import image

PAGE = P.PAGE_SIZE
SLOT = P.SLOT_SIZE
MB_SIZE = P.MAILBOX_PAGES * PAGE
CMD_OFF = P.COMMAND_OFFSET
ENTRIES_OFF = P.COMMAND_OFFSET + P.Command.offset("entries")
CTL_OFF = P.CONTROL_OFFSET
SLOTS_OFF = P.SLOTS_OFFSET
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
        # the context ends where its guard page starts: a write one byte past HelperCtx faults
        size = __import__("helperfw.runtime.session", fromlist=["x"]).HelperCtx.size
        assert size % 16 == 0
        self.ctx = self.addr["ctx"] + self.ctx_size - size
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
        r = self.img.call("mh_test_ctx_init", self.ctx, ctypes.addressof(keybuf),
                          self.mb, self.ram, self.ram_max, self.addr["pool"], self.POOL_PAGES,
                          self.SELF[0] * PAGE, self.SELF[1] * PAGE, restype=ctypes.c_int32)
        assert r == 0
        self.bell = 0
        ctypes.memmove(self.mb + CTL_OFF, bytes(8), 8)

    def platform(self, key: bytes) -> Platform:
        return platform_native(key, self.ram, self.ram_max, self.SELF[0] * PAGE,
                               self.SELF[1] * PAGE)

    def snapshot(self, rng: random.Random) -> object:
        """The host copies private memory: here the whole context and the page-table pool
        (their DRAM ciphertext)."""
        return (ctypes.string_at(self.addr["ctx"], self.ctx_size),
                ctypes.string_at(self.addr["pool"], self.POOL_PAGES * PAGE))

    def rollback(self, snap: object, rng: random.Random) -> str:
        """... and writes it back later: the helper reads its old state. All of it at once,
        so a copy of the model taken with the snapshot follows exactly ("exact")."""
        ctx, pool = snap  # type: ignore[misc]
        ctypes.memmove(self.addr["ctx"], ctx, self.ctx_size)
        ctypes.memmove(self.addr["pool"], pool, self.POOL_PAGES * PAGE)
        return "exact"

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
        self._process(self.ctx)
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
        self.ctx_hpas = set(self.h.symbol_hpas("CTX"))

    def reboot(self) -> None:
        """A freshly booted helper: the machine as it was after the driver loaded."""
        self.h.restore(self.booted)

    def platform(self, key: bytes) -> Platform:
        return platform_of_bootinfo(key, self.h.bi)

    def snapshot(self, rng: random.Random) -> object:
        """Ciphertext of a random handful of the helper's private pages (context, stack,
        tables...): what a host can copy out of DRAM."""
        pages = rng.sample(self.data_hpas, min(len(self.data_hpas), rng.randrange(1, 12)))
        return self.h.hands.snapshot(pages)

    def rollback(self, snap: object, rng: random.Random) -> str | None:
        """Write the copy back. Returns what that changed: "state" if a page of the context
        now holds older plaintext, "other" if only other pages did (stack, tables), None if
        every page still held what was copied."""
        changed = [h for h, data in snap.pages.items()  # type: ignore[attr-defined]
                   if self.h.hands.read(h, PAGE) != data]
        self.h.hands.restore(snap)  # type: ignore[arg-type]
        if not changed:
            return None
        return "state" if set(changed) & self.ctx_hpas else "other"

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
RECV_OPS = (P.OP_RECV, P.OP_RECV_END_EPOCH, P.OP_RECV_FINISH)
BEGIN_OPS = (P.OP_SEND_BEGIN, P.OP_RECV_BEGIN)
ROLLBACK_RATE = 0.02  # batches preceded by a restore of earlier private memory
CLEAN_RATE = 0.35  # sessions the host runs honestly to their end (perhaps with a last forgery)
REPLY_SID = P.HelloReply.offset("session_id")
REPLY_CHALLENGE = P.HelloReply.offset("challenge")
TOKEN_FIELDS = ("magic", "epoch", "sid", "count", "first_seq", "set_hash", "total", "challenge",
                "nonce_epoch")


class Fuzzer:
    """The seeded hostile host: generates a command, runs it on the target, checks it.

    Exact agreement with the reference model (tests/hostile_model.py) is required on every step
    while the model is in sync with the helper's private state. A rollback puts it out of sync;
    then:

    * native: the host restores the whole context and the page-table pool it copied earlier, and
      the fuzzer restores the copy of the model it took at the same moment, so the model never
      leaves sync and every step is checked exactly;
    * emulator: the host restores a random handful of the helper's data pages (context, stack,
      tables). A restore that changed no page changes nothing; one that changed only stack or
      table pages leaves the model in sync (they hold no session state between batches) but may
      make later batches fault, which is denial of service: the helper is rebooted; one that
      changed a context page makes the state a mix the model cannot follow, so exact agreement
      is suspended until the next successful *_BEGIN (which resets every field a decision
      depends on; its session id or challenge comes from the helper's reply) or reboot.

    The invariants that hold whatever the host did (documented statuses, only allowed mailbox
    bytes changed, no private plaintext or key in shared memory, every SEND record authentic for
    the page it names, every installed page an authentic plaintext) are checked on every step,
    in sync or not. Every violation names the command and the command line that replays it."""

    def __init__(self, target, seed: int, key: bytes = KEY, replay: str | None = None) -> None:
        self.t = target
        self.key = key
        self.rng = random.Random(seed)
        self.seed = seed
        self.replay = replay or f"python -m tests.hostile_fuzz native --seed {seed}"
        self.pool = [self.rng.randbytes(PAGE) for _ in range(16)]  # what minted records carry
        self.scan = LeakScanner()
        for blob in target.private_pages() + self.pool:
            self.scan.add(blob)
        self.scan.add(key)
        self.stats: Counter = Counter()
        self.statuses: Counter = Counter()
        self.sids: list[int] = [self.rng.getrandbits(64)]
        self.challenges: list[int] = [self.rng.getrandbits(64) | 1]
        self.sessions: list[Forger] = []  # every session the helper had: who may have sealed
        self.keys: dict[tuple[int, int], Keys] = {}
        self.plat = target.platform(key)
        self.model = HelperModel(self.plat)
        self.synced = True  # the model follows the helper's private state exactly
        self.disturbed = False  # private memory was rolled back since the helper booted
        self.mint_seq = P.FIRST_SEQ  # the next seq the simulated source gives a record
        self.clean: str | None = None  # "send"/"recv": this session is run honestly
        self.clean_left = 0  # records before the clean host closes the epoch
        self.clean_epochs = 0  # epochs before it finishes
        self.state = P.ST_IDLE  # Control.state after the last batch
        self.records: list[tuple[int, bytes]] = []  # records seen (SEND outputs, minted)
        self.tokens: list[bytes] = []
        self.snaps: list[tuple[object, HelperModel | None]] = []  # private memory, model then

    # -- choices ---------------------------------------------------------------------------------
    def _addr(self) -> int:
        r = self.rng.random()
        pages = self.t.pages
        if r < 0.70:
            return self.rng.choice(pages)
        if r < 0.75 and self.model.installed:
            return self.rng.choice(sorted(self.model.installed))  # install-once per epoch
        if r < 0.83:
            return self.rng.choice(self.t.self_pages)
        if r < 0.88 and self.model.ram_size:
            w = self.model.ram_size
            return w - PAGE if self.rng.random() < 0.5 else w
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
        """Command.session_id of a RECV-family command: mostly the session's, or, before the
        session is bound, one the host picks (the first RECV-family command binds it)."""
        m, rng = self.model, self.rng
        if m.state == P.ST_RECEIVING and (self.clean or rng.random() < 0.93):
            return m.session_id if m.bound else rng.choice(self.sids)
        return rng.choice([0, rng.getrandbits(64), *self.sids])

    def _keys(self, sid: int) -> Keys | None:
        """The session keys the receiving helper has (or will have once `sid` binds it)."""
        m = self.model
        if m.state != P.ST_RECEIVING:
            return None
        if m.bound:
            return m.keys
        if sid == 0:
            return None
        k = (sid, m.challenge)
        if k not in self.keys:
            self.keys[k] = Keys.derive(self.key, sid, m.challenge)
            self._new_keys(self.keys[k].forger)
        return self.keys[k]

    def _fresh_seq(self) -> int:
        seq = max(self.mint_seq, self.model.epoch_first)
        self.mint_seq = seq + 1
        return seq

    def _mint(self, ram_addr: int, keys: Keys | None) -> bytes:
        m, rng = self.model, self.rng
        r = rng.random()
        if keys is None or r < 0.08:
            return rng.choice([bytes(SLOT), rng.randbytes(SLOT)])
        f = keys.forger
        plain = rng.choice(self.pool)
        if r < 0.58:
            rec = f.record(ram_addr, plain, epoch=m.epoch, seq=self._fresh_seq())
        elif r < 0.74:
            rec = self._mint_wrong(ram_addr, plain, f)
        elif r < 0.87 and self.records:
            rec = rng.choice(self.records)[1]
        else:
            rec = bytearray(f.record(ram_addr, plain, epoch=m.epoch, seq=self._fresh_seq()))
            for _ in range(rng.randrange(1, 4)):
                rec[rng.randrange(SLOT)] ^= 1 << rng.randrange(8)
            if rng.random() < 0.2:
                cut = rng.randrange(SLOT)
                rec[cut:] = bytes(SLOT - cut)
            rec = bytes(rec)
        self._remember(ram_addr, rec)
        return rec

    def _mint_wrong(self, ram_addr: int, plain: bytes, f: Forger) -> bytes:
        """An authentic record (the host holds the key) that is wrong in one checked way: only
        the check for that one thing can refuse it."""
        m, rng = self.model, self.rng
        how = rng.randrange(8)
        kw = {"epoch": m.epoch, "seq": self._fresh_seq()}
        if how == 0:
            kw["epoch"] = (m.epoch + rng.choice([-1, 1])) & 0xFFFFFFFF
        elif how == 1:
            kw["seq"] = rng.choice([0, m.epoch_first - 1, m.epoch_first + P.EPOCH_RECORDS_MAX,
                                    rng.getrandbits(64)]) & (2**64 - 1)
        elif how == 2:
            kw["sid"] = rng.choice([*self.sids, rng.getrandbits(64)])
        elif how == 3:
            ram_addr = rng.choice(self.t.pages)  # re-addressed: genuine for another page
        elif how == 4:
            kw["nonce"] = (m.epoch, kw["seq"] + 1)
        elif how == 5:
            kw["challenge"] = rng.choice(self.challenges)
        elif how == 6:
            kw[rng.choice(["flags", "lane", "magic"])] = rng.choice(
                [1 << rng.randrange(32), rng.getrandbits(32)])
        elif m.seen:  # a seq this epoch already accepted, for another page
            kw["seq"] = rng.choice(sorted(m.seen))
        return f.record(ram_addr, plain, **kw)

    def _remember(self, ram_addr: int, rec: bytes) -> None:
        if len(self.records) < 256:
            self.records.append((ram_addr, rec))
        else:
            self.records[self.rng.randrange(256)] = (ram_addr, rec)

    def _token(self, finish: bool, keys: Keys | None) -> bytes:
        rng = self.rng
        r = rng.random()
        if keys is None or r < 0.1:
            return rng.choice([bytes(P.EpochToken.size), rng.randbytes(P.EpochToken.size)])
        if r < 0.55:
            return self._honest_token(finish, keys)
        if r < 0.65 and self.tokens:
            return rng.choice(self.tokens)
        if r < 0.93:
            return self._tampered_token(finish, keys)
        return self._honest_token(not finish, keys)  # the other kind

    def _token_fields(self, finish: bool, keys: Keys) -> dict:
        m = self.model
        if finish:
            return {"magic": P.FINISH_MAGIC, "epoch": (m.epoch - 1) & 0xFFFFFFFF, "count": 0,
                    "first_seq": m.epoch_first, "set_hash": bytes(16), "total": m.total,
                    "sid": keys.sid, "challenge": keys.challenge, "nonce_epoch": P.FINISH_EPOCH}
        return {"magic": P.TOKEN_MAGIC, "epoch": m.epoch, "count": m.epoch_count,
                "first_seq": m.epoch_first, "set_hash": m.set_hash.to_bytes(16, "little"),
                "total": m.total, "sid": keys.sid, "challenge": keys.challenge,
                "nonce_epoch": m.epoch}

    def _honest_token(self, finish: bool, keys: Keys) -> bytes:
        """What a source whose records this destination accepted would send now."""
        return keys.forger.token(**self._token_fields(finish, keys))

    def _tampered_token(self, finish: bool, keys: Keys) -> bytes:
        """A genuine token with one bit flipped (any field or the tag), or re-sealed with one
        field changed: epoch and finish tokens alike."""
        rng = self.rng
        kw = self._token_fields(finish, keys)
        if rng.random() < 0.5:
            tok = bytearray(keys.forger.token(**kw))
            bit = rng.randrange(8 * len(tok))
            tok[bit // 8] ^= 1 << (bit % 8)
            self.stats["token-bit-flips"] += 1
            return bytes(tok)
        f = rng.choice(TOKEN_FIELDS)
        v = kw[f]
        if f == "set_hash":
            h = bytearray(v)
            h[rng.randrange(16)] ^= 1 << rng.randrange(8)
            kw[f] = bytes(h)
        elif f == "magic":
            kw[f] = rng.choice([P.TOKEN_MAGIC ^ P.FINISH_MAGIC ^ v, rng.getrandbits(32)])
        elif f == "nonce_epoch":
            kw[f] = rng.choice([P.FINISH_EPOCH, kw["epoch"], kw["epoch"] + 1]) & 0xFFFFFFFF
            if kw[f] == v:
                kw[f] = (v + 1) & 0xFFFFFFFF
        else:
            width = 0xFFFFFFFF if f == "epoch" else 2**64 - 1
            kw[f] = rng.choice([v + 1, v - 1, v ^ (1 << rng.randrange(32)), 0]) & width
            if kw[f] == v:
                kw[f] = (v + 1) & width
        self.stats["token-fields"] += 1
        return keys.forger.token(**kw)

    # -- one command ---------------------------------------------------------------------------
    def _maybe_rollback(self) -> None:
        """A host replaying DRAM: keep copies of the helper's private memory (and, to follow
        it, of the model), and now and then write an earlier one back before a batch."""
        rng = self.rng
        if rng.random() < ROLLBACK_RATE * 2:
            self.snaps = [*self.snaps[-7:], (self.t.snapshot(rng),
                                             self.model.snapshot() if self.synced else None)]
        if self.snaps and rng.random() < ROLLBACK_RATE:
            snap, model = rng.choice(self.snaps)
            effect = self.t.rollback(snap, rng)
            if effect == "exact":
                self.synced = model is not None
                if model is not None:
                    self.model = model.snapshot()
            elif effect == "state":
                self.synced = False
            self.clean = None
            self.disturbed = self.disturbed or effect is not None
            self.stats["rollbacks"] += 1

    def _choose_op(self) -> int:
        rng, m = self.rng, self.model
        if self.clean == "recv" and m.state == P.ST_RECEIVING:
            if self.clean_left > 0:
                return P.OP_RECV
            return P.OP_RECV_FINISH if self.clean_epochs <= 0 else P.OP_RECV_END_EPOCH
        if self.clean == "send" and m.state == P.ST_SENDING:
            if self.clean_left > 0:
                return P.OP_SEND
            return P.OP_SEND_FINISH if self.clean_epochs <= 0 else P.OP_SEND_END_EPOCH
        self.clean = None
        if rng.random() < 0.6 and self.state in STATE_OPS:  # mostly ops that fit the state
            return rng.choice(STATE_OPS[self.state])
        op = rng.choices([o for o, _ in OPS], [w for _, w in OPS])[0]
        if op is None:
            op = rng.choice([0, 11, 12, 0xFF, 0x80000000, rng.getrandbits(32)])
        return op

    def _clean_entries(self) -> list[tuple[int, int]]:
        """Pages the honest host sends now: in the window, not the helper's, not yet installed
        in this epoch (a page goes once per epoch)."""
        m, rng = self.model, self.rng
        own = set(self.t.self_pages)
        n = min(self.clean_left, rng.randrange(1, 9))
        cand = [a for a in rng.sample(self.t.pages, min(len(self.t.pages), 4 * n + 8))
                if a < m.ram_size and a not in own and a not in m.installed
                and m.check_ram_addr(a, 0) == 0]
        cand = list(dict.fromkeys(cand))[:n]
        self.clean_left -= max(len(cand), 1)
        return [(a, 0) for a in cand] or [(self.t.pages[0], 0)]

    def step(self, index: int) -> None:
        rng = self.rng
        self._maybe_rollback()
        op = self._choose_op()
        fields = {"version": P.PROTOCOL_VERSION.value if self.clean or rng.random() < 0.9 else
                  rng.getrandbits(32)}
        entries: list[tuple[int, int]] = []
        slots: dict[int, bytes] = {}
        count = None
        if op in BEGIN_OPS:
            fields["ram_size"] = self._ram_size()
        if op == P.OP_SEND_BEGIN:
            fields["challenge"] = rng.choice(self.challenges) if rng.random() < 0.93 else \
                rng.choice([0, rng.getrandbits(64)])
        if op in RECV_OPS:
            fields["session_id"] = self._session_id()
        keys = self._keys(fields.get("session_id", 0))
        if op in (P.OP_SEND, P.OP_RECV):
            if self.clean:
                entries = self._clean_entries()
            else:
                n = self._count()
                if n < 0:
                    n = rng.randrange(1, P.MAX_SLOTS + 1)
                    count = rng.choice([0, P.MAX_SLOTS + 1, 0xFFFFFFFF, rng.getrandbits(32), n])
                entries = [(self._addr(), self._flags()) for _ in range(n)]
            if op == P.OP_RECV:
                if self.clean and keys is not None:
                    slots = {i: keys.forger.record(a, rng.choice(self.pool),
                                                   epoch=self.model.epoch, seq=self._fresh_seq())
                             for i, (a, _) in enumerate(entries)}
                else:
                    slots = {i: self._mint(a, keys) for i, (a, _) in enumerate(entries)}
        if op in (P.OP_RECV_END_EPOCH, P.OP_RECV_FINISH):
            finish = op == P.OP_RECV_FINISH
            if self.clean and keys is not None:
                strike = rng.random() < (0.4 if finish else 0.1)
                slots = {0: (self._tampered_token if strike else self._honest_token)(finish,
                                                                                      keys)}
                if strike:
                    self.clean = None
                    self.stats["last-strike"] += 1
            else:
                slots = {0: self._token(finish, keys)}
        if op in (P.OP_SEND_END_EPOCH, P.OP_RECV_END_EPOCH) and self.clean:
            self.clean_epochs -= 1
            self.clean_left = rng.randrange(1, 24) if self.clean_epochs > 0 else 0
        if not self.clean and rng.random() < 0.03:  # garbage in the fields nobody should read
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
            raise Violation(f"command {index} (seed {self.seed}) op {op}: {e}\n"
                            f"replay: {self.replay} --commands {index + 1}") from None

    def _start_clean(self, kind: str) -> None:
        if self.rng.random() < CLEAN_RATE:
            self.clean = kind
            self.clean_left = self.rng.randrange(1, 24)
            self.clean_epochs = self.rng.randrange(1, 4)
            self.stats["clean-" + kind] += 1

    # -- invariants ----------------------------------------------------------------------------
    def check(self, op: int, entries, n_eff: int, slots, out: Outcome) -> None:
        if not out.ok_exit:
            if not self.disturbed:
                raise Violation(f"batch did not end in HLT: {out.exit_detail}")
            self._reboot("dos")  # the host rolled back tables or stack: denial of service
            return
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
        exp = self._check_model(op, status, state, processed, est, out)
        self._check_leaks(n, allowed, out, exp)
        if self.clean and (status != 0 or any(est)):
            self.clean = None  # the honest run hit a refusal (e.g. after a rollback): stop it
        self._check_outputs(op, status, entries, n, est, slots, out, exp)
        self._update(op, status, out, exp)
        if status == ST["E_DISCARDED"]:  # one-shot destination: this helper is done for
            self._reboot("reboots")

    def _reboot(self, why: str) -> None:
        self.t.reboot()
        self.state, self.snaps, self.clean = P.ST_IDLE, [], None
        self.model, self.synced, self.disturbed = HelperModel(self.plat), True, False
        self.stats[why] += 1

    def _check_model(self, op, status, state, processed, est, out: Outcome):
        """Exact agreement with the reference model (see the class docstring for when)."""
        cmd = out.before[CMD_OFF:CMD_OFF + P.Command.size]
        if not self.synced:
            if status != 0 or op not in BEGIN_OPS:
                self.stats["unsynced-steps"] += 1
                return None
            self.model, self.synced = resynced(self.plat), True  # this BEGIN resets it all
            self.stats["resyncs"] += 1
        exp = self.model.step(cmd, out.before, self.t.page, observed_status=status)
        self.stats["exact-steps"] += 1
        if exp.uncertain:
            self.stats["undecidable"] += 1
        want = (name(exp.status), exp.state, exp.processed, [name(s) for s in exp.entries])
        got = (name(status), state, processed, [name(s) for s in est])
        if want != got:
            raise Violation(f"the helper said (status, state, processed, entries) = {got}, the "
                            f"model {want}")
        for i, data in exp.slots.items():
            if out.after[SLOTS_OFF + i * SLOT: SLOTS_OFF + i * SLOT + len(data)] != data:
                what = "token" if len(data) == P.EpochToken.size else "record"
                raise Violation(f"slot {i}: not the {what} the model sealed")
        if exp.reply is not None:
            r = P.HelloReply.parse(out.after[SLOTS_OFF:SLOTS_OFF + P.HelloReply.size])
            bad = {k: (getattr(r, k), v) for k, v in exp.reply.items() if getattr(r, k) != v}
            if bad:
                raise Violation(f"reply fields (helper, model): {bad}")
            if exp.rng_field:
                self.model.absorb_rng(getattr(r, exp.rng_field))
        return exp

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

    def _check_leaks(self, n, allowed, out, exp) -> None:
        """Leak scan of what changed: Control, the entry array, each written slot (except the
        records and tokens the model found byte for byte what it sealed itself)."""
        exact = {SLOTS_OFF + i * SLOT for i in exp.slots} if exp is not None else set()
        scan = [(CTL_OFF, CTL_OFF + P.Control.size), (ENTRIES_OFF, ENTRIES_OFF + 16 * n)]
        scan += [(a, b) for a, b in allowed if a >= SLOTS_OFF and a not in exact]
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

    def _check_outputs(self, op, status, entries, n, est, slots, out, exp) -> None:
        """What holds even when the model is out of sync: every SEND record is an authentic
        record of the page it names; RECV writes only pages of OK entries, each exactly an
        authentic plaintext for its address. In sync, the model already checked them exactly:
        only the pages that changed are compared to its installs."""
        exact = exp is not None
        if op == P.OP_SEND and status == 0 and not exact:
            for i in range(n):
                if est[i] != 0:
                    continue
                rec = out.after[SLOTS_OFF + i * SLOT: SLOTS_OFF + (i + 1) * SLOT]
                ra = _u64(rec, 8)
                got = self._opener(rec)
                if ra != entries[i][0] or got is None or got[1] != self.t.page(ra):
                    raise Violation(f"SEND slot {i}: not the sealed page {entries[i][0]:#x}")
        ok_pages = {}
        if op == P.OP_RECV and status == 0:
            for i in range(n):
                if est[i] != 0:
                    continue
                a = entries[i][0]
                if exact:
                    ok_pages[a] = None
                    continue
                got = self._opener(slots[i])
                if got is None or _u64(slots[i], 8) != a:
                    raise Violation(f"RECV slot {i} accepted an unauthentic or re-addressed "
                                    "record")
                ok_pages[a] = got[1]
        if exact:
            ok_pages = exp.installs
        for a in out.changed_pages:
            if a not in ok_pages:
                raise Violation(f"guest page {a:#x} changed without an OK RECV entry")
        for a, plain in ok_pages.items():
            if out.changed_pages.get(a, self.t.page(a)) != plain:
                raise Violation(f"page {a:#x} is not exactly its record's plaintext")

    def _update(self, op, status, out: Outcome, exp) -> None:
        """The generator's own bookkeeping: sessions, challenges, records and tokens seen."""
        if status == 0 and op == P.OP_SEND_BEGIN:
            sid = _u64(out.after, SLOTS_OFF + REPLY_SID)
            challenge = _u64(out.before, CMD_OFF + P.Command.offset("challenge"))
            self._new_keys(Forger(self.key, sid, challenge))
            self.sids.append(sid)
            self._start_clean("send")
        if op == P.OP_SEND and status == 0:
            for i, s in enumerate(exp.entries if exp else []):
                if s == 0:
                    rec = out.after[SLOTS_OFF + i * SLOT: SLOTS_OFF + (i + 1) * SLOT]
                    self._remember(_u64(rec, 8), rec)
        if status == 0 and op in (P.OP_SEND_END_EPOCH, P.OP_SEND_FINISH):
            self.tokens = [*self.tokens[-31:], out.after[SLOTS_OFF: SLOTS_OFF + P.EpochToken.size]]
        if status == 0 and op == P.OP_RECV_BEGIN:
            challenge = _u64(out.after, SLOTS_OFF + REPLY_CHALLENGE)
            if challenge in (0, 2**64 - 1) or challenge in self.challenges:
                raise Violation(f"RECV_BEGIN challenge {challenge:#x} is not fresh")
            self.challenges.append(challenge)
            self.mint_seq = P.FIRST_SEQ
            self._start_clean("recv")
        if op == P.OP_RECV_FINISH and status == 0:
            self.stats["finished"] += 1
        if op == P.OP_SEND_FINISH and status == 0:
            self.stats["sent"] += 1

    def _new_keys(self, f: Forger) -> None:
        self.sessions = [*self.sessions[-15:], f]
        self.scan.add(f.ks)
        self.scan.add(f.ka)


def _u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def replay_command(target: str, seed: int, option: str | None = None) -> str:
    """The command line that replays a run (append --commands N)."""
    opt = f" --option {option}" if option else ""
    return f"python -m tests.hostile_fuzz {target} --seed {seed}{opt}"


def fuzz(target, seed: int, commands: int, *, key: bytes = KEY,
         replay: str | None = None) -> Fuzzer:
    f = Fuzzer(target, seed, key, replay)
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
        replay = replay_command("native", a.seed)
    else:
        opt = {v: k for k, v in P.OPTION_NAMES.items()}[a.option]
        target = EmuTarget(KEY, rng, opt, a.cbit)
        replay = replay_command("emu", a.seed, a.option)
    f = fuzz(target, a.seed, a.commands, replay=replay)
    dt = time.perf_counter() - t0
    print(f"FUZZ {a.target} seed={a.seed} commands={a.commands} seconds={dt:.1f} "
          f"finished_sessions={f.stats['finished']}")
    print("STATS " + " ".join(f"{k}={v}" for k, v in sorted(f.stats.items(), key=str)))
    print("STATUSES " + " ".join(f"{k}={v}" for k, v in sorted(f.statuses.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
_ = ST
