"""Parallel lanes, native: several lanes serve one session, each with its own mailbox,
seq space, seen-bitmap, install table and tokens; lane 0 begins, publishes and finishes the
session, the others JOIN it. The hostile cases: a record moved to another lane, a lane's token
replayed on another lane, a lane that never finishes, a lane rolled back in memory, a JOIN of a
half-made or stale publication."""

from __future__ import annotations

import random
import struct

import pytest

from helperfw.runtime import protocol as P
from helperfw.runtime import session as S
from tests.hostile_common import Forger
from tests.session_host import PAGE, NativeHelper, open_record, set_hash

KEY = bytes(range(60, 92))
SEED = 1313
LANES = 3
NPAGES = 36


def st(name: str) -> int:
    return P.STATUS[name][0]


def lane_of(ram_addr: int, lanes: int) -> int:
    """The documented page rule (docs/PROTOCOL.md, "Lanes")."""
    return (ram_addr >> P.LANE_PAGE_SHIFT) % lanes


@pytest.fixture()
def pair():
    rng = random.Random(SEED)
    src = NativeHelper(KEY, self_pages=(60, 2), lanes=LANES)
    dst = NativeHelper(KEY, self_pages=(60, 2), lanes=LANES)
    pages = {a * PAGE: rng.randbytes(PAGE) for a in range(NPAGES)}
    for a, data in pages.items():
        src.set_page(a, data)
    return src, dst, pages


def begin(src: NativeHelper, dst: NativeHelper, lanes: int = LANES) -> tuple[int, int]:
    status, ch = dst.recv_begin(lanes)
    assert status == 0
    sid = src.send_begin(ch, lanes)
    dst.session_id = sid
    return sid, ch


def by_lane(addrs, lanes: int = LANES) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(lanes)]
    for a in addrs:
        out[lane_of(a, lanes)].append(a)
    return out


def seal_epoch(src: NativeHelper, addrs, lanes: int = LANES):
    """Every lane seals its own pages of `addrs` and ends the epoch: [(records, token)] by lane."""
    out = []
    for lane, mine in enumerate(by_lane(addrs, lanes)):
        statuses, recs = src.send(mine, lane) if mine else ([], [])
        assert statuses == [0] * len(mine)
        ok, tok = src.token(P.OP_SEND_END_EPOCH, lane)
        assert ok == 0
        out.append((list(zip(mine, recs, strict=True)), tok))
    return out


def finish_tokens(src: NativeHelper, lanes: int = LANES) -> list[bytes]:
    toks = []
    for lane in range(lanes):
        ok, fin = src.token(P.OP_SEND_FINISH, lane)
        assert ok == 0
        toks.append(fin)
    return toks


def deliver_lane(dst: NativeHelper, lane: int, recs, tok: bytes) -> None:
    """One lane's records and epoch token, as seal_epoch made them."""
    if recs:
        assert dst.recv(recs, lane) == [0] * len(recs)
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok, lane) == 0


def deliver(dst: NativeHelper, epoch) -> None:
    for lane, (recs, tok) in enumerate(epoch):
        deliver_lane(dst, lane, recs, tok)


def finish(dst: NativeHelper, fins: list[bytes]) -> int:
    """RECV_FINISH on lanes 1.. first, lane 0 last (it checks every lane)."""
    for lane in range(1, len(fins)):
        assert dst.put_token(P.OP_RECV_FINISH, fins[lane], lane) == 0
    return dst.put_token(P.OP_RECV_FINISH, fins[0], 0)


