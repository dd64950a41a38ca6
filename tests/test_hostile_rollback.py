"""Hostile host, rollback: the host replays the ciphertext of the helpers' private memory.

On SEV and SEV-ES private memory has no integrity or freshness: the host copies the DRAM
ciphertext of any page and writes it back later at the same address, and the helper reads its
old plaintext (emulate/attacker.py, `HostHands.snapshot` / `restore`). These tests do that to
every page of the helpers' private state (context, stack, page tables, scratch) and to guest
pages, on the source and on the destination, between batches and at chosen instructions inside
them, and check what must survive it (docs/SECURITY.md):

* no two records share key, nonce and keystream with different content: a repeated nonce gives
  a different tag (GCM-SIV's counter), so no XOR of ciphertexts is an XOR of plaintexts;
* no private plaintext or key reaches shared memory;
* no record built from observed ones (bit-flipped with a known plaintext, tags swapped,
  re-addressed) is ever installed, and every installed page is a genuine version of *its own*
  address;
* a stream bound to one destination session is refused by any other at its first record, and a
  destination that installed pages and did not finish accepts no new session.

Each property has a test that fails on protocol v1 (AES-GCM, host-chosen session ids).
Seeds are fixed; `pytest tests/test_hostile_rollback.py -k <name>` replays a case.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from helperfw.runtime import protocol as P
from helperfw.runtime.session import HelperCtx
from tests.hostile_common import DOCUMENTED, ST, Forger, LeakScanner, name
from tests.mirror_host import KEY, PAGE, RAM, MirrorHost, symbol_sizes

SEED = 7011
OPTION = P.OPT_TUPLES
PAGES = [0x200000 + i * PAGE for i in range(48)]
KNOWN = b"\x41" * PAGE  # a page whose content the host knows (e.g. one it wrote as shared)


def private_pages(h: MirrorHost) -> dict[str, int]:
    """Every page of the helper's private state, named: context, stack, used table pages."""
    out = {}
    for sym, limit in (("CTX", None), ("STACK", None), ("PT_POOL", 12)):
        hpas = h.symbol_hpas(sym)
        for i, hpa in enumerate(hpas[:limit]):
            out[f"{sym}+{i * PAGE:#x}"] = hpa
    return out


_LENGTHS: dict[tuple[int, bytes, tuple], int] = {}


def batch_length(h: MirrorHost, command: bytes, slots: dict[int, bytes] | None = None) -> int:
    """Instructions the helper runs for this batch (measured once on a copy of the machine), so
    a preemption point can be drawn inside it."""
    from unicorn import UC_HOOK_CODE

    key = (id(h), command, tuple(sorted((slots or {}).items())))
    if key in _LENGTHS:
        return _LENGTHS[key]
    saved = h.save(PAGES)
    n = [0]
    hook = h.vcpu.uc.hook_add(UC_HOOK_CODE, lambda *_: n.__setitem__(0, n[0] + 1))
    try:
        assert h.batch(command, slots).exit.reason == "hlt"
    finally:
        h.vcpu.uc.hook_del(hook)
        h.restore(saved)
    _LENGTHS[key] = n[0]
    return n[0]


class Acts:
    """Preemption actions that record that they ran (a stop past the batch's end never fires,
    and a trial whose rollback did not happen proves nothing)."""

    def __init__(self, h: MirrorHost, page: int) -> None:
        self.h, self.page = h, page
        self.snap = None
        self.fired: list[str] = []

    def take(self, *_: object) -> None:
        self.snap = self.h.hands.snapshot([self.page])
        self.fired.append("take")

    def put(self, *_: object) -> None:
        assert self.snap is not None
        self.h.hands.restore(self.snap)
        self.fired.append("put")


@dataclass
class Record:
    raw: bytes
    plain: bytes  # what the helper read from the page its envelope names (when genuine)

    @property
    def ram_addr(self) -> int:
        return struct.unpack_from("<Q", self.raw, 0x08)[0]

    @property
    def nonce(self) -> tuple[int, int]:
        return struct.unpack_from("<I", self.raw, 0x18)[0], struct.unpack_from("<Q", self.raw,
                                                                                0x20)[0]

    @property
    def tag(self) -> bytes:
        return self.raw[0x30:0x40]

    @property
    def ct(self) -> bytes:
        return self.raw[64:]


