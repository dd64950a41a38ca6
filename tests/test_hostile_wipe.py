"""Secrets are gone when a session ends.

When a session ends (RECV_FINISH / SEND_FINISH, ABORT, or a new RECV_BEGIN that discards a
poisoned destination), nothing derived from the transport key for it stays in the helper's
private memory: no K_1, K_s or K_a (as key or as key schedule), no record keys, no plaintext of
the pages it moved. While a session lives, its K_s and K_a stay (they are needed), but each
batch wipes the last record's keys and the plaintext scratch. The transport key K itself stays:
it is needed for the next session.

Secrets are recomputed outside the helper (tests/hostile_secrets.py) and searched for in every
16-byte window of the helper's private memory: natively the context, in the emulator the
whole data region the running helper uses (context, stack, page-table pool, statics; for
`isolated` its mirror-only copy), on all three options.

The dead part of the stack is checked separately (vcpu.park wipes it before every HLT). A poisoned session does not end by itself (RECV_FINISH can never succeed, but the host may go on
feeding it); it ends with ABORT or the next RECV_BEGIN, which then returns E_DISCARDED if it had
installed pages. A fault inside a batch ends the session in the helper's own exception handler
(vcpu.mh_fault): tested with a page-table rewind that makes the RAM window fault.

Replay: `pytest tests/test_hostile_wipe.py -k <path>`; seeds fixed.
"""

from __future__ import annotations

import random

import pytest

from helperfw.runtime import protocol as P
from helperfw.runtime import session as S
from helperfw.runtime.gcmsiv import SivKeys
from tests.hostile_common import ST, Forger, name
from tests.hostile_secrets import SessionSecrets
from tests.mirror_host import KEY, PAGE, RAM, MirrorHost, pack_command
from tests.session_host import NativeHelper, sealed_pair

SEED = 7017
OPTIONS = [P.OPT_SHIFT, P.OPT_TUPLES, P.OPT_ISOLATED]
SID = 0x3A1F_0000_0000_0017
PATHS = ["send-finish", "send-abort", "recv-finish", "recv-abort", "recv-poisoned-abort",
         "recv-poisoned-discarded"]


class SecretsLeft(AssertionError):
    """Secrets of an ended session were found in the helper's private memory."""


def _check(found: dict[int, str], where) -> None:
    if found:
        shown = ", ".join(f"{n} at {where(o)}" for o, n in sorted(found.items())[:6])
        raise SecretsLeft(f"{len(found)} secret blocks left: {shown}")


def _ctx_field(off: int) -> str:
    fields = sorted((S.HelperCtx.offset(n), n) for n in S.HelperCtx.fields)
    base, n = max((f for f in fields if f[0] <= off), default=(0, "?"))
    return f"HelperCtx.{n}+{off - base:#x}"


# -- natively: the session code itself ------------------------------------------------------------
def _sealed(n: int, rng: random.Random):
    """Native source and destination in one session; the source sealed n random pages in epoch
    1. Returns (src, dst, the session's secrets, the pages, their records)."""
    src, dst, sid, ch, addrs, recs = sealed_pair(KEY, n, rng)
    sec = SessionSecrets(KEY, sid, ch)
    for i, a in enumerate(addrs):
        sec.add_record(1, P.FIRST_SEQ + i)
        sec.add_plaintext(f"page {a:#x}", src.page(a))
    return src, dst, sec, addrs, recs


def _native_session(path: str, rng: random.Random):
    """Run `path` on native helpers; return (the helper whose session ended, its secrets)."""
    src, dst, sec, addrs, recs = _sealed(6, rng)
    if path.startswith("send"):
        if path == "send-finish":
            assert src.token(P.OP_SEND_END_EPOCH)[0] == 0
            assert src.token(P.OP_SEND_FINISH)[0] == 0
        else:
            assert src.command(P.OP_ABORT)[0] == 0
        return src, sec
    ok, tok = src.token(P.OP_SEND_END_EPOCH)
    assert ok == 0
    assert dst.recv(list(zip(addrs, recs, strict=True))) == [0] * len(addrs)
    if path == "recv-finish":
        assert dst.put_token(P.OP_RECV_END_EPOCH, tok) == 0
        assert dst.put_token(P.OP_RECV_FINISH, src.token(P.OP_SEND_FINISH)[1]) == 0
        return dst, sec
    if path.startswith("recv-poisoned"):
        bad = bytearray(recs[0])
        bad[100] ^= 1
        assert dst.recv([(addrs[0], bytes(bad))]) == [ST["E_REPLAY"]]  # poisons
        _live(dst, sec)
    if path == "recv-poisoned-discarded":
        assert dst.recv_begin()[0] == ST["E_DISCARDED"]
    else:
        assert dst.command(P.OP_ABORT)[0] == 0
    return dst, sec


