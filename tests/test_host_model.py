"""The host model (emulate.host, emulate.mailbox) and the DSL guest workload (emulate.guest):
ram_addr bookkeeping, the shared-region list by ram_addr, MSR_KVM_MIGRATION_CONTROL, dirty
logging by write protection, memory unplug, the mirror VM for each option from the real helper
image, and the mailbox driver (one exit per batch, refusals); under SEV-ES the workload's GHCB,
its AP jump table and the park / wake cycle of its vCPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from emulate import guest as G
from emulate.host import FOUR_GIB, Host, SharedRegions, default_layout
from emulate.machine import RegisterAccessDenied
from emulate.mailbox import HelperChannel, MailboxError
from emulate.memctl import PAGE
from emulate.migration import workload_image
from emulate.seeds import transport_key
from emulate.workload import JT_MAGIC, ApJumpTable
from helperfw.runtime import protocol as P
from helperfw.runtime.platform import KVM_HC_MAP_GPA_RANGE
from tests.session_host import open_record

SEED = 7070
KEY = bytes(range(0x80, 0xA0))
CHALLENGE = 0x5EED_C0DE_0000_0001  # a destination challenge (any non-zero value seals)
MEM = 32 << 20
NEG = 2**64


@pytest.fixture(scope="module")
def image(firmware) -> Path:
    """The helper as shipped, built from these sources (tests/firmware.py)."""
    return firmware.efi


def test_shared_regions_by_page():
    s = SharedRegions(64 * PAGE)
    s.set(3 * PAGE, 2 * PAGE, True)
    s.set(10 * PAGE, PAGE, True)
    s.set(4 * PAGE, PAGE, False)
    assert s.ranges() == [(3 * PAGE, PAGE), (10 * PAGE, PAGE)]
    assert s.is_shared(10 * PAGE) and not s.is_shared(4 * PAGE) and s.pages == 2
    s.replace([(60 * PAGE, 4 * PAGE)])
    assert s.ranges() == [(60 * PAGE, 4 * PAGE)]


def test_ram_blocks_and_address_conversions():
    h = Host("t", default_layout(MEM), seed=SEED)
    pc, dimm, vmem = h.blocks
    assert (pc.offset, pc.gpa, dimm.gpa, vmem.gpa) == (0, 0, FOUR_GIB, None)
    assert dimm.offset == pc.size and vmem.offset == pc.size + dimm.size == h.ram_size - vmem.size
    assert h.gpa_to_ram_addr(0x1234) == 0x1234
    assert h.gpa_to_ram_addr(FOUR_GIB + 0x5000) == dimm.offset + 0x5000
    assert h.gpa_to_ram_addr(pc.size) is None  # the hole below 4 GiB
    assert h.ram_addr_to_gpa(vmem.offset) is None  # unplugged: no GPA at all
    assert h.ram_hpa(vmem.offset + PAGE) == vmem.hpa + PAGE
    with pytest.raises(ValueError, match="outside every RAM block"):
        h.block_of(h.ram_size)


def test_map_gpa_range_hypercall_is_recorded_by_ram_addr():
    h = Host("t", default_layout(MEM), seed=SEED)
    dimm = h.blocks[1]
    hc = h.vm.hypercall
    # 2 MiB page-size code (a2 = 1): one 2 MiB page of the DIMM becomes shared
    assert hc(None, KVM_HC_MAP_GPA_RANGE, FOUR_GIB, 1, 1, 0) == 0
    assert h.shared.ranges() == [(dimm.offset, 2 << 20)]
    # bit 4 set: back to encrypted, 4 KiB pages
    assert hc(None, KVM_HC_MAP_GPA_RANGE, FOUR_GIB, 16, 0x10, 0) == 0
    assert h.shared.ranges() == [(dimm.offset + 16 * PAGE, (2 << 20) - 16 * PAGE)]
    assert hc(None, KVM_HC_MAP_GPA_RANGE, FOUR_GIB + 1, 1, 0, 0) == NEG - 22  # unaligned
    assert hc(None, KVM_HC_MAP_GPA_RANGE, 0, 1, 0x40, 0) == NEG - 22  # unknown flag
    assert hc(None, KVM_HC_MAP_GPA_RANGE, h.blocks[0].size, 1, 0, 0) == NEG - 22  # no RAM there
    assert hc(None, 99, 0, 0, 0, 0) == NEG - 1000  # -KVM_ENOSYS


def test_every_key_and_stream_derives_from_the_host_seed():
    """DRAM keys and the main VM's RDRAND replay from the host's seed and change with it."""
    def fingerprint(seed: int) -> tuple[bytes, list[int]]:
        h = Host("t", default_layout(MEM), seed=seed)
        h.vm.write(0x10000, bytes(PAGE), encrypted=True)
        return h.read_raw(0x10000, 64), [h.vm.rdrand.draw(64)[0] for _ in range(3)]

    print("seed", SEED)
    assert fingerprint(SEED) == fingerprint(SEED)
    other = fingerprint(SEED + 1)
    assert all(a != b for a, b in zip(fingerprint(SEED), other, strict=True))
    assert transport_key(SEED) == transport_key(SEED) != transport_key(SEED + 1)
    assert len(transport_key(SEED)) == 32


def boot_guest(h: Host, *, plug_vmem: bool = True):
    """The workload's set-up in a firmware-only VM; returns (loaded guest, regions by name)."""
    vmem = h.blocks[2]
    if plug_vmem:
        h.plug(vmem, 8 << 30)
    base = 4 << 20
    named = {
        "shared_low": G.Region(base + 5 * PAGE, 20, G.GR_SHARED | G.GR_DIRTY, 1),
        "private": G.Region(base + 25 * PAGE, 1000, G.GR_DIRTY, 2),
        "dimm_shared": G.Region(FOUR_GIB + (1 << 20), 8, G.GR_SHARED, 3),
        "dimm": G.Region(FOUR_GIB, 256, G.GR_DIRTY, 4),
        "vmem": G.Region(vmem.gpa, 64, G.GR_PRIVATE, 5),
    }
    g = G.load(h, workload_image(), list(named.values()), hot_va=base + 25 * PAGE,
               hot_pages=64, seed=SEED)
    ex = h.uefi.vcpu.run(budget=None)
    assert ex.reason == "stop" and "MSR_KVM_MIGRATION_CONTROL=1" in ex.detail, ex
    return g, named


