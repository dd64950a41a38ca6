"""Parallel lanes in the emulator: the shipped image serves several mirror vCPUs,
each driven from its own host thread; pages split by the documented rule migrate in two
epochs and the destination finishes only when every lane did. SEV and SEV-ES, 1 and 2 lanes.
The publication and the cross-lane checks as compiled: read hooks count what each vCPU reads of
the publication and of other lanes' state, and a JOIN races lane 0's next publication."""

from __future__ import annotations

import pytest

from emulate.lanes import begin_lanes, lane_channels, lane_of, run_lanes, split_by_lane
from emulate.migration import Destination, MigrationParams, Source
from helperfw.runtime import protocol as P
from tests.mirror_host import PAGE, ReadCounter, efi_path

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


def _join(lane, challenge: int) -> int:
    """JOIN on this lane's channel: its status."""
    return lane.batch(P.OP_JOIN, challenge=challenge).status


def test_join_during_publication_is_refused_in_the_image() -> None:
    """Lane 0's SEND_BEGIN stopped right after it wrote the publication's last field (the
    generation still odd: every field is right, the generation not yet); lane 1's vCPU runs
    JOIN meanwhile and gets E_UNPUBLISHED; lane 0 resumes, completes, and the same JOIN then
    joins. The ordering as compiled, on two vCPUs of one mirror VM."""
    import struct

    from unicorn import UC_HOOK_MEM_WRITE

    from helperfw.runtime.session import HelperCtx
    from tests.mirror_host import MirrorHost, pack_command

    h = MirrorHost(47, P.OPT_SHIFT, seed=1302)
    assert h.bi.lanes == P.DEFAULT_LANES
    lane1 = lane_channels(h.mc, h.ch.mirror, 2, first=h.ch)[1]
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

    assert _join(lane1, challenge) == P.STATUS["E_UNPUBLISHED"][0]
    h.remove_hook(hook)
    assert h.vcpu.run(5_000_000).reason == "hlt"  # lane 0 finishes its SEND_BEGIN
    ctl = struct.unpack_from("<QQi", h.mc.host_read(h.mb + P.CONTROL_OFFSET, 20))
    assert ctl[1:] == (h.bell, 0)
    assert _join(lane1, challenge) == 0


class _Reads:
    """How often one vCPU read each byte of the helper's VA range [va, va+n) (one page), or of
    DRAM [hpa, hpa+n): a ReadCounter on that vCPU."""

    def __init__(self, vcpu, va: int, n: int, *, hpa: int | None = None) -> None:
        from unicorn import UC_HOOK_MEM_READ

        if hpa is None:
            _, hpa = vcpu.translate(va)
        assert hpa // PAGE == (hpa + n - 1) // PAGE
        self.lo, self.n = hpa, n
        self.rc = ReadCounter(hpa, hpa + n)
        vcpu.uc.hook_add(UC_HOOK_MEM_READ, lambda _uc, _acc, a, size, _v, _ud: self.rc(a, size),
                         None, hpa, hpa + n - 1)

    @property
    def counts(self) -> list[int]:
        page = self.rc.pages.get(self.lo & ~(PAGE - 1), bytes(PAGE))
        return list(page[self.lo % PAGE:self.lo % PAGE + self.n])

    def of(self, off: int, size: int) -> set[int]:
        return set(self.counts[off:off + size])

    def reset(self) -> None:
        self.rc.reset()


def _ctx_va(chan) -> int:
    """The helper's HelperCtx (the image's CTX) as its vCPUs address it."""
    from tests.mirror_host import symbols

    sym = symbols()
    return int(chan.mirror.info.bootinfo.entry_rip) - sym["mh_entry"] + sym["CTX"]