def test_lanes_migrate_with_their_own_seq_spaces_and_tokens(pair):
    src, dst, pages = pair
    sid, ch = begin(src, dst)
    addrs = sorted(pages)
    e1 = seal_epoch(src, addrs[:24])
    nonces = set()
    for lane, (recs, tok) in enumerate(e1):
        seqs = []
        for a, rec in recs:
            env, pt = open_record(KEY, sid, ch, rec)  # one K_s, checked from the document alone
            assert pt == pages[a] and env.lane == lane and env.seq >> P.LANE_SHIFT == lane
            seqs.append(env.seq)
            nonces.add((env.epoch, env.seq))
        first = (lane << P.LANE_SHIFT) | P.FIRST_SEQ
        assert seqs == list(range(first, first + len(recs)))
        t = P.EpochToken.parse(tok)
        assert (t.count, t.first_seq) == (len(recs), first)
        assert bytes(t.set_hash) == set_hash(KEY, sid, ch, [(a, s) for (a, _), s in
                                                            zip(recs, seqs, strict=True)])
    assert len(nonces) == 24  # no nonce twice across lanes
    e2 = seal_epoch(src, addrs[24:])
    fins = finish_tokens(src)
    assert {P.EpochToken.parse(f).count for f in fins} == {LANES - 1}
    deliver(dst, e1)
    deliver(dst, e2)
    assert finish(dst, fins) == 0
    assert all(dst.page(a) == d for a, d in pages.items())
    assert dst.recv_begin(LANES)[0] == 0  # a finished destination may serve again


def test_every_page_belongs_to_one_lane(pair):
    src, dst, pages = pair
    begin(src, dst)
    for lane in range(LANES):
        others = [a for a in sorted(pages) if lane_of(a, LANES) != lane][:4]
        statuses, _ = src.send(others, lane)
        assert statuses == [st("E_LANE")] * 4
    recs, _tok = seal_epoch(src, sorted(pages)[:6])[1]
    a, rec = recs[0]
    assert dst.recv([(a, rec)], 2) == [st("E_LANE")]  # lane 1's page, offered to lane 2
    assert dst.page(a) == bytes(PAGE)


def test_record_moved_to_another_lane_is_refused(pair):
    """Lane 0's genuine record delivered on lane 1: for its own address the page rule refuses
    it (E_LANE), re-addressed to a page of lane 1 the envelope's lane does (E_HEADER), and a
    record claiming lane 1 with lane 0's seq falls outside lane 1's seq space (E_REPLAY). The
    lane is poisoned: the session cannot finish."""
    src, dst, pages = pair
    sid, ch = begin(src, dst)
    e1 = seal_epoch(src, sorted(pages)[:12])
    a0, rec0 = e1[0][0][0]
    a1 = e1[1][0][0][0]
    moved = rec0[:8] + struct.pack("<Q", a1) + rec0[16:]
    assert dst.recv([(a0, rec0)], 1) == [st("E_LANE")]
    assert dst.recv([(a1, moved)], 1) == [st("E_HEADER")]
    forged = Forger(KEY, sid, ch).record(a1, pages[a1], epoch=P.FIRST_EPOCH, seq=P.FIRST_SEQ,
                                         lane=1)  # only a key holder could make it
    assert dst.recv([(a1, forged)], 1) == [st("E_REPLAY")]
    assert dst.page(a1) == bytes(PAGE) and dst.page(a0) == bytes(PAGE)
    deliver(dst, e1)  # the genuine stream still goes in...
    fins = finish_tokens(src)
    assert dst.put_token(P.OP_RECV_FINISH, fins[1], 1) == st("E_INCOMPLETE")  # ...but poisoned
    assert dst.put_token(P.OP_RECV_FINISH, fins[2], 2) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == st("E_INCOMPLETE")


