"""The driver's SEV-active path in the emulator, then its mirror VM for every option.

Main VM: the UEFI stand-in loads the built MigrationHelper.efi with a launch secret; the driver makes
its mailbox shared, builds the mirror tables and announces BootInfo. Host side: a mirror VM
sharing the main VM's key is created the way the option says (shift: low 4 GiB 1:1; tuples:
regions host-mapped at their mirror GPAs; isolated: regions copied into mirror-only memory),
and one HELLO + SEND_BEGIN + SEND batch runs in it. The sealed page must open with an outside
AES-GCM-SIV to what the main VM holds at that ram_addr."""

from __future__ import annotations

import pytest

from emulate.mailbox import HelperChannel
from helperfw.runtime import protocol as P
from tests import mirror_host
from tests.mirror_host import KEY, RAM
from tests.session_host import open_record

SEED = 31337
CHALLENGE = 0x0DE5_71A7_1011_0001  # as a destination's RECV_BEGIN would have drawn


def boot(cbit: int, option: int, shift_high: int = 0):
    """The driver loaded with SEV: the host read BootInfo in plaintext (the driver made the
    mailbox shared and said so). Returns the host and BootInfo."""
    host = mirror_host.boot(cbit, option, key=KEY, seed=SEED, shift_high=shift_high)
    bi = host.info.bootinfo
    assert host.shared.is_shared(host.gpa_to_ram_addr(host.info.bootinfo_gpa))
    assert (bi.magic, bi.version, bi.option, bi.c_bit, bi.active) == (
        P.BOOTINFO_MAGIC, P.PROTOCOL_VERSION.value, option, cbit, 1)
    return host, bi


def doorbell(ch: HelperChannel, op: int, entries=(), **fields) -> int:
    """One batch; the helper completed it (HLT, completed == doorbell); its status."""
    return ch.batch(op, list(entries), **fields).status


@pytest.mark.parametrize("cbit", [47, 51])
@pytest.mark.parametrize("option", [P.OPT_SHIFT, P.OPT_TUPLES, P.OPT_ISOLATED],
                         ids=lambda o: P.OPTION_NAMES[o])
