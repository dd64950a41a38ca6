"""Hostile host, session state across sessions and edge layouts (native, with the key).

What one session leaves in the helper must not change what the next one does, and each check
must hold in the layouts it guards even where the built image's layouts never reach it:

* a destination that *finished* a session is not discarded by anything after it (an ABORT in
  DONE, a next session that installs nothing and ends), while one that installed and did not
  finish is (test_session.py::test_one_shot_destination);
* envelope fields left in the private copy by a refused record (non-zero flags, another lane) are
  never sealed into the next session's records;
* a refused entry keeps its own status when the epoch is also full;
* the per-epoch tables, replayed by the host after a session finished, do not reach the next
  session (RECV_BEGIN clears them);
* a window is whole 2 MiB granules, at most ram_max;
* a window that overlaps a region's main-VM address or its mirror address is refused, each on
  its own (the `tuples` layout puts them apart; natively the test plays the driver and sets
  the region table that way).

Replay: `pytest tests/test_hostile_state.py -k <name>`.
"""

from __future__ import annotations

import ctypes
import struct

from helperfw.runtime import protocol as P
from helperfw.runtime import session as S
from tests.hostile_common import ST, Forger, finish_epoch_one, name
from tests.session_host import PAGE, NativeHelper, open_record, set_hash

KEY = bytes(range(180, 212))
SID = 0x57A7_E000_0020


def _finish_one_session(dst: NativeHelper, pages: list[int]) -> None:
    """RECV_BEGIN, the pages in one epoch, its token, RECV_FINISH: all accepted."""
    status, ch = dst.recv_begin()
    assert status == 0
    dst.session_id = SID
    f = Forger(KEY, SID, ch)
    recs = [(a, f.record(a, bytes([i]) * PAGE, epoch=1, seq=1 + i)) for i, a in enumerate(pages)]
    assert dst.recv(recs) == [0] * len(pages)
    finish_epoch_one(dst, KEY, f, pages)


def test_a_finished_destination_is_not_discarded_afterwards():
    dst = NativeHelper(KEY)
    _finish_one_session(dst, [0, PAGE, 2 * PAGE])
    assert dst.command(P.OP_ABORT)[0] == 0  # ABORT in DONE: nothing was left unfinished
    status, _ = dst.recv_begin()
    assert status == 0, name(status)
    assert dst.command(P.OP_ABORT)[0] == 0  # a session that installed nothing ends
    status, _ = dst.recv_begin()
    assert status == 0, name(status)
    assert dst.command(P.OP_ABORT)[0] == 0
    assert dst.command(P.OP_SEND_BEGIN, ram_size=dst.ram_size, challenge=9)[0] == 0


def test_refused_envelope_fields_are_never_sealed():
    """The envelope copy is reused for every record; a source session after a refused record
    (flags non-zero, another lane) seals exactly the documented envelope: flags 0, its own lane 0."""
    h = NativeHelper(KEY)
    status, ch = h.recv_begin()
    assert status == 0
    h.session_id = SID
    f = Forger(KEY, SID, ch)
    bad = f.record(PAGE, bytes(PAGE), epoch=1, seq=1, flags=0xF1A6, lane=0x5E)
    assert h.recv([(PAGE, bad)]) == [ST["E_HEADER"]]
    assert h.command(P.OP_ABORT)[0] == 0  # nothing installed: not discarded
    sid = h.send_begin(0xC4A1)
    statuses, recs = h.send([PAGE, 2 * PAGE])
    assert statuses == [0, 0]
    for rec in recs:
        env, _ = open_record(KEY, sid, 0xC4A1, rec)
        assert (env.flags, env.lane) == (0, 0)


