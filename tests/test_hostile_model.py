"""Hostile host that holds the key: the reference model, and every field of records and tokens.

A keyless host only sees that a forgery is refused; a test that holds the transport key can
build *authentic* records and tokens that are wrong in exactly one way, so only the one check for
that way can refuse them, and can ask for the exact status the protocol prescribes
(docs/PROTOCOL.md). Here, natively (the session code itself, at native speed):

* the fuzzer's reference model (tests/hostile_model.py) agrees with the helper on every command
  of a short run (the 100k-command run in test_hostile_mailbox.py does the same at length);
* the fuzzer's model checker has teeth: a planted wrong status, entry status, record or token
  byte is reported with the command that replays it;
* every bit of an epoch token and of a finish token (every field and the tag), and every field
  of both re-sealed with the key, gets its exact status;
* every field of a record, re-sealed with the key, gets its exact status, including the
  boundaries of the seq window, a duplicated seq for another page (the seen bitmap) and a second
  record of one page in an epoch (install-once);
* the per-epoch tables: a full epoch of distinct pages fits the install-once table; a probe
  that starts at its last slot wraps to the first; both tables are cleared to their last entry
  when an epoch closes (the test holds K_a, so it picks pages by where their keyed probe
  starts); and a finished destination's next, larger window still maps;
* an epoch holds at most EPOCH_RECORDS_MAX records on the source, and the epoch counter stops
  before the finish token's nonce epoch.

Replay: `pytest tests/test_hostile_model.py -k <name>`; seeds are fixed.
"""

from __future__ import annotations

import ctypes
import mmap
import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from helperfw.runtime import protocol as P
from helperfw.runtime import session as S
from tests import hostile_fuzz as F
from tests.hostile_common import ST, Forger, finish_epoch_one, name
from tests.session_host import PAGE, NativeHelper, sealed_pair, session_keys, set_hash

KEY = bytes(range(140, 172))
SEED = 7016
MODEL_SEEDS = (71601, 71602)
MODEL_COMMANDS = 1500
TOK = P.EpochToken


def st(n: str) -> int:
    return ST[n]


# -- the model against the helper ------------------------------------------------------------------
@pytest.mark.parametrize("seed", MODEL_SEEDS)
def test_model_agrees_with_the_helper(seed):
    """Every status, entry status, state, record, token, reply and install of a fuzzed run is
    what the reference model decided; rollbacks of the context included."""
    replay = F.replay_command("native", seed)
    target = F.NativeTarget(F.KEY, random.Random(seed ^ 0x7A11))
    try:
        f = F.fuzz(target, seed, MODEL_COMMANDS, replay=replay)
    except F.Violation as e:
        pytest.fail(str(e))
    s = f.stats
    print(dict(sorted(f.statuses.items())), dict(sorted(s.items(), key=str)))
    assert s["exact-steps"] == MODEL_COMMANDS  # natively the model never leaves sync
    assert s["finished"] > 0 and s["sent"] > 0 and s["rollbacks"] > 0
    assert f.statuses["E_EPOCH"] + f.statuses["E_INCOMPLETE"] > 0


def test_model_checker_reports_planted_disagreements():
    """The fuzzer's exact checks have teeth: a helper that returned another documented status,
    another entry status, a record or token with one byte changed, or a reply with another
    field is caught, with the replay command."""
    target = F.NativeTarget(F.KEY, random.Random(2))
    real = target.run

    def planted(kind):
        hit = [False]

        def run(index, command, slots, writable):
            out = real(index, command, slots, writable)
            op = struct.unpack_from("<I", command, 0)[0]
            after = bytearray(out.after)
            status = struct.unpack_from("<i", after, F.CTL_OFF + 16)[0]
            if kind == "status" and status == st("E_REPLAY"):
                struct.pack_into("<i", after, F.CTL_OFF + 16, st("E_HEADER"))
            elif kind == "entry" and op == P.OP_RECV and status == 0:
                off = F.ENTRIES_OFF + 12
                if struct.unpack_from("<i", after, off)[0] == st("E_AUTH"):
                    struct.pack_into("<i", after, off, st("E_REPLAY"))
            elif kind == "record" and op == P.OP_SEND and status == 0 and \
                    struct.unpack_from("<i", after, F.ENTRIES_OFF + 12)[0] == 0:
                after[F.SLOTS_OFF + 64 + 100] ^= 1
            elif kind == "token" and op == P.OP_SEND_END_EPOCH and status == 0:
                after[F.SLOTS_OFF + 0x10] ^= 1  # the count, tag unchanged
            elif kind == "reply" and op == P.OP_HELLO and status == 0:
                after[F.SLOTS_OFF + P.HelloReply.offset("challenge")] ^= 1
            else:
                return out
            hit[0] = True
            out.after = bytes(after)
            return out
        return run, hit

    for kind in ("status", "entry", "record", "token", "reply"):
        target.reboot()
        target.run, hit = planted(kind)
        with pytest.raises(F.Violation, match="replay: python -m tests.hostile_fuzz"):
            F.fuzz(target, 9, 3000, replay=F.replay_command("native", 9))
        assert hit[0], kind
    target.run = real
    target.reboot()
    F.fuzz(target, 9, 300)


