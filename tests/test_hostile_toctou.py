"""Hostile host, TOCTOU: the host rewrites the mailbox while the helper runs.

The mailbox is shared memory: a host vCPU thread can change it at any instant of a batch. Here a
UC_HOOK_MEM_READ on the mailbox DRAM fires on the helper's own reads and, at a chosen read, the
host rewrites Command fields, envelopes, ciphertext or tokens (sometimes putting the old bytes
back at the next read: a transient change). Whatever the timing, the outcome must be one a
well-behaved host could have produced with *some* consistent mailbox: every installed page is
exactly an authenticated plaintext (never a mix), a refused record leaves the page untouched,
no own page is ever sealed or written, and every status is documented.

Replay: `pytest tests/test_hostile_toctou.py -k <name>`; SEED fixed, the trial index is printed
with any failure.
"""

from __future__ import annotations

import random
import struct

import pytest

from helperfw.runtime import protocol as P
from tests import hostile_common
from tests.hostile_common import DOCUMENTED, ST, Forger, name
from tests.mirror_host import KEY, PAGE, RAM, MirrorHost, pack_command
from tests.session_host import set_hash

SEED = 7002
SID = 0x70C7_0C70_0000_0002
PAGES = [0x400000 + i * PAGE for i in range(512)]  # each trial uses fresh pages:
# a page is installed at most once per epoch


class Trigger:
    """On the n-th helper read of [lo, hi] run `fire(hpa)`; optionally `after(hpa)` on the next."""

    def __init__(self, h: MirrorHost, lo: int, hi: int, n: int, fire, after=None):
        self.h, self.n, self.fire, self.after = h, n, fire, after
        self.count = 0
        self.fired = False
        self.handle = h.on_read(lo, hi, self._on)

    def _on(self, hpa: int, size: int) -> None:
        self.count += 1
        if self.count == self.n:
            self.fire(hpa)
            self.fired = True
        elif self.count == self.n + 1 and self.after:
            self.after(hpa)

    def remove(self) -> None:
        self.h.remove_hook(self.handle)


def open_recv(h: MirrorHost, sid: int) -> Forger:
    return hostile_common.open_recv(h, sid, KEY, RAM)


@pytest.fixture(scope="module")
def dst():
    h = MirrorHost(47, P.OPT_TUPLES, seed=SEED)
    h.forger = open_recv(h, SID)
    return h


def test_ciphertext_flipped_while_it_is_read(dst):
    """Per trial: 8 authentic records; at a random read of the slots the host flips a random
    ciphertext/tag/envelope bit (ahead of or behind the read), transiently or for good. Each
    entry ends OK with exactly its plaintext, or refused with its page untouched."""
    rng = random.Random(SEED)
    f = dst.forger
    seq = 1
    lo, hi = dst.slot_hpa(0), dst.slot_hpa(8) - 1
    outcomes = {"OK": 0}
    for trial in range(40):
        pages = PAGES[8 * trial: 8 * trial + 8]
        plains = [rng.randbytes(PAGE) for _ in pages]
        before = {a: dst.guest_page(a) for a in pages}
        recs = {}
        for i, (a, pl) in enumerate(zip(pages, plains)):
            recs[i] = f.record(a, pl, epoch=1, seq=seq)
            seq += 1
        for i, r in recs.items():
            dst.write_slot(i, r)
        target = lo + rng.randrange(hi - lo)
        saved = dst.mc.mem[target]
        bit = 1 << rng.randrange(8)

        def flip(_hpa, target=target, saved=saved, bit=bit):
            dst.mc.mem[target] = saved ^ bit

        def restore(_hpa, target=target, saved=saved):
            dst.mc.mem[target] = saved

        trig = Trigger(dst, lo, hi, rng.randrange(1, 8 * 520), flip,
                       restore if rng.random() < 0.5 else None)
        r = dst.command(P.OP_RECV, [(a, 0) for a in pages], session_id=SID)
        trig.remove()
        assert not r.bad_writes, (trial, r.bad_writes)
        for i, (a, st) in enumerate(zip(pages, r.entry_status)):
            assert st in DOCUMENTED, (trial, st)
            outcomes[name(st)] = outcomes.get(name(st), 0) + 1
            page = dst.guest_page(a)
            if st == 0:
                assert page == plains[i], f"trial {trial}: page {a:#x} is not its plaintext"
            else:
                assert page == before[a] and a not in r.window_pages_written, (trial, a)
    print("outcomes", outcomes)
    assert outcomes["OK"] > 0 and outcomes.get("E_AUTH", 0) > 0


def test_envelope_rewritten_after_it_was_copied(dst):
    """After the helper copied an envelope the host points it at another page, another seq and
    epoch: the helper acts on its private copy (page installed where the entry said, with its
    authentic content), the other page is never written."""
    rng = random.Random(SEED + 1)
    f = dst.forger
    a, other = 0x800000, 0x801000
    data = rng.randbytes(PAGE)
    rec = f.record(a, data, epoch=1, seq=5000)
    before_other = dst.guest_page(other)
    dst.write_slot(0, rec)

    def rewrite(_hpa):
        env = bytearray(rec[:64])
        struct.pack_into("<Q", env, 0x08, other)
        struct.pack_into("<I", env, 0x18, 2)
        struct.pack_into("<Q", env, 0x20, 1)
        dst.poke(P.SLOTS_OFFSET, bytes(env))

    trig = Trigger(dst, dst.slot_hpa(0), dst.slot_hpa(0) + 63, 8, rewrite)  # 8th qword read
    r = dst.command(P.OP_RECV, [(a, 0)], session_id=SID)
    trig.remove()
    assert trig.fired
    assert r.entry_status == [0] and r.window_pages_written == {a}
    assert dst.guest_page(a) == data and dst.guest_page(other) == before_other


