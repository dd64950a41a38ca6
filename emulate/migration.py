"""Live migration of an SEV guest through the helper, source host to destination host.

Source: the guest boots (firmware + helper from the PE file), runs its workload's set-up (private
patterns, shared conversions, MSR_KVM_MIGRATION_CONTROL), then migration starts: dirty logging
on, round 1 sends every page, each later pre-copy round sends the pages dirtied during the
previous one while the guest keeps running between batches; when the dirty set is small enough
(or stops shrinking, or the round limit is hit) the guest is stopped and the last dirty set goes
out (stop-and-copy). Shared pages travel raw; private pages are sealed by the source helper in
its mirror VM (one VM exit per batch of 64). Every round closes a helper epoch with a token.

Destination: a second host with its own VM key boots the same firmware and helper (same
transport key), opens a RECV session and installs every record through its own mirror; it
adopts the shared-region list and the guest's vCPU state.

Under SEV-ES (`MigrationParams.sev_es`) no host can read or set the guest's registers, so the
CPU_STATE record is not used: before stop-and-copy the host asks the guest to park its vCPU
(`guest.request_park`); the guest saves its state into private pages and waits in the AP reset
hold; those pages go out with the last dirty set; the stream's VCPU_PARKED record carries the
AP jump table the guest registered (host state, as KVM keeps it). The destination's firmware
waits in its own AP reset hold from boot; the destination host wakes it (`VCpu.sipi`, "start
this vCPU at its jump table": the only choice it has), and the guest restores its state.

Verification: every page outside the helpers' own ranges, private ones read through C=1 views
with each side's own key, shared ones raw, must be equal; private DRAM must differ (other key);
and the destination guest must resume and keep running.
"""

from __future__ import annotations

import contextlib
import functools
import io
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, ClassVar

from construct import Container

from emulate import guest as G
from emulate import workload
from emulate.host import Host, default_layout
from emulate.lanes import LaneWorkers, lane_channels, run_lanes, split_by_lane
from emulate.mailbox import HelperChannel, status_name
from emulate.memctl import PAGE
from emulate.seeds import Seeds, transport_key
from emulate.stream import (
    CPU_STATE,
    END,
    EPOCH_TOKEN,
    FINISH,
    GPRS,
    PRIVATE_PAGES,
    ROUND,
    SESSION,
    SHARED_LIST,
    SHARED_PAGES,
    VCPU_PARKED,
    Listener,
    StreamError,
    StreamWriter,
    connect,
    read_stream,
)
from emulate.timeline import (
    FINAL_SENT,
    FINISHED,
    PRIVATE,
    SHARED,
    SOURCE,
    SOURCE_END,
    STOPPED,
    Timeline,
)
from helperfw.codegen.image import LinkedImage
from helperfw.runtime import protocol as P

DEFAULT_IMAGE = Path("out/MigrationHelper.efi")
TWO_MIB = 2 << 20
VIRTIO_MEM_SETUP_GPA = 8 << 30  # where the virtio-mem block is plugged while the guest fills it


@functools.cache
def workload_image() -> LinkedImage:
    """The guest workload (emulate.workload) compiled once per process (the compiler loads
    only when a guest is started: a destination-only host never needs it)."""
    from helperfw.codegen.pipeline import build

    return build([workload.guest_main], name="guest").image


Progress = Callable[[str, int], None]
"""progress(event, n): ("round", pages in the round), ("pages", pages just sent), ("done", 0);
with several lanes also, per lane L, (lane_event(L, "round"), the lane's private pages in the
round) and (lane_event(L, "pages"), its pages just sealed)."""


def lane_event(lane: int, what: str) -> str:
    """A per-lane progress event's name: "lane<L>:<what>"."""
    return f"lane{lane}:{what}"


def parse_lane_event(event: str) -> tuple[int, str] | None:
    """(lane, what) of a lane_event name, else None."""
    if not event.startswith("lane") or ":" not in event:
        return None
    lane, what = event[4:].split(":", 1)
    return (int(lane), what) if lane.isdigit() else None


