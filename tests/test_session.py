"""The mailbox protocol end to end (native): seal → outside AES-GCM → open, epochs, refusals."""

from __future__ import annotations

import random

import pytest

from helperfw.runtime import protocol as P
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


def test_hello_reports_version_and_refuses_others():
    h = NativeHelper(KEY)
    assert h.command(P.OP_HELLO, version=1)[0] == 0
    r = P.HelloReply.parse(h.read(h.slot(0), P.HelloReply.size))
    assert (r.version, r.slots, r.capabilities) == (1, 64, P.CAP_AESNI_GCM)
    assert h.command(P.OP_HELLO, version=2)[0] == st("E_VERSION")
    assert h.command(99)[0] == st("E_BAD_OP")


def test_sealed_pages_open_with_cryptography_and_migrate(pair):
    src, dst, pages = pair
    sid = src.send_begin()
    addrs = sorted(pages)
    statuses, records = src.send(addrs[:30])
    assert statuses == [0] * 30
    seqs = []
    for a, rec in zip(addrs, records):
        env, pt = open_record(KEY, sid, rec)
        assert pt == pages[a] and env.ram_addr == a and env.session_id == sid
        assert (env.magic, env.flags, env.epoch, env.reserved0, env.reserved1) == (
            P.ENVELOPE_MAGIC, 0, 1, 0, 0)
        seqs.append(env.seq)
        assert pages[a] not in rec  # ciphertext, not plaintext, in shared memory
    assert seqs == list(range(1, 31))
    ok, token1 = src.token(P.OP_SEND_END_EPOCH)
    assert ok == 0
    t = P.EpochToken.parse(token1)
    assert (t.epoch, t.count, t.first_seq, t.total_records) == (1, 30, 1, 30)
    assert bytes(t.set_hash) == set_hash(KEY, sid, list(zip(addrs[:30], seqs)))
    _, records2 = src.send(addrs[30:])
    ok, token2 = src.token(P.OP_SEND_END_EPOCH)
    ok, fin = src.token(P.OP_SEND_FINISH)
    assert ok == 0 and P.EpochToken.parse(fin).magic == P.FINISH_MAGIC
    # destination, records delivered out of order within each epoch
    assert dst.recv_begin(sid) == 0
    batch = list(zip(addrs[:30], records))
    random.Random(SEED).shuffle(batch)
    assert dst.recv(batch) == [0] * 30
    assert dst.put_token(P.OP_RECV_END_EPOCH, token1) == 0
    assert dst.recv(list(zip(addrs[30:], records2))) == [0] * 10
    assert dst.put_token(P.OP_RECV_END_EPOCH, token2) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fin) == 0
    for a, data in pages.items():
        assert dst.page(a) == data


def migrate_epoch(src, dst, addrs):
    """Seal `addrs` as one epoch; return (records, token)."""
    _, records = src.send(addrs)
    ok, token = src.token(P.OP_SEND_END_EPOCH)
    assert ok == 0
    return list(zip(addrs, records)), token


def test_attacks_are_refused_and_leave_memory_untouched(pair):
    src, dst, pages = pair
    sid = src.send_begin()
    addrs = sorted(pages)
    recs1, tok1 = migrate_epoch(src, dst, addrs[:8])
    recs2, _tok2 = migrate_epoch(src, dst, addrs[8:16])
    assert dst.recv_begin(sid) == 0
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
    assert dst.recv([(a0, flip(r0, 0x1C))]) == [st("E_HEADER")]  # reserved field
    assert dst.page(a0) == before
    # re-addressed: the host asks to install the record somewhere else
    assert dst.recv([(addrs[5], r0)]) == [st("E_HEADER")]
    # cross-epoch: a record of epoch 2 while epoch 1 is open
    assert dst.recv([recs2[0]]) == [st("E_REPLAY")]
    assert dst.page(recs2[0][0]) == bytes(PAGE)
    # valid, then replayed/duplicated
    assert dst.recv([recs1[0]]) == [0]
    assert dst.recv([recs1[0]]) == [st("E_REPLAY")]
    # a record from another session (other key material) is refused
    other = NativeHelper(KEY)
    for a, d in pages.items():
        other.set_page(a, d)
    other.send_begin()
    _, orecs = other.send([a0])
    assert dst.recv([(a0, orecs[0])]) == [st("E_REPLAY")]
    # dropped record: epoch 1 ends with one missing → refused, and finish is refused for ever
    assert dst.recv(recs1[1:7]) == [0] * 6
    assert dst.put_token(P.OP_RECV_END_EPOCH, flip(tok1, 0x30)) == st("E_AUTH")
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == st("E_EPOCH")
    assert dst.recv([recs1[7]]) == [0]  # arriving late does not heal a poisoned session
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == 0
    ok, fin = src.token(P.OP_SEND_FINISH)
    assert ok == 0
    assert dst.put_token(P.OP_RECV_FINISH, fin) == st("E_INCOMPLETE")


