"""Parallel lanes in the emulator: the shipped image serves several mirror vCPUs,
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


def test_join_during_publication_is_refused_in_the_image() -> None:
    """Lane 0's SEND_BEGIN stopped right after it wrote the publication's last field (the
    generation still odd: every field is right, the generation not yet); lane 1's vCPU runs
    JOIN meanwhile and gets E_UNPUBLISHED; lane 0 resumes, completes, and the same JOIN then
    joins. The ordering as compiled, on two vCPUs of one mirror VM."""
    import struct

    from unicorn import UC_HOOK_MEM_WRITE

    from helperfw.runtime.session import HelperCtx
    from tests.mirror_host import PAGE, MirrorHost, pack_command

    h = MirrorHost(47, P.OPT_SHIFT, seed=1302)
    bi = h.bi
    assert bi.lanes == P.DEFAULT_LANES
    e1 = bi.lane_info[1]
    lane1 = h.mirror.create_vcpu(rip=bi.entry_rip, cr3=bi.cr3, rsp=e1.rsp)
    mb1 = h.vm.gpa_to_hpa(e1.mailbox_gpa)
    off = HelperCtx.offset("pub_ram_size")
    last_hpa = h.symbol_hpas("CTX")[off // PAGE] + off % PAGE
    stopped = []

    def on_last(uc, _acc, _hpa, _size, value, _ud) -> None:
        if not stopped:
            stopped.append(value)
            uc.emu_stop()

    hook = h.vcpu.uc.hook_add(UC_HOOK_MEM_WRITE, on_last, None, last_hpa, last_hpa + 7)
    challenge = 0xC4A1_0000_0000_0013
    h.mc.host_write(h.mb + PAGE, pack_command(P.OP_SEND_BEGIN, count=2, ram_size=32 << 20,
                                              challenge=challenge))
    h.bell += 1
    h.mc.host_write(h.mb + P.CONTROL_OFFSET, struct.pack("<Q", h.bell))
    ex = h.vcpu.run(5_000_000)
    assert stopped and ex.reason != "hlt"  # lane 0 is mid-publication

    def join() -> int:
        h.mc.host_write(mb1 + PAGE, pack_command(P.OP_JOIN, challenge=challenge))
        bell = struct.unpack("<Q", h.mc.host_read(mb1 + P.CONTROL_OFFSET, 8))[0] + 1
        h.mc.host_write(mb1 + P.CONTROL_OFFSET, struct.pack("<Q", bell))
        assert lane1.run(5_000_000).reason == "hlt"
        completed, status = struct.unpack_from("<Qi", h.mc.host_read(mb1 + P.CONTROL_OFFSET + 8,
                                                                     12))
        assert completed == bell
        return status

    assert join() == P.STATUS["E_UNPUBLISHED"][0]
    h.remove_hook(hook)
    assert h.vcpu.run(5_000_000).reason == "hlt"  # lane 0 finishes its SEND_BEGIN
    ctl = struct.unpack_from("<QQi", h.mc.host_read(h.mb + P.CONTROL_OFFSET, 20))
    assert ctl[1:] == (h.bell, 0)
    assert join() == 0
