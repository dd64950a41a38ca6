"""Hostile host, address space: everything the host says about *where* memory is.

The host controls the RAM window size (`ram_size` of *_BEGIN), every entry's `ram_addr` and
`flags`, and the mirror's memslots. The helper must refuse a window it cannot use safely and any
ram_addr that would make it read (SEND) or write (RECV) its own code, data, stack, page tables or
the mailbox, in every address-space option. RECV attempts use *authentic* records (minted with
the transport key), so a refusal here is the address check's doing, not the tag's.

Replay: `pytest tests/test_hostile_addrspace.py -k <name>` (no randomness beyond SEED).
"""

from __future__ import annotations

import ctypes
import random

import pytest

from helperfw.runtime import protocol as P
from tests.hostile_common import ST, name, open_recv
from tests.mirror_host import KEY, PAGE, RAM, MirrorHost
from tests.session_host import NativeHelper

SEED = 7004
OPTIONS = [P.OPT_SHIFT, P.OPT_TUPLES, P.OPT_ISOLATED]
RECV_SID = 0x5EED_0000_0000_0004
CH = 0xC4A1_0000_0000_0004  # a destination challenge for SEND_BEGIN (RECV_BEGIN ignores it)


def table_pages(h: MirrorHost, vas: list[int]) -> set[int]:
    """Main-VM GPAs of every page-table page the mirror walks for `vas` (PML4 included)."""
    phys_bits = h.cbit + 1 - 5
    amask = ((1 << phys_bits) - 1) & ~0xFFF
    mirror_to_main = {}
    for r in h.regions:
        for off in range(0, r.length, PAGE):
            mirror_to_main[r.mirror_gpa + off] = r.main_gpa + off
    out = set()
    for va in vas:
        table = h.bi.cr3 & amask
        for shift in (39, 30, 21, 12):
            out.add(mirror_to_main[table])
            e = int.from_bytes(h.mirror.read(table + ((va >> shift) & 511) * 8, 8,
                                             encrypted=True), "little")
            assert e & 1
            if shift == 12 or e & 0x80:
                break
            table = e & amask
    return out


def own_pages(h: MirrorHost) -> dict[str, int]:
    """Named ram_addrs (low RAM: ram_addr == GPA) inside the helper's own memory."""
    pages = {}
    for r in h.regions:
        kind = {P.REGION_CODE: "code", P.REGION_RODATA: "rodata", P.REGION_DATA: "data",
                P.REGION_MAILBOX: "mailbox"}[r.kind]
        pages[f"{kind}.first"] = r.main_gpa
        pages[f"{kind}.last"] = r.main_gpa + r.length - PAGE
    mb = h.region(P.REGION_MAILBOX)
    for i in range(0, mb.length, PAGE):
        pages[f"mailbox+{i:#x}"] = mb.main_gpa + i
    for sym in ("CTX", "STACK", "PT_POOL"):
        pages[sym] = h.symbol_gpa(sym) & ~(PAGE - 1)
    pages["STACK.top"] = (h.bi.rsp - 8) & ~(PAGE - 1)
    code = h.region(P.REGION_CODE)
    for i, t in enumerate(sorted(table_pages(h, [h.ram_base, code.main_gpa, mb.main_gpa]))):
        pages[f"pagetable{i}"] = t
    return pages


def outside_regions(h: MirrorHost, a: int) -> bool:
    return all(not (r.main_gpa <= a < r.main_gpa + r.length) for r in h.regions)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: P.OPTION_NAMES[o])
