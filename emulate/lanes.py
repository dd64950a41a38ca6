"""Parallel lanes on the emulated host (docs/PROTOCOL.md "Lanes").

The helper serves BootInfo.lanes mirror vCPUs. The host gives lane l its own vCPU in the mirror
VM (same entry RIP and CR3, the lane's RSP from BootInfo.lane_info) and drives its mailbox with
its own HelperChannel, each lane from its own thread: unicorn releases the GIL while a vCPU
runs, so lanes seal and open pages side by side on several cores. Pages go to lanes by the
documented rule, so no two threads ever touch the same page, seq space or mailbox.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from emulate.host import Mirror
from emulate.mailbox import HelperChannel
from emulate.memctl import MemoryController
from helperfw.runtime import protocol as P

T = TypeVar("T")


def lane_of(ram_addr: int, lanes: int) -> int:
    """The lane a page belongs to (the helper refuses it on any other: E_LANE)."""
    return (ram_addr >> P.LANE_PAGE_SHIFT) % lanes


def split_by_lane(ram_addrs: Sequence[int], lanes: int) -> list[list[int]]:
    """ram_addrs in lane order: out[l] holds lane l's pages, in their original order."""
    out: list[list[int]] = [[] for _ in range(lanes)]
    for a in ram_addrs:
        out[lane_of(a, lanes)].append(a)
    return out


def lane_channels(mc: MemoryController, mirror: Mirror, lanes: int,
                  first: HelperChannel | None = None) -> list[HelperChannel]:
    """Lane 0's channel (`first`, or a new one on the mirror's own vCPU) and a new vCPU and
    channel for each of lanes 1.."""
    bi = mirror.info.bootinfo
    served = int(bi.lanes)  # type: ignore[attr-defined]
    if not 1 <= lanes <= served:
        raise ValueError(f"--lanes {lanes}: the helper serves 1 to {served} lanes")
    chans = [first or HelperChannel(mc, mirror)]
    for lane in range(1, lanes):
        e = bi.lane_info[lane]  # type: ignore[attr-defined]
        hpa = mirror.vm.gpa_to_hpa(int(e.mailbox_mirror_gpa))
        if hpa is None:
            raise ValueError(f"lane {lane}'s mailbox {int(e.mailbox_mirror_gpa):#x} is not "
                             "mapped in the mirror")
        vcpu = mirror.vm.create_vcpu(rip=int(bi.entry_rip), cr3=int(bi.cr3),  # type: ignore[attr-defined]
                                     rsp=int(e.rsp), symbolize=mirror.vcpu.symbolize)
        vcpu.launch()
        chans.append(HelperChannel(mc, mirror, lane=lane, vcpu=vcpu, mailbox_hpa=hpa))
    return chans


def run_lanes(work: Sequence[Callable[[], T]]) -> list[T]:
    """Run work[l] on lane l's thread (lane 0 on the caller's); the results in lane order.
    The first exception of any lane is raised once every lane has stopped."""
    results: list[T | None] = [None] * len(work)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = work[i]()
        except Exception as e:  # noqa: BLE001 (re-raised after join, in the caller's thread)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,), name=f"lane-{i}")
               for i in range(1, len(work))]
    for t in threads:
        t.start()
    one(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


def begin_lanes(src: list[HelperChannel], dst: list[HelperChannel], ram_size: int) -> int:
    """RECV_BEGIN and SEND_BEGIN on lane 0 for len(src) lanes, JOIN on the others; the session
    id, bound on every destination lane."""
    n = len(src)
    if len(dst) != n:
        raise ValueError(f"{n} source lanes but {len(dst)} destination lanes")
    challenge = dst[0].recv_begin(ram_size, n)
    sid = src[0].send_begin(ram_size, challenge, n)
    for s, d in zip(src[1:], dst[1:], strict=True):
        s.join(challenge)
        d.join(challenge)
    for d in dst:
        d.bind(sid)
    return sid


class LaneWorkers:
    """The destination's side of the stream: work for lane l runs on lane l's thread, in the
    order it was submitted (a lane's records before its token), lanes side by side. With one
    lane everything runs on the caller's thread, as before lanes."""

    def __init__(self, lanes: int) -> None:
        self.errors: list[Exception] = []
        self.queues: list[queue.Queue] = []
        self.threads: list[threading.Thread] = []
        if lanes > 1:
            for i in range(lanes):
                q: queue.Queue = queue.Queue()
                t = threading.Thread(target=self._serve, args=(q,), name=f"lane-{i}",
                                     daemon=True)
                t.start()
                self.queues.append(q)
                self.threads.append(t)

    def _serve(self, q: queue.Queue) -> None:
        while True:
            fn = q.get()
            try:
                if fn is None:
                    return
                if not self.errors:  # after a failure the lane only drains
                    fn()
            except Exception as e:  # noqa: BLE001 (re-raised by drain, in the caller's thread)
                self.errors.append(e)
            finally:
                q.task_done()

    def submit(self, lane: int, fn: Callable[[], object]) -> None:
        if not self.queues:
            fn()
            return
        if self.errors:
            self.drain()
        self.queues[lane].put(fn)

    def drain(self) -> None:
        """Wait until every lane did all its work; raise the first lane's error."""
        for q in self.queues:
            q.join()
        if self.errors:
            raise self.errors[0]

    def close(self) -> None:
        for q in self.queues:
            q.put(None)
        for t in self.threads:
            t.join()
        self.queues, self.threads = [], []