def test_guest_workload_shares_pages_and_enables_migration():
    print("seed", SEED)
    h = Host("t", default_layout(MEM), seed=SEED)
    g, r = boot_guest(h)
    cfg = G.read_cfg(h, g)
    assert (cfg.phase, cfg.hc_errors, cfg.shared_calls) == (1, 0, 2)
    assert h.migration_control == 1 and not h.hypercall_errors
    dimm = h.blocks[1]
    # the list is by ram_addr: the DIMM's window is at dimm.offset + 1 MiB, not at its GPA
    assert h.shared.ranges() == [(r["shared_low"].va, 20 * PAGE),
                                 (dimm.offset + (1 << 20), 8 * PAGE)]
    # shared pages hold the guest's plaintext in DRAM; private ones only ciphertext
    sh = r["shared_low"]
    assert h.read_raw(sh.va) == G.expected_page(sh.va, sh.seed)
    assert h.read_raw(dimm.offset + (1 << 20)) == G.expected_page(FOUR_GIB + (1 << 20), 3)
    pv = r["private"]  # in the same 2 MiB as the shared pages: the split kept its C-bit
    assert h.read_private(pv.va) == G.expected_page(pv.va, pv.seed)
    assert h.read_raw(pv.va) != G.expected_page(pv.va, pv.seed)
    vm_blk = h.blocks[2]
    assert h.read_private(vm_blk.offset) == G.expected_page(vm_blk.gpa, 5)


