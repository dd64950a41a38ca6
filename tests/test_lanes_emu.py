"""Parallel lanes in the emulator (issue 13): the shipped image serves several mirror vCPUs,
each driven from its own host thread; pages split by the documented rule migrate in two
epochs and the destination finishes only when every lane did. SEV and SEV-ES, 1 and 2 lanes."""

from __future__ import annotations

import pytest

from emulate.lanes import begin_lanes, lane_channels, lane_of, run_lanes, split_by_lane
from emulate.migration import Destination, MigrationParams, Source
from helperfw.runtime import protocol as P
from tests.mirror_host import efi_path

PAGES = 320
TWO_MIB = 2 << 20


@pytest.mark.parametrize("lanes", [1, 2])
@pytest.mark.parametrize("sev_es", [False, True], ids=["sev", "sev-es"])
def test_lanes_migrate_in_parallel(sev_es: bool, lanes: int) -> None:
    p = MigrationParams(mem=32 << 20, option=P.OPT_SHIFT, sev_es=sev_es, image=efi_path(),
                        seed=1301)
    src, dst = Source(p), Destination(p)
    sh = src.host
    assert src.mirror.info.bootinfo.lanes == P.DEFAULT_LANES  # type: ignore[attr-defined]
    pages = [a for a in sh.pages() if a not in src.skip and not sh.shared.is_shared(a)][:PAGES]
    sc = lane_channels(sh.mc, src.mirror, lanes)
    dc = lane_channels(dst.host.mc, dst.mirror, lanes)
    sc[0], dc[0] = src.ch, dst.ch  # lane 0 is the mirror's first vCPU
    begin_lanes(sc, dc, -(-sh.ram_size // TWO_MIB) * TWO_MIB)
    parts = split_by_lane(pages, lanes)
    exits0 = sum(c.exits for c in sc)

    def epoch(half: int):
        def lane(i: int):
            def work():
                mine = parts[i][half::2]
                recs = [(b, sc[i].send(b)) for b in
                        (mine[k:k + sc[i].slots] for k in range(0, len(mine), sc[i].slots))]
                tok = sc[i].token(P.OP_SEND_END_EPOCH)
                for b, r in recs:
                    assert all(P.Envelope.parse(x[:64]).lane == i for x in r)
                    assert dc[i].recv(b, r) == [0] * len(b)
                return dc[i].put_token(P.OP_RECV_END_EPOCH, tok)
            return work
        assert run_lanes([lane(i) for i in range(lanes)]) == [0] * lanes

    epoch(0)
    epoch(1)
    sealing_exits = sum(c.exits for c in sc) - exits0
    fins = [c.token(P.OP_SEND_FINISH) for c in sc]
    for i in range(1, lanes):
        assert dc[i].put_token(P.OP_RECV_FINISH, fins[i]) == 0
    assert dc[0].put_token(P.OP_RECV_FINISH, fins[0]) == 0
    assert all(dst.host.read_private(a) == sh.read_private(a) for a in pages)
    assert sum(sh.read_private(a) != bytes(4096) for a in pages) > PAGES // 2  # real content
    assert {lane_of(a, lanes) for a in pages} == set(range(lanes))
    # per side: one exit per batch of up to 64 pages, plus one per lane per epoch token
    assert sealing_exits / len(pages) <= 1 / 32 + 2 * lanes / len(pages)