def test_finish_refused_when_an_epoch_is_missing(pair):
    src, dst, pages = pair
    sid = src.send_begin()
    addrs = sorted(pages)
    recs1, tok1 = migrate_epoch(src, dst, addrs[:4])
    recs2, tok2 = migrate_epoch(src, dst, addrs[4:8])
    _, fin = src.token(P.OP_SEND_FINISH)
    assert dst.recv_begin(sid) == 0
    assert dst.recv(recs1) == [0] * 4
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == 0
    # epoch 2 withheld entirely: its token cannot be skipped, finish refuses
    assert dst.put_token(P.OP_RECV_FINISH, fin) == st("E_INCOMPLETE")
    # ...and that refusal poisoned the session: delivering the rest cannot make it succeed
    assert dst.recv(recs2) == [0] * 4
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok2) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fin) == st("E_INCOMPLETE")


def test_any_refusal_poisons_the_receiving_session(pair):
    """Fail closed: a single refused record (here a replayed token of another epoch, then a
    duplicate) means RECV_FINISH is refused even if every genuine item arrives."""
    src, dst, pages = pair
    sid = src.send_begin()
    addrs = sorted(pages)
    recs1, tok1 = migrate_epoch(src, dst, addrs[:4])
    recs2, tok2 = migrate_epoch(src, dst, addrs[4:8])
    _, fin = src.token(P.OP_SEND_FINISH)
    for extra in ("token", "duplicate"):
        assert dst.command(P.OP_ABORT)[0] == 0
        assert dst.recv_begin(sid) == 0
        assert dst.recv(recs1) == [0] * 4
        assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == 0
        if extra == "token":
            assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == st("E_REPLAY")
        assert dst.recv(recs2) == [0] * 4
        if extra == "duplicate":
            assert dst.recv(recs2[:1]) == [st("E_REPLAY")]
        assert dst.put_token(P.OP_RECV_END_EPOCH, tok2) == 0
        assert dst.put_token(P.OP_RECV_FINISH, fin) == st("E_INCOMPLETE"), extra
    # the same stream without the extra item completes
    assert dst.command(P.OP_ABORT)[0] == 0
    assert dst.recv_begin(sid) == 0
    assert dst.recv(recs1) == [0] * 4
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok1) == 0
    assert dst.recv(recs2) == [0] * 4
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok2) == 0
    assert dst.put_token(P.OP_RECV_FINISH, fin) == 0


def test_address_validation_and_states(pair):
    src, _dst, _pages = pair
    assert src.command(P.OP_SEND, [(0, 0)])[0] == st("E_BAD_STATE")
    assert src.command(P.OP_RECV_FINISH)[0] == st("E_BAD_STATE")
    assert src.command(P.OP_SEND_BEGIN, ram_size=3 * PAGE)[0] == st("E_BAD_ARG")
    assert src.command(P.OP_SEND_BEGIN, ram_size=1 << 41)[0] == st("E_BAD_ARG")
    src.send_begin()
    statuses, _ = src.send([0x123, src.ram_size, 60 * PAGE, 61 * PAGE, 62 * PAGE])
    assert statuses == [st("E_RANGE"), st("E_RANGE"), st("E_SELF"), st("E_SELF"), 0]
    assert src.command(P.OP_SEND, [(0, P.ENTRY_F_SHARED)])[1] == [st("E_SHARED")]
    assert src.command(P.OP_SEND, [(0, 2)])[1] == [st("E_BAD_ARG")]
    assert src.command(P.OP_SEND, [(0, 0)], count=0)[0] == st("E_BAD_COUNT")
    assert src.command(P.OP_SEND, [(0, 0)], count=65)[0] == st("E_BAD_COUNT")
    assert src.command(P.OP_SEND_BEGIN, ram_size=src.ram_size)[0] == st("E_BAD_STATE")
    assert src.command(P.OP_ABORT)[0] == 0
    assert src.command(P.OP_SEND, [(0, 0)])[0] == st("E_ABORTED")
    assert src.send_begin() != 0  # a new session after abort


def test_doorbell_not_rung_processes_nothing():
    h = NativeHelper(KEY)
    h.command(P.OP_HELLO, version=1)
    # run again without bumping the doorbell: nothing is executed
    import ctypes

    status = h.img.call("mh_test_process", h.ctx, restype=ctypes.c_int32)
    assert status == st("E_BAD_STATE")


def test_session_ids_differ():
    ids = {NativeHelper(KEY).send_begin() for _ in range(4)}
    assert len(ids) == 4


