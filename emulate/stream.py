"""The migration stream: what the source host sends the destination host, as framed records.

A stream is the 8-byte header `"MHMS" u16 version u16 flags`, then records, each
`u8 kind ‖ u32 length ‖ body` (little-endian), body layouts below (construct). It ends with an
END record carrying totals and the CRC-32 of every byte before it. Readers skip nothing: an
unknown kind is an error.

Record kinds and why each exists:

| kind | body | purpose |
|---|---|---|
| SESSION | session id, challenge, option, C-bit, RAM window size, RAM blocks, helper ranges | the destination binds its helper session (opened by RECV_BEGIN, whose challenge the source bound) and checks the RAM layout matches |
| SHARED_LIST | (ram_addr, length) runs | the shared-region list (by ram_addr): the destination host adopts it |
| ROUND | round number, pages in it | progress marker (pre-copy rounds, then stop-and-copy) |
| SHARED_PAGES | (ram_addr, 4096 raw bytes) × n | shared pages travel as the host reads them |
| PRIVATE_PAGES | (ram_addr, 64-byte envelope + 4096-byte ciphertext) × n | one helper batch of sealed records (docs/PROTOCOL.md) |
| EPOCH_TOKEN | 80 bytes | SEND_END_EPOCH's token, fed to RECV_END_EPOCH |
| FINISH | 80 bytes | SEND_FINISH's token, fed to RECV_FINISH |
| CPU_STATE | guest vCPU registers | device state, so the destination resumes the guest (not under SEV-ES: the host cannot read them) |
| VCPU_PARKED | the AP jump table GPA the guest registered | SEV-ES: the guest parked its vCPU (its state is in private pages); the destination host starts the vCPU at that jump table |
| END | record/page totals, CRC-32 | truncation or corruption of the stream is detected |

Private pages are authenticated by the helpers (anything changed is refused); the CRC only
protects the host-visible parts (shared pages, lists) against transport damage.
"""

from __future__ import annotations

import ipaddress
import socket
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from construct import (
    Bytes,
    Const,
    ConstructError,
    Default,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    PascalString,
    PrefixedArray,
    Struct,
)

from helperfw.runtime import protocol as P

STREAM_MAGIC = b"MHMS"
STREAM_VERSION = 3  # v2 records, challenge in SESSION; 3: lanes (records and tokens tagged)
PAGE = P.PAGE_SIZE
RECORD_SIZE = P.SLOT_SIZE  # envelope + ciphertext
TOKEN_SIZE = P.EpochToken.size

Header = Struct("magic" / Const(STREAM_MAGIC), "version" / Int16ul, "flags" / Int16ul)
Frame = Struct("kind" / Int8ul, "length" / Int32ul)

SESSION, SHARED_LIST, ROUND, SHARED_PAGES, PRIVATE_PAGES, EPOCH_TOKEN, FINISH, CPU_STATE, END = (
    range(1, 10))
VCPU_PARKED = 10
KIND_NAMES = {SESSION: "SESSION", SHARED_LIST: "SHARED_LIST", ROUND: "ROUND",
              SHARED_PAGES: "SHARED_PAGES", PRIVATE_PAGES: "PRIVATE_PAGES",
              EPOCH_TOKEN: "EPOCH_TOKEN", FINISH: "FINISH", CPU_STATE: "CPU_STATE", END: "END",
              VCPU_PARKED: "VCPU_PARKED"}

Range = Struct("ram_addr" / Int64ul, "length" / Int64ul)
Block = Struct("name" / PascalString(Int8ul, "utf8"), "offset" / Int64ul, "size" / Int64ul)
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15", "rip", "rflags", "cr3")

BODIES = {
    SESSION: Struct(
        "session_id" / Int64ul, "challenge" / Int64ul, "option" / Int32ul, "c_bit" / Int32ul,
        "ram_size" / Int64ul,
        "page_size" / Int32ul, "protocol" / Int32ul,
        "lanes" / Default(Int8ul, 1),  # the session's lanes (docs/PROTOCOL.md, "Lanes")
        "blocks" / PrefixedArray(Int8ul, Block),
        "helper_ranges" / PrefixedArray(Int16ul, Range),
    ),
    SHARED_LIST: Struct("ranges" / PrefixedArray(Int32ul, Range)),
    ROUND: Struct("round" / Int32ul, "pages" / Int64ul, "final" / Int8ul),
    SHARED_PAGES: Struct("pages" / PrefixedArray(Int16ul, Struct(
        "ram_addr" / Int64ul, "data" / Bytes(PAGE)))),
    PRIVATE_PAGES: Struct("lane" / Default(Int8ul, 0), "pages" / PrefixedArray(Int16ul, Struct(
        "ram_addr" / Int64ul, "record" / Bytes(RECORD_SIZE)))),
    EPOCH_TOKEN: Struct("lane" / Default(Int8ul, 0), "token" / Bytes(TOKEN_SIZE)),
    FINISH: Struct("lane" / Default(Int8ul, 0), "token" / Bytes(TOKEN_SIZE)),  # lane 0's last
    CPU_STATE: Struct(*(name / Int64ul for name in GPRS)),
    VCPU_PARKED: Struct("ap_jump_table" / Int64ul),
    END: Struct("records" / Int64ul, "private_pages" / Int64ul, "shared_pages" / Int64ul,
                "epochs" / Int32ul, "crc32" / Int32ul),
}


