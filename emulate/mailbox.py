"""The host's side of the mailbox (docs/PROTOCOL.md): one batch per doorbell, one VM exit.

The host writes `Command` into mailbox page 1 (and, for RECV or a token, the records into the
data slots), bumps `Control.doorbell`, runs the mirror vCPU until it executes HLT, and reads
`Control` and the per-entry status back. All mailbox accesses are raw DRAM accesses of shared
pages: nothing here can see or touch private memory.

Layouts come from helperfw.runtime.protocol; the command header and entries are packed with
`struct` at the offsets the DSL structs declare (checked at import) because this is the host's
per-batch hot path.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from dataclasses import dataclass

from unicorn import UcError

from emulate.host import Mirror
from emulate.machine import VCpu
from emulate.memctl import MemoryController
from helperfw.runtime import protocol as P

PAGE = P.PAGE_SIZE
SLOT = P.SLOT_SIZE
STATUS_NAMES = {v: k for k, (v, _doc) in P.STATUS.items()}
# A batch must complete within this wall-clock time. Why not an instruction budget: unicorn
# counts instructions with a per-instruction hook, which made the helper's AES code ~5x slower;
# a watchdog thread calling emu_stop costs nothing while the helper runs.
BATCH_TIMEOUT_S = 60.0

_HDR = struct.Struct("<IIQIIQQ")  # op, count, session_id, epoch, version, ram_size, challenge
_ENTRY = struct.Struct("<QIi")
assert _HDR.size == P.Command.offset("entries") and _ENTRY.size == P.Entry.size
assert (P.Command.offset("session_id"), P.Command.offset("ram_size"),
        P.Command.offset("challenge")) == (8, 24, 32)
_CTL = struct.Struct("<QQiIII")
assert _CTL.size == P.Control.size


def status_name(st: int) -> str:
    return STATUS_NAMES.get(st, str(st))


class MailboxError(RuntimeError):
    """The helper refused a batch or did not complete it (fault, hang, no completion)."""

    def __init__(self, msg: str, status: int | None = None) -> None:
        super().__init__(msg)
        self.status = status


@dataclass
class BatchResult:
    status: int
    entry_status: list[int]
    processed: int


class HelperChannel:
    """Drives one helper's mailbox. Counts exits (every batch is exactly one HLT exit)."""

    def __init__(self, mc: MemoryController, mirror: Mirror, *, lane: int = 0,
                 vcpu: VCpu | None = None, mailbox_hpa: int | None = None) -> None:
        """Lane 0 by default; another lane (emulate/lanes.py) brings its vCPU and mailbox."""
        self.mc = mc
        self.mirror = mirror
        self.lane = lane
        self.vcpu = mirror.vcpu if vcpu is None else vcpu
        self.mb = mirror.mailbox_hpa if mailbox_hpa is None else mailbox_hpa
        self.cmd_hpa = self.mb + PAGE
        self.slot_hpa = self.mb + 2 * PAGE
        self.slots = int(mirror.info.bootinfo.slots)  # type: ignore[attr-defined]
        self.bell = 0
        self.exits = 0
        self.timeout_s = BATCH_TIMEOUT_S
        self.session_id = 0
        self.vm_key = mirror.vm.key_id

    # ---- the doorbell -------------------------------------------------------------------------
    def batch(self, op: int, ram_addrs: list[int] = (), *, session_id: int = 0, epoch: int = 0,
              version: int = P.PROTOCOL_VERSION.value, ram_size: int = 0, challenge: int = 0,
              count: int | None = None) -> BatchResult:
        n = len(ram_addrs)
        cmd = bytearray(_HDR.pack(op, n if count is None else count, session_id, epoch, version,
                                  ram_size, challenge))
        for ra in ram_addrs:
            cmd += _ENTRY.pack(ra, 0, 0)
        self._store(self.cmd_hpa, bytes(cmd))
        self.bell += 1
        self._store(self.mb + P.CONTROL_OFFSET, struct.pack("<Q", self.bell))
        ex = self._run_mirror()
        self.exits += 1
        if ex.reason != "hlt":
            raise MailboxError(f"mirror vCPU did not complete op {op}: {ex}")
        _bell, completed, status, _state, processed, _r = _CTL.unpack(
            self.mc.host_read(self.mb + P.CONTROL_OFFSET, _CTL.size))
        if completed != self.bell:
            raise MailboxError(f"op {op}: completed={completed} for doorbell {self.bell}")
        statuses: list[int] = []
        if n:
            raw = self.mc.host_read(self.cmd_hpa + _HDR.size, n * _ENTRY.size)
            statuses = [s for _a, _f, s in _ENTRY.iter_unpack(raw)]
        return BatchResult(status, statuses, processed)

    def _run_mirror(self):
        timer = threading.Timer(self.timeout_s, self._watchdog)
        timer.start()
        try:
            return self.vcpu.run(None)
        finally:
            timer.cancel()

    def _watchdog(self) -> None:
        with contextlib.suppress(UcError):  # already stopped: nothing to do
            self.vcpu.uc.emu_stop()

    def _store(self, hpa: int, data: bytes) -> None:
        """Host store into the (shared, raw) mailbox. Unlike MemoryController.host_write this
        does not invalidate every vCPU's translated code: mailbox pages are never code (NX in
        the mirror's tables), and dropping the translation cache on each doorbell made every
        batch start cold (hundreds of Python TLB fills per batch)."""
        self.mc.make_state(hpa, len(data), self.vm_key, False)
        self.mc.mem[hpa : hpa + len(data)] = data

    def _ok(self, op: int, r: BatchResult) -> BatchResult:
        if r.status != 0:
            raise MailboxError(f"op {op}: {status_name(r.status)}", r.status)
        return r

    def read_slots(self, n: int) -> list[bytes]:
        raw = self.mc.host_read(self.slot_hpa, n * SLOT)
        return [raw[i * SLOT : (i + 1) * SLOT] for i in range(n)]

    def write_slots(self, records: list[bytes]) -> None:
        self._store(self.slot_hpa, b"".join(records))

    # ---- ops ----------------------------------------------------------------------------------
    def reply(self) -> object:
        """The HelloReply a HELLO or *_BEGIN left in slot 0."""
        return P.HelloReply.parse(self.mc.host_read(self.slot_hpa, P.HelloReply.size))

    def hello(self) -> object:
        self._ok(P.OP_HELLO, self.batch(P.OP_HELLO))
        return self.reply()

    def send_begin(self, ram_size: int, challenge: int, lanes: int = 1) -> int:
        """Open a sending session of `lanes` lanes bound to the destination's challenge;
        returns the session id the source helper drew."""
        self._ok(P.OP_SEND_BEGIN, self.batch(P.OP_SEND_BEGIN, ram_size=ram_size,
                                             challenge=challenge, count=lanes))
        self.session_id = int(self.reply().session_id)
        return self.session_id

    def send(self, ram_addrs: list[int]) -> list[bytes]:
        """Seal a batch; returns the records (envelope + ciphertext). Any refused entry raises."""
        r = self._ok(P.OP_SEND, self.batch(P.OP_SEND, ram_addrs))
        bad = [(hex(a), status_name(s)) for a, s in zip(ram_addrs, r.entry_status, strict=True)
               if s != 0]
        if bad:
            raise MailboxError(f"SEND refused {len(bad)} entries, first {bad[:4]}")
        return self.read_slots(len(ram_addrs))

    def token(self, op: int) -> bytes:
        self._ok(op, self.batch(op))
        return self.mc.host_read(self.slot_hpa, P.EpochToken.size)

    def recv_begin(self, ram_size: int, lanes: int = 1) -> int:
        """Open a receiving session of `lanes` lanes; returns the challenge the destination
        helper drew, which the host carries back to the source (QEMU's return path)."""
        self.session_id = 0
        self._ok(P.OP_RECV_BEGIN, self.batch(P.OP_RECV_BEGIN, ram_size=ram_size, count=lanes))
        return int(self.reply().challenge)

    def join(self, challenge: int) -> None:
        """Lanes > 0: join the session lane 0 published under `challenge` (its session id, on
        the source, comes back in the reply)."""
        self._ok(P.OP_JOIN, self.batch(P.OP_JOIN, challenge=challenge))
        self.session_id = int(self.reply().session_id)

    def bind(self, session_id: int) -> None:
        """The session id (from the stream) that RECV-family commands name; the helper binds
        the receiving session to it on the first one."""
        self.session_id = session_id

    def recv(self, ram_addrs: list[int], records: list[bytes]) -> list[int]:
        """Install a batch; returns the per-entry status (0 = installed)."""
        self.write_slots(records)
        return self._ok(P.OP_RECV, self.batch(P.OP_RECV, ram_addrs,
                                              session_id=self.session_id)).entry_status

    def put_token(self, op: int, token: bytes) -> int:
        self._store(self.slot_hpa, token)
        return self.batch(op, session_id=self.session_id).status

    def abort(self) -> int:
        return self.batch(P.OP_ABORT).status