@dataclass
class MigrationParams:
    mem: int = 64 << 20
    option: int = P.OPT_TUPLES
    cbit: int = 47
    seed: int = 1
    image: Path = DEFAULT_IMAGE
    transport: str = "memory"  # "memory", "file:PATH" or "tcp" (loopback)
    max_rounds: int = 6
    converge_pages: int = 384  # stop-and-copy once a round's dirty set is at most this
    guest_slice: int = 30_000  # guest instructions per slice while pre-copy runs
    slice_every: int = 8  # helper batches between guest slices
    epoch_records: int = P.EPOCH_RECORDS_MAX  # close an epoch at least this often
    hot_pages: int = 256
    transport_key: bytes | None = None  # None: derived from `seed` (emulate.seeds)
    verify: bool = True
    sev_es: bool = False  # SEV-ES guest: no register access; the guest parks its vCPU (docs/PROTOCOL.md, "SEV-ES launch")
    lanes: int = 1  # mirror vCPUs per helper, each driven from its own host thread (emulate/lanes.py)

    @property
    def key(self) -> bytes:
        """The guest owner's transport key, provisioned on both hosts: from `seed` unless given."""
        return self.transport_key if self.transport_key is not None else transport_key(self.seed)


@dataclass
class RoundStats:
    round: int
    pages: int  # pages sent in this round
    private: int
    shared: int
    guest_touches: int  # pages the guest wrote while the round ran
    dirty_after: int  # pages dirtied during the round (the next round's work; under SEV-ES the
    # last pre-copy round's includes what the guest wrote while parking)
    seconds: float
    final: bool = False


@dataclass
class Verification:
    ok: bool
    private_pages: int = 0
    shared_pages: int = 0
    skipped_pages: int = 0
    mismatches: list[int] = field(default_factory=list)
    ciphertext_differs: bool = False
    resumed: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        state = "PASS" if self.ok else "FAIL"
        s = (f"{state}: {self.private_pages} private pages equal (C=1, each side's key), "
             f"{self.shared_pages} shared pages equal (raw), {self.skipped_pages} helper pages "
             f"skipped; private DRAM differs across keys: {self.ciphertext_differs}; "
             f"guest resumed on destination: {self.resumed}")
        if self.mismatches:
            s += f"; {len(self.mismatches)} mismatches, first " + ", ".join(
                hex(a) for a in self.mismatches[:4])
        return s + "".join(f"; {n}" for n in self.notes)


@dataclass
class MigrationResult:
    params: MigrationParams
    rounds: list[RoundStats]
    private_pages: int
    shared_pages: int
    bytes_on_wire: int
    records: int
    epochs: int
    src_exits: int  # mirror VM exits on the source (one per helper batch)
    dst_exits: int
    seconds: float  # from SEND_BEGIN to RECV_FINISH
    session_id: int
    challenge: int = 0  # the destination's RECV_BEGIN challenge the session is bound to
    guest_exits: int = 0  # source guest exits while migrating: dirty-log write faults + slices
    downtime: float | None = None  # guest stopped → destination finished (concurrent transport)
    verification: Verification | None = None
    timeline: Timeline | None = None  # what each side did when (emulate.timeline)

    @property
    def pages(self) -> int:
        return self.private_pages + self.shared_pages

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds if self.seconds else 0.0

    @property
    def exits_per_page(self) -> float:
        """Mirror VM exits (both sides) per private page moved through the helpers."""
        return (self.src_exits + self.dst_exits) / max(self.private_pages, 1)