@dataclass
class Source:
    """A source helper in a session bound to a destination's challenge, with its guest pages."""

    h: MirrorHost
    challenge: int
    sid: int = 0
    forger: Forger | None = None
    records: list[Record] = field(default_factory=list)
    scan: LeakScanner = field(default_factory=LeakScanner)
    versions: dict[int, list[bytes]] = field(default_factory=dict)  # every content of a page
    faulted: bool = False  # the last batch ended in a fault (allowed only where dos_ok)

    @classmethod
    def begin(cls, challenge: int, seed: int) -> Source:
        s = cls(MirrorHost(47, OPTION, seed=seed, track_writes=False), challenge)
        rng = random.Random(seed)
        for a in PAGES:
            s.write_page(a, KNOWN if a == PAGES[0] else rng.randbytes(PAGE))
        s.scan.add(KEY)
        r = s.h.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=challenge)
        assert r.status == 0, name(r.status)
        s.sid = P.HelloReply.parse(s.h.read_slot(0, P.HelloReply.size)).session_id
        s.forger = Forger(KEY, s.sid, challenge)
        s.scan.add(s.forger.ks)
        s.scan.add(s.forger.ka)
        return s

    def write_page(self, a: int, data: bytes) -> None:
        """The guest writes a page (the test remembers every version)."""
        self.h.set_guest_page(a, data)
        self.versions.setdefault(a, []).append(data)
        if data != KNOWN:
            self.scan.add(data)

    def send(self, pages: list[int], *, dos_ok: bool = False, **kw) -> list[Record]:
        """One SEND batch. A record's content is checked against the page its *envelope*
        names: a rolled-back command copy can make the helper seal other pages than asked,
        which is harmless as long as each is sealed under its own address. `dos_ok`: a batch
        the host disturbed may end without completing (a fault, or a HLT reached through a
        replayed return address): denial of service, which the host has anyway."""
        r = self.h.batch(_cmd(P.OP_SEND, pages), **kw)
        assert not r.bad_writes, r.bad_writes
        self.check_no_leak()
        self.faulted = r.exit.reason != "hlt"  # the mirror vCPU is dead: no later command runs
        if r.status is None:
            assert dos_ok, f"batch did not complete: {r.exit}"
            return []
        assert r.status in DOCUMENTED, name(r.status)
        out = []
        for i, st in enumerate(r.entry_status):
            if st == 0:
                raw = self.h.read_slot(i)
                ra = struct.unpack_from("<Q", raw, 0x08)[0]
                got = self.forger.open(raw)
                out.append(Record(raw, got if got in self.versions.get(ra, ()) else
                                  self.versions.get(ra, [b""])[-1]))
        self.records += out
        return out

    def token(self, op: int) -> bytes:
        assert self.h.command(op).status == 0
        self.check_no_leak()
        return self.h.read_slot(0, P.EpochToken.size)

    def check_no_leak(self) -> None:
        hits = self.scan.scan(self.h.read_mailbox())
        assert not hits, f"private plaintext or key in the mailbox at {hits[:4]}"


def _cmd(op: int, pages: list[int], **fields) -> bytes:
    from tests.mirror_host import pack_command

    return pack_command(op, [(a, 0) for a in pages], **fields)