def _live(h: NativeHelper, sec: SessionSecrets) -> None:
    """A live session keeps K_s and K_a (as key schedules) and nothing else of its secrets."""
    left = set(sec.find(h.read(h.ctx, S.HelperCtx.size)).values())
    assert left and all(n.startswith(("K_s", "K_a")) for n in left), sorted(left)[:4]


def _scratch(h: NativeHelper) -> bytes:
    return h.read(h.ctx + S.HelperCtx.offset("scratch"), PAGE)


def test_native_each_batch_wipes_its_record_keys_and_plaintext():
    """Between batches of a live session: no record key, no page plaintext, on either side, and
    the scratch page (the last page, masked) is zero."""
    rng = random.Random(SEED + 1)
    src, dst, sec, addrs, recs = _sealed(4, rng)
    _live(src, sec)
    assert _scratch(src) == bytes(PAGE)
    assert dst.recv(list(zip(addrs, recs, strict=True))) == [0] * len(addrs)
    _live(dst, sec)
    assert _scratch(dst) == bytes(PAGE)


@pytest.mark.parametrize("side", ["send", "recv"])
def test_native_session_end_wipes_a_written_back_scratch(side):
    """The host writes an older scratch page back between batches (memory replay): the
    session's end wipes it again rather than trusting each batch to have left it zero."""
    src, dst, _sec, addrs, recs = _sealed(2, random.Random(SEED + 2))
    h = src
    if side == "recv":
        assert dst.recv(list(zip(addrs, recs, strict=True))) == [0, 0]
        h = dst
    h.write(h.ctx + S.HelperCtx.offset("scratch"), random.Random(SEED).randbytes(PAGE))
    assert h.command(P.OP_ABORT)[0] == 0
    assert _scratch(h) == bytes(PAGE)


@pytest.mark.parametrize("path", PATHS)
def test_native_session_secrets_are_wiped(path):
    h, sec = _native_session(path, random.Random(SEED))
    ctx = h.read(h.ctx, S.HelperCtx.size)
    assert ctx[S.HelperCtx.offset("key"):][:32] == KEY  # K stays for the next session
    _check(sec.find(ctx), _ctx_field)


# -- in the mirror VM: the built image, its whole data region ----------------------------------
@pytest.fixture(scope="module", params=OPTIONS, ids=lambda o: P.OPTION_NAMES[o])
def booted(request):
    h = MirrorHost(47, request.param, seed=SEED + request.param)
    return h, h.save()


def private_memory(h: MirrorHost, part: str = "all") -> tuple[int, bytes]:
    """(mirror GPA, plaintext) of the data region as the running helper sees it; `part`:
    "stack" keeps only the stack, "state" everything but the stack (zeros instead)."""
    data = h.region(P.REGION_DATA)
    mem = bytearray(h.mirror.read(data.mirror_gpa, data.length, encrypted=True))
    lo = h.symbol_gpa("STACK") - data.main_gpa
    hi = lo + S.STACK_SIZE
    if part == "state":
        mem[lo:hi] = bytes(hi - lo)
    elif part == "stack":
        mem[:lo] = bytes(lo)
        mem[hi:] = bytes(len(mem) - hi)
    return data.mirror_gpa, bytes(mem)


def _where(h: MirrorHost, base: int):
    data = h.region(P.REGION_DATA)
    syms = {s: h.symbol_gpa(s) - data.main_gpa for s in ("CTX", "STACK", "PT_POOL")}
    sizes = {"CTX": S.HelperCtx.size, "STACK": S.STACK_SIZE, "PT_POOL": 32 * PAGE}

    def where(off: int) -> str:
        for s, o in syms.items():
            if o <= off < o + sizes[s]:
                return _ctx_field(off - o) if s == "CTX" else f"{s}+{off - o:#x}"
        return f"data+{off:#x}"
    return where


