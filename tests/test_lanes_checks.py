"""Each per-lane condition of JOIN, of lane 0's *_BEGIN (`lanes_clean`) and of lane 0's
RECV_FINISH (`lanes_finished`) on its own, native: a helper state where exactly that condition
decides, and the status the helper must answer.

Most states are ones a hostile host reaches by driving the lanes in an unusual order (each test
says which). A few can only arise if single fields of a lane's private page are rolled back. A
consistent rollback of the whole page changes several fields at once (test_lanes.py), so those
states are set up here by writing the one field, to show that each check the code claims to make
is made."""

from __future__ import annotations

import random

import pytest

from helperfw.runtime import protocol as P
from tests.session_host import PAGE, NativeHelper
from tests.test_lanes import (
    KEY,
    begin,
    deliver,
    deliver_lane,
    finish_tokens,
    lane_of,
    seal_epoch,
    st,
)

NPAGES = 24


def helpers(lanes: int = 3, seed: int = 1401) -> tuple[NativeHelper, NativeHelper, list[int]]:
    """A source with NPAGES random pages and an empty destination, both serving `lanes`."""
    rng = random.Random(seed)
    src = NativeHelper(KEY, self_pages=(60, 2), lanes=lanes)
    dst = NativeHelper(KEY, self_pages=(60, 2), lanes=lanes)
    addrs = [a * PAGE for a in range(NPAGES)]
    for a in addrs:
        src.set_page(a, rng.randbytes(PAGE))
    return src, dst, addrs


def send_begin(h: NativeHelper, challenge: int, lanes: int = 2) -> int:
    return h.command(P.OP_SEND_BEGIN, ram_size=h.ram_size, challenge=challenge, count=lanes)[0]


# -- JOIN ------------------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["send", "recv"])
def test_join_refuses_a_lane_still_in_an_older_session(side):
    """Lane 0 ended its session and began a new one while lane 1 stayed in the old one: lane 1
    must end it (ABORT) before it may join, or its live session would be replaced mid-stream."""
    h = NativeHelper(KEY, self_pages=(60, 2), lanes=3)
    if side == "send":
        assert send_begin(h, 5) == 0 and h.join(1, 5) == 0
        assert h.command(P.OP_ABORT)[0] == 0  # lane 0 only
        assert send_begin(h, 7) == 0
        ch, live = 7, P.ST_SENDING
    else:
        assert h.command(P.OP_RECV_BEGIN, ram_size=h.ram_size, count=2)[0] == 0
        assert h.join(1, h.reply().challenge) == 0
        assert h.command(P.OP_RECV_BEGIN, ram_size=h.ram_size, count=2)[0] == 0  # ends lane 0's
        ch, live = h.reply().challenge, P.ST_RECEIVING
    gen = h.lane_state(1, "gen")
    assert h.join(1, ch) == st("E_BAD_STATE")
    assert (h.lane_state(1, "state"), h.lane_state(1, "gen")) == (live, gen)
    assert h.command(P.OP_ABORT, lane=1)[0] == 0
    assert h.join(1, ch) == 0
    assert h.lane_state(1, "gen") == h.lane_state(0, "gen") != gen


@pytest.mark.parametrize("end", [P.OP_SEND_FINISH, P.OP_ABORT], ids=["finished", "aborted"])
def test_a_lane_joins_the_next_session_after_its_own_ended(end):
    """A source lane that finished or aborted session 1 joins session 2 (it installed nothing,
    so the destination's one-shot rule does not concern it), and its JOIN answers the new
    session's HELLO reply."""
    h = NativeHelper(KEY, self_pages=(60, 2), lanes=2)
    assert send_begin(h, 5) == 0 and h.join(1, 5) == 0
    assert h.command(end, lane=1)[0] == 0
    assert h.command(P.OP_SEND_FINISH)[0] == 0
    assert send_begin(h, 7) == 0
    sid = h.reply().session_id
    assert h.join(1, 7) == 0
    r = h.reply(1)
    assert (r.session_id, r.challenge, r.version) == (sid, 7, P.PROTOCOL_VERSION.value)
    assert h.lane_state(1, "state") == P.ST_SENDING