def test_sev_es_workload_parks_and_wakes_through_its_jump_table():
    """Under SEV-ES the workload shares its GHCB and control page (its hypercalls carry their
    arguments through the GHCB), registers its AP jump table, and parks on request: its state
    goes into the table (private: ciphertext to the host) and the vCPU waits in the AP reset
    hold; woken on the same side, it restores that state and dirties memory again, as often
    as asked. The host never reads a register."""
    print("seed", SEED)
    h = Host("t", default_layout(MEM), seed=SEED, sev_es=True)
    g, _r = boot_guest(h)
    cfg = G.read_cfg(h, g)
    assert (cfg.sev_es, cfg.hc_errors, cfg.shared_calls) == (1, 0, 4)
    assert h.vm.ghcb.ap_jump_table == g.jt
    for page in (g.ghcb, g.ctl, h.uefi.ghcb):
        assert h.shared.is_shared(h.gpa_to_ram_addr(page)), hex(page)
    maps = [e.inputs for e in h.vm.ghcb.log if e.request == "VMMCALL" and e.msr == g.ghcb]
    assert [(m["rbx"], m["rcx"]) for m in maps][:2] == [(g.ghcb, 1), (g.ctl, 1)]
    v = h.uefi.vcpu
    for parks in (1, 2):
        assert v.run(20_000).reason == "budget"
        G.request_park(h, g)
        ex = v.run(200_000)
        assert ex.reason == "reset_hold", str(ex)
        before = G.read_cfg(h, g).touches
        assert v.run(200_000).reason == "reset_hold" and G.read_cfg(h, g).touches == before
        jt = ApJumpTable.parse(h.vm.read(g.jt, ApJumpTable.size, encrypted=True))
        assert jt.magic == JT_MAGIC and jt.rsp and jt.cr3 == v.regs["cr3"]
        assert h.read_raw(h.gpa_to_ram_addr(g.jt))[:16] != h.vm.read(g.jt, 16, encrypted=True)
        with pytest.raises(RegisterAccessDenied):
            v.get("rsp")
        v.sipi()
        assert v.run(100_000).reason == "budget"
        cfg = G.read_cfg(h, g)
        assert cfg.parks == parks and cfg.touches > before


def test_dirty_log_write_protection_and_unplug():
    print("seed", SEED)
    h = Host("t", default_layout(MEM), seed=SEED)
    g, r = boot_guest(h)
    vmem = h.blocks[2]
    h.unplug(vmem)
    assert h.gpa_to_ram_addr(8 << 30) is None and h.ram_addr_to_gpa(vmem.offset) is None
    assert h.read_private(vmem.offset) == G.expected_page(8 << 30, 5)  # contents stay
    h.vm.set_dirty_logging(True)
    h.vm.get_dirty_log()
    assert h.uefi.vcpu.run(50_000).reason == "budget"
    log = h.vm.get_dirty_log()
    dirty = {h.gpa_to_ram_addr(h.vm.slots[s].gpa + i * PAGE) for s, idx in log.items()
             for i in idx}
    pv, dm, sh = r["private"], r["dimm"], r["shared_low"]
    allowed = set()
    for reg in (pv, dm, sh):
        allowed |= {h.gpa_to_ram_addr(reg.va + i * PAGE) for i in range(reg.pages)}
    allowed.add(g.cfg)  # the workload's own state page
    allowed |= set(range(g.stack_top - G.GUEST_STACK, g.stack_top, PAGE))
    hot = {pv.va + i * PAGE for i in range(64)}
    assert len(dirty & hot) > 32, "the hot set is written"
    assert dirty <= allowed, sorted(hex(a) for a in dirty - allowed)[:8]
    assert not h.vm.get_dirty_log(), "fetching the log cleared it"
    # write protection is re-armed: the same pages fault (and are logged) again
    assert h.uefi.vcpu.run(50_000).reason == "budget"
    again = h.vm.get_dirty_log()
    assert again and sum(map(len, again.values())) > 32


def boot_with_helper(image: Path, option: int, cbit: int = 47, seed: int = SEED) -> Host:
    h = Host("t", default_layout(MEM), cbit=cbit, seed=seed, uefi_seed=SEED)
    info = h.boot_helper(image, KEY, option)
    assert info.option == option and info.bootinfo.c_bit == cbit
    return h


