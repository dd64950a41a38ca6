"""The migration stream format (emulate.stream): framing, every record kind round-trips, the END
record's totals and CRC catch truncation and corruption, private records are real protocol-v2
envelopes an outside AES-GCM-SIV opens, and the loopback socket transport."""

from __future__ import annotations

import functools
import io
import random
import threading

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from emulate import stream as S
from helperfw.runtime import protocol as P
from tests.session_host import PAGE, NativeHelper, open_record

SEED = 60601
KEY = bytes(range(0x20, 0x40))
CHALLENGE = 0xC4A1_1E46_E000_0001  # what the destination's RECV_BEGIN would have drawn


def sample_stream(rng: random.Random) -> tuple[bytes, dict]:
    """A stream with every record kind; private records sealed by the (native) helper."""
    src = NativeHelper(KEY, ram_pages=16)
    pages = {a * PAGE: rng.randbytes(PAGE) for a in range(6)}
    for a, d in pages.items():
        src.set_page(a, d)
    sid = src.send_begin(CHALLENGE)
    statuses, records = src.send(sorted(pages))
    assert statuses == [0] * len(pages)
    st, token = src.token(P.OP_SEND_END_EPOCH)
    assert st == 0
    st, fin = src.token(P.OP_SEND_FINISH)
    assert st == 0
    shared = [(0x10000 + i * PAGE, rng.randbytes(PAGE)) for i in range(3)]
    cpu = {r: rng.getrandbits(64) for r in S.GPRS}
    buf = io.BytesIO()
    w = S.StreamWriter(buf)
    w.write(S.SESSION, session_id=sid, challenge=CHALLENGE, option=P.OPT_TUPLES, c_bit=51,
            ram_size=2 << 20, page_size=PAGE, protocol=P.PROTOCOL_VERSION.value,
            blocks=[{"name": "pc.ram", "offset": 0, "size": 1 << 20},
                    {"name": "virtio-mem0", "offset": 1 << 20, "size": 1 << 20}],
            helper_ranges=[{"ram_addr": 0xF0000, "length": 0x4000}])
    w.write(S.SHARED_LIST, ranges=[{"ram_addr": 0x10000, "length": 3 * PAGE}])
    w.write(S.ROUND, round=1, pages=9, final=0)
    w.put_shared(shared)
    w.put_private(sorted(pages), records)
    w.put_epoch_token(token)
    w.write(S.CPU_STATE, **cpu)
    w.write(S.FINISH, token=fin)
    w.end()
    return buf.getvalue(), {"sid": sid, "pages": pages, "shared": shared, "cpu": cpu,
                            "token": token, "fin": fin, "writer": w}


@functools.cache
def valid_stream() -> bytes:
    """One valid stream, made once (sealing needs the native helper)."""
    return sample_stream(random.Random(SEED))[0]


def read_all(raw: bytes) -> list[S.Record]:
    return list(S.read_stream(io.BytesIO(raw)))


FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.data())
def test_any_change_to_a_valid_stream_is_refused(data):
    """Flipping any bits of any byte, cutting the stream anywhere or inserting bytes anywhere:
    the reader refuses with StreamError (header, framing, END totals or CRC), never accepts,
    never fails another way. An insertion that leaves the whole valid stream in front (bytes
    equal to END's last ones, inserted just before them) only appends to it: the reader stops
    at END by design (the transport ends there), so such a case is not a change of the stream."""
    orig = valid_stream()
    raw = bytearray(orig)
    kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[at] ^= data.draw(st.integers(1, 255))
    elif kind == "cut":
        del raw[at:]
    else:
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        assume(not raw.startswith(orig))
    with pytest.raises(S.StreamError):
        read_all(bytes(raw))


@FUZZ
@given(st.binary(max_size=256), st.integers(0, 0xFFFF))
def test_arbitrary_bytes_after_a_header_are_refused_cleanly(tail, version):
    """Whatever follows the magic, the reader ends in StreamError, without a construct or
    struct error and without trying to allocate what a length field claims."""
    raw = S.Header.build({"version": version, "flags": 0}) + tail
    with pytest.raises(S.StreamError):
        read_all(raw)


