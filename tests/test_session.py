"""The mailbox protocol v2 end to end (native): seal → outside AES-GCM-SIV → open, epochs,
fresh sessions bound to the destination's challenge, the one-shot destination, refusals."""

from __future__ import annotations

import ctypes
import random

import pytest

from helperfw.runtime import protocol as P
from helperfw.runtime import session as S
from tests.session_host import PAGE, NativeHelper, open_record, set_hash

KEY = bytes(range(100, 132))
SEED = 4242


def st(name: str) -> int:
    return P.STATUS[name][0]


@pytest.fixture()
def pair():
    rng = random.Random(SEED)
    src = NativeHelper(KEY, self_pages=(60, 2))
    dst = NativeHelper(KEY, self_pages=(60, 2))
    pages = {a * PAGE: rng.randbytes(PAGE) for a in range(40)}
    for a, data in pages.items():
        src.set_page(a, data)
    return src, dst, pages


def begin(src: NativeHelper, dst: NativeHelper) -> tuple[int, int]:
    """RECV_BEGIN on the destination, SEND_BEGIN with its challenge on the source; the
    destination's host learns the session id (it names it in RECV-family commands)."""
    status, challenge = dst.recv_begin()
    assert status == 0 and challenge != 0
    sid = src.send_begin(challenge)
    dst.session_id = sid
    return sid, challenge


def migrate_epoch(src, addrs):
    """Seal `addrs` as one epoch; return (records, token)."""
    _, records = src.send(addrs)
    ok, token = src.token(P.OP_SEND_END_EPOCH)
    assert ok == 0
    return list(zip(addrs, records, strict=True)), token


def test_hello_reports_version_and_refuses_others():
    h = NativeHelper(KEY)
    assert h.command(P.OP_HELLO)[0] == 0
    r = h.reply()
    assert (r.version, r.slots, r.capabilities) == (2, 64, P.CAP_GCM_SIV)
    assert h.command(P.OP_HELLO, version=1)[0] == st("E_VERSION")
    assert h.command(P.OP_RECV_BEGIN, version=1, ram_size=h.ram_size)[0] == st("E_VERSION")
    assert h.command(99)[0] == st("E_BAD_OP")


def test_sealed_pages_open_with_cryptography_and_migrate(pair):
    src, dst, pages = pair
    sid, ch = begin(src, dst)
    addrs = sorted(pages)
    statuses, records = src.send(addrs[:30])
    assert statuses == [0] * 30
    seqs = []
    for a, rec in zip(addrs, records, strict=False):
        env, pt = open_record(KEY, sid, ch, rec)
        assert pt == pages[a] and env.ram_addr == a and env.session_id == sid
        assert (env.magic, env.flags, env.epoch, env.lane, env.challenge) == (
            P.ENVELOPE_MAGIC, 0, P.FIRST_EPOCH, 0, ch)
        seqs.append(env.seq)
        assert pages[a] not in rec  # ciphertext, not plaintext, in shared memory
    assert seqs == list(range(P.FIRST_SEQ, P.FIRST_SEQ + 30))
    ok, token1 = src.token(P.OP_SEND_END_EPOCH)
    assert ok == 0
    t = P.EpochToken.parse(token1)
    assert (t.magic, t.epoch, t.count, t.first_seq, t.total_records, t.challenge) == (
        P.TOKEN_MAGIC, 1, 30, 1, 30, ch)
    assert bytes(t.set_hash) == set_hash(KEY, sid, ch, list(zip(addrs[:30], seqs, strict=True)))
    _, records2 = src.send(addrs[30:])
    ok, token2 = src.token(P.OP_SEND_END_EPOCH)
    ok, fin = src.token(P.OP_SEND_FINISH)
    f = P.EpochToken.parse(fin)
    assert ok == 0 and (f.magic, f.epoch, f.count, f.first_seq, f.total_records) == (
        P.FINISH_MAGIC, 2, 0, 41, 40)
    assert bytes(f.set_hash) == bytes(16)
    # destination, records delivered out of order within each epoch
    batch = list(zip(addrs[:30], records, strict=True))
    random.Random(SEED).shuffle(batch)
    assert dst.recv(batch) == [0] * 30
    assert dst.put_token(P.OP_RECV_END_EPOCH, token1) == 0
    assert dst.recv(list(zip(addrs[30:], records2, strict=True))) == [0] * 10
    assert dst.put_token(P.OP_RECV_END_EPOCH, token2) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fin) == 0
    for a, data in pages.items():
        assert dst.page(a) == data