def _emu_session(h: MirrorHost, path: str, rng: random.Random) -> SessionSecrets:
    """Run `path` on the emulated helper (as source or destination; the other side is the
    test, which holds the key)."""
    pages = [0x400000 + i * PAGE for i in range(6)]
    plains = {a: rng.randbytes(PAGE) for a in pages}
    if path.startswith("send"):
        ch = 0xC4A1_1E06_0000_0017
        assert h.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=ch).status == 0
        sid = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size)).session_id
        sec = SessionSecrets(KEY, sid, ch)
        for a, d in plains.items():
            h.set_guest_page(a, d)
        assert h.command(P.OP_SEND, [(a, 0) for a in pages]).entry_status == [0] * len(pages)
        if path == "send-finish":
            assert h.command(P.OP_SEND_END_EPOCH).status == 0
            assert h.command(P.OP_SEND_FINISH).status == 0
        else:
            assert h.command(P.OP_ABORT).status == 0
    else:
        assert h.command(P.OP_RECV_BEGIN, ram_size=RAM).status == 0
        ch = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size)).challenge
        f = Forger(KEY, SID, ch)
        sec = SessionSecrets(KEY, SID, ch)
        recs = {i: f.record(a, plains[a], epoch=1, seq=P.FIRST_SEQ + i)
                for i, a in enumerate(pages)}
        r = h.command(P.OP_RECV, [(a, 0) for a in pages], session_id=SID, slots=recs)
        assert r.entry_status == [0] * len(pages), [name(s) for s in r.entry_status]
        if path == "recv-finish":
            tok = f.token(epoch=1, count=len(pages), first_seq=1, total=len(pages),
                          set_hash=_set_hash(f, pages))
            assert h.command(P.OP_RECV_END_EPOCH, session_id=SID, slots={0: tok}).status == 0
            fin = f.token(epoch=1, count=0, first_seq=1 + len(pages), total=len(pages),
                          set_hash=bytes(16), magic=P.FINISH_MAGIC)
            assert h.command(P.OP_RECV_FINISH, session_id=SID, slots={0: fin}).status == 0
        elif path == "recv-abort":
            assert h.command(P.OP_ABORT).status == 0
        else:
            bad = f.record(pages[0], plains[pages[0]], epoch=1, seq=99, lane=1)
            r = h.command(P.OP_RECV, [(pages[0], 0)], session_id=SID, slots={0: bad})
            assert r.entry_status == [ST["E_HEADER"]]  # poisoned, pages installed: discarded
            if path == "recv-poisoned-discarded":
                assert h.command(P.OP_RECV_BEGIN, ram_size=RAM).status == ST["E_DISCARDED"]
            else:
                assert h.command(P.OP_ABORT).status == 0
    for i, a in enumerate(pages):
        sec.add_record(1, P.FIRST_SEQ + i)
        sec.add_plaintext(f"page {a:#x}", plains[a])
    return sec


def _set_hash(f: Forger, pages: list[int]) -> bytes:
    from tests.session_host import set_hash

    return set_hash(KEY, f.sid, f.challenge, [(a, P.FIRST_SEQ + i) for i, a in enumerate(pages)])


@pytest.mark.parametrize("path", PATHS)
def test_session_secrets_are_wiped(booted, path):
    """The context, the page-table pool and every static: no secret of the ended session."""
    h, saved = booted
    h.restore(saved)
    sec = _emu_session(h, path, random.Random(SEED))
    base, mem = private_memory(h, "state")
    _check(sec.find(mem), _where(h, base))


@pytest.mark.parametrize("path", PATHS)
def test_session_secrets_are_wiped_from_the_stack(booted, path):
    """The stack below the run loop's frame is dead between batches: no secret there either
    (vcpu.park wipes it before HLT; without that it kept K_1's key schedule, spilled by the key
    expansion, the last record's H and the last bytes of the last page)."""
    h, saved = booted
    h.restore(saved)
    sec = _emu_session(h, path, random.Random(SEED))
    base, mem = private_memory(h, "stack")
    _check(sec.find(mem), _where(h, base))


