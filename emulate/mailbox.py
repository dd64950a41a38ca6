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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from unicorn import UcError

from emulate.host import Mirror
from emulate.machine import Exit, VCpu
from emulate.memctl import MemoryController
from helperfw.runtime import protocol as P

SLOT = P.SLOT_SIZE
STATUS_NAMES = {v: k for k, (v, _doc) in P.STATUS.items()}
OP_NAMES = {v: k.removeprefix("OP_") for k, v in vars(P).items()
            if k.startswith("OP_") and isinstance(v, int)}
# A batch must complete within this wall-clock time. Why not an instruction budget: unicorn
# counts instructions with a per-instruction hook, which made the helper's AES code ~5x slower;
# a watchdog thread calling emu_stop costs nothing while the helper runs.
BATCH_TIMEOUT_S = 60.0

# The layouts as struct.Struct (a doorbell packs and unpacks these; construct is too slow).
_HDR = P.Command.pystruct(upto="entries")  # op, count, session_id, epoch, version, ram_size,
#                                            challenge
_ENTRY = P.Entry.pystruct()  # ram_addr, flags, status
_CTL = P.Control.pystruct()  # doorbell, completed, status, state, processed, reserved


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


def pack_command(op: int, entries: Iterable[tuple[int, int]] = (), *, count: int | None = None,
                 session_id: int = 0, epoch: int = 0, version: int = P.PROTOCOL_VERSION.value,
                 ram_size: int = 0, challenge: int = 0) -> bytes:
    """The whole Command page a host writes: the header, `entries` as (ram_addr, flags) pairs
    with status 0, zeros after them. `count` defaults to the number of entries; a hostile host
    may claim any other."""
    ents = list(entries)
    n = len(ents) if count is None else count
    body = b"".join(_ENTRY.pack(a, f, 0) for a, f in ents)
    return (_HDR.pack(op, n & 0xFFFFFFFF, session_id, epoch, version, ram_size, challenge)
            + body + bytes(P.Command.size - _HDR.size - len(body)))


def describe_command(command: bytes) -> str:
    """One line naming a packed command (for the crash dump's "last mailbox commands")."""
    op, count, session_id, epoch, _version, ram_size, challenge = _HDR.unpack_from(command)
    name = OP_NAMES.get(op, f"op {op:#x}")
    first = [hex(a) for a, _f, _s in _ENTRY.iter_unpack(
        command[_HDR.size:_HDR.size + min(count, 4) * _ENTRY.size])]
    return (f"{name} count={count} session={session_id:#x} epoch={epoch} "
            f"ram_size={ram_size:#x} challenge={challenge:#x} entries={first}"
            f"{'...' if count > 4 else ''}")


class HelperChannel:
    """Drives one helper's mailbox. Counts exits (every batch is exactly one HLT exit).

    `batch` is the honest host's doorbell (pack, ring, run, read back, raise on failure); the
    steps it is made of (`ring`, `run`, `completion`) are public for hosts that misbehave
    (tests run a batch with an instruction budget or preempted, and inspect what came back)."""

    def __init__(self, mc: MemoryController, mirror: Mirror, *, lane: int = 0,
                 vcpu: VCpu | None = None, mailbox_hpa: int | None = None) -> None:
        """Lane 0 by default; another lane (emulate/lanes.py) brings its vCPU and mailbox."""
        self.mc = mc
        self.mirror = mirror
        self.lane = lane
        self.vcpu = mirror.vcpu if vcpu is None else vcpu
        self.mb = mirror.mailbox_hpa if mailbox_hpa is None else mailbox_hpa
        self.cmd_hpa = self.mb + P.COMMAND_OFFSET
        self.slot_hpa = self.mb + P.SLOTS_OFFSET
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
        self.ring(pack_command(op, [(ra, 0) for ra in ram_addrs], count=count,
                               session_id=session_id, epoch=epoch, version=version,
                               ram_size=ram_size, challenge=challenge))
        ex = self.run()
        if ex.reason != "hlt":
            raise MailboxError(f"mirror vCPU did not complete op {op}: {ex}")
        r = self.completion(len(ram_addrs))
        if r is None:
            raise MailboxError(f"op {op}: completed={self.control().completed} "
                               f"for doorbell {self.bell}")
        return r

    def ring(self, command: bytes, slots: Mapping[int, bytes] | None = None) -> int:
        """Write `command` (and slot contents, slot index -> bytes) and bump the doorbell; the
        command is remembered for the mirror VM's crash dump. Returns the new doorbell."""
        self._store(self.cmd_hpa, command)
        for i, data in (slots or {}).items():
            self._store(self.slot_hpa + i * SLOT, data)
        self.bell += 1
        self._store(self.mb + P.CONTROL_OFFSET, struct.pack("<Q", self.bell))
        self.mirror.vm.note_command(f"#{self.bell} {describe_command(command)}")
        return self.bell

    def run(self, budget: int | None = None) -> Exit:
        """Run the mirror vCPU for one batch (until HLT, a fault or `budget` instructions; with
        no budget a wall-clock watchdog bounds it). Counts the exit."""
        ex = self._run_mirror() if budget is None else self.vcpu.run(budget)
        self.exits += 1
        return ex

    def control(self) -> Any:
        """The Control block as the host reads it (shared page, plaintext)."""
        return P.Control.parse(self.mc.host_read(self.mb + P.CONTROL_OFFSET, P.Control.size))

    def completion(self, n: int) -> BatchResult | None:
        """The outcome of the current doorbell with the status of its first `n` entries (at
        most the helper's slot count), or None if the helper has not completed it."""
        _bell, completed, status, _state, processed, _r = _CTL.unpack(
            self.mc.host_read(self.mb + P.CONTROL_OFFSET, _CTL.size))
        if completed != self.bell:
            return None
        n = min(n, P.MAX_SLOTS)
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
