"""Hostile host, double fetch: the helper reads each byte of shared memory at most once a batch.

The host can change the mailbox between any two reads of the helper (test_hostile_toctou.py
races a few of them); a byte read twice is a check-then-use race waiting for its timing. The
detector (tests/mirror_host.py, `track_reads`) counts every read the helper makes from the
mailbox DRAM, byte by byte, during each batch, and of every guest page outside the helper's own
regions (the host can replay a guest page's ciphertext too, so a page sealed from two reads
could hash one version and encrypt another). Every op, in success and in each refusal the host
can cause, on all three address-space options: no byte is read twice; the doorbell and the
whole Command are read exactly once (the detector sees the reads it must); every slot a RECV
entry reaches is read once, and every page a SEND seals.

The detector has teeth: the firmware built with one such read moved from the private copy back
to the mailbox (the issue's example: `open_one` given `ram_addr` re-read from the Command) is
caught, naming the field.

Replay: `pytest tests/test_hostile_doublefetch.py -k <option>`; seeds fixed.
"""

from __future__ import annotations

import random

import pytest

from helperfw.runtime import protocol as P
from tests.hostile_common import Forger, name
from tests.mirror_host import KEY, PAGE, RAM, MirrorHost, pack_command
from tests.session_host import set_hash

SEED = 7018
OPTIONS = [P.OPT_SHIFT, P.OPT_TUPLES, P.OPT_ISOLATED]
SID = 0xD0B1_EF37_0000_0018
PAGES = [0x400000 + i * PAGE for i in range(P.MAX_SLOTS)]
CMD = PAGE
CTL = P.CONTROL_OFFSET
SLOTS = 2 * PAGE


def mailbox_field(off: int) -> str:
    """The name of mailbox byte `off` (for messages)."""
    if CTL <= off < CTL + P.Control.size:
        return f"Control+{off - CTL:#x}"
    if CMD <= off < CMD + P.Command.size:
        o = off - CMD
        e = P.Command.offset("entries")
        if o < e:
            f = max((P.Command.offset(n), n) for n in P.Command.fields if P.Command.offset(n) <= o)
            return f"Command.{f[1]}+{o - f[0]}"
        i, r = divmod(o - e, P.Entry.size)
        f = max((P.Entry.offset(n), n) for n in P.Entry.fields if P.Entry.offset(n) <= r)
        return f"Command.entries[{i}].{f[1]}+{r - f[0]}"
    if off >= SLOTS:
        i, r = divmod(off - SLOTS, P.SLOT_SIZE)
        return f"slot {i}+{r:#x}"
    return f"mailbox+{off:#x}"


class Reads:
    """One batch's read counts: the mailbox as bytes by offset, guest pages by ram_addr."""

    def __init__(self, h: MirrorHost, counts: dict[int, bytes]) -> None:
        self.mb = bytearray(h.mb_size)
        self.guest: dict[int, bytes] = {}
        for hpa, c in counts.items():
            if h.mb <= hpa < h.mb + h.mb_size:
                self.mb[hpa - h.mb: hpa - h.mb + PAGE] = c
            else:
                self.guest[hpa] = c  # window HPA == ram_addr (tests/mirror_host.py)

    def twice(self) -> list[str]:
        out = [mailbox_field(o) for o, n in enumerate(self.mb) if n > 1]
        out += [f"guest page {a:#x}+{o:#x}" for a, c in self.guest.items()
                for o, n in enumerate(c) if n > 1]
        return out

    def once(self, lo: int, hi: int) -> bool:
        return all(n == 1 for n in self.mb[lo:hi])