def test_a_lane_joins_each_publication_once():
    """Lane 1 sealed a page, aborted and joins the same publication again: refused. Joining
    again would restart its seqs under the same K_s: two pages under one nonce."""
    h = NativeHelper(KEY, self_pages=(60, 2), lanes=2)
    assert send_begin(h, 5) == 0 and h.join(1, 5) == 0
    a = next(a for a in range(0, 64 * PAGE, PAGE) if lane_of(a, 2) == 1)
    assert h.send([a], 1)[0] == [0]
    assert h.command(P.OP_ABORT, lane=1)[0] == 0
    assert h.join(1, 5) == st("E_BAD_STATE")
    assert h.lane_state(1, "state") == P.ST_ABORTED


def test_join_discards_a_lane_holding_pages_of_an_unfinished_session():
    """Lane 1 installed its pages and verified its finish token, lane 0 has not finished: a JOIN
    on lane 1 is refused and discards the lane for good. The session still finishes (every lane
    verified it), but no later session may begin on this destination."""
    src, dst, addrs = helpers(2)
    begin(src, dst, 2)
    deliver(dst, seal_epoch(src, addrs[:8], 2))
    fins = finish_tokens(src, 2)
    assert dst.put_token(P.OP_RECV_FINISH, fins[1], 1) == 0
    assert dst.join(1, dst.lane_state(1, "challenge")) == st("E_DISCARDED")
    assert dst.lane_state(1, "discarded") == 1
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == 0
    assert dst.command(P.OP_RECV_BEGIN, ram_size=dst.ram_size, count=2)[0] == st("E_DISCARDED")


def test_a_discarded_lane_never_joins():
    """The discard flag alone refuses a JOIN, whatever the lane's install record says."""
    h = NativeHelper(KEY, self_pages=(60, 2), lanes=2)
    assert send_begin(h, 5) == 0
    h.set_lane_state(1, "discarded", 1)
    assert h.join(1, 5) == st("E_DISCARDED")
    assert h.lane_state(1, "state") == P.ST_IDLE


def test_recv_begin_on_another_lane_leaves_its_session_alone():
    """RECV_BEGIN on lane 1 is refused (only lane 0 begins) without ending lane 1's session:
    the lane still receives its records and finishes."""
    src, dst, addrs = helpers(2)
    begin(src, dst, 2)
    assert dst.command(P.OP_RECV_BEGIN, lane=1, ram_size=dst.ram_size, count=2)[0] == st("E_LANE")
    assert dst.lane_state(1, "state") == P.ST_RECEIVING
    deliver(dst, seal_epoch(src, addrs[:8], 2))
    fins = finish_tokens(src, 2)
    assert dst.put_token(P.OP_RECV_FINISH, fins[1], 1) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == 0


# -- lane 0's *_BEGIN: lanes_clean -----------------------------------------------------------
def test_a_stray_begin_does_not_discard_a_live_receiving_session():
    """SEND_BEGIN on lane 0 while its receiving session is live, lane 1 having installed pages
    of it: refused (E_BAD_STATE), and the session, judged when it ends, still finishes."""
    src, dst, addrs = helpers(2)
    begin(src, dst, 2)
    e1 = seal_epoch(src, addrs[:8], 2)
    deliver_lane(dst, 1, *e1[1])
    assert send_begin(dst, 9) == st("E_BAD_STATE")
    deliver_lane(dst, 0, *e1[0])
    fins = finish_tokens(src, 2)
    assert dst.put_token(P.OP_RECV_FINISH, fins[1], 1) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == 0
    assert dst.recv_begin(2)[0] == 0


def test_a_lane_that_finished_alone_discards_the_destination_when_lane_0_aborts():
    """Lane 1 installed its pages and verified its own finish token; lane 0 aborts instead of
    finishing. Lane 1's pages belong to a session that did not finish: lane 0's next
    RECV_BEGIN is refused for good."""
    src, dst, addrs = helpers(2)
    begin(src, dst, 2)
    deliver_lane(dst, 1, *seal_epoch(src, addrs[:8], 2)[1])
    assert dst.put_token(P.OP_RECV_FINISH, finish_tokens(src, 2)[1], 1) == 0
    assert dst.command(P.OP_ABORT)[0] == 0
    assert dst.command(P.OP_RECV_BEGIN, ram_size=dst.ram_size, count=2)[0] == st("E_DISCARDED")
    assert send_begin(dst, 9) == st("E_DISCARDED")