def test_attacks_are_refused_and_leave_memory_untouched(pair):
    src, dst, pages = pair
    _sid, ch = begin(src, dst)
    addrs = sorted(pages)
    recs1, tok1 = migrate_epoch(src, addrs[:8])
    recs2, _tok2 = migrate_epoch(src, addrs[8:16])
    before = dst.page(addrs[0])

    def flip(rec: bytes, off: int) -> bytes:
        b = bytearray(rec)
        b[off] ^= 0x10
        return bytes(b)

    a0, r0 = recs1[0]
    # tampered ciphertext, tag and header: refused, page unchanged
    assert dst.recv([(a0, flip(r0, 64 + 100))]) == [st("E_AUTH")]
    assert dst.recv([(a0, flip(r0, 0x30))]) == [st("E_AUTH")]
    assert dst.recv([(a0, flip(r0, 0x18 + 3))]) == [st("E_REPLAY")]  # epoch field changed
    assert dst.recv([(a0, flip(r0, 0x28))]) == [st("E_REPLAY")]  # challenge changed
    assert dst.recv([(a0, flip(r0, 0x1C))]) == [st("E_HEADER")]  # lane field (one-lane session: only lane 0)
    assert dst.recv([(a0, flip(r0, 0x20))]) == [st("E_AUTH")]  # seq changed (inside window)
    assert dst.page(a0) == before
    # re-addressed: the host asks to install the record somewhere else
    assert dst.recv([(addrs[5], r0)]) == [st("E_HEADER")]
    # cross-epoch: a record of epoch 2 while epoch 1 is open
    assert dst.recv([recs2[0]]) == [st("E_REPLAY")]
    assert dst.page(recs2[0][0]) == bytes(PAGE)
    # valid, then replayed/duplicated
    assert dst.recv([recs1[0]]) == [0]
    assert dst.recv([recs1[0]]) == [st("E_REPLAY")]
    # a record of another session (another source session, same destination challenge)
    other = NativeHelper(KEY)
    for a, d in pages.items():
        other.set_page(a, d)
    other.send_begin(ch)
    _, orecs = other.send([a0])
    assert dst.recv([(a0, orecs[0])]) == [st("E_REPLAY")]
    # dropped record: epoch 1 ends with one missing → refused, and finish is refused for ever
    assert dst.recv(recs1[1:7]) == [0] * 6
    assert dst.put_token(P.OP_RECV_END_EPOCH, flip(tok1, 0x40)) == st("E_AUTH")
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == st("E_EPOCH")
    assert dst.recv([recs1[7]]) == [0]  # arriving late does not heal a poisoned session
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == 0
    ok, fin = src.token(P.OP_SEND_FINISH)
    assert ok == 0
    assert dst.put_token(P.OP_RECV_FINISH, fin) == st("E_INCOMPLETE")


def two_epochs_first_delivered(src, dst, pages):
    """A session of two epochs of four pages, finished by the source; the destination has
    installed epoch 1 and its token. Returns (epoch 1's token, epoch 2's records and token,
    the finish token)."""
    begin(src, dst)
    addrs = sorted(pages)
    recs1, tok1 = migrate_epoch(src, addrs[:4])
    recs2, tok2 = migrate_epoch(src, addrs[4:8])
    _, fin = src.token(P.OP_SEND_FINISH)
    assert dst.recv(recs1) == [0] * 4
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == 0
    return tok1, recs2, tok2, fin


def test_finish_refused_when_an_epoch_is_missing(pair):
    src, dst, pages = pair
    _tok1, recs2, tok2, fin = two_epochs_first_delivered(src, dst, pages)
    # epoch 2 withheld entirely: its token cannot be skipped, finish refuses
    assert dst.put_token(P.OP_RECV_FINISH, fin) == st("E_INCOMPLETE")
    # ...and that refusal poisoned the session: delivering the rest cannot make it succeed
    assert dst.recv(recs2) == [0] * 4
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok2) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fin) == st("E_INCOMPLETE")