@pytest.mark.parametrize("option", [P.OPT_SHIFT, P.OPT_TUPLES, P.OPT_ISOLATED],
                         ids=lambda o: P.OPTION_NAMES[o])
def test_mirror_for_each_option_runs_the_helper(image, option):
    print("seed", SEED)
    h = boot_with_helper(image, option, cbit=51)
    m = h.create_mirror()
    regions = h.info.regions
    slots = sorted((s.gpa, s.size, s.hpa) for s in m.vm.slots.values())
    window = [(m.ram_base + b.offset, b.size, b.hpa) for b in h.blocks]
    assert set(window) <= set(slots), "every block in the RAM window, unplugged ones too"
    if option == P.OPT_SHIFT:
        assert (0, h.blocks[0].size, 0) in slots and m.ram_base == FOUR_GIB
    else:
        for reg in regions:
            hpa = next(hp for g, _n, hp in slots if g == reg.mirror_gpa)
            if option == P.OPT_ISOLATED and reg.kind != P.REGION_MAILBOX:
                assert hpa >= h.ram_size, "copied into mirror-only DRAM"
                n = -(-reg.length // PAGE) * PAGE
                assert m.vm.read(reg.mirror_gpa, n, encrypted=True) == h.vm.read(
                    reg.main_gpa, n, encrypted=True), "the PSP copy re-encrypted for its place"
            else:
                assert hpa == h.vm.gpa_to_hpa(reg.main_gpa)
        assert m.copied_bytes > 0 if option == P.OPT_ISOLATED else m.copied_bytes == 0
    entry = h.info.bootinfo.entry_rip
    assert m.vcpu.symbolize(entry) == "mh_entry+0x0", "faults name the helper's mirror VAs"
    ch = HelperChannel(h.mc, m)
    hello = ch.hello()
    assert (hello.version, hello.slots, hello.option, hello.c_bit) == (2, 64, option, 51)
    # one private page sealed; it opens outside with the transport key
    ra = h.blocks[1].offset + 3 * PAGE  # a DIMM page: ram_addr != GPA
    secret = bytes((i * 7 + option) & 0xFF for i in range(PAGE))
    h.vm.write(FOUR_GIB + 3 * PAGE, secret, encrypted=True)
    sid = ch.send_begin(h.ram_size, CHALLENGE)
    (rec,) = ch.send([ra])
    env, plain = open_record(KEY, sid, CHALLENGE, rec)
    assert env.ram_addr == ra and plain == secret
    assert ch.exits == 3, "one exit per batch"


def test_mailbox_refusals_raise_and_leave_memory_alone(image):
    h = boot_with_helper(image, P.OPT_TUPLES)
    ch = HelperChannel(h.mc, h.create_mirror())
    d = boot_with_helper(image, P.OPT_TUPLES, seed=SEED + 1)  # other VM key, same layout
    dch = HelperChannel(d.mc, d.create_mirror())
    challenge = dch.recv_begin(d.ram_size)
    sid = ch.send_begin(h.ram_size, challenge)
    own = h.helper_ram_ranges()[0][0]
    with pytest.raises(MailboxError, match="E_SELF"):
        ch.send([own])
    with pytest.raises(MailboxError, match="E_RANGE"):
        ch.send([h.ram_size + PAGE])
    recs = ch.send([0x200000])
    # the destination's helper refuses a tampered record, page untouched
    dch.bind(sid)
    before = d.read_private(0x200000)
    bad = bytearray(recs[0])
    bad[100] ^= 1
    assert dch.recv([0x200000], [bytes(bad)]) == [P.STATUS["E_AUTH"][0]]
    assert d.read_private(0x200000) == before
    assert dch.recv([0x200000], recs) == [0]
    assert d.read_private(0x200000) == h.read_private(0x200000)
    # each VM's RDRAND is its own stream from its host's seed: the mirrors' differ from each
    # other and from their main VMs'
    seeds = {x.rdrand.seed for x in (h.vm, h.mirror.vm, d.vm, d.mirror.vm)}
    assert len(seeds) == 4