def test_a_lanes_token_does_not_verify_on_another_lane(pair):
    """Lane 0's epoch token on lane 1, and a token with lane 1's exact bytes sealed under lane
    0's nonce: both refused (the nonce carries the lane)."""
    src, dst, pages = pair
    sid, ch = begin(src, dst, 2)
    e1 = seal_epoch(src, sorted(pages)[:10], 2)
    recs1, tok1 = e1[1]
    assert dst.recv(recs1, 1) == [0] * len(recs1)
    t = P.EpochToken.parse(tok1)
    as_lane0 = Forger(KEY, sid, ch).token(epoch=t.epoch, count=t.count, first_seq=t.first_seq,
                                          set_hash=bytes(t.set_hash), total=t.total_records,
                                          lane=0)
    assert as_lane0[:P.TOKEN_AAD_LEN] == tok1[:P.TOKEN_AAD_LEN]  # same bytes, lane 0's nonce
    assert dst.put_token(P.OP_RECV_END_EPOCH, as_lane0, 1) == st("E_AUTH")
    assert dst.put_token(P.OP_RECV_END_EPOCH, e1[0][1], 1) == st("E_AUTH")
    assert dst.lane_state(1, "poisoned") == 1


def _session(src, dst, pages, lanes=2):
    """Begin a session of `lanes` lanes and seal one epoch of 16 pages and the finish."""
    begin(src, dst, lanes)
    e1 = seal_epoch(src, sorted(pages)[:16], lanes)
    return e1, finish_tokens(src, lanes)


def test_a_lane_that_never_finishes_fails_the_session(pair):
    src, dst, pages = pair
    e1, fins = _session(src, dst, pages)
    deliver(dst, e1)
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == st("E_INCOMPLETE")  # lane 1 open
    assert dst.put_token(P.OP_RECV_FINISH, fins[1], 1) == 0  # too late: lane 0 is poisoned
    assert dst.recv_begin(2)[0] == st("E_DISCARDED")  # pages were installed: one-shot


def test_a_lane_that_installed_and_was_abandoned_discards_the_helper(pair):
    """Only lane 1 installed pages; lane 0 starts over without finishing: every new session is
    refused (the one-shot rule counts every lane's installs)."""
    src, dst, pages = pair
    e1, _fins = _session(src, dst, pages)
    recs1, _ = e1[1]
    assert dst.recv(recs1, 1) == [0] * len(recs1)
    assert dst.recv_begin(2)[0] == st("E_DISCARDED")
    assert dst.recv_begin(1)[0] == st("E_DISCARDED")


def test_a_missing_lane_fails_the_session(pair):
    """The destination begun for 2 lanes, but lane 1 never joins: lane 0 cannot finish."""
    src, dst, pages = pair
    assert dst.command(P.OP_RECV_BEGIN, ram_size=dst.ram_size, count=2)[0] == 0
    sid = src.send_begin(dst.reply().challenge, 2)
    dst.session_id = sid
    e1 = seal_epoch(src, sorted(pages)[:8], 2)
    fins = finish_tokens(src, 2)
    deliver(dst, e1[:1])
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == st("E_INCOMPLETE")


def test_the_finish_token_binds_the_lane_count(pair):
    """A source that sealed with 2 lanes cannot finish a destination begun with 1 lane, even
    when every page it sent went through lane 0."""
    src, dst, pages = pair
    status, ch = dst.recv_begin(1)
    assert status == 0
    dst.session_id = src.send_begin(ch, 2)
    e1 = seal_epoch(src, [a for a in sorted(pages)[:8] if lane_of(a, 2) == 0], 2)
    fins = finish_tokens(src, 2)
    deliver(dst, e1[:1])
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == st("E_INCOMPLETE")


def test_a_lane_rolled_back_in_memory_cannot_finish_the_session(pair):
    """The host keeps lane 1's private state from when it finished session A and writes it
    back in session B, after lane 1 installed B's pages: lane 0's RECV_FINISH of B refuses
    it (the lane is DONE, but in another publication and session)."""
    src, dst, pages = pair
    e1, fins = _session(src, dst, pages)
    deliver(dst, e1)
    assert finish(dst, fins) == 0
    done_a = dst.lane_snapshot(1)
    src2 = NativeHelper(KEY, self_pages=(60, 2), lanes=2)
    for a, d in pages.items():
        src2.set_page(a, bytes(x ^ 0xFF for x in d))
    e2, fins2 = _session(src2, dst, pages)
    deliver(dst, e2)
    dst.lane_restore(1, done_a)
    assert dst.put_token(P.OP_RECV_FINISH, fins2[0], 0) == st("E_INCOMPLETE")