def test_every_record_round_trips_and_private_records_open_outside():
    print("seed", SEED)
    raw, want = sample_stream(random.Random(SEED))
    assert raw[:4] == S.STREAM_MAGIC
    recs = list(S.read_stream(io.BytesIO(raw)))
    assert [r.name for r in recs] == ["SESSION", "SHARED_LIST", "ROUND", "SHARED_PAGES",
                                      "PRIVATE_PAGES", "EPOCH_TOKEN", "CPU_STATE", "FINISH",
                                      "END"]
    sess = recs[0].body
    assert (sess.session_id, sess.challenge, sess.option, sess.c_bit, sess.page_size) == (
        want["sid"], CHALLENGE, P.OPT_TUPLES, 51, PAGE)
    assert [(b.name, b.offset, b.size) for b in sess.blocks] == [
        ("pc.ram", 0, 1 << 20), ("virtio-mem0", 1 << 20, 1 << 20)]
    assert [(p.ram_addr, p.data) for p in recs[3].body.pages] == want["shared"]
    for p in recs[4].body.pages:
        env, plain = open_record(KEY, want["sid"], CHALLENGE, p.record)  # outside AES-GCM-SIV
        assert env.ram_addr == p.ram_addr and plain == want["pages"][p.ram_addr]
        assert plain not in p.record  # only ciphertext on the wire
    assert recs[5].body.token == want["token"] and recs[7].body.token == want["fin"]
    assert {r: recs[6].body[r] for r in S.GPRS} == want["cpu"]
    end = recs[-1].body
    w = want["writer"]
    assert (end.records, end.private_pages, end.shared_pages, end.epochs) == (9, 6, 3, 1)
    assert w.bytes == len(raw)


@pytest.mark.parametrize("where", ["shared page", "private record", "session"])
def test_corruption_is_caught_by_the_end_crc(where):
    print("seed", SEED)
    raw, _ = sample_stream(random.Random(SEED))
    b = bytearray(raw)
    marker = {"shared page": 3, "private record": 4, "session": 0}[where]
    off = _record_offset(raw, marker) + 5 + 40  # inside the record's body
    b[off] ^= 0x01
    with pytest.raises(S.StreamError, match="CRC|malformed"):
        list(S.read_stream(io.BytesIO(bytes(b))))


def _record_offset(raw: bytes, index: int) -> int:
    off = S.Header.sizeof()
    for _ in range(index):
        f = S.Frame.parse(raw[off : off + 5])
        off += 5 + f.length
    return off


def test_truncation_bad_header_and_unknown_kind_are_refused():
    raw, _ = sample_stream(random.Random(SEED))
    for cut in (3, S.Header.sizeof() + 2, len(raw) // 2, len(raw) - 1):
        with pytest.raises(S.StreamError, match="truncated"):
            list(S.read_stream(io.BytesIO(raw[:cut])))
    with pytest.raises(S.StreamError, match="not a migration stream"):
        list(S.read_stream(io.BytesIO(b"XXXX" + raw[4:])))
    bad = bytearray(raw)
    bad[S.Header.sizeof()] = 0x7F
    with pytest.raises(S.StreamError, match="unknown record kind 127"):
        list(S.read_stream(io.BytesIO(bytes(bad))))
    # a dropped record: the END totals no longer match
    start, nxt = _record_offset(raw, 3), _record_offset(raw, 4)
    with pytest.raises(S.StreamError, match="END totals"):
        list(S.read_stream(io.BytesIO(raw[:start] + raw[nxt:])))


def test_loopback_socket_transport():
    raw, _ = sample_stream(random.Random(SEED))
    lst = S.Listener("127.0.0.1", 0)
    got: list[S.Record] = []

    def receive() -> None:
        conn, rf = lst.accept(timeout=30)
        with conn, rf:
            got.extend(S.read_stream(rf))

    t = threading.Thread(target=receive)
    t.start()
    sock, wf = S.connect(lst.address)
    with sock, wf:
        wf.write(raw)
    t.join(30)
    lst.close()
    assert [r.name for r in got][-1] == "END" and len(got) == 9


def test_only_loopback_addresses():
    assert S.check_loopback("127.0.0.1") == "127.0.0.1"
    assert S.check_loopback("localhost").startswith("127.")
    with pytest.raises(ValueError, match="not a loopback"):
        S.check_loopback("192.0.2.1")  # TEST-NET-1: refused before any packet is sent


def test_the_destination_has_a_handler_for_every_record_kind():
    from emulate.migration import Destination

    assert set(Destination._RECEIVERS) == set(S.BODIES)