# -- a fault inside a batch (vcpu.mh_fault ends the session) ------------------------------------
def test_session_secrets_are_wiped_after_a_fault():
    """The host rewinds the helper's page tables to before the RAM window was mapped while a
    RECV batch runs (memory replay, possible on SEV and SEV-ES): the next access to the window
    faults. The helper's own handler (vcpu.mh_fault) completes the batch with E_FAULT and ends
    the session: its secrets must be gone from the helper's private memory."""
    h = MirrorHost(47, P.OPT_TUPLES, seed=SEED + 9)
    pool = h.symbol_hpas("PT_POOL")
    before = h.hands.snapshot(pool)  # the tables without the window
    assert h.command(P.OP_RECV_BEGIN, ram_size=RAM).status == 0
    ch = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size)).challenge
    f, sec = Forger(KEY, SID, ch), SessionSecrets(KEY, SID, ch)
    a = 0x400000
    plain = random.Random(SEED).randbytes(PAGE)
    sec.add_record(1, 1)
    sec.add_plaintext("page", plain)

    def rewind(vcpu, _n):
        h.hands.restore(before)
        vcpu.flush_tlb()  # the host changed the tables' DRAM: the CPU re-walks them

    cmd = pack_command(P.OP_RECV, [(a, 0)], session_id=SID)
    r = h.batch(cmd, {0: f.record(a, plain, epoch=1, seq=1)}, preempt=[(2000, rewind)])
    assert r.status == ST["E_FAULT"], (r.status, str(r.exit))
    base, mem = private_memory(h, "state")
    _check(sec.find(mem), _where(h, base))


# -- what the host can put back: private pages replayed, then the session ends ------------------
def _instructions(h: MirrorHost, cmd: bytes, slots: dict[int, bytes]) -> int:
    """Instructions the helper runs for this batch before it wipes its dead stack (measured on
    a copy of the machine): the wipe's `rep stos` is the batch's only instruction that unicorn
    steps through at one address, and its iterations would outnumber the record's work."""
    from unicorn import UC_HOOK_CODE

    saved = h.save()
    n, last, wiping = [0], [-1], [False]

    def count(_uc, address, _size, _data) -> None:
        wiping[0] = wiping[0] or address == last[0]
        last[0] = address
        if not wiping[0]:
            n[0] += 1

    hook = h.vcpu.uc.hook_add(UC_HOOK_CODE, count)
    try:
        assert h.batch(cmd, slots).exit.reason == "hlt"
    finally:
        h.vcpu.uc.hook_del(hook)
        h.restore(saved)
    return n[0]


def test_replayed_record_keys_and_scratch_are_wiped_when_the_session_ends():
    """The host copies the context pages holding the record keys and the plaintext scratch
    halfway through a RECV batch (while a record is being decrypted) and writes them back after
    the batch: the session's end (ABORT) must wipe them again, not rely on each batch having
    done so."""
    h = MirrorHost(47, P.OPT_TUPLES, seed=SEED + 5)
    assert h.command(P.OP_RECV_BEGIN, ram_size=RAM).status == 0
    ch = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size)).challenge
    f, sec = Forger(KEY, SID, ch), SessionSecrets(KEY, SID, ch)
    a, plain = 0x400000, random.Random(SEED).randbytes(PAGE)
    sec.add_record(1, 1)
    sec.add_plaintext("page", plain)
    ctx = h.symbol_gpa("CTX")
    pages = sorted(set(h.private_hpas(ctx + S.HelperCtx.offset("rec"), SivKeys.size)
                       + h.private_hpas(ctx + S.HelperCtx.offset("scratch"), PAGE)))
    cmd = pack_command(P.OP_RECV, [(a, 0)], session_id=SID)
    slots = {0: f.record(a, plain, epoch=1, seq=1)}
    snap = []
    r = h.batch(cmd, slots, preempt=[(_instructions(h, cmd, slots) // 2,
                                      lambda *_: snap.append(h.hands.snapshot(pages)))])
    assert r.entry_status == [0] and snap
    h.hands.restore(snap[0])
    found = set(sec.find(private_memory(h, "state")[1]).values())
    # (the scratch holds the page masked with a register-held key, gcmsiv: its plaintext does
    # not come back with it, the record's keys do)
    assert any(n.startswith("record key") for n in found), "the replay must bring secrets back"
    assert h.command(P.OP_ABORT).status == 0
    base, mem = private_memory(h, "state")
    _check(sec.find(mem), _where(h, base))