# -- lane 0's RECV_FINISH: lanes_finished ----------------------------------------------------
def finished_but_lane_0(lanes: int = 3, session_lanes: int = 2):
    """A destination serving `lanes` lanes where every lane of a `session_lanes`-lane session
    but lane 0 verified its finish token: (dst, lane 0's finish token)."""
    src, dst, addrs = helpers(lanes)
    begin(src, dst, session_lanes)
    deliver(dst, seal_epoch(src, addrs[:12], session_lanes))
    fins = finish_tokens(src, session_lanes)
    for lane in range(1, session_lanes):
        assert dst.put_token(P.OP_RECV_FINISH, fins[lane], lane) == 0
    return dst, fins[0]


@pytest.mark.parametrize("field,change", [
    (None, None),
    ("state", lambda v: P.ST_RECEIVING),
    ("gen", lambda v: v + 2),
    ("session_id", lambda v: v ^ 1),
    ("challenge", lambda v: v ^ 1),
    ("epoch", lambda v: v + 1),
    ("poisoned", lambda v: 1),
], ids=["as-is", "state", "gen", "session_id", "challenge", "epoch", "poisoned"])
def test_lane_0_checks_each_field_of_each_lane_of_its_session(field, change):
    """Lane 1 of a 2-lane session on a 3-lane helper, one field of its final state changed:
    lane 0's RECV_FINISH refuses. As it is, with lane 2 outside the session and never used,
    the session finishes."""
    dst, fin0 = finished_but_lane_0()
    if field is not None:
        dst.set_lane_state(1, field, change(dst.lane_state(1, field)))
    assert dst.put_token(P.OP_RECV_FINISH, fin0, 0) == (st("E_INCOMPLETE") if field else 0)


def test_a_lane_that_skipped_an_epoch_fails_the_session():
    """Epochs are global: the host ends epoch 2 on lane 0 only. Lane 1's own stream is complete
    (its finish token names epoch 1), but the lanes disagree on the epoch: lane 0 refuses.
    Otherwise a host could withhold one lane's last round of dirty pages."""
    src, dst, addrs = helpers(2)
    begin(src, dst, 2)
    e1 = seal_epoch(src, addrs[:8], 2)
    mine = [a for a in addrs[8:16] if lane_of(a, 2) == 0]
    statuses, recs = src.send(mine, 0)
    assert statuses == [0] * len(mine)
    ok, tok = src.token(P.OP_SEND_END_EPOCH, 0)
    assert ok == 0
    fins = finish_tokens(src, 2)
    deliver(dst, e1)
    deliver_lane(dst, 0, list(zip(mine, recs, strict=True)), tok)
    assert dst.put_token(P.OP_RECV_FINISH, fins[1], 1) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == st("E_INCOMPLETE")


def test_a_lane_bound_to_another_source_session_fails_the_session():
    """The host runs two source sessions under the destination's one challenge and feeds lane 1
    the other one's stream. Each lane's stream verifies under its own binding, but lane 0
    refuses: the lanes are not of one session."""
    src, dst, addrs = helpers(2)
    other = NativeHelper(KEY, self_pages=(60, 2), lanes=2)
    for a in addrs:
        other.set_page(a, bytes(x ^ 0x5A for x in src.page(a)))
    status, ch = dst.recv_begin(2)
    assert status == 0
    sid = src.send_begin(ch, 2)
    sid_other = other.send_begin(ch, 2)
    ours, theirs = seal_epoch(src, addrs[:8], 2), seal_epoch(other, addrs[:8], 2)
    fins, fins_other = finish_tokens(src, 2), finish_tokens(other, 2)
    dst.session_id = sid_other
    deliver_lane(dst, 1, *theirs[1])
    assert dst.put_token(P.OP_RECV_FINISH, fins_other[1], 1) == 0
    dst.session_id = sid
    deliver_lane(dst, 0, *ours[0])
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == st("E_INCOMPLETE")


def _second_source(src: NativeHelper, addrs: list[int]) -> NativeHelper:
    """Another 3-lane source helper holding src's pages (a second source session)."""
    src2 = NativeHelper(KEY, self_pages=(60, 2), lanes=3)
    for a in addrs:
        src2.set_page(a, src.page(a))
    return src2