def test_the_window_grows_after_a_finished_session():
    """A destination that finished a session (a page per home slot of the install table's
    keyed probe, i.e. the table's whole index range used) takes a four times larger window in
    its next session, maps it and installs into the new part: the per-epoch tables never
    reach past themselves into the page-table builder that the growth uses."""
    dst = NativeHelper(KEY, ram_pages=4 * 512)
    first = 2 << 20
    status, ch = dst.command(P.OP_RECV_BEGIN, ram_size=first)[0], dst.reply().challenge
    assert status == 0
    sid = 0x6E0F_0016
    dst.session_id = sid
    f = Forger(KEY, sid, ch)
    pages = [i * PAGE for i in range(first // PAGE)]
    for base in range(0, len(pages), P.MAX_SLOTS):
        batch = [(a, f.record(a, bytes(PAGE), epoch=1, seq=1 + base + i))
                 for i, a in enumerate(pages[base:base + P.MAX_SLOTS])]
        assert dst.recv(batch) == [0] * len(batch)
    finish_epoch_one(dst, KEY, f, pages)
    status = dst.command(P.OP_RECV_BEGIN, ram_size=4 * first)[0]
    assert status == 0, name(status)
    f2 = Forger(KEY, sid, dst.reply().challenge)
    top = 4 * first - PAGE
    assert dst.recv([(top, f2.record(top, b"\x5a" * PAGE, epoch=1, seq=1))]) == [0]
    assert dst.page(top) == b"\x5a" * PAGE


# -- tokens: every bit, every field -----------------------------------------------------------------
class Dest:
    """A destination helper whose private context can be put back between trials."""

    def __init__(self, h: NativeHelper) -> None:
        self.h = h
        self.saved = b""

    def save(self) -> None:
        self.saved = self.h.read(self.h.ctx, S.HelperCtx.size)

    def restore(self) -> None:
        self.h.write(self.h.ctx, self.saved)

    def token(self, op: int, tok: bytes) -> int:
        """Deliver a token from the saved state. The Command page of the same op is written
        once; later deliveries only rewrite slot 0 and ring (thousands of trials)."""
        self.restore()
        h = self.h
        if getattr(self, "_op", None) != op:
            self._op = op
            return h.put_token(op, tok)
        h.write(h.slot(0), tok)
        h.bell += 1
        h.write(h.mailbox + P.CONTROL_OFFSET, struct.pack("<Q", h.bell))
        return h.img.call("mh_test_process", h.ctx, restype=ctypes.c_int32)


@pytest.fixture()
def session():
    """A source and a destination in one session; the destination received epoch 1's
    records. Returns (src, dst, forger, records, epoch-1 token)."""
    rng = random.Random(SEED)
    src, dst, sid, ch, addrs, recs = sealed_pair(KEY, 8, rng)
    ok, tok = src.token(P.OP_SEND_END_EPOCH)
    assert ok == 0
    assert dst.recv(list(zip(addrs, recs, strict=True))) == [0] * len(addrs)
    return src, dst, Forger(KEY, sid, ch), list(zip(addrs, recs, strict=True)), tok


def _token_fields(tok: bytes) -> dict:
    t = TOK.parse(tok)
    return {"magic": t.magic, "epoch": t.epoch, "sid": t.session_id, "count": t.count,
            "first_seq": t.first_seq, "set_hash": bytes(t.set_hash), "total": t.total_records,
            "challenge": t.challenge}


def _bit_status(off: int) -> str:
    """The status of a token with one bit flipped at byte `off`: the checks before the tag
    (magic, then session id and challenge) see it first; every other bit breaks the tag."""
    if off < 4:
        return "E_HEADER"
    if 8 <= off < 16 or 56 <= off < 64:
        return "E_REPLAY"
    return "E_AUTH"


def _flip(b: bytes, bit: int) -> bytes:
    x = bytearray(b)
    x[bit // 8] ^= 1 << (bit % 8)
    return bytes(x)


def _every_bit_refused(dst_h: NativeHelper, op: int, tok: bytes) -> Dest:
    """Each single-bit flip of `tok`, delivered by `op` from the saved state, is refused with the
    status its byte's field calls for. Returns the saved destination for further cases."""
    dst = Dest(dst_h)
    dst.save()
    got = {bit: dst.token(op, _flip(tok, bit)) for bit in range(8 * TOK.size)}
    wrong = {b: name(s) for b, s in got.items() if name(s) != _bit_status(b // 8)}
    assert not wrong, wrong
    return dst


def test_every_epoch_token_bit_and_field(session):
    _src, dst_h, f, _recs, tok = session
    dst = _every_bit_refused(dst_h, P.OP_RECV_END_EPOCH, tok)
    good = _token_fields(tok)
    other = f.sid ^ 0x40
    cases = {  # field changed, tag re-made with the key -> the check that must refuse it
        "epoch+1": ({"epoch": good["epoch"] + 1}, "E_REPLAY"),
        "epoch-1": ({"epoch": good["epoch"] - 1}, "E_REPLAY"),
        "count+1": ({"count": good["count"] + 1}, "E_EPOCH"),
        "count-1": ({"count": good["count"] - 1}, "E_EPOCH"),
        "first+1": ({"first_seq": good["first_seq"] + 1}, "E_EPOCH"),
        "first-1": ({"first_seq": good["first_seq"] - 1}, "E_EPOCH"),
        "total+1": ({"total": good["total"] + 1}, "E_EPOCH"),
        "total-1": ({"total": good["total"] - 1}, "E_EPOCH"),
        "hash-lo": ({"set_hash": _flip(good["set_hash"], 3)}, "E_EPOCH"),
        "hash-hi": ({"set_hash": _flip(good["set_hash"], 100)}, "E_EPOCH"),
        "sid": ({"sid": other}, "E_REPLAY"),
        "challenge": ({"challenge": f.challenge ^ 1}, "E_REPLAY"),
        "magic": ({"magic": P.FINISH_MAGIC}, "E_HEADER"),
        "nonce": ({"nonce_epoch": P.FINISH_EPOCH}, "E_AUTH"),
    }
    for label, (change, want) in cases.items():
        forged = f.token(**{**good, **change})
        assert name(dst.token(P.OP_RECV_END_EPOCH, forged)) == want, label
    assert dst.token(P.OP_RECV_FINISH, tok) == st("E_HEADER")  # an epoch token cannot finish
    assert dst.token(P.OP_RECV_END_EPOCH, tok) == 0
    assert dst_h.put_token(P.OP_RECV_END_EPOCH, tok) == st("E_REPLAY")  # already closed


def test_every_finish_token_bit_and_field(session):
    src, dst_h, f, _recs, tok = session
    assert dst_h.put_token(P.OP_RECV_END_EPOCH, tok) == 0
    ok, fin = src.token(P.OP_SEND_FINISH)
    assert ok == 0
    dst = _every_bit_refused(dst_h, P.OP_RECV_FINISH, fin)
    good = _token_fields(fin)
    assert (good["epoch"], good["count"], good["first_seq"], good["total"]) == (1, 0, 9, 8)
    cases = {
        "epoch+1": ({"epoch": 2}, "E_INCOMPLETE"),
        "epoch-1": ({"epoch": 0}, "E_INCOMPLETE"),
        "count": ({"count": 1}, "E_INCOMPLETE"),
        "first+1": ({"first_seq": 10}, "E_INCOMPLETE"),
        "first-1": ({"first_seq": 8}, "E_INCOMPLETE"),
        "total+1": ({"total": 9}, "E_INCOMPLETE"),
        "total-1": ({"total": 7}, "E_INCOMPLETE"),
        "hash-lo": ({"set_hash": _flip(bytes(16), 0)}, "E_INCOMPLETE"),
        "hash-hi": ({"set_hash": _flip(bytes(16), 127)}, "E_INCOMPLETE"),
        "sid": ({"sid": f.sid ^ 2}, "E_REPLAY"),
        "challenge": ({"challenge": f.challenge ^ 2}, "E_REPLAY"),
        "magic": ({"magic": P.TOKEN_MAGIC}, "E_HEADER"),
        "nonce": ({"nonce_epoch": 1}, "E_AUTH"),
    }
    for label, (change, want) in cases.items():
        forged = f.token(**{**good, "magic": P.FINISH_MAGIC, **change})
        assert name(dst.token(P.OP_RECV_FINISH, forged)) == want, label
    assert dst.token(P.OP_RECV_END_EPOCH, fin) == st("E_HEADER")  # a finish token cannot close
    assert dst.token(P.OP_RECV_FINISH, fin) == 0
    assert dst_h.put_token(P.OP_RECV_FINISH, fin) == st("E_BAD_STATE")  # the session is done


def test_finish_is_refused_while_an_epoch_is_open(session):
    """A finish token for a session whose last epoch has records but no token is refused even
    when every field of it matches what was accepted."""
    _src, dst, f, _recs, tok = session
    fields = _token_fields(tok)
    fin = f.token(**{**fields, "magic": P.FINISH_MAGIC, "epoch": 0, "count": 0,
                     "set_hash": bytes(16)})
    assert dst.put_token(P.OP_RECV_FINISH, fin) == st("E_INCOMPLETE")


# -- records: every field ------------------------------------------------------------------------
def test_every_record_field(session):
    """Authentic records for a fresh page, each wrong in one field (or one relation to what
    the destination already accepted), one by one from the same state."""
    _src, dst_h, f, recs, tok = session
    assert dst_h.put_token(P.OP_RECV_END_EPOCH, tok) == 0  # epoch 2 now; seqs 9.. are next
    dst = Dest(dst_h)
    dst.save()
    a, b = 20 * PAGE, 21 * PAGE
    plain = bytes(range(256)) * 16
    first = 9

    def rec(addr=a, **kw):
        return f.record(addr, plain, **{"epoch": 2, "seq": first, **kw})

    def recv(entries) -> list[str]:
        dst.restore()
        return [name(s) for s in dst_h.recv(entries)]

    cases = {
        "genuine": ([(a, rec())], ["OK"]),
        "seq=first-1": ([(a, rec(seq=first - 1))], ["E_REPLAY"]),
        "seq=last": ([(a, rec(seq=first + P.EPOCH_RECORDS_MAX - 1))], ["OK"]),
        "seq=last+1": ([(a, rec(seq=first + P.EPOCH_RECORDS_MAX))], ["E_REPLAY"]),
        "seq=0": ([(a, rec(seq=0))], ["E_REPLAY"]),
        "epoch+1": ([(a, rec(epoch=3))], ["E_REPLAY"]),
        "epoch-1": ([(a, rec(epoch=1))], ["E_REPLAY"]),
        "session_id": ([(a, rec(sid=f.sid ^ 4))], ["E_REPLAY"]),
        "challenge": ([(a, rec(challenge=f.challenge ^ 4))], ["E_REPLAY"]),
        "magic": ([(a, rec(magic=P.TOKEN_MAGIC))], ["E_HEADER"]),
        "flags": ([(a, rec(flags=1))], ["E_HEADER"]),
        "flags-high": ([(a, rec(flags=1 << 31))], ["E_HEADER"]),
        "lane": ([(a, rec(lane=1))], ["E_HEADER"]),
        "lane-high": ([(a, rec(lane=1 << 31))], ["E_HEADER"]),
        "re-addressed": ([(a, rec(addr=b))], ["E_HEADER"]),
        "nonce": ([(a, rec(nonce=(2, first + 1)))], ["E_AUTH"]),
        "same-seq-other-page": ([(a, rec()), (b, rec(addr=b))], ["OK", "E_REPLAY"]),
        "same-page-next-seq": ([(a, rec()), (a, rec(seq=first + 1))], ["OK", "E_REPLAY"]),
        "two-pages": ([(a, rec()), (b, rec(addr=b, seq=first + 1))], ["OK", "OK"]),
        "previous-epoch": ([recs[0]], ["E_REPLAY"]),
    }
    for label, (entries, want) in cases.items():
        assert recv(entries) == want, label
    assert recv([(a, rec(seq=first + 5)), (b, rec(addr=b, seq=first + 5))]) == ["OK", "E_REPLAY"]
    # the seen bitmap, word by word: a duplicate of any seq of the window is refused
    for off in (0, 63, 64, 127, 4096, P.EPOCH_RECORDS_MAX - 1):
        got = recv([(a, rec(seq=first + off)), (b, rec(addr=b, seq=first + off)),
                    (b, rec(addr=b, seq=first + (off ^ 1)))])
        assert got == ["OK", "E_REPLAY", "OK"], off
    # what an accepted record counts: the epoch token must name exactly it
    dst.restore()
    assert dst_h.recv([(a, rec(seq=first + 70))]) == [0]
    tok2 = f.token(epoch=2, count=1, first_seq=first, total=9,
                   set_hash=set_hash(KEY, f.sid, f.challenge, [(a, first + 70)]))
    assert dst_h.put_token(P.OP_RECV_END_EPOCH, tok2) == 0


def test_install_once_table_holds_a_full_epoch():
    """EPOCH_RECORDS_MAX distinct pages in one epoch (the whole seq window) are all installed:
    the keyed open-addressing table holds a full epoch; any further record is refused."""
    n = P.EPOCH_RECORDS_MAX
    dst = NativeHelper(KEY, ram_pages=n)
    status, ch = dst.recv_begin()
    assert status == 0
    sid = 0x1D_0000_0016
    dst.session_id = sid
    f = Forger(KEY, sid, ch)
    plain = bytes(PAGE)
    seq = 1
    for base in range(0, n, P.MAX_SLOTS):
        batch = [(a * PAGE, f.record(a * PAGE, plain, epoch=1, seq=seq + i))
                 for i, a in enumerate(range(base, base + P.MAX_SLOTS))]
        seq += P.MAX_SLOTS
        assert dst.recv(batch) == [0] * P.MAX_SLOTS
    again = [(a * PAGE, f.record(a * PAGE, plain, epoch=1, seq=i + 1))
             for i, a in enumerate(range(0, n, n // 64))]
    assert dst.recv(again) == [st("E_REPLAY")] * len(again)


# -- the limits of an epoch ----------------------------------------------------------------------
def test_an_epoch_holds_at_most_epoch_records_max():
    """The source seals EPOCH_RECORDS_MAX records in one epoch and refuses the next one
    (E_EXHAUSTED); the next epoch starts afresh."""
    src = NativeHelper(KEY, ram_pages=P.MAX_SLOTS)
    src.send_begin(0x5EED)
    pages = [i * PAGE for i in range(P.MAX_SLOTS)]
    for _ in range(P.EPOCH_RECORDS_MAX // P.MAX_SLOTS):
        statuses, _ = src.send(pages)
        assert statuses == [0] * P.MAX_SLOTS
    assert src.send(pages[:2])[0] == [st("E_EXHAUSTED")] * 2
    ok, tok = src.token(P.OP_SEND_END_EPOCH)
    assert ok == 0 and TOK.parse(tok).count == P.EPOCH_RECORDS_MAX
    assert src.send(pages[:2])[0] == [0, 0]


def test_the_epoch_counter_stops_before_the_finish_nonce():
    """Epoch FINISH_EPOCH is the finish token's nonce epoch: the source closes epoch
    FINISH_EPOCH - 2 (the next is FINISH_EPOCH - 1), refuses to close FINISH_EPOCH - 1
    (E_EXHAUSTED), and still finishes. No host can make four billion epochs in a test, so the
    counter is set in the context (the test's view of the helper's private memory)."""
    src = NativeHelper(KEY)
    src.send_begin(0x5EED)
    src.write(src.ctx + S.HelperCtx.offset("epoch"), struct.pack("<I", P.FINISH_EPOCH - 2))
    ok, tok = src.token(P.OP_SEND_END_EPOCH)
    assert ok == 0 and TOK.parse(tok).epoch == P.FINISH_EPOCH - 2
    assert src.token(P.OP_SEND_END_EPOCH)[0] == st("E_EXHAUSTED")
    ok, fin = src.token(P.OP_SEND_FINISH)
    assert ok == 0 and TOK.parse(fin).epoch == P.FINISH_EPOCH - 2


# -- the per-epoch tables, to their last entries ---------------------------------------------------
def _homes(ka: bytes, pages: list[int]) -> list[int]:
    """Where the install-once table's probe for each page starts: the low 64 bits of
    AES_Ka(ram_addr ‖ 0), masked (session.installed_slot); the test holds K_a."""
    enc = Cipher(algorithms.AES(ka), modes.ECB()).encryptor()
    out = enc.update(b"".join(struct.pack("<QQ", a, 0) for a in pages))
    return [int.from_bytes(out[16 * i:16 * i + 8], "little") & (S.ADDR_SLOTS - 1)
            for i in range(len(pages))]


def test_epoch_tables_wrap_and_are_cleared_to_their_last_entry():
    """Two pages whose keyed probe starts at the install table's last slot (the second wraps to
    slot 0) and a record at the seq window's last offset: accepted once in epoch 1, refused a
    second time there, accepted again in epoch 2: each epoch's seen bitmap and install-once
    table start empty to their last word, and a probe wraps around the table's end. The test
    holds K_a, so it picks those pages (retrying RECV_BEGIN until the challenge gives two)."""
    n = 2 * S.ADDR_SLOTS
    dst = NativeHelper(KEY)
    ram = mmap.mmap(-1, n * PAGE)  # a 128 MiB window, backed only where pages are written
    dst.ram, dst.ram_size = ctypes.addressof(ctypes.c_char.from_buffer(ram)), n * PAGE
    key = ctypes.create_string_buffer(KEY, 32)
    assert dst.img.call("mh_test_ctx_init", dst.ctx, ctypes.addressof(key), dst.mailbox,
                        dst.ram, 1 << 40, dst.pool, 32, 0, 0, restype=ctypes.c_int32) == 0
    pages = [i * PAGE for i in range(n)]
    sid = 0x7AB1_E000_0016
    dst.session_id = sid
    for attempt in range(50):
        status, ch = dst.recv_begin()
        assert status == 0
        ka = session_keys(KEY, sid, ch)[1]
        last = [a for a, h in zip(pages, _homes(ka, pages), strict=True)
                if h == S.ADDR_SLOTS - 1]
        if len(last) >= 2:
            break
        assert dst.command(P.OP_ABORT)[0] == 0  # nothing installed: a new session is allowed
    print("RECV_BEGIN attempts:", attempt + 1)
    x, y = last[:2]
    z = next(a for a in pages if a not in (x, y))
    f = Forger(KEY, sid, ch)
    plain = bytes(range(256)) * 16
    top = P.FIRST_SEQ + P.EPOCH_RECORDS_MAX - 1  # the window's last offset in epoch 1
    assert dst.recv([(x, f.record(x, plain, epoch=1, seq=1)),
                     (y, f.record(y, plain, epoch=1, seq=2)),
                     (z, f.record(z, plain, epoch=1, seq=top))]) == [0, 0, 0]
    assert dst.recv([(y, f.record(y, plain, epoch=1, seq=3)),
                     (x, f.record(x, plain, epoch=1, seq=4))]) == [st("E_REPLAY")] * 2
    accepted = [(x, 1), (y, 2), (z, top)]
    tok = f.token(epoch=1, count=3, first_seq=1, total=3,
                  set_hash=set_hash(KEY, sid, ch, accepted))
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok) == 0
    first = 1 + 3
    assert dst.recv([(y, f.record(y, plain, epoch=2, seq=first)),
                     (x, f.record(x, plain, epoch=2, seq=first + 1)),
                     (z, f.record(z, plain, epoch=2,
                                  seq=first + P.EPOCH_RECORDS_MAX - 1))]) == [0, 0, 0]
