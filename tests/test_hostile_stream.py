"""Hostile host, migration stream: attacks on what the destination receives.

A destination machine (the built .efi in its mirror VM, its own memory key, the same transport
key) opens a receiving session; its challenge goes to a source machine, whose session (three
epochs, pages re-sent in later epochs after the guest changed them) is framed with the host
model's stream format (emulate/stream.py). The attacker parses that stream, changes it at the
record level and re-frames it with a *valid* CRC/END (the destination host is as hostile as the
source host, so the stream's own checks protect nothing). The destination, restored to the
moment after its RECV_BEGIN for every attack, then gets every item through its mailbox, the way
a hostile destination host would: it carries on after each refusal and finally tries
RECV_FINISH.

For each attack: the helper refuses something (status ≠ OK), a refused record never writes
guest memory (window write tracking), no page ever holds anything but its initial content or a
genuine source version, and RECV_FINISH is refused. Purely additive attacks (an extra copy of a
record, an extra stale or foreign record) are refused record by record, cannot change memory,
and poison the session too: RECV_FINISH is refused although every genuine item arrived.

Replay one attack: `pytest tests/test_hostile_stream.py -k <attack name>`; SEED is fixed.
"""

from __future__ import annotations

import io
import random
import struct
from dataclasses import dataclass, field

import pytest

from emulate.stream import (
    END,
    EPOCH_TOKEN,
    FINISH,
    PRIVATE_PAGES,
    SESSION,
    StreamError,
    StreamWriter,
    read_stream,
)
from helperfw.runtime import protocol as P
from tests.hostile_common import ST, name
from tests.mirror_host import KEY, PAGE, RAM, MirrorHost
from tests.session_host import NativeHelper

SEED = 7003
OPTION = P.OPT_TUPLES
OTHER_KEY = bytes(range(200, 232))
PAGES = [0x200000 + i * PAGE for i in range(24)] + [RAM - PAGE]
EPOCHS = [PAGES[:12], PAGES[0:4] + PAGES[12:20], PAGES[0:2] + PAGES[20:]]  # pages per epoch

# -- the stream as the attacker sees it: a list of items -------------------------------------
# ("session", sid) | ("pages", [(ram_addr, record)]) | ("token", bytes) | ("finish", bytes)


@dataclass
class SourceRun:
    sid: int
    challenge: int
    items: list
    versions: dict[int, list[bytes]]  # ram_addr -> every content it was sealed with, in order
    final: dict[int, bytes]
    records: list[list[tuple[int, bytes]]]  # per epoch
    tokens: list[bytes]
    finish: bytes


