"""End-to-end live migration under emulation, with the built MigrationHelper.efi on both sides.

Matrix: every option (shift, tuples, isolated) × C-bit 47 and 51, each with 32 MiB of guest RAM
(pc.ram, a DIMM at 4 GiB, an unplugged virtio-mem block), the three transports spread over the
matrix, each with 1 lane and with 2 lanes (two mirror vCPUs per side, one thread each). The guest keeps dirtying memory between helper batches, so
every run has at least two pre-copy rounds before stop-and-copy (isolated/C-bit 51 also splits
round 1 into several helper epochs). Success: destination private
memory (C=1, its own key) equals the source's page for page, shared pages equal raw, private
DRAM differs (other key), and the guest resumes on the destination. A tampered, dropped or
replayed record in the stream is refused by the destination helper without touching memory.

SEV-ES matrix: the same options × C-bits with 32 MiB guests whose registers no host can read:
the guest parks its vCPU before stop-and-copy (its state travels as private pages, the stream
carries VCPU_PARKED, not CPU_STATE) and resumes on the destination from its AP jump table. One
of them scans, at every exit of every vCPU on both hosts (every VMGEXIT included), the GHCB,
the mailbox and all shared memory for the transport key, the session keys and the guest's
private plaintext.
Runtime: about 1.5 minutes on the 2-core machine for the SEV matrix (32 MiB runs take 8-12 s
each), about as much again for SEV-ES.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from emulate import guest as G
from emulate import stream as S
from emulate.attacker import HostHands
from emulate.ghcb import GhcbHost
from emulate.host import Host
from emulate.lanes import split_by_lane
from emulate.machine import VCpu
from emulate.memctl import PAGE
from emulate.migration import (
    VIRTIO_MEM_SETUP_GPA,
    Destination,
    Migration,
    MigrationParams,
)
from helperfw.cli import main as cli_main
from helperfw.runtime import protocol as P
from tests.hostile_common import LeakScanner
from tests.session_host import open_record, session_keys

SEED = 20261125
MEM = 32 << 20  # 8192 pages: several rounds, epochs and batches per round, and a quick matrix

MATRIX = [  # (option, C-bit, transport)
    (P.OPT_SHIFT, 47, "memory"),
    (P.OPT_SHIFT, 51, "tcp"),
    (P.OPT_TUPLES, 47, "tcp"),
    (P.OPT_TUPLES, 51, "file"),
    (P.OPT_ISOLATED, 47, "file"),
    (P.OPT_ISOLATED, 51, "tcp"),
]


@pytest.fixture(scope="module")
def image(firmware) -> Path:
    """The image as shipped (+ map), built from these sources (tests/firmware.py)."""
    return firmware.efi


def params(image: Path, option: int, cbit: int, transport: str, tmp: Path, *, mem: int = MEM,
           seed: int = SEED) -> MigrationParams:
    if transport == "file":
        transport = f"file:{tmp / 'stream.bin'}"
    return MigrationParams(mem=mem, option=option, cbit=cbit, seed=seed, image=image,
                           transport=transport)


# Every row runs with 1 lane and with 2 lanes (the SEV-ES shift/47 2-lane row with the leak
# scan over every lane's mailbox); tests/test_lanes_emu.py drives lanes directly.
LANE_COUNTS = (1, 2)


def with_lanes(matrix):
    return [(*row, n) for n in LANE_COUNTS for row in matrix]


def check_exits(res, m: Migration, lanes: int) -> None:
    """One mirror exit per batch of up to 64 pages (+ begin/epoch/finish ops); with lanes, each
    lane's last batch of a round may be short: at most 1/32 per side, every lane used."""
    assert res.src_exits == res.dst_exits
    if lanes == 1:
        assert 1 / 64 <= res.exits_per_page / 2 < 1 / 60
    else:
        assert 1 / 64 <= res.exits_per_page / 2 <= 1 / 32
        assert len(m.src.lanes) == len(m.dst.lanes) == lanes
        assert all(c.exits > 1 for c in m.src.lanes + m.dst.lanes), "every lane did batches"


@pytest.mark.parametrize(("option", "cbit", "transport", "lanes"), with_lanes(MATRIX),
                         ids=[f"{P.OPTION_NAMES[o]}-c{c}-{t}-lanes{n}"
                              for o, c, t, n in with_lanes(MATRIX)])