class StreamError(ValueError):
    """The stream is malformed, truncated, or its END totals/CRC do not match."""


@dataclass
class Record:
    kind: int
    body: object  # construct Container

    @property
    def name(self) -> str:
        return KIND_NAMES.get(self.kind, str(self.kind))


class StreamWriter:
    """Frames records onto a binary file-like object (file, socket file, BytesIO)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.bytes = 0
        self.records = 0
        self.private_pages = 0
        self.shared_pages = 0
        self.epochs = 0
        self._crc = 0
        self._put(Header.build({"version": STREAM_VERSION, "flags": 0}))

    def _put(self, data: bytes) -> None:
        self.out.write(data)
        self._crc = zlib.crc32(data, self._crc)
        self.bytes += len(data)

    def write(self, kind: int, **fields: object) -> None:
        body = BODIES[kind].build(fields)
        self._put(Frame.build({"kind": kind, "length": len(body)}) + body)
        self.records += 1

    # typed helpers -----------------------------------------------------------------------------
    def put_private(self, ram_addrs: list[int], records: list[bytes], lane: int = 0) -> None:
        self.write(PRIVATE_PAGES, lane=lane, pages=[
            {"ram_addr": a, "record": r} for a, r in zip(ram_addrs, records, strict=True)])
        self.private_pages += len(records)

    def put_shared(self, pages: list[tuple[int, bytes]]) -> None:
        self.write(SHARED_PAGES, pages=[{"ram_addr": a, "data": d} for a, d in pages])
        self.shared_pages += len(pages)

    def put_epoch_token(self, token: bytes, lane: int = 0) -> None:
        self.write(EPOCH_TOKEN, lane=lane, token=token)
        self.epochs += 1

    def end(self) -> None:
        """The END record (its CRC covers everything before it); flushes the output."""
        body = {"records": self.records + 1, "private_pages": self.private_pages,
                "shared_pages": self.shared_pages, "epochs": self.epochs, "crc32": self._crc}
        self.write(END, **body)
        self.out.flush()


def _read_exact(inp: BinaryIO, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = inp.read(n - len(buf))
        if not chunk:
            raise StreamError(f"stream truncated ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


def read_stream(inp: BinaryIO) -> Iterator[Record]:
    """Yield records up to and including END, checking the header, framing, totals and CRC.
    Nothing after END is read: the stream ends there (a socket may stay open after it)."""
    crc = 0
    head = _read_exact(inp, Header.sizeof())
    try:
        h = Header.parse(head)
    except ConstructError as e:
        raise StreamError(f"not a migration stream: {e}") from None
    if h.version != STREAM_VERSION:
        raise StreamError(f"stream version {h.version}, expected {STREAM_VERSION}")
    crc = zlib.crc32(head, crc)
    records = private = shared = epochs = 0
    while True:
        fh = _read_exact(inp, Frame.sizeof())
        f = Frame.parse(fh)
        if f.kind not in BODIES:
            raise StreamError(f"unknown record kind {f.kind}")
        raw = _read_exact(inp, f.length)
        try:
            body = BODIES[f.kind].parse(raw)
        except ConstructError as e:
            raise StreamError(f"malformed {KIND_NAMES[f.kind]} record: {e}") from None
        records += 1
        if f.kind == END:
            want = (records, private, shared, epochs, crc)
            got = (body.records, body.private_pages, body.shared_pages, body.epochs, body.crc32)
            if want != got:
                raise StreamError(f"END totals/CRC mismatch: stream has {want}, END says {got}")
            yield Record(f.kind, body)
            return
        crc = zlib.crc32(raw, zlib.crc32(fh, crc))
        if f.kind == PRIVATE_PAGES:
            private += len(body.pages)
        elif f.kind == SHARED_PAGES:
            shared += len(body.pages)
        elif f.kind == EPOCH_TOKEN:
            epochs += 1
        yield Record(f.kind, body)


# -- transports --------------------------------------------------------------------------------
def check_loopback(host: str) -> str:
    """Only loopback addresses: the demo never sends guest memory off this machine."""
    addr = socket.gethostbyname(host)
    if not ipaddress.ip_address(addr).is_loopback:
        raise ValueError(f"{host} ({addr}) is not a loopback address")
    return addr


class Listener:
    """The destination's incoming socket (TCP on loopback). `accept()` returns a reader."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.create_server((check_loopback(host), port))
        self.address = self.sock.getsockname()[:2]

    def accept(self, timeout: float = 60.0) -> tuple[socket.socket, BinaryIO]:
        self.sock.settimeout(timeout)
        conn, _ = self.sock.accept()
        conn.settimeout(timeout)
        return conn, conn.makefile("rb", buffering=1 << 20)

    def close(self) -> None:
        self.sock.close()


def connect(address: tuple[str, int], timeout: float = 60.0) -> tuple[socket.socket, BinaryIO]:
    """The source's side: a buffered binary writer on a loopback TCP connection."""
    host, port = address
    sock = socket.create_connection((check_loopback(host), port), timeout=timeout)
    return sock, sock.makefile("wb", buffering=1 << 20)