def test_any_refusal_poisons_and_discards(pair):
    """Fail closed: a single refused item (a replayed token of another epoch) means RECV_FINISH
    is refused even if every genuine item arrives, and since the session had installed pages,
    the destination is discarded: no later session may start on it (one-shot)."""
    src, dst, pages = pair
    tok1, recs2, tok2, fin = two_epochs_first_delivered(src, dst, pages)
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == st("E_REPLAY")
    assert dst.recv(recs2) == [0] * 4
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok2) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fin) == st("E_INCOMPLETE")
    assert dst.recv_begin()[0] == st("E_DISCARDED")
    assert dst.command(P.OP_ABORT)[0] == 0
    assert dst.recv_begin()[0] == st("E_DISCARDED")
    assert dst.command(P.OP_SEND_BEGIN, ram_size=dst.ram_size, challenge=7)[0] == st(
        "E_DISCARDED")


@pytest.mark.parametrize("how", ["abort", "recv_begin"])
def test_one_shot_destination(pair, how):
    """A receiving session that installed a page and ends without RECV_FINISH discards the
    helper; one that installed nothing does not (the host may start over)."""
    src, dst, pages = pair
    begin(src, dst)
    addrs = sorted(pages)
    recs, _tok = migrate_epoch(src, addrs[:2])
    end = ((lambda: dst.command(P.OP_ABORT)[0]) if how == "abort" else
           (lambda: dst.recv_begin()[0]))
    # nothing installed yet: ending is harmless
    assert end() == 0
    status, _ch = dst.recv_begin() if how == "abort" else (0, None)
    assert status == 0
    # the stream of the first session is bound to the old challenge: refused at its first record
    assert dst.recv(recs[:1]) == [st("E_REPLAY")]
    src2 = NativeHelper(KEY)
    for a, d in pages.items():
        src2.set_page(a, d)
    dst.command(P.OP_ABORT)
    begin(src2, dst)
    recs2, _ = migrate_epoch(src2, addrs[:2])
    assert dst.recv(recs2[:1]) == [0]  # a page installed...
    assert end() == (0 if how == "abort" else st("E_DISCARDED"))  # ...then the session ends
    assert dst.recv_begin()[0] == st("E_DISCARDED")
    assert dst.command(P.OP_RECV, [(addrs[1], 0)])[0] in (st("E_ABORTED"), st("E_BAD_STATE"))
    assert dst.page(addrs[1]) == bytes(PAGE)


def test_streams_are_bound_to_one_destination_session(pair):
    """An old stream replayed to a fresh destination, or one stream fed to two destinations,
    fails at its first record: the source bound it to the first destination's challenge."""
    src, dst, pages = pair
    begin(src, dst)
    addrs = sorted(pages)
    recs, tok = migrate_epoch(src, addrs[:3])
    _, fin = src.token(P.OP_SEND_FINISH)
    # a second destination (clone), and the first one after a new session (replay)
    clone = NativeHelper(KEY, self_pages=(60, 2))
    assert clone.recv_begin()[0] == 0
    clone.session_id = dst.session_id
    assert clone.recv(recs[:1]) == [st("E_REPLAY")]
    assert clone.put_token(P.OP_RECV_END_EPOCH, tok) == st("E_REPLAY")
    assert clone.page(addrs[0]) == bytes(PAGE)
    # even a host that rewrites the challenge in the envelope only breaks the tag
    forged = bytearray(recs[0][1])
    forged[0x28:0x30] = clone.reply().challenge.to_bytes(8, "little")
    clone2 = NativeHelper(KEY, self_pages=(60, 2))
    _, ch2 = clone2.recv_begin()
    forged[0x28:0x30] = ch2.to_bytes(8, "little")
    clone2.session_id = dst.session_id
    assert clone2.recv([(addrs[0], bytes(forged))]) == [st("E_AUTH")]
    # the genuine destination still completes
    assert dst.recv(recs) == [0] * 3
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fin) == 0


def test_session_binding(pair):
    """The first RECV-family command binds the session id; a later different one is refused;
    a wrong id only makes records fail (keys derive from the id and the own challenge)."""
    src, dst, pages = pair
    sid, _ch = begin(src, dst)
    addrs = sorted(pages)
    recs, _tok = migrate_epoch(src, addrs[:2])
    dst.session_id = 0
    assert dst.command(P.OP_RECV, [(addrs[0], 0)])[0] == st("E_BAD_ARG")
    dst.session_id = sid ^ 1
    assert dst.recv(recs[:1]) == [st("E_REPLAY")]  # envelope names the real id
    dst.session_id = sid
    assert dst.command(P.OP_RECV, [(addrs[0], 0)])[0] == st("E_REPLAY")