@pytest.mark.parametrize("op", [P.OP_SEND, P.OP_RECV], ids=["send", "recv"])
def test_command_rewritten_while_it_is_copied(op):
    """At a random read of the Command page the host swaps the entries for the helper's own
    pages, a huge count and another op. The helper works on one (possibly torn) private copy:
    no own page is sealed or written, every sealed record is exactly the page it names, every
    installed page exactly an authentic plaintext."""
    rng = random.Random(SEED + op)
    h = MirrorHost(47, P.OPT_SHIFT, seed=SEED + op)
    own = sorted({r.main_gpa for r in h.regions} | {h.symbol_gpa("CTX") & ~(PAGE - 1)})
    contents = {}
    if op == P.OP_SEND:
        challenge = 0xC0FFEE
        assert h.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=challenge).status == 0
        sid = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size)).session_id
        f = Forger(KEY, sid, challenge)
    else:
        f = open_recv(h, SID)
    seq = 1
    cmd_lo = h.mb + P.COMMAND_OFFSET
    for trial in range(30):
        pages = PAGES[6 * trial: 6 * trial + 6]
        slots = {}
        if op == P.OP_RECV:
            for i, a in enumerate(pages):
                contents[(a, seq)] = rng.randbytes(PAGE)
                slots[i] = f.record(a, contents[(a, seq)], epoch=1, seq=seq)
                seq += 1
        else:
            for a in pages:
                h.set_guest_page(a, rng.randbytes(PAGE))
        evil = struct.pack("<II", rng.choice([op, P.OP_RECV_FINISH, P.OP_SEND]), 64)
        evil += bytes(32) + b"".join(struct.pack("<QIi", rng.choice(own), 0, 0)
                                     for _ in range(64))

        def swap(_hpa, evil=evil):
            h.poke(P.COMMAND_OFFSET, evil)

        cmd = pack_command(op, [(a, 0) for a in pages], session_id=SID)
        trig = Trigger(h, cmd_lo, cmd_lo + P.Command.size - 1,
                       rng.randrange(1, P.Command.size // 8), swap)
        r = h.batch(cmd, slots)
        trig.remove()
        assert r.exit.reason == "hlt" and r.status in DOCUMENTED, (trial, str(r.exit))
        assert not r.bad_writes, (trial, r.bad_writes)
        assert not (r.window_pages_written & set(own)), trial
        for i, st in enumerate(r.entry_status):
            assert st in DOCUMENTED, (trial, st)
            if st != 0:
                continue
            if op == P.OP_SEND:
                rec = h.read_slot(i)
                ra = struct.unpack_from("<Q", rec, 8)[0]
                assert ra not in own and f.open(rec) == h.guest_page(ra), trial
        for a in r.window_pages_written:
            assert any(h.guest_page(a) == c for (b, _), c in contents.items() if b == a), trial


def test_token_rewritten_after_it_was_copied(dst):
    """RECV_END_EPOCH: once the helper copied the token the host rewrites count and set-hash;
    the helper's decision is the one for the token it copied (here: the authentic one)."""
    h = MirrorHost(47, P.OPT_ISOLATED, seed=SEED + 9)
    sid = SID + 1
    f = open_recv(h, sid)
    a = PAGES[0]
    r = h.command(P.OP_RECV, [(a, 0)], session_id=sid,
                  slots={0: f.record(a, b"x" * PAGE, epoch=1, seq=1)})
    assert r.entry_status == [0]
    tok = f.token(epoch=1, count=1, first_seq=1,
                  set_hash=set_hash(KEY, sid, f.challenge, [(a, 1)]), total=1)
    h.write_slot(0, tok)
    bad = tok[:0x10] + struct.pack("<Q", 0) + tok[0x18:0x20] + bytes(16) + tok[0x30:]
    trig = Trigger(h, h.slot_hpa(0), h.slot_hpa(0) + P.EpochToken.size - 1,
                   P.EpochToken.size // 8, lambda _hpa: h.poke(P.SLOTS_OFFSET, bad))
    r = h.command(P.OP_RECV_END_EPOCH, session_id=sid)
    trig.remove()
    assert trig.fired and r.status == 0
    fin = f.token(epoch=1, count=0, first_seq=2, set_hash=bytes(16), total=1,
                  magic=P.FINISH_MAGIC)
    assert h.command(P.OP_RECV_FINISH, session_id=sid, slots={0: fin}).status == 0


def test_doorbell_changed_mid_batch():
    """The doorbell is read once: a change during the batch is not what `completed` reports,
    and the next run treats the new value as a new batch."""
    h = MirrorHost(47, P.OPT_TUPLES, seed=SEED + 3)
    ctl = h.mb + P.CONTROL_OFFSET
    trig = Trigger(h, h.mb + P.COMMAND_OFFSET, h.mb + P.COMMAND_OFFSET + 7, 1,
                   lambda _hpa: h.poke(P.CONTROL_OFFSET, struct.pack("<Q", 999)))
    r = h.command(P.OP_HELLO)
    trig.remove()
    assert r.status == 0
    completed = struct.unpack("<Q", h.mc.host_read(ctl + 8, 8))[0]
    assert completed == h.bell  # the value the helper read, not 999
    ex = h.vcpu.run(5_000_000)  # re-entered without a new doorbell write: 999 != last
    assert ex.reason == "hlt"
    assert struct.unpack("<Q", h.mc.host_read(ctl + 8, 8))[0] == 999
    assert h.command(P.OP_HELLO, version=1).status == ST["E_VERSION"]