def test_ram_addr_into_the_helpers_own_pages_is_refused(option):
    """SEND and RECV (with authentic records) of every own page: E_SELF, nothing written, no
    plaintext of those pages leaves; pages right next to the regions still migrate."""
    print("seed", SEED)
    h = MirrorHost(47, option, seed=SEED)
    assert h.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=CH).status == 0  # maps the window
    pages = own_pages(h)
    assert len(pages) > 70
    addrs = sorted(set(pages.values()))
    for i in range(0, len(addrs), 64):
        chunk = addrs[i:i + 64]
        before = {j: h.read_slot(j, 64) for j in range(len(chunk))}
        r = h.command(P.OP_SEND, [(a, 0) for a in chunk])
        bad = {hex(a): name(s) for a, s in zip(chunk, r.entry_status) if s != ST["E_SELF"]}
        assert not bad, bad
        assert not r.window_pages_written and not r.bad_writes
        assert all(h.read_slot(j, 64) == before[j] for j in before), "a refused entry was sealed"
    # neighbours of the regions that belong to no region are ordinary guest pages
    near = sorted({a for r in h.regions for a in (r.main_gpa - PAGE, r.main_gpa + r.length)
                   if outside_regions(h, a)})
    r = h.command(P.OP_SEND, [(a, 0) for a in near])
    assert r.entry_status == [0] * len(near)
    assert h.command(P.OP_ABORT).status == 0

    # destination side: authentic records for the same addresses must not be installed
    f = open_recv(h, RECV_SID, KEY, RAM)
    rng = random.Random(SEED)
    seq = 1
    for i in range(0, len(addrs), 64):
        chunk = addrs[i:i + 64]
        recs = {}
        for j, a in enumerate(chunk):
            recs[j] = f.record(a, rng.randbytes(PAGE), epoch=1, seq=seq)
            seq += 1
        r = h.command(P.OP_RECV, [(a, 0) for a in chunk], slots=recs, session_id=RECV_SID)
        bad = {hex(a): name(s) for a, s in zip(chunk, r.entry_status) if s != ST["E_SELF"]}
        assert not bad, bad
        assert not r.window_pages_written and not r.bad_writes
    # the helper is intact: an ordinary page still installs
    a = near[0]
    data = rng.randbytes(PAGE)
    r = h.command(P.OP_RECV, [(a, 0)], slots={0: f.record(a, data, epoch=1, seq=seq)},
                  session_id=RECV_SID)
    assert r.entry_status == [0] and r.window_pages_written == {a}
    assert h.guest_page(a) == data


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: P.OPTION_NAMES[o])
def test_bad_windows_are_refused_and_change_nothing(option):
    """ram_size: zero, unaligned, over ram_max, wrapping: E_BAD_ARG in IDLE, no session. The
    largest allowed window maps without touching any of the helper's own mappings."""
    h = MirrorHost(47, option, seed=SEED)
    region_pages = [r.main_gpa + o for r in h.regions for o in range(0, r.length, PAGE)]

    def translations():
        out = []
        for va in region_pages:
            t, hpa = h.vcpu.translate(va)
            out.append((hpa, t.writable, t.executable, t.encrypted))
        return out

    before = translations()
    m = h.bi.ram_max
    for size in (0, 1, PAGE, (2 << 20) - PAGE, (2 << 20) + PAGE, m + (2 << 20), 2 * m,
                 2**63, 2**64 - (2 << 20), 2**64 - h.ram_base, 2**64 - h.ram_base + (2 << 20)):
        for op in (P.OP_SEND_BEGIN, P.OP_RECV_BEGIN):
            r = h.command(op, ram_size=size, challenge=CH)
            assert r.status == ST["E_BAD_ARG"], (hex(size), name(r.status))
            assert not r.window_pages_written and not r.bad_writes
    assert h.command(P.OP_SEND, [(0x200000, 0)]).status == ST["E_BAD_STATE"]
    assert h.command(P.OP_SEND_BEGIN, ram_size=m, challenge=CH).status == 0
    assert translations() == before
    # the whole window is private, writable, never executable
    for ra in (0, RAM - PAGE):
        t, _ = h.vcpu.translate(h.ram_base + ra)
        assert t.encrypted and t.writable and not t.executable


@pytest.mark.parametrize("option", [P.OPT_SHIFT, P.OPT_TUPLES], ids=lambda o: P.OPTION_NAMES[o])
def test_window_larger_than_the_table_pool_is_refused_recoverably(option):
    """Regression (found by this suite): with C-bit 51, ram_max (2^46..2^47) is more than the
    table pool (then 64 pages, now 32) can map. One *_BEGIN of such a window used to leave half-built leaves
    that `window_mapped` did not cover, so every later *_BEGIN failed with E_BAD_ARG (the
    helper was unusable until the guest rebooted). Now it fails alone."""
    h = MirrorHost(51, option, seed=SEED)
    for op in (P.OP_SEND_BEGIN, P.OP_RECV_BEGIN):
        r = h.command(op, ram_size=h.bi.ram_max, challenge=CH)
        assert r.status == ST["E_BAD_ARG"], name(r.status)
        assert not r.bad_writes
    assert h.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=CH).status == 0
    h.set_guest_page(0x200000, bytes(range(256)) * 16)
    r = h.command(P.OP_SEND, [(0x200000, 0)])
    assert r.entry_status == [0]
    assert h.command(P.OP_ABORT).status == 0
    assert h.command(P.OP_RECV_BEGIN, ram_size=2 * RAM).status == 0