def run_source(key: bytes, seed: int, challenge: int, *,
               second_session: bool = False) -> SourceRun:
    """A source session bound to `challenge` (a destination's RECV_BEGIN drew it)."""
    h = MirrorHost(47, OPTION, key=key, seed=seed, track_writes=False)
    rng = random.Random(seed)
    versions: dict[int, list[bytes]] = {a: [] for a in PAGES}
    if second_session:  # a finished session first: its records are "another session"
        assert h.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=challenge).status == 0
        assert h.command(P.OP_SEND_END_EPOCH).status == 0
        assert h.command(P.OP_SEND_FINISH).status == 0
    r = h.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=challenge)
    assert r.status == 0
    sid = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size)).session_id
    items: list = [("session", sid)]
    per_epoch, tokens = [], []
    for pages in EPOCHS:
        for a in pages:  # the guest (re)writes the page before it is (re)sent
            data = rng.randbytes(PAGE)
            h.set_guest_page(a, data)
            versions[a].append(data)
        r = h.command(P.OP_SEND, [(a, 0) for a in pages])
        assert r.entry_status == [0] * len(pages)
        recs = [(a, h.read_slot(i)) for i, a in enumerate(pages)]
        per_epoch.append(recs)
        items.append(("pages", recs[: len(recs) // 2]))
        items.append(("pages", recs[len(recs) // 2:]))
        assert h.command(P.OP_SEND_END_EPOCH).status == 0
        tokens.append(h.read_slot(0, P.EpochToken.size))
        items.append(("token", tokens[-1]))
    assert h.command(P.OP_SEND_FINISH).status == 0
    fin = h.read_slot(0, P.EpochToken.size)
    items.append(("finish", fin))
    return SourceRun(sid, challenge, items, versions, {a: v[-1] for a, v in versions.items()},
                     per_epoch, tokens, fin)


def frame(items: list, *, truncate_to: int | None = None) -> bytes:
    """The host model's stream for these items (valid CRC and END: the attacker re-frames)."""
    buf = io.BytesIO()
    w = StreamWriter(buf)
    for kind, v in items:
        if kind == "session":
            w.write(SESSION, session_id=v, challenge=0, option=OPTION, c_bit=47, ram_size=RAM,
                    page_size=PAGE, protocol=P.PROTOCOL_VERSION.value, blocks=[],
                    helper_ranges=[])
        elif kind == "pages":
            w.put_private([a for a, _ in v], [r for _, r in v])
        elif kind == "token":
            w.put_epoch_token(v)
        else:
            w.write(FINISH, token=v)
    w.end()
    data = buf.getvalue()
    return data if truncate_to is None else data[:truncate_to]


def unframe(data: bytes) -> tuple[list, str | None]:
    """Items of a stream; a framing error ends the list (and is reported, then ignored)."""
    items: list = []
    try:
        for rec in read_stream(io.BytesIO(data)):
            b = rec.body
            if rec.kind == SESSION:
                items.append(("session", b.session_id))
            elif rec.kind == PRIVATE_PAGES:
                items.append(("pages", [(p.ram_addr, bytes(p.record)) for p in b.pages]))
            elif rec.kind == EPOCH_TOKEN:
                items.append(("token", bytes(b.token)))
            elif rec.kind == FINISH:
                items.append(("finish", bytes(b.token)))
            elif rec.kind == END:
                pass
    except StreamError as e:
        return items, str(e)
    return items, None


@dataclass
class Outcome:
    statuses: list[tuple[str, int]] = field(default_factory=list)  # (item kind, status)
    finish: int | None = None
    dst: MirrorHost | None = None
    initial: dict[int, bytes] = field(default_factory=dict)

    @property
    def refusals(self) -> list[tuple[str, str]]:
        return [(k, name(s)) for k, s in self.statuses if s != 0]


class Destination:
    """One destination machine right after RECV_BEGIN, restorable for every attack (the whole
    VM saved and put back: a host can do that, and it gives every attack the same start)."""

    def __init__(self, seed: int) -> None:
        self.h = MirrorHost(47, OPTION, seed=seed)
        rng = random.Random(seed)
        self.initial = {a: rng.randbytes(PAGE) for a in PAGES}
        for a, data in self.initial.items():
            self.h.set_guest_page(a, data)
        r = self.h.command(P.OP_RECV_BEGIN, ram_size=RAM)
        assert r.status == 0
        self.challenge = P.HelloReply.parse(self.h.read_slot(0, P.HelloReply.size)).challenge
        self.saved = self.h.save()

    def fresh(self) -> MirrorHost:
        self.h.restore(self.saved)
        return self.h


def deliver(items: list, dest: Destination, *, finish_token: bytes | None = None) -> Outcome:
    """A hostile destination host: feed every item, never stop on a refusal, then (again) try
    RECV_FINISH with `finish_token` if the stream did not end with one. RECV-family commands
    name the session id the stream's SESSION record carried."""
    dst = dest.fresh()
    out = Outcome(dst=dst, initial=dict(dest.initial))
    sid = 0
    for kind, v in items:
        if kind == "session":
            sid = v
        elif kind == "pages":
            v = v[: P.MAX_SLOTS]
            r = dst.command(P.OP_RECV, [(a, 0) for a, _ in v], session_id=sid,
                            slots={i: rec for i, (_, rec) in enumerate(v)})
            assert not r.bad_writes, r.bad_writes
            ok_pages = {a for (a, _), s in zip(v, r.entry_status, strict=False) if s == 0}
            assert r.window_pages_written <= ok_pages, "a refused record wrote guest memory"
            out.statuses += [("record", s) for s in r.entry_status]
        elif kind == "token":
            out.statuses.append((kind, dst.command(P.OP_RECV_END_EPOCH, session_id=sid,
                                                   slots={0: v}).status))
        else:
            out.finish = dst.command(P.OP_RECV_FINISH, session_id=sid, slots={0: v}).status
            out.statuses.append((kind, out.finish))
    if finish_token is not None and out.finish != 0:
        out.finish = dst.command(P.OP_RECV_FINISH, session_id=sid,
                                 slots={0: finish_token}).status
        out.statuses.append(("finish", out.finish))
    return out


def check_memory(out: Outcome, src: SourceRun) -> None:
    """Every page holds its initial content or a genuine version the source sealed."""
    for a in PAGES:
        page = out.dst.guest_page(a)
        assert page == out.initial[a] or page in src.versions[a], f"page {a:#x} is forged"


@pytest.fixture(scope="module")
def dest() -> Destination:
    return Destination(SEED)


@pytest.fixture(scope="module")
def src(dest) -> SourceRun:
    return run_source(KEY, SEED, dest.challenge)


@pytest.fixture(scope="module")
def other_session(dest) -> SourceRun:
    """Another source session bound to the same destination challenge (the host has it)."""
    return run_source(KEY, SEED + 1, dest.challenge, second_session=True)


@pytest.fixture(scope="module")
def other_key(dest) -> SourceRun:
    return run_source(OTHER_KEY, SEED + 2, dest.challenge)


def test_untouched_stream_migrates(src, dest):
    print("seed", SEED)
    items, err = unframe(frame(src.items))
    assert err is None and items == src.items
    out = deliver(items, dest)
    assert not out.refusals and out.finish == 0
    for a in PAGES:
        assert out.dst.guest_page(a) == src.final[a]


def flip(rec: bytes, off: int, bit: int = 0) -> bytes:
    b = bytearray(rec)
    b[off] ^= 1 << bit
    return bytes(b)


def _replace(items, pred, fn):
    out = []
    for kind, v in items:
        if kind == "pages":
            v = [fn(a, r) if pred(a, r) else (a, r) for a, r in v]
        out.append((kind, v))
    return out


def _seq(rec: bytes) -> int:
    return struct.unpack_from("<Q", rec, 0x20)[0]


def attack(src: SourceRun, other_session: SourceRun, other_key: SourceRun, kind: str):
    """(attacked items, finish token the attacker tries at the end)."""
    items = src.items
    e1, e2, _ = src.records
    p0_e1 = e1[0][1]
    p0_e2 = e2[0][1]
    if kind == "replay-older-version":  # epoch 2's P0 replaced by its epoch-1 record
        return _replace(items, lambda a, r: r == p0_e2, lambda a, r: (a, p0_e1)), None
    if kind == "replay-token":  # epoch 2's token replaced by epoch 1's
        return [(k, src.tokens[0]) if v == src.tokens[1] else (k, v) for k, v in items], None
    if kind == "drop-record":
        return _replace(items, lambda a, r: r == e2[5][1], lambda a, r: None), None
    if kind == "drop-last-epoch":  # truncation at the item level: epoch 3 gone, FINISH kept
        cut = items.index(("token", src.tokens[1])) + 1
        return items[:cut] + [items[-1]], None
    if kind == "truncate-stream-bytes":  # the framed stream cut inside epoch 3's records
        data = frame(items)
        cut = data.index(src.records[2][3][1][:64]) + 1000
        got, err = unframe(data[:cut])
        assert err is not None  # the host model's framing notices; a hostile host ignores it
        return got, src.finish
    if kind == "truncate-record":  # a record cut short, the rest zero
        return _replace(items, lambda a, r: r == e1[3][1],
                        lambda a, r: (a, r[:2048] + bytes(len(r) - 2048))), None
    if kind == "duplicate-instead":  # P0's record twice in epoch 1, P1's record gone
        return _replace(items, lambda a, r: r == e1[1][1], lambda a, r: (e1[0][0], p0_e1)), None
    if kind == "reorder-across-epochs":  # one record of epoch 1 and one of epoch 2 swapped
        x, y = e1[6], e2[6]
        return _replace(items, lambda a, r: r in (x[1], y[1]),
                        lambda a, r: y if r == x[1] else x), None
    if kind == "readdress-entry":  # the host installs the record at another page
        return _replace(items, lambda a, r: r == e1[2][1], lambda a, r: (e1[4][0], r)), None
    if kind == "readdress-envelope":  # entry and envelope both say the other page
        def both(a, r):
            b = e1[4][0]
            return b, r[:8] + struct.pack("<Q", b) + r[16:]
        return _replace(items, lambda a, r: r == e1[2][1], both), None
    if kind.startswith("bitflip-"):
        off = {"bitflip-envelope-seq": 0x20, "bitflip-envelope-epoch": 0x18,
               "bitflip-ciphertext": 64 + 1234, "bitflip-tag": 0x30 + 7,
                      "bitflip-magic": 0, "bitflip-lane": 0x1C, "bitflip-challenge": 0x28}[kind]
        return _replace(items, lambda a, r: r == e2[3][1],
                        lambda a, r: (a, flip(r, off, 3))), None
    if kind == "splice-other-session":  # same key, the source's other session
        return _replace(items, lambda a, r: r == e1[5][1],
                        lambda a, r: (a, other_session.records[0][5][1])), None
    if kind == "splice-other-session-relabelled":  # ... with this session's id written in
        def relabel(a, r):
            o = other_session.records[0][5][1]
            return a, o[:0x10] + struct.pack("<Q", src.sid) + o[0x18:]
        return _replace(items, lambda a, r: r == e1[5][1], relabel), None
    if kind == "splice-other-key":  # another guest owner's key, session id rewritten
        def other(a, r):
            o = other_key.records[0][5][1]
            o = o[:0x10] + struct.pack("<Q", src.sid) + o[0x18:0x20] + r[0x20:0x28] + o[0x28:]
            return a, o
        return _replace(items, lambda a, r: r == e1[5][1], other), None
    if kind == "splice-token-other-session":
        return [(k, other_session.tokens[0]) if v == src.tokens[0] else (k, v)
                for k, v in items], None
    if kind == "splice-finish-other-session":
        return items[:-1] + [("finish", other_session.finish)], None
    if kind == "forged-token-counts":  # epoch 1's token with count/total edited (tag kept)
        t = src.tokens[0]
        bad = t[:0x10] + struct.pack("<Q", 11) + t[0x18:0x30] + struct.pack("<Q", 11) + t[0x38:]
        return [(k, bad) if v == t else (k, v) for k, v in items], None
    raise AssertionError(kind)


ATTACKS = ["replay-older-version", "replay-token", "drop-record", "drop-last-epoch",
           "truncate-stream-bytes", "truncate-record", "duplicate-instead",
           "reorder-across-epochs", "readdress-entry", "readdress-envelope",
           "bitflip-envelope-seq", "bitflip-envelope-epoch", "bitflip-ciphertext", "bitflip-tag",
           "bitflip-magic", "bitflip-lane", "bitflip-challenge", "splice-other-session",
           "splice-other-session-relabelled", "splice-other-key", "splice-token-other-session",
           "splice-finish-other-session", "forged-token-counts"]


@pytest.mark.parametrize("kind", ATTACKS)
def test_stream_attack_is_detected(src, other_session, other_key, dest, kind):
    print("seed", SEED, "attack", kind)
    items, finish = attack(src, other_session, other_key, kind)
    items = [(k, [x for x in v if x is not None]) if k == "pages" else (k, v) for k, v in items]
    got, err = unframe(frame(items))  # re-framed: valid CRC and totals
    assert err is None
    out = deliver(got, dest, finish_token=finish)
    assert out.refusals, "attack not detected"
    assert out.finish not in (0, None), "RECV_FINISH accepted an attacked stream"
    check_memory(out, src)


@pytest.mark.parametrize("extra", ["duplicate", "stale-replay", "other-session", "other-key"])
def test_additive_attacks_are_refused_and_poison_the_session(src, other_session, other_key, dest,
                                                            extra):
    """Extra records (a duplicate, a stale version, foreign sessions) are refused one by one and
    change nothing; the destination fails closed, so RECV_FINISH is refused even though the
    genuine stream around them is complete (the same stream without the extra record finishes:
    test_genuine_stream_completes)."""
    e1, e2, _ = src.records
    rec = {"duplicate": e2[2], "stale-replay": e1[0],
           "other-session": (e2[2][0], other_session.records[1][2][1]),
           "other-key": (e2[2][0], other_key.records[1][2][1])}[extra]
    items = list(src.items)
    at = items.index(("token", src.tokens[1]))
    items.insert(at, ("pages", [rec]))  # delivered after the genuine records of epoch 2
    out = deliver(items, dest)
    # the extra record is the only refused item of the stream; then finish fails closed
    assert out.refusals[0] == ("record", "E_REPLAY")
    assert [k for k, _ in out.refusals[1:]] == ["finish"], out.refusals
    assert out.finish == P.STATUS["E_INCOMPLETE"][0], "RECV_FINISH accepted a refused record"
    for a in PAGES:
        assert out.dst.guest_page(a) == src.final[a]


def test_genuine_stream_completes(src, dest):
    out = deliver(list(src.items), dest)
    assert out.refusals == [] and out.finish == 0
    for a in PAGES:
        assert out.dst.guest_page(a) == src.final[a]


def test_all_envelope_and_tag_bits_and_ciphertext_samples(src, dest):
    """Every bit of the 64-byte envelope and tag and 512 random ciphertext bits of one record,
    each delivered on its own slot: every one refused, the page never written."""
    rng = random.Random(SEED)
    a, rec = src.records[0][7]
    flips = [(o, b) for o in range(64) for b in range(8)]
    flips += [(64 + rng.randrange(PAGE), rng.randrange(8)) for _ in range(512)]
    dst = dest.fresh()
    before = dst.guest_page(a)
    seen: dict[str, int] = {}
    for i in range(0, len(flips), P.MAX_SLOTS):
        chunk = flips[i:i + P.MAX_SLOTS]
        r = dst.command(P.OP_RECV, [(a, 0)] * len(chunk), session_id=src.sid,
                        slots={j: flip(rec, o, b) for j, (o, b) in enumerate(chunk)})
        assert 0 not in r.entry_status
        assert not r.window_pages_written and not r.bad_writes
        for s in r.entry_status:
            seen[name(s)] = seen.get(name(s), 0) + 1
    assert dst.guest_page(a) == before
    assert set(seen) <= {"E_AUTH", "E_HEADER", "E_REPLAY"}, seen
    print("bit flips:", len(flips), seen)


def test_a_stream_serves_one_destination_session(src, dest):
    """A genuine stream replayed to a destination whose session drew another challenge (a
    second destination, or the same one after a new RECV_BEGIN) fails at its first record and
    never finishes; no page changes."""
    dst = dest.fresh()
    assert dst.command(P.OP_RECV_BEGIN, ram_size=RAM).status == 0  # a new session, nothing in
    assert P.HelloReply.parse(dst.read_slot(0, P.HelloReply.size)).challenge != src.challenge
    saved = dst.save()
    dest2 = Destination.__new__(Destination)
    dest2.h, dest2.initial, dest2.saved = dst, dest.initial, saved
    out = deliver(list(src.items), dest2)
    assert out.statuses[0] == ("record", ST["E_REPLAY"]), out.statuses[:3]
    assert out.finish not in (0, None)
    for a in PAGES:
        assert dst.guest_page(a) == dest.initial[a]


# -- regression: two versions of one page in one epoch ------------------------------------------
def test_two_versions_of_a_page_in_one_epoch_cannot_roll_it_back(dest):
    """Found by this suite: the host has the source seal a page twice in one epoch (old, then
    new content) and delivers the new record first, the old one last. The destination used to
    accept both (distinct seqs, the order-free set-hash matches) and RECV_FINISH succeeded with
    the page rolled back. Now the second record of a page in an epoch is refused (E_REPLAY),
    the epoch token no longer matches, and RECV_FINISH is refused."""
    src = MirrorHost(47, OPTION, seed=SEED + 5, track_writes=False)
    old, new = b"\x11" * PAGE, b"\x22" * PAGE
    a = PAGES[0]
    assert src.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=dest.challenge).status == 0
    sid = P.HelloReply.parse(src.read_slot(0, P.HelloReply.size)).session_id
    src.set_guest_page(a, old)
    src.command(P.OP_SEND, [(a, 0)])
    r_old = src.read_slot(0)
    src.set_guest_page(a, new)
    src.command(P.OP_SEND, [(a, 0)])
    r_new = src.read_slot(0)
    assert _seq(r_new) == _seq(r_old) + 1
    src.command(P.OP_SEND_END_EPOCH)
    tok = src.read_slot(0, P.EpochToken.size)
    src.command(P.OP_SEND_FINISH)
    fin = src.read_slot(0, P.EpochToken.size)
    for order in ((r_new, r_old), (r_old, r_new)):
        items = [("session", sid), ("pages", [(a, order[0])]), ("pages", [(a, order[1])]),
                 ("token", tok), ("finish", fin)]
        out = deliver(items, dest)
        assert [s for _, s in out.statuses] == [
            0, ST["E_REPLAY"], ST["E_EPOCH"], ST["E_INCOMPLETE"]]
        assert out.dst.guest_page(a) == (new if order[0] == r_new else old)


def test_two_versions_of_a_page_in_one_epoch_native():
    """The same regression at native speed (the session code itself)."""
    src, dst = NativeHelper(KEY), NativeHelper(KEY)
    src.set_page(0, b"O" * PAGE)
    _, challenge = dst.recv_begin()
    dst.session_id = src.send_begin(challenge)
    _, r1 = src.send([0])
    src.set_page(0, b"N" * PAGE)
    _, r2 = src.send([0])
    _, tok = src.token(P.OP_SEND_END_EPOCH)
    _, fin = src.token(P.OP_SEND_FINISH)
    assert dst.recv([(0, r2[0])]) == [0]
    assert dst.recv([(0, r1[0])]) == [ST["E_REPLAY"]]
    assert dst.page(0) == b"N" * PAGE
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok) == ST["E_EPOCH"]
    assert dst.put_token(P.OP_RECV_FINISH, fin) == ST["E_INCOMPLETE"]