def test_refused_entries_keep_their_status_in_a_full_epoch():
    src = NativeHelper(KEY, ram_pages=P.MAX_SLOTS)
    src.send_begin(0x5EED)
    pages = [i * PAGE for i in range(P.MAX_SLOTS)]
    for _ in range(P.EPOCH_RECORDS_MAX // P.MAX_SLOTS):
        assert src.send(pages)[0] == [0] * P.MAX_SLOTS
    st, statuses = src.command(P.OP_SEND, [(PAGE + 8, 0), (0, P.ENTRY_F_SHARED), (PAGE, 2),
                                           (PAGE, 0)])
    assert st == 0
    assert [name(s) for s in statuses] == ["E_RANGE", "E_SHARED", "E_BAD_ARG", "E_EXHAUSTED"]


def test_a_window_over_a_regions_main_or_mirror_address_is_refused():
    """One region whose main-VM address and mirror address differ (as `tuples` lays them out):
    a window over either one is refused; a window next to both is taken."""
    h = NativeHelper(KEY, ram_pages=2048)
    key = ctypes.create_string_buffer(KEY, 32)
    win = 2 << 20
    r0 = S.HelperCtx.offset("regions")

    def layout(main: int, mirror: int) -> None:
        assert h.img.call("mh_test_ctx_init", h.ctx, ctypes.addressof(key), h.mailbox, h.ram,
                          h.ram_size, h.pool, 32, main, 2 * PAGE, restype=ctypes.c_int32) == 0
        h.write(h.ctx + r0 + P.Region.offset("mirror_gpa"), struct.pack("<Q", mirror))

    far = 1 << 44
    for main, mirror in ((h.ram + PAGE, far), (far, h.ram + win - PAGE)):
        layout(main, mirror)
        for op in (P.OP_SEND_BEGIN, P.OP_RECV_BEGIN):
            st, _ = h.command(op, ram_size=win, challenge=3)
            assert name(st) == "E_BAD_ARG", (hex(main), hex(mirror), name(st))
    layout(h.ram + win, far)  # right after the window: fine
    assert h.command(P.OP_SEND_BEGIN, ram_size=win, challenge=3)[0] == 0


def test_window_sizes_are_whole_2mib_granules_within_ram_max():
    h = NativeHelper(KEY)
    two = 2 << 20
    for size in (0, 1, PAGE, two - 1, two + 1, two + PAGE, 2**63, 2**64 - two):
        st, _ = h.command(P.OP_SEND_BEGIN, ram_size=size, challenge=3)
        assert name(st) == "E_BAD_ARG", hex(size)
    assert h.command(P.OP_SEND_BEGIN, ram_size=two, challenge=3)[0] == 0


def test_replayed_epoch_tables_do_not_reach_the_next_session():
    """The host copies the seen bitmap and the install-once table while session A holds
    records in them, lets A finish, writes the copy back and begins session B: B starts with
    empty tables (RECV_BEGIN clears them) and accepts a record of the same page and seq."""
    dst = NativeHelper(KEY)
    status, ch = dst.recv_begin()
    assert status == 0
    dst.session_id = SID
    f = Forger(KEY, SID, ch)
    assert dst.recv([(PAGE, f.record(PAGE, bytes(PAGE), epoch=1, seq=1))]) == [0]
    lo = S.HelperCtx.offset("seen")
    hi = S.HelperCtx.offset("installed") + S.HelperCtx.fields["installed"].type.size
    tables = dst.read(dst.ctx + lo, hi - lo)  # the host's copy of those pages' ciphertext
    tok = f.token(epoch=1, count=1, first_seq=1, total=1,
                  set_hash=set_hash(KEY, SID, ch, [(PAGE, 1)]))
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok) == 0
    fin = f.token(epoch=1, count=0, first_seq=2, total=1, set_hash=bytes(16),
                  magic=P.FINISH_MAGIC)
    assert dst.put_token(P.OP_RECV_FINISH, fin) == 0
    dst.write(dst.ctx + lo, tables)  # ... written back
    status, ch2 = dst.recv_begin()
    assert status == 0
    f2 = Forger(KEY, SID, ch2)
    assert dst.recv([(PAGE, f2.record(PAGE, b"\x42" * PAGE, epoch=1, seq=1))]) == [0]


def test_a_context_without_the_key_begins_no_session():
    """The driver starts the mirror only once it found the key (have_key = 1), but the check in
    *_BEGIN is the last line: a context whose key flag is clear (here set so by the test, as a
    driver that failed after the mirror's set-up would leave it) refuses both BEGINs with
    E_NO_KEY, draws no session id or challenge, and stays out of any session."""
    h = NativeHelper(KEY)
    off = S.HelperCtx.offset("have_key")
    h.write(h.ctx + off, struct.pack("<I", 0))
    state_before = h.read(h.ctx + S.HelperCtx.offset("state"), 4)
    for op in (P.OP_SEND_BEGIN, P.OP_RECV_BEGIN):
        st, _ = h.command(op, ram_size=h.ram_size, challenge=0xC4A1)
        assert name(st) == "E_NO_KEY", name(st)
        assert h.read(h.ctx + S.HelperCtx.offset("state"), 4) == state_before
    st, _ = h.command(P.OP_SEND, [(0, 0)])
    assert name(st) == "E_BAD_STATE", name(st)


def test_commands_outside_the_stream_do_not_poison_a_receiving_session():
    """Only a refusal of the stream (a RECV-family command) poisons a receiving session: a
    source-side op or an unknown op in RECEIVING is refused on its own (E_BAD_STATE /
    E_BAD_OP) and the honest stream still finishes. (RECV_BEGIN is different: it ends the
    session it interrupts.)"""
    dst = NativeHelper(KEY)
    status, ch = dst.recv_begin()
    assert status == 0
    dst.session_id = SID
    f = Forger(KEY, SID, ch)
    assert dst.recv([(PAGE, f.record(PAGE, b"\x17" * PAGE, epoch=1, seq=1))]) == [0]
    for op, want in ((P.OP_SEND, "E_BAD_STATE"), (P.OP_SEND_BEGIN, "E_BAD_STATE"),
                     (P.OP_SEND_END_EPOCH, "E_BAD_STATE"), (P.OP_SEND_FINISH, "E_BAD_STATE"),
                     (P.OP_HELLO, "OK"), (0x7F, "E_BAD_OP")):
        entries = [(0, 0)] if op == P.OP_SEND else ()
        st, _ = dst.command(op, entries, ram_size=dst.ram_size, challenge=5)
        assert name(st) == want, (op, name(st))
    tok = f.token(epoch=1, count=1, first_seq=1, total=1,
                  set_hash=set_hash(KEY, SID, ch, [(PAGE, 1)]))
    assert dst.put_token(P.OP_RECV_END_EPOCH, tok) == 0
    fin = f.token(epoch=1, count=0, first_seq=2, total=1, set_hash=bytes(16),
                  magic=P.FINISH_MAGIC)
    assert name(dst.put_token(P.OP_RECV_FINISH, fin)) == "OK"