class Host:
    """A mirror VM with the read detector; every batch is checked."""

    def __init__(self, option: int) -> None:
        self.h = MirrorHost(47, option, seed=SEED + option)
        self.h.track_reads(window=True)
        self.batches = 0

    def run(self, op: int, entries=(), slots=None, *, want=None, **fields):
        r = self.h.batch(pack_command(op, entries, **fields), slots)
        assert r.exit.reason == "hlt", str(r.exit)
        reads = Reads(self.h, r.reads)
        twice = reads.twice()
        assert not twice, f"op {op}: read more than once in one batch: {twice[:8]}"
        assert reads.once(CTL, CTL + 8), "the doorbell must be read exactly once"
        assert reads.once(CMD, CMD + P.Command.size), "the Command is copied exactly once"
        if want is not None:
            assert name(r.status) == want, (op, name(r.status))
        self.batches += 1
        return r, reads


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: P.OPTION_NAMES[o])
def test_every_op_reads_shared_memory_once(option):
    rng = random.Random(SEED + option)
    host = Host(option)
    h = host.h
    # HELLO, and refusals before any session
    host.run(P.OP_HELLO, want="OK")
    host.run(P.OP_HELLO, version=1, want="E_VERSION")
    host.run(P.OP_SEND, [(PAGES[0], 0)], want="E_BAD_STATE")
    host.run(0x77, want="E_BAD_OP")
    # source: every op, and every refusal its entries can get
    host.run(P.OP_SEND_BEGIN, ram_size=RAM, challenge=0, want="E_BAD_ARG")
    host.run(P.OP_SEND_BEGIN, ram_size=RAM, challenge=5, version=3, want="E_VERSION")
    host.run(P.OP_SEND_BEGIN, ram_size=RAM + PAGE, challenge=5, want="E_BAD_ARG")
    host.run(P.OP_SEND_BEGIN, ram_size=RAM, challenge=0xC4A1, want="OK")
    for a in PAGES:
        h.set_guest_page(a, rng.randbytes(PAGE))
    own = h.region(P.REGION_DATA).main_gpa
    entries = [(a, 0) for a in PAGES[:60]] + [(own, 0), (PAGES[60] + 8, 0),
                                              (PAGES[61], P.ENTRY_F_SHARED), (RAM, 0)]
    r, reads = host.run(P.OP_SEND, entries, want="OK")
    assert [name(s) for s in r.entry_status[60:]] == ["E_SELF", "E_RANGE", "E_SHARED",
                                                      "E_RANGE"]
    assert all(reads.guest.get(a) == b"\x01" * PAGE for a in PAGES[:60]), \
        "every sealed page is read exactly once"
    host.run(P.OP_SEND, [(PAGES[0], 0)], count=0, want="E_BAD_COUNT")
    host.run(P.OP_SEND_END_EPOCH, want="OK")
    host.run(P.OP_SEND, [(a, 0) for a in PAGES[:3]], want="OK")
    host.run(P.OP_SEND_FINISH, want="E_INCOMPLETE")
    host.run(P.OP_SEND_END_EPOCH, want="OK")
    host.run(P.OP_SEND_FINISH, want="OK")
    host.run(P.OP_SEND_FINISH, want="E_BAD_STATE")
    # destination, a session that finishes
    r, _ = host.run(P.OP_RECV_BEGIN, ram_size=RAM, want="OK")
    f = _forger(h)
    host.run(P.OP_RECV, [(PAGES[0], 0)], session_id=0, want="E_BAD_ARG")  # poisons (nothing in)
    r, _ = host.run(P.OP_RECV_BEGIN, ram_size=RAM, want="OK")  # ends it, starts afresh
    f = _forger(h)
    recs = {i: f.record(a, rng.randbytes(PAGE), epoch=1, seq=1 + i)
            for i, a in enumerate(PAGES)}
    r, reads = host.run(P.OP_RECV, [(a, 0) for a in PAGES], recs, session_id=SID, want="OK")
    assert r.entry_status == [0] * len(PAGES)
    for i in range(len(PAGES)):
        lo = SLOTS + i * P.SLOT_SIZE
        assert reads.once(lo, lo + P.SLOT_SIZE), f"slot {i} is read exactly once"
    tok = f.token(epoch=1, count=len(PAGES), first_seq=1, total=len(PAGES),
                  set_hash=set_hash(KEY, SID, f.challenge,
                                    [(a, 1 + i) for i, a in enumerate(PAGES)]))
    _, reads = host.run(P.OP_RECV_END_EPOCH, slots={0: tok}, session_id=SID, want="OK")
    assert reads.once(SLOTS, SLOTS + P.EpochToken.size), "the token is read exactly once"
    fin = f.token(epoch=1, count=0, first_seq=1 + len(PAGES), total=len(PAGES),
                  set_hash=bytes(16), magic=P.FINISH_MAGIC)
    host.run(P.OP_RECV_FINISH, slots={0: fin}, session_id=SID, want="OK")
    # destination: every refusal of a record, of a token, of the session
    host.run(P.OP_RECV_BEGIN, ram_size=RAM, want="OK")
    f = _forger(h)
    plain = rng.randbytes(PAGE)
    good = f.record(PAGES[1], plain, epoch=1, seq=2)
    bad_tag = bytearray(f.record(PAGES[2], plain, epoch=1, seq=3))
    bad_tag[64 + 7] ^= 1
    cases = [
        (PAGES[0], f.record(PAGES[0], plain, epoch=1, seq=1), "OK"),
        (PAGES[1], good, "OK"),
        (PAGES[2], bytes(bad_tag), "E_AUTH"),
        (PAGES[3], f.record(PAGES[3], plain, epoch=1, seq=4, lane=1), "E_HEADER"),
        (PAGES[4], f.record(PAGES[5], plain, epoch=1, seq=5), "E_HEADER"),
        (PAGES[6], f.record(PAGES[6], plain, epoch=1, seq=6, sid=SID + 1), "E_REPLAY"),
        (PAGES[7], f.record(PAGES[7], plain, epoch=2, seq=7), "E_REPLAY"),
        (PAGES[8], f.record(PAGES[8], plain, epoch=1, seq=1 << 40), "E_REPLAY"),
        (PAGES[9], f.record(PAGES[9], plain, epoch=1, seq=2), "E_REPLAY"),  # seen
        (PAGES[1], f.record(PAGES[1], plain, epoch=1, seq=10), "E_REPLAY"),  # installed
        (own, f.record(own, plain, epoch=1, seq=11), "E_SELF"),
    ]
    r, reads = host.run(P.OP_RECV, [(a, 0) for a, _, _ in cases],
                        {i: rec for i, (_, rec, _) in enumerate(cases)}, session_id=SID,
                        want="OK")
    assert [name(s) for s in r.entry_status] == [w for _, _, w in cases]
    host.run(P.OP_RECV, [(PAGES[0], 0)], session_id=SID + 1, want="E_REPLAY")
    host.run(P.OP_RECV, [(PAGES[0], 0)], session_id=SID, count=65, want="E_BAD_COUNT")
    for label, tok, want in [
            ("magic", f.token(epoch=1, count=0, first_seq=1, total=0, set_hash=bytes(16),
                              magic=P.FINISH_MAGIC), "E_HEADER"),
            ("session", f.token(epoch=1, count=2, first_seq=1, total=2, set_hash=bytes(16),
                                sid=SID + 1), "E_REPLAY"),
            ("tag", bytes(80), "E_HEADER"),
            ("epoch", f.token(epoch=2, count=2, first_seq=1, total=2, set_hash=bytes(16)),
             "E_REPLAY"),
            ("counts", f.token(epoch=1, count=3, first_seq=1, total=2, set_hash=bytes(16)),
             "E_EPOCH")]:
        host.run(P.OP_RECV_END_EPOCH, slots={0: tok}, session_id=SID, want=want)
    bad = bytearray(f.token(epoch=0, count=0, first_seq=1, total=2, set_hash=bytes(16),
                            magic=P.FINISH_MAGIC))
    bad[70] ^= 1
    host.run(P.OP_RECV_FINISH, slots={0: bytes(bad)}, session_id=SID, want="E_AUTH")
    host.run(P.OP_RECV_FINISH, slots={0: f.token(epoch=0, count=0, first_seq=1, total=0,
                                                 set_hash=bytes(16), magic=P.FINISH_MAGIC)},
             session_id=SID, want="E_INCOMPLETE")
    host.run(P.OP_ABORT, want="OK")
    host.run(P.OP_RECV, [(PAGES[0], 0)], session_id=SID, want="E_ABORTED")
    host.run(P.OP_RECV_BEGIN, ram_size=RAM, want="E_DISCARDED")
    host.run(P.OP_SEND_BEGIN, ram_size=RAM, challenge=5, want="E_DISCARDED")
    print(P.OPTION_NAMES[option], host.batches, "batches, no byte read twice")