def test_mirror_runs_a_batch(option, cbit):
    print("seed", SEED)
    host, bi = boot(cbit, option)
    mc, vm = host.mc, host.vm
    regions = list(bi.regions)[: bi.nregions]
    kinds = {r.kind for r in regions}
    assert kinds == {P.REGION_CODE, P.REGION_RODATA, P.REGION_DATA, P.REGION_MAILBOX}
    if option == P.OPT_SHIFT:
        assert bi.ram_base == 1 << 32 and all(r.mirror_gpa == r.main_gpa for r in regions)
    else:
        assert bi.ram_base == 1 << (cbit + 1 - 5 - 1)  # 2^(MAXPHYADDR - reduction - 1)
        assert all(r.mirror_gpa >= bi.ram_base // 2 for r in regions)
    ch = HelperChannel(mc, host.create_mirror())
    assert doorbell(ch, P.OP_HELLO, version=2) == 0
    # a private page of the guest: write it through the main VM's C=1 view
    page_gpa = 0x200000
    secret = bytes((i * 13 + option) & 0xFF for i in range(P.PAGE_SIZE))
    vm.write(page_gpa, secret, encrypted=True)
    assert secret not in mc.host_read(vm.gpa_to_hpa(page_gpa), P.PAGE_SIZE)
    assert doorbell(ch, P.OP_SEND_BEGIN, version=2, ram_size=RAM, challenge=CHALLENGE) == 0
    sid = ch.reply().session_id
    assert doorbell(ch, P.OP_SEND, entries=[page_gpa]) == 0
    record = ch.read_slots(1)[0]
    env, plain = open_record(KEY, sid, CHALLENGE, record)
    assert env.ram_addr == page_gpa and plain == secret
    # its own code page is refused (E_SELF), and nothing faulted
    code = next(r for r in regions if r.kind == P.REGION_CODE)
    r = ch.batch(P.OP_SEND, [code.main_gpa])
    assert (r.status, r.entry_status) == (0, [P.STATUS["E_SELF"][0]])


def _leaves(read_qword, cr3: int, layout) -> list[tuple[int, int, int]]:
    out = []

    def rec(table: int, shift: int, va_base: int) -> None:
        for i in range(512):
            e = read_qword(table + 8 * i, True)
            if not e & 1:
                continue
            va = va_base | (i << shift)
            if shift == 12 or e & 0x80:
                out.append((va, 1 << shift, e))
            else:
                rec(e & layout.addr_mask, shift - 9, va)

    rec(cr3 & layout.addr_mask, 39, 0)
    return out


@pytest.mark.parametrize("cbit", [47, 51])
@pytest.mark.parametrize("option,high", [(P.OPT_SHIFT, 0), (P.OPT_SHIFT, 1), (P.OPT_TUPLES, 0),
                                         (P.OPT_ISOLATED, 0)],
                         ids=["shift-4g", "shift-high", "tuples", "isolated"])
def test_mirror_tables_for_a_1tib_guest(option, high, cbit):
    """Walk the tables the driver built (plus the 1 TiB RAM window SEND_BEGIN adds) with the
    emulator's walker: every mapping and permission, for each option and C-bit."""
    from emulate.mmu import PageFault, PhysLayout, walk

    host, bi = boot(cbit, option, high)
    ch = HelperChannel(host.mc, host.create_mirror())
    mirror = ch.mirror.vm
    tib = 1 << 40
    assert doorbell(ch, P.OP_SEND_BEGIN, ram_size=tib, challenge=CHALLENGE, version=2) == 0
    layout = PhysLayout(maxphyaddr=cbit + 1, cbit=cbit, reduction=5)
    phys_top = 1 << layout.phys_bits
    if option == P.OPT_SHIFT and not high:
        assert bi.ram_base == 1 << 32
    else:
        assert bi.ram_base == phys_top // 2

    def rq(gpa: int, enc: bool) -> int:
        assert enc, "page-table pages are private"
        return int.from_bytes(mirror.read(gpa, 8, encrypted=True), "little")

    def tr(va: int):
        return walk(rq, bi.cr3, va, "read", layout)

    regions = list(bi.regions)[: bi.nregions]
    for r in regions:
        for off in (0, r.length // 2 & ~0xFFF, r.length - 1):
            t = tr(r.main_gpa + off)
            assert t.gpa == r.mirror_gpa + off
            assert t.encrypted == (r.kind != P.REGION_MAILBOX)
            assert t.executable == (r.kind == P.REGION_CODE)
            assert t.writable == (r.kind in (P.REGION_DATA, P.REGION_MAILBOX))
    for off in (0, 0x12345000, tib // 2 + 0x1000, tib - 1):
        t = tr(bi.ram_base + off)
        assert (t.gpa, t.encrypted, t.writable, t.executable) == (bi.ram_base + off, True, True,
                                                                   False)
    assert tr(bi.ram_base + tib // 2).page_size == 1 << 30
    with pytest.raises(PageFault):
        tr(bi.ram_base + tib)
    if option == P.OPT_SHIFT:  # the rest of the low 4 GiB: identity, private, NX
        lo = 0x300000
        assert all(not (r.main_gpa <= lo < r.main_gpa + r.length) for r in regions)
        t = tr(lo)
        assert (t.gpa, t.encrypted, t.writable, t.executable) == (lo, True, True, False)
    else:  # nothing of the guest but the helper's regions
        with pytest.raises(PageFault):
            tr(0x300000)
    for va, _size, e in _leaves(rq, bi.cr3, layout):
        assert not (e & 2 and not e >> 63), f"writable and executable leaf at {va:#x}"