def _stale_lane_2(dst: NativeHelper, src: NativeHelper, addrs: list[int], install: bool):
    """Session 1 on all 3 lanes; lane 1 aborts and lane 0 starts session 2 on lanes 0-1 while
    lane 2 stays in session 1 (`install`: and then takes in its session-1 records and finish
    token, writing guest memory). Returns session 2's source and lane 0's finish token."""
    status, ch1 = dst.recv_begin(3)
    assert status == 0
    sid1 = src.send_begin(ch1, 3)
    e1 = seal_epoch(src, addrs[:18], 3)
    fins1 = finish_tokens(src, 3)
    assert dst.command(P.OP_ABORT, lane=1)[0] == 0
    status, ch2 = dst.recv_begin(2)
    assert status == 0
    if install:
        dst.session_id = sid1
        deliver_lane(dst, 2, *e1[2])
        assert dst.put_token(P.OP_RECV_FINISH, fins1[2], 2) == 0
    src2 = _second_source(src, addrs)
    dst.session_id = src2.send_begin(ch2, 2)
    deliver(dst, seal_epoch(src2, addrs[:12], 2))
    fins2 = finish_tokens(src2, 2)
    assert dst.put_token(P.OP_RECV_FINISH, fins2[1], 1) == 0
    return fins2[0]


@pytest.mark.parametrize("install", [False, True], ids=["still-receiving", "installed-stale"])
def test_a_lane_left_in_an_older_session_fails_the_session(install):
    """Lane 2 is outside session 2 but still in session 1, which lane 0 abandoned: it could
    still write guest memory (still-receiving), or already did (installed-stale, its own finish
    token verified). Lane 0 refuses to finish session 2. A stray SEND_BEGIN while session 2 is
    live is refused for its live session, or, with stale pages in guest memory, for good."""
    src, dst, addrs = helpers(3)
    fin0 = _stale_lane_2(dst, src, addrs, install)
    assert send_begin(dst, 9) == st("E_DISCARDED" if install else "E_BAD_STATE")
    assert dst.put_token(P.OP_RECV_FINISH, fin0, 0) == st("E_INCOMPLETE")


def test_lanes_outside_the_session_with_finished_pages_do_not_matter():
    """Session 1 finished on 3 lanes, session 2 runs on 2: lane 2's installs belong to the
    finished session, so session 2 finishes. A discarded lane outside the session does
    matter."""
    src, dst, addrs = helpers(3)
    begin(src, dst, 3)
    deliver(dst, seal_epoch(src, addrs[:18], 3))
    fins = finish_tokens(src, 3)
    for lane in (1, 2, 0):
        assert dst.put_token(P.OP_RECV_FINISH, fins[lane], lane) == 0
    src2 = _second_source(src, addrs)
    begin(src2, dst, 2)
    deliver(dst, seal_epoch(src2, addrs[:12], 2))
    fins2 = finish_tokens(src2, 2)
    assert dst.put_token(P.OP_RECV_FINISH, fins2[1], 1) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fins2[0], 0) == 0

    dst, fin0 = finished_but_lane_0()
    dst.set_lane_state(2, "discarded", 1)
    assert dst.put_token(P.OP_RECV_FINISH, fin0, 0) == st("E_INCOMPLETE")


def test_a_lane_that_left_an_abandoned_session_empty_does_not_matter():
    """Lane 2 joined session 1 and aborted it without installing anything; session 1 never
    finished. Session 2 (lanes 0-1) finishes: only installs, a discard or a live RECEIVING
    state outside the session count, not the mere generation of a lane's last session."""
    src, dst, addrs = helpers(3)
    assert dst.recv_begin(3)[0] == 0
    for lane in (2, 1):
        assert dst.command(P.OP_ABORT, lane=lane)[0] == 0
    status, ch = dst.recv_begin(2)
    assert status == 0
    dst.session_id = src.send_begin(ch, 2)
    deliver(dst, seal_epoch(src, addrs[:12], 2))
    fins = finish_tokens(src, 2)
    assert dst.put_token(P.OP_RECV_FINISH, fins[1], 1) == 0
    assert dst.lane_state(2, "gen") != dst.lane_state(0, "gen")
    assert dst.put_token(P.OP_RECV_FINISH, fins[0], 0) == 0