def test_join_refuses_a_half_made_or_stale_publication():
    h = NativeHelper(KEY, self_pages=(60, 2), lanes=3)
    assert h.join(1, 0) == st("E_UNPUBLISHED")  # nothing published yet
    assert h.command(P.OP_SEND_BEGIN, lane=1, ram_size=h.ram_size, challenge=5)[0] == \
        st("E_LANE")
    assert h.command(P.OP_SEND_BEGIN, ram_size=h.ram_size, challenge=5, count=4)[0] == \
        st("E_BAD_COUNT")  # more lanes than the helper serves
    assert h.command(P.OP_SEND_BEGIN, ram_size=h.ram_size, challenge=5, count=2)[0] == 0
    assert h.join(0, 5) == st("E_LANE")  # lane 0 begins, it never joins
    assert h.join(2, 5) == st("E_LANE")  # beyond the session's 2 lanes
    assert h.join(1, 6) == st("E_UNPUBLISHED")  # another challenge
    gen_off = S.HelperCtx.offset("pub_gen")
    gen = int.from_bytes(h.read(h.ctx + gen_off, 8), "little")
    assert gen % 2 == 0 and gen != 0
    h.write(h.ctx + gen_off, (gen | 1).to_bytes(8, "little"))  # lane 0 mid-publication
    assert h.join(1, 5) == st("E_UNPUBLISHED")
    h.write(h.ctx + gen_off, gen.to_bytes(8, "little"))
    assert h.join(1, 5) == 0
    assert h.join(1, 5) == st("E_BAD_STATE")  # already in it
    assert h.command(P.OP_SEND_FINISH)[0] == 0  # lane 0's session ends: withdrawn
    assert h.command(P.OP_ABORT, lane=1)[0] == 0
    assert h.join(1, 5) == st("E_UNPUBLISHED")


def test_lane_0s_end_withdraws_the_publication():
    """Only lane 0's session end withdraws it: after lane 1's end lane 2 still joins; after
    lane 0's, no lane can join the session (lane 1 is still in it, its own way)."""
    for end in (P.OP_SEND_FINISH, P.OP_ABORT):
        h = NativeHelper(KEY, self_pages=(60, 2), lanes=3)
        assert h.command(P.OP_SEND_BEGIN, ram_size=h.ram_size, challenge=5, count=3)[0] == 0
        assert h.join(1, 5) == 0
        assert h.command(end, lane=1)[0] == 0  # another lane's end withdraws nothing
        assert h.join(2, 5) == 0
        assert h.command(P.OP_ABORT, lane=2)[0] == 0
        assert h.command(end)[0] == 0
        assert h.join(2, 5) == st("E_UNPUBLISHED"), end


def test_a_lane_that_aborts_after_installing_discards_the_destination(pair):
    """Lane 1 installs a page, then aborts while lane 0's session is still live: that lane's
    pages belong to a session that can never finish, so the destination is discarded at once
    (lane 0's next *_BEGIN answers E_DISCARDED, not just E_BAD_STATE for its live session)."""
    src, dst, pages = pair
    begin(src, dst)
    recs, _tok = seal_epoch(src, sorted(pages)[:24])[1]
    assert dst.recv(recs[:1], 1) == [0]
    assert dst.command(P.OP_ABORT, lane=1)[0] == 0
    assert dst.lane_state(1, "discarded") == 1  # the lane's own one-shot mark, at its end
    assert dst.command(P.OP_RECV_BEGIN, ram_size=dst.ram_size, count=LANES)[0] == \
        st("E_DISCARDED")