def test_live_migration(image, tmp_path, option, cbit, transport, lanes):
    print("seed", SEED, "option", P.OPTION_NAMES[option], "cbit", cbit, "transport", transport,
          "lanes", lanes)
    p = params(image, option, cbit, transport, tmp_path)
    p.lanes = lanes
    if option == P.OPT_ISOLATED and cbit == 51:
        p.epoch_records = 4096 // lanes  # round 1 spans several helper epochs
    m = Migration(p)
    res = m.run()
    v = res.verification
    assert v is not None and v.ok, v.summary()
    src, dst = m.src, m.dst
    ram_pages = MEM // P.PAGE_SIZE
    assert v.private_pages + v.shared_pages + v.skipped_pages == ram_pages
    assert v.shared_pages == 64 and v.private_pages > ram_pages * 9 // 10
    # pre-copy while the guest dirties memory, then stop-and-copy
    pre = [r for r in res.rounds if not r.final]
    assert len(pre) >= 2 and res.rounds[-1].final and len(res.rounds) == len(pre) + 1
    assert pre[0].pages == ram_pages - v.skipped_pages
    assert all(r.guest_touches > 0 for r in pre)
    assert all(a.dirty_after == b.pages for a, b in zip(res.rounds, res.rounds[1:]))
    check_exits(res, m, lanes)
    assert dst.counts["epochs"] == res.epochs
    # one epoch per round, round 1 split when its fullest lane passes epoch_records; every
    # lane ends every epoch with its own token
    fullest = pre[0].private if lanes == 1 else max(
        len(part) for part in split_by_lane(
            [a for a in src.host.pages() if a not in src.skip and not src.host.shared.is_shared(a)],
            lanes))
    assert res.epochs == lanes * (len(res.rounds) - 1 + -(-fullest // p.epoch_records))
    assert res.bytes_on_wire > res.private_pages * P.SLOT_SIZE
    assert res.guest_exits > sum(r.dirty_after for r in pre) // 2  # write-protection faults
    if transport == "tcp":  # concurrent: the downtime is stop-and-copy plus the catch-up
        assert 0 < res.downtime < res.seconds
    # the unplugged virtio-mem block arrived by ram_addr (only the mirror's window reaches it)
    vmem = dst.host.blocks[2]
    assert vmem.gpa is None
    for off in (0, vmem.size - P.PAGE_SIZE):
        want = G.expected_page(VIRTIO_MEM_SETUP_GPA + off, 15)
        assert dst.host.mirror.vm.read(dst.host.mirror.ram_base + vmem.offset + off,
                                       P.PAGE_SIZE, encrypted=True) == want
    assert src.host.shared.ranges() == dst.host.shared.ranges()
    if transport == "file":
        check_stream_file(tmp_path / "stream.bin", res.session_id, res.challenge, src)


ES_MEM = 32 << 20
ES_MATRIX = [  # (option, C-bit, transport), all SEV-ES
    (P.OPT_SHIFT, 47, "memory"),
    (P.OPT_SHIFT, 51, "file"),
    (P.OPT_TUPLES, 47, "tcp"),
    (P.OPT_TUPLES, 51, "memory"),
    (P.OPT_ISOLATED, 47, "file"),
    (P.OPT_ISOLATED, 51, "tcp"),
]
LEAK_SCAN = (P.OPT_SHIFT, 47, 2)  # the SEV-ES case that scans at every exit (every lane's
#                                   mailbox among the pages scanned)
SAMPLE_EVERY = 32  # private pages whose plaintext it looks for: one in SAMPLE_EVERY (a bigger
#                    set of blocks makes every scan slower: cache misses)
ES_SHARED_EXTRA = 3  # the firmware's GHCB, the workload's GHCB and its control page


class ExitLeakScan:
    """At every exit of every vCPU (each `VCpu.run` returning, each VMGEXIT as the host serves
    it) of every host: scan the exit's GHCB page, the mailbox and every shared page for the
    transport key, the session keys and private guest plaintext (one in SAMPLE_EVERY of the
    source's private pages, taken once the guest has filled them). A page is scanned again only when
    its bytes changed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, key: bytes) -> None:
        self.scanner = LeakScanner()
        self.scanner.add(key)
        self.key = key
        self.hosts: list[Host] = []
        self.seen: dict[tuple[int, int], bytes] = {}
        self.exits = self.scans = 0
        self.sampled = False
        self.sessions: set[tuple[int, int]] = set()
        self.hits: list[str] = []
        scan = self
        host_init, run, record = Host.__init__, VCpu.run, GhcbHost._record

        def new_host(h: Host, *a, **kw) -> None:
            scan.hosts.append(h)
            host_init(h, *a, **kw)

        def new_run(v: VCpu, *a, **kw):
            ex = run(v, *a, **kw)
            scan.exit(v, None)
            return ex

        def new_record(g: GhcbHost, v: VCpu, rec):
            scan.exit(v, rec.msr if rec.protocol == "ghcb" else None)
            return record(g, v, rec)

        monkeypatch.setattr(Host, "__init__", new_host)
        monkeypatch.setattr(VCpu, "run", new_run)
        monkeypatch.setattr(GhcbHost, "_record", new_record)

    def learn(self, m: Migration) -> None:
        """Secrets that appear during the run: the session keys, the guest's plaintext."""
        sid = getattr(m, "session_id", 0)
        if sid and (sid, m.challenge) not in self.sessions:
            self.sessions.add((sid, m.challenge))
            for k in session_keys(self.key, sid, m.challenge):
                self.scanner.add(k)
        if not self.sampled and getattr(m.src, "guest", None) is not None:
            self.sampled = True
            h = m.src.host
            for ra in range(0, h.ram_size, SAMPLE_EVERY * PAGE):
                if ra not in m.src.skip and not h.shared.is_shared(ra):
                    self.scanner.add(h.read_private(ra))

    def exit(self, v: VCpu, ghcb_gpa: int | None) -> None:
        self.exits += 1
        host = next((h for h in self.hosts if h.mc is v.mc), None)
        if host is None or not hasattr(host, "shared"):
            return
        hpas = [host.ram_hpa(ra) for start, n in host.shared.ranges()
                for ra in range(start, start + n, PAGE)]
        if host.mirror is not None:  # every lane's mailbox
            mirror = host.mirror
            for lane in range(int(mirror.info.bootinfo.lanes)):
                gpa = int(mirror.info.bootinfo.lane_info[lane].mailbox_mirror_gpa)
                base = mirror.vm.gpa_to_hpa(gpa)
                hpas += [base + i * PAGE for i in range(P.MAILBOX_PAGES)]
        if ghcb_gpa:
            hpas.append(v.vm.gpa_to_hpa(ghcb_gpa))
        for hpa in hpas:
            data = host.mc.host_read(hpa, PAGE)
            if self.seen.get((id(host), hpa)) == data:
                continue
            self.seen[(id(host), hpa)] = data
            self.scans += 1
            for off in self.scanner.scan(data):
                self.hits.append(f"{host.name} hpa {hpa:#x}+{off:#x} at exit {self.exits}")


@pytest.mark.parametrize(("option", "cbit", "transport", "lanes"),
                         with_lanes(ES_MATRIX),
                         ids=[f"sev-es-{P.OPTION_NAMES[o]}-c{c}-{t}-lanes{n}"
                              for o, c, t, n in with_lanes(ES_MATRIX)])
def test_live_migration_sev_es(image, tmp_path, monkeypatch, option, cbit, transport, lanes):
    print("seed", SEED, "SEV-ES option", P.OPTION_NAMES[option], "cbit", cbit, transport,
          "lanes", lanes)
    p = params(image, option, cbit, transport, tmp_path, mem=ES_MEM)
    p.sev_es, p.lanes = True, lanes
    scan = ExitLeakScan(monkeypatch, p.key) if (option, cbit, lanes) == LEAK_SCAN else None
    m = Migration(p)
    if scan is not None:
        src_send = m.src.ch.send

        def send(addrs):  # learn the session keys and the guest's pages as they appear
            scan.learn(m)
            return src_send(addrs)

        m.src.ch.send = send
    res = m.run()
    v = res.verification
    assert v is not None and v.ok, v.summary()
    src, dst = m.src, m.dst
    ram_pages = ES_MEM // P.PAGE_SIZE
    assert v.private_pages + v.shared_pages + v.skipped_pages == ram_pages
    assert v.shared_pages == 64 + ES_SHARED_EXTRA
    pre = [r for r in res.rounds if not r.final]
    assert len(pre) >= 2 and res.rounds[-1].final
    assert all(a.dirty_after == b.pages for a, b in zip(res.rounds, res.rounds[1:]))
    check_exits(res, m, lanes)
    # the guest parked on the source, came back once on the destination, and runs there
    assert src.host.uefi.vcpu.hold is not None, "the source vCPU stays in the AP reset hold"
    src_cfg, dst_cfg = G.read_cfg(src.host, src.guest), G.read_cfg(dst.host, src.guest)
    assert (src_cfg.sev_es, src_cfg.parks, dst_cfg.parks) == (1, 0, 1)
    assert dst_cfg.touches > src_cfg.touches, "it kept dirtying memory on the destination"
    assert dst.host.vm.ghcb.ap_jump_table == src.guest.jt
    assert dst.cpu is None
    with pytest.raises(Exception, match="SEV-ES vCPU"):
        src.cpu_state()
    if transport == "file":
        kinds = {rec.kind for rec in S.read_stream((tmp_path / "stream.bin").open("rb"))}
        assert S.VCPU_PARKED in kinds and S.CPU_STATE not in kinds
        check_stream_file(tmp_path / "stream.bin", res.session_id, res.challenge, src)
    if scan is not None:
        print(f"leak scan: {scan.exits} exits, {scan.scans} page scans, "
              f"{len(scan.scanner.blocks)} secret blocks")
        assert scan.sampled and scan.sessions and scan.exits > 1000
        assert not scan.hits, scan.hits[:5]


def check_stream_file(path: Path, session_id: int, challenge: int, src) -> None:
    """The stream on disk: private records open with an outside AES-GCM-SIV and the transport
    key to what the source guest holds (pages it never rewrote: the virtio-mem block)."""
    vmem = src.host.blocks[2]
    opened = 0
    with path.open("rb") as f:
        for rec in S.read_stream(f):
            if rec.kind != S.PRIVATE_PAGES:
                continue
            for pg in rec.body.pages:
                if vmem.offset <= pg.ram_addr < vmem.end and opened < 8:
                    _env, plain = open_record(src.p.key, session_id, challenge,
                                              pg.record)
                    assert plain == src.host.read_private(pg.ram_addr)
                    opened += 1
    assert opened == 8


class SavedDestination:
    """The destination host right after its RECV_BEGIN (its machine and its mailbox counters),
    so every hostile stream meets the session the stream was bound to: a host can save and
    restore its whole VM."""

    def __init__(self, dst: Destination) -> None:
        self.dst = dst
        self.hands = HostHands(dst.host.mc)
        self.snap = self.hands.snapshot_machine([dst.mirror.vcpu])
        self.bell = dst.ch.bell

    def fresh(self) -> Destination:
        self.hands.restore_machine(self.snap)
        d = self.dst
        d.ch.bell, d.ch.session_id, d.finished, d.cpu = self.bell, 0, False, None
        d.counts = {"private": 0, "shared": 0, "epochs": 0}
        return d


@pytest.fixture(scope="module")
def small_stream(image, tmp_path_factory):
    """A 32 MiB migration through a file, kept for the hostile-stream tests, and its
    destination as it was when the stream was bound to it."""
    tmp = tmp_path_factory.mktemp("hostile")
    p = params(image, P.OPT_TUPLES, 47, "file", tmp, mem=32 << 20, seed=SEED + 1)
    m = Migration(p)
    m.open()
    saved = SavedDestination(m.dst)
    res = m.run()
    assert res.verification.ok
    return p, (tmp / "stream.bin").read_bytes(), saved


def _frames(raw: bytes) -> list[tuple[int, int, int]]:
    """(offset, kind, total length) of each record."""
    out, off = [], S.Header.sizeof()
    while off < len(raw):
        f = S.Frame.parse(raw[off : off + 5])
        out.append((off, f.kind, 5 + f.length))
        off += 5 + f.length
    return out


@pytest.mark.parametrize("attack", ["tamper", "drop", "replay"])
def test_hostile_stream_is_refused(small_stream, attack):
    print("seed", SEED + 1, "attack", attack)
    _p, raw, saved = small_stream
    frames = [f for f in _frames(raw) if f[1] == S.PRIVATE_PAGES]
    off, _kind, ln = frames[3]
    body = S.BODIES[S.PRIVATE_PAGES].parse(raw[off + 5 : off + ln])
    victim = body.pages[0].ram_addr
    if attack == "tamper":  # one ciphertext bit of the first page in the record
        b = bytearray(raw)
        b[off + 5 + 2 + 8 + 64 + 100] ^= 0x04
        bad, want = bytes(b), re.escape(f"refused 1 records: [('{hex(victim)}', 'E_AUTH')")
    elif attack == "drop":  # the epoch's token no longer matches what arrived
        bad, want = raw[:off] + raw[off + ln :], "RECV_END_EPOCH refused: E_EPOCH"
    else:  # the same record delivered twice
        bad, want = raw[: off + ln] + raw[off : off + ln] + raw[off + ln :], "E_REPLAY"
    dst = saved.fresh()
    before = dst.host.read_private(victim)
    with pytest.raises(S.StreamError, match=want):
        dst.receive(io.BytesIO(bad))
    if attack == "tamper":
        assert dst.host.read_private(victim) == before, "a refused record wrote nothing"
    assert not dst.finished


def test_migrate_cli(image):
    out = io.StringIO()
    status = cli_main(["migrate", "--mem", "32M", "--option", "isolated", "--cbit", "51",
                       "--sev-es", "--lanes", "2", "--transport", "memory", "--no-progress",
                       "--image", str(image), "--seed", str(SEED)], out=out)
    text = out.getvalue()
    print(text)
    assert status == 0, text
    for needle in ("32 MiB SEV-ES guest", "option isolated, C-bit 51", "lanes 2",
                   "round 1 (pre-copy)", "(stop-and-copy)", "pages/s", "exits/page",
                   "bytes on the wire", "verification: PASS", "guest resumed on destination: True"):
        assert needle in text