def test_cross_lane_state_is_read_once() -> None:
    """The publication's seqlock and the cross-lane checks as compiled: a JOIN reads the
    generation twice and each published field once (a second read could see the next
    publication); lane 0's *_BEGIN and RECV_FINISH read each field of another lane's state at
    most once, and the fields RECV_FINISH checks exactly once (that lane may run meanwhile:
    what is checked must be what is used). While pages move nothing crosses lanes: no lane
    reads the publication, lane 0 reads no other lane. Read hooks on every vCPU, 3 lanes."""
    import struct

    from helperfw.runtime.session import HelperCtx, LaneCtx

    n = 3
    p = MigrationParams(mem=32 << 20, option=P.OPT_SHIFT, image=efi_path(), seed=1303)
    src, dst = Source(p), Destination(p)
    sh = src.host
    sc = lane_channels(sh.mc, src.mirror, n, first=src.ch)
    dc = lane_channels(dst.host.mc, dst.mirror, n, first=dst.ch)
    pub = HelperCtx.offset("pub_gen")
    pub_len = HelperCtx.offset("pub_ram_size") + 8 - pub
    head = LaneCtx.offset("ks")  # every field lane 0 reads of another lane lies before the keys

    def watch(chans):
        ctx = _ctx_va(chans[0])
        v0 = chans[0].vcpu
        lane_vas = struct.unpack(f"<{n}Q", v0.read_virt(ctx + HelperCtx.offset("lane_ctx"), 8 * n))
        others = [_Reads(v0, va, head) for va in lane_vas[1:]]
        pubs = [_Reads(c.vcpu, ctx + pub, pub_len) for c in chans[1:]]
        cmds = [_Reads(c.vcpu, 0, P.Command.size, hpa=c.mb + P.COMMAND_OFFSET)
                for c in chans[1:]]
        return others, pubs, cmds

    s_others, s_pubs, s_cmds = watch(sc)
    d_others, d_pubs, d_cmds = watch(dc)
    gen = (0, 8)
    fields = [(HelperCtx.offset(f) - pub, 8 if f in ("pub_session_id", "pub_challenge",
                                                     "pub_ram_size") else 4)
              for f in ("pub_state", "pub_lanes", "pub_session_id", "pub_challenge",
                        "pub_ram_size")]
    assert sum(s for _, s in fields) + 8 == pub_len
    begin_lanes(sc, dc, -(-sh.ram_size // TWO_MIB) * TWO_MIB)
    for r in s_pubs + d_pubs:  # one JOIN each
        assert r.of(*gen) == {2} and all(r.of(*f) == {1} for f in fields), r.counts
    for r in s_cmds + d_cmds:  # the JOIN's command (and the destination's binding RECV)
        assert max(r.counts) == 1, r.counts
    for r in s_others + d_others:  # lane 0's *_BEGIN: lanes_clean
        assert max(r.counts) == 1 and r.of(LaneCtx.offset("gen"), 8) == {1}, r.counts
    for r in s_others + d_others + s_pubs + d_pubs:
        r.reset()

    pages = [a for a in sh.pages() if a not in src.skip and not sh.shared.is_shared(a)][:48]
    parts = split_by_lane(pages, n)
    for i in range(n):
        recs = sc[i].send(parts[i])
        tok = sc[i].token(P.OP_SEND_END_EPOCH)
        assert dc[i].recv(parts[i], recs) == [0] * len(parts[i])
        assert dc[i].put_token(P.OP_RECV_END_EPOCH, tok) == 0
    fins = [c.token(P.OP_SEND_FINISH) for c in sc]
    for i in range(1, n):
        assert dc[i].put_token(P.OP_RECV_FINISH, fins[i]) == 0
    assert all(max(r.counts) == 0 for r in s_others + d_others + s_pubs + d_pubs)
    assert dc[0].put_token(P.OP_RECV_FINISH, fins[0]) == 0
    checked = [(LaneCtx.offset(f), LaneCtx.fields[f].type.size)
               for f in ("state", "gen", "session_id", "challenge", "epoch", "poisoned")]
    for r in d_others:
        assert max(r.counts) == 1 and all(r.of(*f) == {1} for f in checked), r.counts

    # session 2 on lanes 0-1: every lane holds installs now (lane 2's of the finished session
    # 1), so lanes_clean and lanes_finished read the generations they compare, and lane 2 is
    # outside the session
    def once(rs) -> None:
        assert all(max(r.counts) <= 1 for r in rs), [r.counts for r in rs]
        for r in rs:
            r.reset()

    for r in d_others:
        r.reset()
    begin_lanes(sc[:2], dc[:2], -(-sh.ram_size // TWO_MIB) * TWO_MIB)
    once(d_others)
    parts = split_by_lane(pages, 2)
    recs = [sc[i].send(parts[i]) for i in range(2)]
    toks = [sc[i].token(P.OP_SEND_END_EPOCH) for i in range(2)]
    assert dc[1].recv(parts[1], recs[1]) == [0] * len(parts[1])
    # a stray SEND_BEGIN while lane 1 holds installs of the live session: refused, not discarded
    stray = dc[0].batch(P.OP_SEND_BEGIN, ram_size=32 << 20, challenge=5, count=2)
    assert stray.status == P.STATUS["E_BAD_STATE"][0]
    once(d_others)
    assert dc[0].recv(parts[0], recs[0]) == [0] * len(parts[0])
    for i in range(2):
        assert dc[i].put_token(P.OP_RECV_END_EPOCH, toks[i]) == 0
    fins = [c.token(P.OP_SEND_FINISH) for c in sc[:2]]
    assert dc[1].put_token(P.OP_RECV_FINISH, fins[1]) == 0
    for r in d_others:
        r.reset()
    assert dc[0].put_token(P.OP_RECV_FINISH, fins[0]) == 0
    assert d_others[1].of(LaneCtx.offset("state"), 4) == {1}  # lane 2, outside the session
    once(d_others)


def test_a_publication_completed_during_the_copy_is_refused() -> None:
    """Lane 0 ends its session and publishes the next while lane 1's JOIN copies the fields
    (between the JOIN's two reads of the generation, both even): the copy may mix two sessions,
    so the JOIN answers E_UNPUBLISHED; tried again, it joins the new one."""
    import struct

    from helperfw.runtime.session import HelperCtx
    from tests.mirror_host import MirrorHost, pack_command

    h = MirrorHost(47, P.OPT_SHIFT, seed=1304)
    lane1 = lane_channels(h.mc, h.ch.mirror, 2, first=h.ch)[1]
    challenge = 0xC4A1_0000_0000_0014
    res = h.batch(pack_command(P.OP_SEND_BEGIN, count=2, ram_size=32 << 20, challenge=challenge))
    assert res.status == 0
    ctx = h.symbol_gpa("CTX")  # = the helper's VA
    gen_va = ctx + HelperCtx.offset("pub_gen")
    gen = struct.unpack("<Q", lane1.vcpu.read_virt(gen_va, 8))[0]
    _, state_hpa = lane1.vcpu.translate(ctx + HelperCtx.offset("pub_state"))
    from unicorn import UC_HOOK_MEM_READ

    def republish(_uc, _acc, _a, _size, _val, _ud) -> None:
        if struct.unpack("<Q", lane1.vcpu.read_virt(gen_va, 8))[0] == gen:
            lane1.vcpu.write_virt(gen_va, struct.pack("<Q", gen + 2))

    hook = lane1.vcpu.uc.hook_add(UC_HOOK_MEM_READ, republish, None, state_hpa, state_hpa + 3)

    assert _join(lane1, challenge) == P.STATUS["E_UNPUBLISHED"][0]
    lane1.vcpu.uc.hook_del(hook)
    assert _join(lane1, challenge) == 0