def test_window_overlapping_a_region_is_refused_native():
    """The layout of every option keeps regions out of the window, so this check is only
    reachable with a context whose region lies inside the window: built natively."""
    h = NativeHelper(KEY, ram_pages=1024)
    key = ctypes.create_string_buffer(KEY, 32)

    def reinit(region_gpa: int) -> None:
        r = h.img.call("mh_test_ctx_init", h.ctx, ctypes.addressof(key), h.mailbox, h.ram,
                       h.ram_size, h.pool, 32, region_gpa, 2 * PAGE, restype=ctypes.c_int32)
        assert r == 0

    for inside in (h.ram, h.ram + (1 << 20), h.ram + (2 << 20) - PAGE, h.ram - PAGE):
        reinit(inside)
        for op in (P.OP_SEND_BEGIN, P.OP_RECV_BEGIN):
            st, _ = h.command(op, ram_size=2 << 20, challenge=CH)
            assert st == ST["E_BAD_ARG"], (hex(inside - h.ram), name(st))
    reinit(h.ram + (2 << 20))  # right after a 2 MiB window: fine for 2 MiB, not for 4 MiB
    assert h.command(P.OP_SEND_BEGIN, ram_size=4 << 20, challenge=CH)[0] == ST["E_BAD_ARG"]
    assert h.command(P.OP_SEND_BEGIN, ram_size=2 << 20, challenge=CH)[0] == 0


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: P.OPTION_NAMES[o])
def test_host_declared_shared_pages_are_refused(option):
    """ENTRY_F_SHARED → E_SHARED (SEND and RECV), unknown flag bits → E_BAD_ARG; the one range
    the guest itself shared (the mailbox, via KVM_HC_MAP_GPA_RANGE) is E_SELF even unflagged.
    A private page the host calls shared is not sealed: the host can only copy its raw DRAM,
    ciphertext under the guest's memory key."""
    h = MirrorHost(47, option, seed=SEED)
    a = 0x300000
    secret = random.Random(SEED).randbytes(PAGE)
    h.set_guest_page(a, secret)
    assert h.command(P.OP_SEND_BEGIN, ram_size=RAM, challenge=CH).status == 0
    before = h.read_slot(0)
    flags = [P.ENTRY_F_SHARED, P.ENTRY_F_SHARED | 2, 2, 0x80000000, 0xFFFFFFFF]
    r = h.command(P.OP_SEND, [(a, f) for f in flags])
    assert [name(s) for s in r.entry_status] == [
        "E_SHARED", "E_SHARED", "E_BAD_ARG", "E_BAD_ARG", "E_SHARED"]
    assert h.read_slot(0) == before
    raw = h.mc.host_read(h.vm.gpa_to_hpa(a), PAGE)
    assert raw != secret and secret[:16] not in raw
    mb = h.region(P.REGION_MAILBOX)
    r = h.command(P.OP_SEND, [(mb.main_gpa, 0), (mb.main_gpa + PAGE, P.ENTRY_F_SHARED)])
    assert [name(s) for s in r.entry_status] == ["E_SELF", "E_SHARED"]
    assert h.command(P.OP_ABORT).status == 0
    f = open_recv(h, RECV_SID, KEY, RAM)
    recs = {i: f.record(a, bytes(PAGE), epoch=1, seq=i + 1) for i in range(len(flags))}
    r = h.command(P.OP_RECV, [(a, fl) for fl in flags], slots=recs, session_id=RECV_SID)
    assert [name(s) for s in r.entry_status] == [
        "E_SHARED", "E_SHARED", "E_BAD_ARG", "E_BAD_ARG", "E_SHARED"]
    assert not r.window_pages_written and h.guest_page(a) == secret