def siv_keystream(ks: bytes, nonce: bytes, tag: bytes, n: int) -> bytes:
    """The AES-256-GCM-SIV keystream for (K_s, nonce, tag) (RFC 8452 §4): the record
    encryption key from blocks 2..5 of AES_Ks(LE32(i) ‖ nonce), counter = the tag with bit 127
    set, its first 32 bits counting (little-endian, mod 2^32)."""
    kgk = Cipher(algorithms.AES(ks), modes.ECB()).encryptor()
    enc_key = b"".join(kgk.update(struct.pack("<I", i) + nonce)[:8] for i in range(2, 6))
    aes = Cipher(algorithms.AES(enc_key), modes.ECB()).encryptor()
    ctr0 = bytearray(tag)
    ctr0[15] |= 0x80
    first = int.from_bytes(ctr0[:4], "little")
    blocks = [struct.pack("<I", (first + i) & 0xFFFFFFFF) + bytes(ctr0[4:])
              for i in range(-(-n // 16))]
    return aes.update(b"".join(blocks))[:n]


def check_records(records: list[Record], forger: Forger, versions: dict[int, list[bytes]]) -> None:
    """GCM-SIV's promise under a repeated nonce. Same key and nonce: the keystream is fixed by
    the tag (the counter's start), so a host learns the XOR of two inputs only if two records
    were really encrypted with one (nonce, tag) keystream; with AES-GCM the keystream depends on
    key and nonce alone. Checked exactly, with the key: decrypting each pair of records that
    share (nonce, tag) under that keystream must not give two different genuine pages (a record
    whose envelope or tag a rollback replaced decrypts to garbage there). Every record that
    authenticates carries a genuine version of the page its envelope names."""
    by_nonce: dict[tuple[int, int, bytes], list[Record]] = {}
    genuine = {v for vs in versions.values() for v in vs}
    for r in records:
        got = forger.open(r.raw)
        if got is not None:
            assert got in versions[r.ram_addr], \
                f"record for {r.ram_addr:#x} authenticates content that page never held"
        by_nonce.setdefault((*r.nonce, r.tag), []).append(r)
    for (epoch, seq, tag), group in by_nonce.items():
        inputs = {r.ct: r for r in group}
        if len(inputs) < 2:
            continue
        ksm = siv_keystream(forger.ks, struct.pack("<IQ", epoch, seq), tag, PAGE)
        plain = {bytes(a ^ b for a, b in zip(ct, ksm, strict=True)) for ct in inputs}
        assert len(plain & genuine) < 2, "two pages encrypted with one keystream"


# -- the finding: the context rolled back between SEND batches -------------------------
@pytest.fixture(scope="module")
def dest() -> MirrorHost:
    h = MirrorHost(47, OPTION, seed=SEED)
    assert h.command(P.OP_RECV_BEGIN, ram_size=RAM).status == 0
    h.challenge = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size)).challenge
    h.saved = h.save(PAGES)
    return h


def test_source_context_rolled_back_between_batches_reveals_nothing(dest):
    """The host restores the source context (which holds next_seq) after a batch, so the next
    batch reuses every nonce for other pages. Under AES-GCM (v1) that hands over the keystream:
    XOR with the known page recovers a private page, and two tags under one nonce give the GHASH
    key. Under GCM-SIV the repeated nonces reveal nothing, forged records built from the
    observed ones are refused, and the destination refuses the repeats."""
    src = Source.begin(dest.challenge, SEED)
    snap = src.h.hands.snapshot(private_pages(src.h).values())
    a = src.send(PAGES[0:8])
    src.h.hands.restore(snap)
    b = src.send(PAGES[8:16])
    assert [r.nonce for r in a] == [r.nonce for r in b], "the rollback must repeat the nonces"
    check_records(a + b, src.forger, src.versions)
    # what AES-GCM would give: ct_a0 ^ known ^ ct_b0 = the plaintext of b0
    guess = bytes(x ^ y ^ k for x, y, k in zip(a[0].ct, b[0].ct, KNOWN, strict=True))
    assert all(guess[i:i + 16] != b[0].plain[i:i + 16] for i in range(0, PAGE, 16))
    # forgeries from what the host saw: known-plaintext bit flips, swapped tags, re-addressing
    chosen = b"\x99" * PAGE
    flip = bytes(c ^ k ^ x for c, k, x in zip(a[0].ct, KNOWN, chosen, strict=True))
    forged = [(a[0].ram_addr, a[0].raw[:64] + flip),
              (b[1].ram_addr, b[1].raw[:0x30] + a[1].tag + b[1].ct),
              (a[2].ram_addr, a[2].raw[:64] + b[2].ct),
              (b[3].ram_addr, a[3].raw[:8] + struct.pack("<Q", b[3].ram_addr) + a[3].raw[16:])]
    dest.restore(dest.saved)
    before = {x: dest.guest_page(x) for x, _ in forged}
    r = dest.command(P.OP_RECV, [(x, 0) for x, _ in forged], session_id=src.sid,
                     slots={i: rec for i, (_, rec) in enumerate(forged)})
    assert r.entry_status == [ST["E_AUTH"]] * len(forged), [name(s) for s in r.entry_status]
    assert not r.window_pages_written and all(dest.guest_page(x) == v for x, v in before.items())
    # genuine records install; their nonce-twins are refused as replays
    dest.restore(dest.saved)
    r = dest.command(P.OP_RECV, [(x.ram_addr, 0) for x in a], session_id=src.sid,
                     slots={i: x.raw for i, x in enumerate(a)})
    assert r.entry_status == [0] * len(a)
    r = dest.command(P.OP_RECV, [(x.ram_addr, 0) for x in b], session_id=src.sid,
                     slots={i: x.raw for i, x in enumerate(b)})
    assert r.entry_status == [ST["E_REPLAY"]] * len(b)
    assert all(dest.guest_page(x.ram_addr) == x.plain for x in a)


# -- every private page, between batches and inside them -----------------------------------------
def _source_trial(base: SourceBase, page: int, rng: random.Random, inside: bool) -> None:
    """Three SEND batches; after the first the host copies `page`, and it writes the copy back
    before the third (or, `inside`, the copy is taken at a random instruction of the second
    batch and written back at a random instruction of the third)."""
    src = base.src
    src.h.restore(base.saved)
    src.records = []
    acts = Acts(src.h, page)
    src.send(PAGES[16:20])
    if inside:
        src.send(PAGES[20:24], preempt=[(rng.randrange(1, base.length), acts.take)])
        src.send(PAGES[24:28], preempt=[(rng.randrange(1, base.length), acts.put)], dos_ok=True)
        if src.faulted:  # the rollback crashed the helper (denial of service): nothing follows
            check_records(src.records, src.forger, src.versions)
            return
    else:
        acts.take()
        src.send(PAGES[20:24])
        acts.put()
        src.send(PAGES[24:28])
    assert acts.fired == ["take", "put"]
    if src.h.command(P.OP_SEND_END_EPOCH).status == 0:
        src.check_no_leak()
        src.send(PAGES[28:30], dos_ok=inside)
    check_records(src.records, src.forger, src.versions)


@dataclass
class SourceBase:
    src: Source
    saved: object
    length: int  # instructions of a 4-page SEND batch


@pytest.fixture(scope="module")
def source_base(dest) -> SourceBase:
    src = Source.begin(dest.challenge, SEED + 1)
    return SourceBase(src, src.h.save(PAGES),
                      batch_length(src.h, _cmd(P.OP_SEND, PAGES[16:20])))


@pytest.mark.parametrize("inside", [False, True], ids=["between", "inside"])
def test_source_survives_rollback_of_any_private_page(dest, source_base, inside):
    rng = random.Random(SEED + inside)
    pages = private_pages(source_base.src.h)
    print("seed", SEED, "pages", len(pages))
    failures = {}
    for label, hpa in pages.items():
        try:
            _source_trial(source_base, hpa, rng, inside)
        except AssertionError as e:
            failures[label] = str(e).splitlines()[0]
    assert not failures, failures


@dataclass
class Stream:
    """A genuine three-epoch stream for `dest`'s session, pages re-sent with new content."""

    sid: int
    epochs: list[list[Record]]
    tokens: list[bytes]
    finish: bytes
    versions: dict[int, list[bytes]]


@pytest.fixture(scope="module")
def stream(dest) -> Stream:
    src = Source.begin(dest.challenge, SEED + 2)
    rng = random.Random(SEED + 2)
    epochs, tokens = [], []
    for pages in (PAGES[0:12], PAGES[0:4] + PAGES[12:20], PAGES[0:2] + PAGES[20:24]):
        for a in pages[: len(pages) // 3]:  # the guest changed these before they are re-sent
            src.write_page(a, rng.randbytes(PAGE))
        epochs.append(src.send(pages))
        tokens.append(src.token(P.OP_SEND_END_EPOCH))
    fin = src.token(P.OP_SEND_FINISH)
    return Stream(src.sid, epochs, tokens, fin, src.versions)


def _forgeries(s: Stream) -> list[tuple[int, bytes]]:
    """Records a host can build from the stream it carried: all must be refused."""
    e1, e2 = s.epochs[0], s.epochs[1]
    return [(e1[5].ram_addr, e1[6].raw),  # another page's record at this address
            (e1[5].ram_addr, e1[6].raw[:8] + struct.pack("<Q", e1[5].ram_addr) + e1[6].raw[16:]),
            (e2[1].ram_addr, e2[1].raw[:0x30] + e1[1].tag + e2[1].ct),  # tag of another version
            (e2[2].ram_addr, e2[2].raw[:64] + bytes(c ^ 1 for c in e2[2].ct))]


def _deliver(dest: MirrorHost, s: Stream, page: int | None, rng: random.Random,
             inside: bool) -> list[int]:
    """Deliver the stream with forgeries mixed in; the host copies `page` during/after the
    first batch of epoch 1 and writes it back during/before epoch 2's batch. Returns the
    statuses. Checks after every batch: each 16-byte block of a page is that block of one of the
    page's own versions (a batch cut short leaves a page half old, half new) or noise (no block
    of any page's content: what a rewind that turns a mask wrong leaves, or zero where the
    helper caught it, E_CHANGED). The host gets both by writing older or random ciphertext into
    the page's DRAM, which SEV-ES never prevents. No refused record wrote guest memory except an E_CHANGED one (zeroed); and
    a session that finishes holds only genuine versions."""
    dest.restore(dest.saved)
    initial = {a: dest.guest_page(a) for a in PAGES}
    statuses: list[int] = []
    acts = Acts(dest, page) if page is not None else None
    known = LeakScanner()  # every content a page can legitimately hold
    for a in PAGES:
        known.add(initial[a])
        for v in s.versions[a]:
            known.add(v)
    scan = LeakScanner()
    for vs in s.versions.values():
        for v in vs:
            if v != KNOWN:
                scan.add(v)
    scan.add(KEY)

    def recv(recs: list[tuple[int, bytes]], act=None) -> None:
        cmd = _cmd(P.OP_RECV, [a for a, _ in recs], session_id=s.sid)
        slots = {i: rec for i, (_, rec) in enumerate(recs)}
        preempt = None
        if act is not None:
            preempt = [(rng.randrange(1, batch_length(dest, cmd, slots)), act)]
        r = dest.batch(cmd, slots, preempt=preempt)
        assert not r.bad_writes
        if r.status is None:  # the host disturbed the batch into not completing: DoS
            assert inside, f"batch did not complete: {r.exit}"
        else:
            ok = {a for (a, _), st in zip(recs, r.entry_status, strict=True) if st == 0}
            changed = {a for (a, _), st in zip(recs, r.entry_status, strict=True)
                       if st == ST["E_CHANGED"]}
            assert r.window_pages_written <= ok | changed, "a refused record wrote guest memory"
            statuses.extend(r.entry_status)
        hits = scan.scan(dest.read_mailbox())
        assert not hits, f"private plaintext or key in the mailbox at {hits[:4]}"
        for a in PAGES:
            got = dest.guest_page(a)
            if got == initial[a] or got in s.versions[a]:
                continue
            own = [initial[a], *s.versions[a]]
            for b in range(0, PAGE, 16):
                blk = got[b:b + 16]
                assert any(v[b:b + 16] == blk for v in own) or not known.scan(blk), \
                    f"page {a:#x} holds at {b:#x} a block that is neither its own nor noise"

    def token(op: int, tok: bytes) -> None:
        r = dest.batch(_cmd(op, [], session_id=s.sid), {0: tok})
        assert not r.bad_writes and (r.status is not None or inside), str(r.exit)
        statuses.append(r.status if r.status is not None else ST["E_BAD_STATE"])

    e1 = [(r.ram_addr, r.raw) for r in s.epochs[0]]
    recv(e1[:6], acts.take if acts and inside else None)
    if acts and not inside:
        acts.take()
    recv(_forgeries(s)[:2] + e1[6:])  # forgeries first: they reach the tag check
    token(P.OP_RECV_END_EPOCH, s.tokens[0])
    e2 = [(r.ram_addr, r.raw) for r in s.epochs[1]]
    if acts and not inside:
        acts.put()
    recv(_forgeries(s)[2:] + e2, acts.put if acts and inside else None)
    if acts:
        assert acts.fired == ["take", "put"]
    token(P.OP_RECV_END_EPOCH, s.tokens[1])
    recv([(r.ram_addr, r.raw) for r in s.epochs[2]])
    token(P.OP_RECV_END_EPOCH, s.tokens[2])
    token(P.OP_RECV_FINISH, s.finish)
    assert all(st in DOCUMENTED for st in statuses)
    if statuses[-1] == 0:  # finished: every page holds a genuine version of itself
        for a in PAGES:
            assert dest.guest_page(a) in [initial[a], *s.versions[a]]
    return statuses


def test_genuine_stream_with_forgeries_never_installs_them(dest, stream):
    """Without rollback: the four forgeries are refused (and poison the session), every genuine
    record and epoch token is accepted, RECV_FINISH is refused."""
    st = _deliver(dest, stream, None, random.Random(SEED), False)
    assert st.count(0) == sum(len(e) for e in stream.epochs) + len(stream.tokens)
    assert [name(x) for x in st if x != 0] == ["E_HEADER", "E_REPLAY", "E_AUTH", "E_AUTH",
                                              "E_INCOMPLETE"]


@pytest.mark.parametrize("inside", [False, True], ids=["between", "inside"])
def test_destination_survives_rollback_of_any_private_page(dest, stream, inside):
    rng = random.Random(SEED + 10 + inside)
    failures = {}
    pages = private_pages(dest)
    for label, hpa in pages.items():
        try:
            _deliver(dest, stream, hpa, rng, inside)
        except AssertionError as e:
            failures[label] = str(e).splitlines()[0]
    assert not failures, failures


def test_guest_page_rollback_on_the_source_gives_genuine_records(dest):
    """The host rewinds a guest page while the helper seals it. The helper reads the page once
    (into its scratch), so every record authenticates exactly what it read: block by block a
    version the page really held (a rewind in the middle of the read gives a mix of two
    versions, which the host can make in the source's DRAM anyway: that is an attack on the
    source guest's memory, not on the migration)."""
    src = Source.begin(dest.challenge, SEED + 3)
    a = PAGES[5]
    hpa = src.h.hands.page_hpas(src.h.vm, a, PAGE)
    old = src.h.hands.snapshot(hpa)
    src.write_page(a, b"\x07" * PAGE)
    n = batch_length(src.h, _cmd(P.OP_SEND, [a]))
    for at in (n // 10, n // 3, n // 2, 2 * n // 3, 9 * n // 10):
        src.send([a], preempt=[(at, lambda v, n: src.h.hands.restore(old))])
        src.write_page(a, bytes([at & 0xFF]) * PAGE)
    assert len(src.records) == 5
    for rec in src.records:
        got = src.forger.open(rec.raw)
        assert got is not None
        for b in range(0, PAGE, 16):
            assert any(got[b:b + 16] == v[b:b + 16] for v in src.versions[a]), b
    check_records(src.records, src.forger, {a: [src.forger.open(r.raw) for r in src.records]})


# -- sessions: whole-VM replay and the one-shot destination --------------------------------------
def test_whole_destination_replayed_to_a_new_session_refuses_the_old_stream(dest, stream):
    """A host that restarts the destination from a snapshot taken before its RECV_BEGIN gets a
    new challenge: the old stream fails at its first record."""
    dest.restore(dest.saved)
    assert dest.command(P.OP_ABORT).status == 0
    assert dest.command(P.OP_RECV_BEGIN, ram_size=RAM).status == 0
    r = dest.command(P.OP_RECV, [(x.ram_addr, 0) for x in stream.epochs[0][:4]],
                     session_id=stream.sid,
                     slots={i: x.raw for i, x in enumerate(stream.epochs[0][:4])})
    assert r.entry_status[0] == ST["E_REPLAY"] and not r.window_pages_written


def test_discarded_destination_refuses_every_new_session(dest, stream):
    """One-shot: pages installed, then ABORT; RECV_BEGIN and SEND_BEGIN are refused for good,
    so a second, complete session can never finish on top of the first one's pages."""
    dest.restore(dest.saved)
    recs = stream.epochs[0][:3]
    r = dest.command(P.OP_RECV, [(x.ram_addr, 0) for x in recs], session_id=stream.sid,
                     slots={i: x.raw for i, x in enumerate(recs)})
    assert r.entry_status == [0, 0, 0]
    assert dest.command(P.OP_ABORT).status == 0
    assert dest.command(P.OP_RECV_BEGIN, ram_size=RAM).status == ST["E_DISCARDED"]
    assert dest.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=7).status == ST["E_DISCARDED"]


def test_source_rolled_back_into_an_old_session_cannot_feed_the_new_one(dest):
    """The host restores the source context of session A while session B runs: what the helper
    then seals belongs to session A (its keys, id and challenge) and B's destination refuses it."""
    src = Source.begin(dest.challenge, SEED + 4)
    old = src.h.hands.snapshot(private_pages(src.h).values())
    assert src.h.command(P.OP_ABORT).status == 0
    dest.restore(dest.saved)
    assert dest.command(P.OP_ABORT).status == 0
    assert dest.command(P.OP_RECV_BEGIN, ram_size=RAM).status == 0
    ch_b = P.HelloReply.parse(dest.read_slot(0, P.HelloReply.size)).challenge
    assert src.h.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=ch_b).status == 0
    sid_b = P.HelloReply.parse(src.h.read_slot(0, P.HelloReply.size)).session_id
    src.h.hands.restore(old)  # back in session A
    recs = src.send(PAGES[30:34])
    r = dest.command(P.OP_RECV, [(x.ram_addr, 0) for x in recs], session_id=sid_b,
                     slots={i: x.raw for i, x in enumerate(recs)})
    assert set(r.entry_status) == {ST["E_REPLAY"]} and not r.window_pages_written


def test_private_page_sizes_cover_the_whole_state():
    """The family above restores every page of CTX and STACK and the used table pages."""
    sizes = symbol_sizes()
    assert sizes["CTX"] == HelperCtx.size and sizes["STACK"] > 0


# -- documented residuals: rewinds timed inside one record ---------------------------------------
def instructions_before_write(h: MirrorHost, command: bytes, slots: dict[int, bytes],
                              hpa: int) -> int:
    """Instructions the helper runs in this batch before its first write to the page at `hpa`
    (measured on a copy of the machine): the moment a host that single-steps the mirror picks."""
    from unicorn import UC_HOOK_MEM_WRITE

    return _instructions_before(h, command, slots, UC_HOOK_MEM_WRITE, hpa, hpa + PAGE - 1)


def instructions_before_call(h: MirrorHost, command: bytes, slots: dict[int, bytes],
                             symbol: str, nth: int) -> int:
    """Instructions the helper runs in this batch before it enters `symbol` the nth time."""
    from unicorn import UC_HOOK_CODE

    va = h.symbol_gpa(symbol)  # the image is mapped at VA = GPA
    return _instructions_before(h, command, slots, UC_HOOK_CODE, va, va, nth)


def _instructions_before(h: MirrorHost, command: bytes, slots: dict[int, bytes], kind: int,
                         begin: int, end: int, nth: int = 1) -> int:
    from unicorn import UC_HOOK_CODE

    saved = h.save(PAGES)
    n, hits = [0], []

    def on_code(*_):
        n[0] += 1

    def on_event(*_):
        hits.append(n[0] - 1)  # the instruction is counted already
    hooks = [h.vcpu.uc.hook_add(UC_HOOK_CODE, on_code),
             h.vcpu.uc.hook_add(kind, on_event, None, begin, end)]
    try:
        h.batch(command, slots)
    finally:
        for hook in hooks:
            h.vcpu.uc.hook_del(hook)
        h.restore(saved)
    assert len(hits) >= nth, "the helper never got there"
    return hits[nth - 1]


def test_scratch_rewound_between_verify_and_copy(dest, stream):
    """The host single-steps the destination to the copy-out of record i (page B), after its
    tag verified, and writes back the scratch page's ciphertext from when record h (page A)
    waited there. The copy hashes what it stores (gcmsiv.siv_open) and finds it is not what
    was verified: B is zeroed, the entry refused with E_CHANGED and the session can no longer
    finish. Without that check A's genuine page landed at B, reported installed."""
    dest.restore(dest.saved)
    h_rec, i_rec = stream.epochs[0][0], stream.epochs[0][1]
    scratch = dest.private_hpas(dest.symbol_gpa("CTX") + HelperCtx.offset("scratch"), PAGE)
    b_hpa = dest.vm.gpa_to_hpa(i_rec.ram_addr)
    a_hpa = dest.vm.gpa_to_hpa(h_rec.ram_addr)
    # the scratch is wiped after each batch: the host copies it just before h's copy-out
    cmd_h = _cmd(P.OP_RECV, [h_rec.ram_addr], session_id=stream.sid)
    at_h = instructions_before_write(dest, cmd_h, {0: h_rec.raw}, a_hpa)
    snap = [None]
    r = dest.batch(cmd_h, {0: h_rec.raw},
                   preempt=[(at_h, lambda *_: snap.__setitem__(0, dest.hands.snapshot(scratch)))])
    assert r.entry_status == [0] and snap[0] is not None
    cmd_i = _cmd(P.OP_RECV, [i_rec.ram_addr], session_id=stream.sid)
    at_i = instructions_before_write(dest, cmd_i, {0: i_rec.raw}, b_hpa)
    r = dest.batch(cmd_i, {0: i_rec.raw}, preempt=[(at_i, lambda *_: dest.hands.restore(snap[0]))])
    assert r.status == 0 and name(r.entry_status[0]) == "E_CHANGED"
    assert dest.guest_page(i_rec.ram_addr) == bytes(PAGE)
    # the rest of the stream is genuine, but this session can never finish
    rest = stream.epochs[0][2:]
    r = dest.batch(_cmd(P.OP_RECV, [x.ram_addr for x in rest], session_id=stream.sid),
                   {j: x.raw for j, x in enumerate(rest)})
    assert r.entry_status == [0] * len(rest)
    r = dest.batch(_cmd(P.OP_RECV_END_EPOCH, [], session_id=stream.sid), {0: stream.tokens[0]})
    assert r.status != 0


def test_staging_mask_key_is_drawn_per_vcpu_run(dest, source_base):
    """The masks above are only as good as their key: each helper draws it from RDRAND when its
    vCPU starts, into mm6:mm7. A plain-SEV host reads it at any exit (it reads every register,
    so masks add nothing there); under SEV-ES the register file is out of its reach. Here: the
    key is not zero (a zero key makes every mask public) and the two helpers' keys differ."""
    keys = [(h.vcpu.get("mm6"), h.vcpu.get("mm7")) for h in (dest, source_base.src.h)]
    assert all(lo and hi for lo, hi in keys), keys
    assert keys[0] != keys[1]


def test_all_private_memory_rewound_at_the_copy_out(dest, stream):
    """The strongest rewind of one record: when record i (page B) has verified and its copy-out
    begins (the second `_absorb`: the copy's hash restarts from the AAD), the host writes back
    *all* of the destination's private memory (context, scratch, stack, tables) as it was at
    the same instruction of record h (page A). Memory then says "h, verified, copying to A";
    only the registers are i's. Unmasked, the copy would store A's plaintext wherever the
    register-held pointer goes (B), and the hash of what it stored would match the rewound one:
    A's page installed at B and reported OK. The masks' ids are the addresses stored to and
    their serial is in a register, so the scratch unmasks to noise and the copy is refused."""
    dest.restore(dest.saved)
    h_rec, i_rec = stream.epochs[0][0], stream.epochs[0][1]
    pages = list(private_pages(dest).values())
    snap, rips = [None], []

    def take(*_: object) -> None:
        snap[0] = dest.hands.snapshot(pages)
        rips.append(dest.vcpu.get("rip"))

    def put(*_: object) -> None:
        dest.hands.restore(snap[0])
        rips.append(dest.vcpu.get("rip"))

    for rec, act in ((h_rec, take), (i_rec, put)):
        cmd = _cmd(P.OP_RECV, [rec.ram_addr], session_id=stream.sid)
        at = instructions_before_call(dest, cmd, {0: rec.raw}, "_absorb", 2)
        r = dest.batch(cmd, {0: rec.raw}, preempt=[(at, act)])
    assert len(rips) == 2 and rips[0] == rips[1] == dest.symbol_gpa("_absorb")
    got = dest.guest_page(i_rec.ram_addr)
    misplaced = [b for b in range(0, PAGE, 16) if got[b:b + 16] == h_rec.plain[b:b + 16]]
    assert not misplaced, f"{len(misplaced)} blocks of page A landed at B ({r.entry_status})"
    # the helper caught it and zeroed B; the rewound stack then sends the batch astray (DoS)
    assert got == bytes(PAGE) and (r.status is None or r.entry_status == [ST["E_CHANGED"]])


def test_source_stage_rewound_between_hash_and_encryption(dest):
    """Seal hashes a page into its private stage, then encrypts the stage. The host rolls the
    source's context back so one nonce is used three times: for page Y (secret), for page X
    (KNOWN) untouched, and for X again with the stage written back, between the two passes,
    to what it held for Y. Unmasked, the third record would be Y's
    plaintext under X's keystream, and XOR with the second and KNOWN would give Y. The stage's
    masks change with the serial in mm5, which the rollback cannot touch: the result is noise."""
    src = Source.begin(dest.challenge, SEED + 3)
    x, y = PAGES[0], PAGES[5]
    ctx = src.h.hands.snapshot(private_pages(src.h).values())
    scratch = src.h.private_hpas(src.h.symbol_gpa("CTX") + HelperCtx.offset("scratch"), PAGE)
    stage = [None]

    def seal(page: int, act=None) -> Record:
        src.h.hands.restore(ctx)
        cmd = _cmd(P.OP_SEND, [page])
        pre = None
        if act is not None:
            # the last 8-block POLYVAL step: the stage is complete, the CTR pass not begun
            pre = [(instructions_before_call(src.h, cmd, {}, "_absorb8", PAGE // 128), act)]
        r = src.h.batch(cmd, preempt=pre)
        assert r.status == 0 and r.entry_status == [0]
        return Record(src.h.read_slot(0), b"")

    r_y = seal(y, lambda *_: stage.__setitem__(0, src.h.hands.snapshot(scratch)))
    r_x = seal(x)
    r_x2 = seal(x, lambda *_: src.h.hands.restore(stage[0]))
    assert r_y.nonce == r_x.nonce == r_x2.nonce and r_x.tag == r_x2.tag
    guess = bytes(a ^ b ^ k for a, b, k in zip(r_x2.ct, r_x.ct, KNOWN, strict=True))
    secret = src.versions[y][-1]
    leaked = [b for b in range(0, PAGE, 16) if guess[b:b + 16] == secret[b:b + 16]]
    assert not leaked, f"{len(leaked)} blocks of page Y recovered"
    assert r_x2.ct != r_x.ct  # the rewind did land (the record is noise, refused downstream)



# -- a record's address and its content come from one read --------------------------------------
def _rewind_all_at(h: MirrorHost, symbol: str, cmds: list[tuple[bytes, dict[int, bytes]]],
                   extra=None) -> object:
    """Run the batches in turn, each stopped where it first enters `symbol`: the first
    snapshots all private memory there, the second gets it written back (and `extra()` runs).
    Returns the second batch's result."""
    pages = list(private_pages(h).values())
    snap, rips = [None], []

    def take(*_: object) -> None:
        snap[0] = h.hands.snapshot(pages)
        rips.append(h.vcpu.get("rip"))

    def put(*_: object) -> None:
        h.hands.restore(snap[0])
        if extra is not None:
            extra()
        rips.append(h.vcpu.get("rip"))

    r = None
    for (cmd, slots), act in zip(cmds, (take, put), strict=True):
        at = instructions_before_call(h, cmd, slots, symbol, 1)
        r = h.batch(cmd, slots, preempt=[(at, act)])
    assert len(rips) == 2 and rips[0] == rips[1] == h.symbol_gpa(symbol)
    return r


def test_source_rewound_before_the_seal_seals_what_the_envelope_names(dest):
    """At the instant the source derives record keys for page Y, the host writes back all of
    its private memory as it was at that instant for page X: the envelope, nonce and keys are
    X's, the registers Y's. The record's content must still be X's page: the helper reads the
    page at the address inside the very AAD block it authenticates. Otherwise the record is
    Y's page under X's address, with a valid tag, and the destination installs it at X."""
    src = Source.begin(dest.challenge, SEED + 4)
    x, y = PAGES[1], PAGES[6]
    _rewind_all_at(src.h, "siv_derive", [(_cmd(P.OP_SEND, [x]), {}), (_cmd(P.OP_SEND, [y]), {})])
    raw = src.h.read_slot(0)
    at = struct.unpack_from("<Q", raw, 0x08)[0]
    got = src.forger.open(raw)
    assert got is not None, "the rewound seal should still give a valid record"
    assert got in src.versions[at], f"a valid record for {at:#x} carries another page"


def test_destination_rewound_before_the_open_installs_where_the_envelope_says(dest, stream):
    """When the destination starts hashing record Y's AAD (header checks passed, keys derived),
    the host writes back all private memory as it was at that instant for record X, and puts
    X's ciphertext in the slot: envelope, nonce and keys say X, the registers Y. Without the
    binding X's genuine record verifies and lands where the register-held pointer says (Y).
    With it, the address comes from the AAD block absorbed (Y's, loaded before the rewind),
    the rest of the AAD is X's, and the tag fails."""
    dest.restore(dest.saved)
    xr, yr = stream.epochs[0][2], stream.epochs[0][3]
    _rewind_all_at(
        dest, "_absorb", [(_cmd(P.OP_RECV, [r.ram_addr], session_id=stream.sid), {0: r.raw})
               for r in (xr, yr)],
        extra=lambda: dest.write_slot(0, xr.raw))
    got = dest.guest_page(yr.ram_addr)
    misplaced = [b for b in range(0, PAGE, 16) if got[b:b + 16] == xr.plain[b:b + 16]]
    assert not misplaced, f"{len(misplaced)} blocks of page X landed at Y"


def test_a_first_record_changed_at_the_copy_out_discards_the_destination(dest, stream):
    """The host writes noise over the scratch page's DRAM at the copy-out of the session's very
    first record (after its tag verified). The copy's hash catches it: the page is zeroed and
    the entry refused with E_CHANGED. Zeroing wrote guest memory, so the one-shot rule applies
    although nothing was installed before: the next RECV_BEGIN is refused for good."""
    dest.restore(dest.saved)
    rec = stream.epochs[0][0]
    scratch = dest.private_hpas(dest.symbol_gpa("CTX") + HelperCtx.offset("scratch"), PAGE)
    cmd = _cmd(P.OP_RECV, [rec.ram_addr], session_id=stream.sid)
    at = instructions_before_write(dest, cmd, {0: rec.raw}, dest.vm.gpa_to_hpa(rec.ram_addr))
    noise = random.Random(SEED + 7).randbytes(PAGE)

    first = (dest.symbol_gpa("CTX") + HelperCtx.offset("scratch")) % PAGE

    def scribble(*_) -> None:  # the scratch's bytes only (its pages hold other fields too)
        dest.hands.write(scratch[0] + first, noise[first:])
        if first:
            dest.hands.write(scratch[1], noise[:first])

    r = dest.batch(cmd, {0: rec.raw}, preempt=[(at, scribble)])
    assert r.status == 0 and name(r.entry_status[0]) == "E_CHANGED"
    assert dest.guest_page(rec.ram_addr) == bytes(PAGE)
    assert name(dest.command(P.OP_RECV_BEGIN, ram_size=RAM).status) == "E_DISCARDED"