def _forger(h: MirrorHost) -> Forger:
    return Forger(KEY, SID, P.HelloReply.parse(h.read_slot(0, P.HelloReply.size)).challenge)


def test_the_detector_catches_a_planted_double_fetch():
    """The firmware with the issue's receive-side double fetch (op_recv hands open_one the
    entry's ram_addr read again from the shared Command, not from the private copy): the
    detector names the field in the first RECV batch, while every status is still right (a
    host that does not race it sees nothing else)."""
    from tests.mutation.mutants import module_mutants
    from tests.mutation.workspace import mutant_firmware

    [m] = [m for m in module_mutants("session") if m.function == "op_recv"
           and m.operator == "shared" and m.original.startswith("st = open_one(")]
    efi = mutant_firmware(m)
    h = MirrorHost(47, P.OPT_TUPLES, seed=SEED, efi=efi)
    h.track_reads()
    assert h.command(P.OP_RECV_BEGIN, ram_size=RAM).status == 0
    f = _forger(h)
    recs = {i: f.record(a, bytes(PAGE), epoch=1, seq=1 + i) for i, a in enumerate(PAGES[:4])}
    r = h.batch(pack_command(P.OP_RECV, [(a, 0) for a in PAGES[:4]], session_id=SID), recs)
    assert r.entry_status == [0] * 4
    twice = Reads(h, r.reads).twice()
    assert twice and {t.rsplit("+", 1)[0] for t in twice} == {
        f"Command.entries[{i}].ram_addr" for i in range(4)}, twice[:8]