def test_send_begin_needs_a_challenge(pair):
    src, _dst, _ = pair
    assert src.command(P.OP_SEND_BEGIN, ram_size=src.ram_size)[0] == st("E_BAD_ARG")
    assert src.command(P.OP_SEND_BEGIN, ram_size=src.ram_size, challenge=5, version=1)[0] == \
        st("E_VERSION")


def test_address_validation_and_states(pair):
    src, _dst, _pages = pair
    assert src.command(P.OP_SEND, [(0, 0)])[0] == st("E_BAD_STATE")
    assert src.command(P.OP_RECV_FINISH)[0] == st("E_BAD_STATE")
    for bad in (3 * PAGE, 0, (2 << 20) + 1, (2 << 20) + (1 << 20), 1 << 41):  # 2 MiB granules
        assert src.command(P.OP_SEND_BEGIN, ram_size=bad, challenge=1)[0] == st("E_BAD_ARG"), bad
    src.send_begin(0x1234)
    statuses, _ = src.send([0x123, src.ram_size, 60 * PAGE, 61 * PAGE, 62 * PAGE])
    assert statuses == [st("E_RANGE"), st("E_RANGE"), st("E_SELF"), st("E_SELF"), 0]
    assert src.command(P.OP_SEND, [(0, P.ENTRY_F_SHARED)])[1] == [st("E_SHARED")]
    assert src.command(P.OP_SEND, [(0, 2)])[1] == [st("E_BAD_ARG")]
    assert src.command(P.OP_SEND, [(0, 0)], count=0)[0] == st("E_BAD_COUNT")
    assert src.command(P.OP_SEND, [(0, 0)], count=65)[0] == st("E_BAD_COUNT")
    assert src.command(P.OP_SEND_BEGIN, ram_size=src.ram_size, challenge=1)[0] == st(
        "E_BAD_STATE")
    assert src.command(P.OP_RECV_BEGIN, ram_size=src.ram_size)[0] == st("E_BAD_STATE")
    assert src.command(P.OP_ABORT)[0] == 0
    assert src.command(P.OP_SEND, [(0, 0)])[0] == st("E_ABORTED")
    # the window is mapped now, so only the size check itself can refuse a bad size
    for bad in (1, (2 << 20) + 1, (2 << 20) + PAGE):  # 1: inside the mapped window
        assert src.command(P.OP_SEND_BEGIN, ram_size=bad, challenge=1)[0] == st("E_BAD_ARG"), bad
    assert src.send_begin(0x1234) != 0  # a new session after abort


def test_doorbell_not_rung_processes_nothing():
    h = NativeHelper(KEY)
    h.command(P.OP_HELLO)
    status = h.img.call("mh_test_process", h.ctx, restype=ctypes.c_int32)
    assert status == st("E_BAD_STATE")


def test_session_ids_and_challenges_differ():
    ids = {NativeHelper(KEY).send_begin(0x55) for _ in range(4)}
    chs = {NativeHelper(KEY).recv_begin()[1] for _ in range(4)}
    assert len(ids) == 4 and len(chs) == 4 and 0 not in ids | chs


def _ctx_field(h: NativeHelper, name: str) -> bytes:
    return h.read(h.ctx + S.HelperCtx.offset(name), S.HelperCtx.fields[name].type.size)


@pytest.mark.parametrize("end", ["finish", "abort"])
def test_session_secrets_are_wiped_when_it_ends(pair, end):
    """K_s, K_a, the last record's keys and the plaintext scratch are zero after the session."""
    src, dst, pages = pair
    begin(src, dst)
    addrs = sorted(pages)
    recs, tok = migrate_epoch(src, addrs[:3])
    assert dst.recv(recs) == [0] * 3
    for h in (src, dst):
        assert any(_ctx_field(h, "ks"))  # a live session holds keys
    if end == "finish":
        _, fin = src.token(P.OP_SEND_FINISH)
        assert dst.put_token(P.OP_RECV_END_EPOCH, tok) == 0
        assert dst.put_token(P.OP_RECV_FINISH, fin) == 0
    else:
        assert src.command(P.OP_ABORT)[0] == 0
        assert dst.command(P.OP_ABORT)[0] == 0
    for h in (src, dst):
        for f in ("ks", "ka", "rec", "scratch"):
            assert not any(_ctx_field(h, f)), (end, f)