# -- the two sides --------------------------------------------------------------------------------
def _free_runs(host: Host) -> list[tuple[int, int]]:
    """(gpa, pages) of the free runs of pc.ram above the firmware area, largest first."""
    u = host.uefi
    used = [(u.LOW, 0)] + sorted((b, p * PAGE) for b, (p, _t) in u.allocations.items())
    runs = []
    cursor = u.LOW
    for base, size in sorted(used) + [(u.ram_size, 0)]:
        if base > cursor:
            runs.append((cursor, (base - cursor) // PAGE))
        cursor = max(cursor, base + size)
    return sorted(runs, key=lambda r: -r[1])


class Source:
    """The source host with a booted, running guest."""

    def __init__(self, p: MigrationParams, layout=None) -> None:
        self.p = p
        layout = layout or default_layout(p.mem)
        self.host = Host("source", layout, cbit=p.cbit, seed=Seeds(p.seed).child("source"),
                         uefi_seed=p.seed, sev_es=p.sev_es)
        self.host.boot_helper(p.image, p.key, p.option)
        self._start_guest()
        self.host.settle_private_views()
        self.mirror = self.host.create_mirror()
        self.ch = HelperChannel(self.host.mc, self.mirror)
        self.ch.hello()
        self.lanes = lane_channels(self.host.mc, self.mirror, p.lanes, self.ch)
        self.skip = _page_set(self.host.helper_ram_ranges())

    @property
    def exits(self) -> int:
        """Exits of every lane's mirror vCPU."""
        return sum(c.exits for c in self.lanes)

    def _start_guest(self) -> None:
        h, p = self.host, self.p
        vmem = next(b for b in h.blocks if b.gpa is None)
        h.plug(vmem, VIRTIO_MEM_SETUP_GPA)
        gpa, pages = _free_runs(h)[0]
        pages -= 64  # room for the workload's image, config, stack and table pool
        # 48 shared pages at an offset that is not 2 MiB aligned (the guest must split a large
        # leaf), then the big private region whose first pages are the hot set
        shared_low = G.Region(gpa + 5 * PAGE, 48, G.GR_SHARED | G.GR_DIRTY, 11)
        start = gpa + 53 * PAGE
        regions = [shared_low, G.Region(start, pages - 53, G.GR_DIRTY, 12)]
        hot = G.Region(start, min(p.hot_pages, pages - 53))
        for blk in h.blocks[1:]:
            if blk is vmem:
                regions.append(G.Region(vmem.gpa, vmem.size // PAGE, G.GR_PRIVATE, 15))
            elif blk.gpa is not None:  # a DIMM: private, with a shared window 1 MiB in
                mib = (1 << 20) // PAGE
                regions += [G.Region(blk.gpa, mib, G.GR_DIRTY, 13),
                            G.Region(blk.gpa + (1 << 20), 16, G.GR_SHARED, 14),
                            G.Region(blk.gpa + (1 << 20) + 16 * PAGE, blk.size // PAGE - mib - 16,
                                     G.GR_DIRTY, 16)]
        self.guest = G.load(h, workload_image(), regions, hot_va=hot.va, hot_pages=hot.pages,
                            seed=p.seed)
        ex = h.vcpu.run(budget=None)
        if ex.reason != "stop" or not h.migration_control:
            raise RuntimeError(f"guest set-up did not reach MSR_KVM_MIGRATION_CONTROL: {ex}")
        cfg = G.read_cfg(h, self.guest)
        if cfg.hc_errors or h.hypercall_errors:
            raise RuntimeError(f"guest set-up: {cfg.hc_errors} failed conversions, host saw "
                               f"{h.hypercall_errors}")
        h.unplug(vmem)  # from now on no GPA reaches it; it is still migrated by ram_addr

    def run_guest(self, budget: int) -> None:
        ex = self.host.vcpu.run(budget)
        if ex.reason not in ("budget", "stop"):
            raise RuntimeError(f"source guest stopped: {ex}")

    def touches(self) -> int:
        return int(G.read_cfg(self.host, self.guest).touches)

    def dirty_pages(self) -> list[int]:
        """Fetch and clear the dirty log; ram_addrs to resend (helper ranges excluded)."""
        h = self.host
        out = set()
        for slot, idxs in h.vm.get_dirty_log().items():
            s = h.vm.slots[slot]
            for i in idxs:
                ra = h.gpa_to_ram_addr(s.gpa + i * PAGE)
                if ra is not None and ra not in self.skip:
                    out.add(ra)
        return sorted(out)

    def cpu_state(self) -> dict[str, int]:
        v = self.host.vcpu
        return {r: v.get("eflags" if r == "rflags" else r) for r in GPRS}

    def park_guest(self, budget: int = 2_000_000) -> None:
        """SEV-ES: ask the guest to park and run its vCPU until it waits in the AP reset hold
        (its registers are then in private pages the dirty log has seen)."""
        G.request_park(self.host, self.guest)
        ex = self.host.vcpu.run(budget)
        if ex.reason != "reset_hold":
            raise RuntimeError(f"source guest did not park: {ex}")


class Destination:
    """The destination host: its own VM key, same firmware and helper, incoming session."""

    def __init__(self, p: MigrationParams, layout=None) -> None:
        layout = layout or default_layout(p.mem)
        self.host = Host("destination", layout, cbit=p.cbit,
                         seed=Seeds(p.seed).child("destination"), uefi_seed=p.seed,
                         sev_es=p.sev_es)
        self.host.boot_helper(p.image, p.key, p.option)
        if p.sev_es:  # a migration target's firmware waits for the incoming guest
            self.host.uefi.park_for_incoming()
        self.host.settle_private_views()
        self.mirror = self.host.create_mirror()
        self.ch = HelperChannel(self.host.mc, self.mirror)
        self.ch.hello()
        self.lanes = lane_channels(self.host.mc, self.mirror, p.lanes, self.ch)
        self._workers = LaneWorkers(1)  # receive() puts one thread per lane here
        self.skip = _page_set(self.host.helper_ram_ranges())
        self.cpu: dict[str, int] | None = None
        self.ap_jump_table: int | None = None  # SEV-ES: where the parked guest resumes
        self.finished = False
        self.finished_at = 0.0
        self.session_id = 0
        self.counts = {"private": 0, "shared": 0, "epochs": 0}
        self.challenge = 0
        self.timeline = Timeline()

    def open_session(self, ram_size: int) -> int:
        """RECV_BEGIN before the source starts: the helper draws the challenge the source's
        session must bind (the host carries it back to the source, as on QEMU's return path)."""
        self.challenge = self.ch.recv_begin(ram_size, len(self.lanes))
        for c in self.lanes[1:]:
            c.join(self.challenge)
        return self.challenge

    @property
    def exits(self) -> int:
        return sum(c.exits for c in self.lanes)

    def receive(self, inp: BinaryIO) -> None:
        """Apply the stream, each record through the handler of its kind (`_RECEIVERS`); each
        lane's records and tokens run on its own thread (in stream order per lane)."""
        self._workers = LaneWorkers(len(self.lanes))
        try:
            self._receive(inp)
            self._workers.drain()
        finally:
            self._workers.close()

    def _recv_records(self, lane: int, addrs: list[int], records: list[bytes]) -> None:
        st = self.lanes[lane].recv(addrs, records)
        bad = [(hex(a), status_name(s)) for a, s in zip(addrs, st, strict=True) if s != 0]
        if bad:
            raise StreamError(f"destination helper refused {len(bad)} records: {bad[:4]}")

    def _token(self, lane: int, op: int, token: bytes) -> None:
        st = self.lanes[lane].put_token(op, token)
        if st != 0:
            what = "RECV_END_EPOCH" if op == P.OP_RECV_END_EPOCH else "RECV_FINISH"
            raise StreamError(f"{what} refused: {status_name(st)} (lane {lane})")

    def _lane(self, lane: int) -> int:
        if not 0 <= lane < len(self.lanes):
            raise StreamError(f"stream names lane {lane}; this session has {len(self.lanes)}")
        return lane

    def _receive(self, inp: BinaryIO) -> None:
        for rec in read_stream(inp):
            started = self.timeline.now()
            self._RECEIVERS[rec.kind](self, rec.body)
            self.timeline.received(rec.kind, rec.body, started, self.exits)

    def _on_session(self, b: Container) -> None:
        """The source's session must fit this host (option, C-bit, RAM blocks, where the helper
        lives) and be bound to this destination's challenge; its id binds the helper."""
        h, ch = self.host, self.ch
        if (b.option, b.c_bit, b.page_size) != (ch.mirror.info.option, h.cbit, PAGE):
            raise StreamError(f"session for option {b.option} C-bit {b.c_bit}, this "
                              f"host runs option {ch.mirror.info.option} C-bit {h.cbit}")
        mine = [(x.name, x.offset, x.size) for x in h.blocks]
        theirs = [(x.name, x.offset, x.size) for x in b.blocks]
        if mine != theirs:
            raise StreamError(f"RAM blocks differ: {theirs} vs {mine}")
        if _page_set([(r.ram_addr, r.length) for r in b.helper_ranges]) != self.skip:
            raise StreamError("the destination helper lives elsewhere than the source's")
        if b.challenge != self.challenge:
            raise StreamError(f"stream bound to challenge {b.challenge:#x}, this "
                              f"destination's session drew {self.challenge:#x}")
        if b.lanes != len(self.lanes):
            raise StreamError(f"stream of {b.lanes} lanes, this destination's session has "
                              f"{len(self.lanes)}")
        for c in self.lanes:
            c.bind(b.session_id)
        self.session_id = b.session_id

    def _on_shared_list(self, b: Container) -> None:
        self.host.shared.replace([(r.ram_addr, r.length) for r in b.ranges])

    def _on_shared_pages(self, b: Container) -> None:
        """Shared pages travel raw: the host writes them itself."""
        for pg in b.pages:
            self._check_target(pg.ram_addr)
            self.host.write_raw(pg.ram_addr, pg.data)
        self.counts["shared"] += len(b.pages)

    def _on_private_pages(self, b: Container) -> None:
        """Sealed pages: only the destination helper can install them, on the lane the stream
        names (the helper refuses another lane's pages); any refusal ends it."""
        addrs = [pg.ram_addr for pg in b.pages]
        for a in addrs:
            self._check_target(a)
        lane = self._lane(b.lane)
        self._workers.submit(lane, functools.partial(self._recv_records, lane, addrs,
                                                     [bytes(pg.record) for pg in b.pages]))
        self.counts["private"] += len(addrs)

    def _on_epoch_token(self, b: Container) -> None:
        lane = self._lane(b.lane)
        self._workers.submit(lane, functools.partial(self._token, lane, P.OP_RECV_END_EPOCH,
                                                     bytes(b.token)))
        self.counts["epochs"] += 1

    def _on_finish(self, b: Container) -> None:
        """Lanes 1.. finish on their threads; lane 0 checks every lane, so it goes last, once
        they all have."""
        lane = self._lane(b.lane)
        if lane:
            self._workers.submit(lane, functools.partial(self._token, lane, P.OP_RECV_FINISH,
                                                         bytes(b.token)))
            return
        self._workers.drain()
        self._token(0, P.OP_RECV_FINISH, bytes(b.token))
        self.finished = True
        self.finished_at = self.timeline.event(FINISHED)

    def _on_cpu_state(self, b: Container) -> None:
        if self.host.vm.sev_es:
            raise StreamError("CPU_STATE for an SEV-ES guest: its registers cannot be set by "
                              "the host")
        self.cpu = {r: int(b[r]) for r in GPRS}

    def _on_vcpu_parked(self, b: Container) -> None:
        if not self.host.vm.sev_es:
            raise StreamError("VCPU_PARKED record, but this destination is not SEV-ES")
        self.ap_jump_table = int(b.ap_jump_table)

    def _on_round(self, b: Container) -> None:
        """A round's header: for the timeline only."""

    def _on_end(self, b: Container) -> None:
        if not self.finished:
            raise StreamError("stream ended without a FINISH token")

    _RECEIVERS: ClassVar[dict[int, Callable[[Destination, Container], None]]] = {
        SESSION: _on_session, SHARED_LIST: _on_shared_list, SHARED_PAGES: _on_shared_pages,
        PRIVATE_PAGES: _on_private_pages, EPOCH_TOKEN: _on_epoch_token, FINISH: _on_finish,
        CPU_STATE: _on_cpu_state, VCPU_PARKED: _on_vcpu_parked, ROUND: _on_round, END: _on_end,
    }

    def _check_target(self, ram_addr: int) -> None:
        if ram_addr % PAGE or not 0 <= ram_addr < self.host.ram_size or ram_addr in self.skip:
            raise StreamError(f"page {ram_addr:#x} outside guest RAM or inside the helper")

    def resume(self, budget: int = 200_000) -> bool:
        """Start the guest's vCPU from the migrated state; True if it runs on without a fault.
        SEV-ES: the host can only wake the vCPU waiting in the firmware's AP reset hold, which
        enters the guest's AP jump table (the GPA the source host learned, KVM state)."""
        v = self.host.vcpu
        if self.host.vm.sev_es:
            if self.ap_jump_table is None:
                return False
            self.host.vm.ghcb.ap_jump_table = self.ap_jump_table
            v.sipi()
        elif self.cpu is None:
            return False
        else:
            for r, val in self.cpu.items():
                v.set("eflags" if r == "rflags" else r, val)
        ex = v.run(budget)
        return ex.reason == "budget"


def _page_set(ranges: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for start, length in ranges:
        out.update(range(start, start + length, PAGE))
    return out


# -- the driver ---------------------------------------------------------------------------------
class Migration:
    """One source → destination migration with the given parameters."""

    def __init__(self, p: MigrationParams, progress: Progress | None = None) -> None:
        self.p = p
        self.progress = progress or (lambda _e, _n: None)
        self.src = Source(p)
        self.dst = Destination(p)
        self.rounds: list[RoundStats] = []
        self._slices = 0
        self.challenge = 0  # set by open() (run() opens if nobody did)
        self.timeline = self.dst.timeline  # one recorder for both sides

    # ---- source side ----------------------------------------------------------------------------
    def _send(self, w: StreamWriter, addrs: list[int], *, guest_runs: bool) -> tuple[int, int]:
        """Send `addrs` (shared raw, private sealed in batches); the guest runs between batches
        if `guest_runs`. Returns (private, shared) counts."""
        h, ch, p = self.src.host, self.src.ch, self.p
        lanes = self.src.lanes
        priv = [a for a in addrs if not h.shared.is_shared(a)]
        shared = [a for a in addrs if h.shared.is_shared(a)]
        for i in range(0, len(shared), ch.slots):
            chunk = shared[i : i + ch.slots]
            started = self.timeline.now()
            w.put_shared([(a, h.read_raw(a)) for a in chunk])
            self.timeline.batch(SOURCE, SHARED, len(chunk), started)
            self.progress("pages", len(chunk))
        parts = split_by_lane(priv, len(lanes))
        if len(lanes) > 1:
            for lane, part in enumerate(parts):
                self.progress(lane_event(lane, "round"), len(part))
        waves = max(-(-len(part) // ch.slots) for part in parts) if priv else 0
        batches = 0  # helper batches (all lanes) since the guest last ran
        for wave in range(waves):  # a wave: one batch per lane, the lanes at once
            lo = wave * ch.slots
            chunks = [part[lo : lo + ch.slots] for part in parts]
            if self._epoch_count + max(len(c) for c in chunks) > p.epoch_records:
                self._end_epoch(w)
            started = self.timeline.now()
            recs = run_lanes([functools.partial(c.send, chunk) if chunk else list
                              for c, chunk in zip(lanes, chunks, strict=True)])
            for lane, (chunk, r) in enumerate(zip(chunks, recs, strict=True)):
                if chunk:
                    w.put_private(chunk, r, lane)
                    self.timeline.batch(SOURCE, PRIVATE, len(chunk), started)
            self._epoch_count += max(len(c) for c in chunks)
            self.progress("pages", sum(len(c) for c in chunks))
            if len(lanes) > 1:
                for lane, chunk in enumerate(chunks):
                    if chunk:
                        self.progress(lane_event(lane, "pages"), len(chunk))
            batches += sum(1 for c in chunks if c)
            while guest_runs and batches >= p.slice_every:  # as often per page as with 1 lane
                batches -= p.slice_every
                self.src.run_guest(p.guest_slice)
                self._slices += 1
        return len(priv), len(shared)

    def _end_epoch(self, w: StreamWriter) -> None:
        """Epochs are global: every lane ends it and sends its own token."""
        for lane, c in enumerate(self.src.lanes):
            w.put_epoch_token(c.token(P.OP_SEND_END_EPOCH), lane)
        self._epoch_count = 0  # the fullest lane's records in the epoch

    def _source(self, w: StreamWriter) -> None:
        src, p = self.src, self.p
        h = src.host
        ram_size = self.window()
        sid = src.ch.send_begin(ram_size, self.challenge, len(src.lanes))
        for c in src.lanes[1:]:
            c.join(self.challenge)
        self.session_id = sid
        w.write(SESSION, session_id=sid, challenge=self.challenge, option=p.option,
                c_bit=p.cbit, ram_size=ram_size, lanes=len(src.lanes),
                page_size=PAGE, protocol=P.PROTOCOL_VERSION.value,
                blocks=[{"name": b.name, "offset": b.offset, "size": b.size} for b in h.blocks],
                helper_ranges=[{"ram_addr": a, "length": n} for a, n in h.helper_ram_ranges()])
        self._epoch_count = 0
        h.vm.set_dirty_logging(True)
        self._faults0 = h.vm.write_faults
        todo = [a for a in h.pages() if a not in src.skip]
        rnd = 1
        while True:
            t0, touches0 = time.perf_counter(), src.touches()
            npriv, nshared = self._round(w, rnd, todo, final=False)
            dirty = src.dirty_pages()
            self.rounds.append(RoundStats(rnd, len(todo), npriv, nshared,
                                          src.touches() - touches0, len(dirty),
                                          time.perf_counter() - t0))
            shrinking = len(self.rounds) < 2 or len(dirty) < self.rounds[-2].dirty_after
            if len(dirty) <= p.converge_pages or rnd >= p.max_rounds or not shrinking:
                break
            todo, rnd = dirty, rnd + 1
        # stop-and-copy: the guest does not run again on the source
        self.stopped_at = self.timeline.event(STOPPED)
        if p.sev_es:  # it parks first: what that writes joins the last dirty set
            src.park_guest()
            dirty = sorted(set(dirty) | set(src.dirty_pages()))
            self.rounds[-1].dirty_after = len(dirty)
        rnd += 1
        t0 = time.perf_counter()
        npriv, nshared = self._round(w, rnd, dirty, final=True)
        if p.sev_es:
            w.write(VCPU_PARKED, ap_jump_table=h.vm.ghcb.ap_jump_table)
        else:
            w.write(CPU_STATE, **src.cpu_state())
        for lane in [*range(1, len(src.lanes)), 0]:  # lane 0's last: it checks the others
            w.write(FINISH, lane=lane, token=src.lanes[lane].token(P.OP_SEND_FINISH))
        self.rounds.append(RoundStats(rnd, len(dirty), npriv, nshared, 0, 0,
                                      time.perf_counter() - t0, final=True))
        w.end()
        self.timeline.event(SOURCE_END)
        self.timeline.close(SOURCE, src.exits, self._guest_exits())
        self.progress("done", 0)

    def _round(self, w: StreamWriter, rnd: int, todo: list[int], *, final: bool) -> tuple[int, int]:
        """One round, pre-copy or stop-and-copy: the shared list, the ROUND header, the pages
        (the guest runs between batches unless `final`), the epoch closed by its token.
        Returns (private, shared) pages sent."""
        src = self.src
        self.progress("round", len(todo))
        self.timeline.round(SOURCE, rnd, final, src.exits, self._guest_exits())
        w.write(SHARED_LIST, ranges=[{"ram_addr": a, "length": n}
                                     for a, n in src.host.shared.ranges()])
        w.write(ROUND, round=rnd, pages=len(todo), final=int(final))
        npriv, nshared = self._send(w, todo, guest_runs=not final)
        if final:
            self.timeline.event(FINAL_SENT)
        if self._epoch_count:
            self._end_epoch(w)
        return npriv, nshared

    def _guest_exits(self) -> int:
        """Source guest exits since dirty logging began: write faults + budget slices."""
        return self.src.host.vm.write_faults - self._faults0 + self._slices

    # ---- the whole thing --------------------------------------------------------------------------
    def window(self) -> int:
        """The RAM window both helpers map: guest RAM rounded up to 2 MiB."""
        return -(-self.src.host.ram_size // TWO_MIB) * TWO_MIB

    def open(self) -> int:
        """Protocol v2: the destination opens its session first; its challenge goes back to the
        source, whose session (and so every record of this stream) is bound to it."""
        self.challenge = self.dst.open_session(self.window())
        return self.challenge

    def run(self) -> MigrationResult:
        t0 = self.timeline.start()
        kind = self.p.transport
        if not self.challenge:
            self.open()
        if kind == "memory":
            buf = io.BytesIO()
            w = StreamWriter(buf)
            self._source(w)
            buf.seek(0)
            self.dst.receive(buf)
        elif kind.startswith("file:"):
            path = Path(kind[5:])
            with path.open("wb") as f:
                w = StreamWriter(f)
                self._source(w)
            with path.open("rb") as f:
                self.dst.receive(f)
        elif kind == "tcp" or kind.startswith("tcp:"):
            w = self._over_tcp(kind)
        else:
            raise ValueError(f"unknown transport {kind!r} (memory, file:PATH, tcp[:HOST:PORT])")
        seconds = time.perf_counter() - t0
        res = MigrationResult(self.p, self.rounds, w.private_pages, w.shared_pages, w.bytes,
                              w.records, w.epochs, self.src.exits - 1, self.dst.exits - 1,
                              seconds, self.session_id, self.challenge)
        res.guest_exits = self._guest_exits()
        res.timeline = self.timeline
        if kind.startswith("tcp"):
            res.downtime = self.dst.finished_at - self.stopped_at
        if self.p.verify:
            res.verification = verify(self.src, self.dst)
        return res

    def _over_tcp(self, kind: str) -> StreamWriter:
        """Destination in a thread reading a loopback socket; the source writes into it. The
        two hosts' vCPUs run concurrently (unicorn releases the GIL while emulating)."""
        host, port = "127.0.0.1", 0
        if kind.startswith("tcp:"):
            host, _, ps = kind[4:].rpartition(":")
            port = int(ps)
        lst = Listener(host, port)

        def dest() -> None:
            conn, rf = lst.accept()
            with conn, rf:
                self.dst.receive(rf)

        with ThreadPoolExecutor(1, thread_name_prefix="destination") as pool:
            incoming = pool.submit(dest)
            try:
                sock, wf = connect(lst.address)
                with sock, wf:
                    w = StreamWriter(wf)
                    self._source(w)
            except BaseException:
                # the source failed: wake a destination still in accept(), let it end (EOF or
                # refusal), and report the source's error rather than the consequence
                with contextlib.suppress(OSError):
                    lst.sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(Exception):
                    incoming.result(timeout=120)
                raise
            finally:
                lst.close()
            incoming.result()  # re-raises the destination's error here
        return w


def verify(src: Source, dst: Destination, *, resume: bool = True) -> Verification:
    """Destination memory equals the source's: private pages through C=1 views (each side's own
    key; unmapped blocks through the mirror's RAM window), shared pages raw."""
    sh, dh = src.host, dst.host
    v = Verification(ok=True)
    if not dst.finished:
        v.ok = False
        v.notes.append("RECV_FINISH never succeeded")
    if sh.shared.ranges() != dh.shared.ranges():
        v.ok = False
        v.notes.append("shared-region lists differ")
    sample: list[int] = []
    for blk_s, blk_d in zip(sh.blocks, dh.blocks, strict=True):
        for ra in range(blk_s.offset, blk_s.end, PAGE):
            if ra in src.skip:
                v.skipped_pages += 1
                continue
            if sh.shared.is_shared(ra):
                same = sh.read_raw(ra) == dh.read_raw(ra)
                v.shared_pages += 1
            else:
                same = _private_view(sh, blk_s, ra) == _private_view(dh, blk_d, ra)
                v.private_pages += 1
                if len(sample) < 16 and ra % (1 << 20) == 0:
                    sample.append(ra)
            if not same:
                v.mismatches.append(ra)
    v.ciphertext_differs = bool(sample) and all(sh.read_raw(a) != dh.read_raw(a) for a in sample)
    if resume:
        before = int(G.read_cfg(dh, src.guest).touches)
        v.resumed = dst.resume() and int(G.read_cfg(dh, src.guest).touches) > before
    v.ok = v.ok and not v.mismatches and v.ciphertext_differs and (v.resumed or not resume)
    return v


def _private_view(h: Host, blk, ra: int) -> bytes:
    if blk.gpa is not None:  # the VM's own C=1 view
        return h.vm.read(blk.gpa + ra - blk.offset, PAGE, encrypted=True)
    assert h.mirror is not None  # unmapped block: only the mirror's RAM window reaches it
    return h.mirror.vm.read(h.mirror.ram_base + ra, PAGE, encrypted=True)


def migrate(p: MigrationParams, progress: Progress | None = None) -> MigrationResult:
    return Migration(p, progress).run()
