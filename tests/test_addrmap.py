"""`helperfw map`: the mirror's address spaces as data and as a picture.

The data model (emulate.addrmap) must say what the booted helper really set up: every BootInfo
region at its mirror GPA and its VA with the documented permissions and C-bit, the RAM window at
ram_base, the markers at 2^cbit and 2^MAXPHYADDR. It is checked here against BootInfo and
against an independent page walk (emulate.mmu.walk on the mirror VM) at addresses chosen by the
test, for every option and C-bit 47/51. The drawing must contain each span and label of the
model it was given, in address order, and render byte-identically twice.
"""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest

from emulate.addrmap import (
    GUEST,
    REGION_KINDS,
    WINDOW,
    AddressMap,
    Span,
    address_map,
    boot_mirror,
    read_map,
)
from emulate.host import FOUR_GIB
from emulate.mmu import PageFault, walk
from helperfw.runtime import protocol as P
from tests.firmware import efi_path

MEM = 32 << 20
SEED = 7
PAGE = P.PAGE_SIZE
OPTIONS = [(P.OPT_SHIFT, False), (P.OPT_SHIFT, True), (P.OPT_TUPLES, False),
           (P.OPT_ISOLATED, False)]
IDS = ["shift", "shift-high", "tuples", "isolated"]
# what docs/PROTOCOL.md "Address-space options" requires of each region's mapping: (writable, executable, C-bit)
PERMS = {P.REGION_CODE: (False, True, True), P.REGION_RODATA: (False, False, True),
         P.REGION_DATA: (True, False, True), P.REGION_MAILBOX: (True, False, False)}


def page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


@pytest.fixture(scope="module", params=[(o, h, c) for (o, h) in OPTIONS for c in (47, 51)],
                ids=[f"{i}-c{c}" for i in IDS for c in (47, 51)])
def booted(request):
    """(AddressMap, BootInfo, mirror, host) for one option, shift placement and C-bit."""
    option, high, cbit = request.param
    host, mirror = boot_mirror(efi_path(), option, cbit, MEM, seed=SEED, shift_high=high)
    return address_map(host, mirror, mem=MEM, shift_high=high), mirror.info.bootinfo, mirror, host


def covered(spans: list[Span]) -> list[tuple[int, int]]:
    """Merged [start, end) ranges of contiguous spans."""
    out: list[tuple[int, int]] = []
    for s in sorted(spans, key=lambda s: s.start):
        if out and out[-1][1] == s.start:
            out[-1] = (out[-1][0], s.end)
        else:
            out.append((s.start, s.end))
    return out


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, e in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], e)
        else:
            out.append((a, e))
    return out


def test_regions_match_bootinfo(booted) -> None:
    """Every region at its place (a kind may have several: the lanes' data is a second data
    region)."""
    m, bi, _mirror, _host = booted
    regions = list(bi.regions)[: bi.nregions]
    assert {r.kind for r in regions} == set(PERMS)
    for r in regions:
        name = REGION_KINDS[r.kind][0]
        same = [x for x in regions if x.kind == r.kind]
        assert covered([s for s in m.gpa if s.kind == name]) == _merged(
            [(x.mirror_gpa, x.mirror_gpa + page_up(x.length)) for x in same])
        va = [s for s in m.va if s.kind == name]
        assert covered(va) == _merged([(x.main_gpa, x.main_gpa + page_up(x.length))
                                       for x in same])
        for s in va:
            if not r.main_gpa <= s.start < r.main_gpa + page_up(r.length):
                continue  # another region of the kind
            assert s.gpa == r.mirror_gpa + (s.start - r.main_gpa)
            assert (s.writable, s.executable, s.encrypted) == PERMS[r.kind]
            assert s.backed
        copied = m.option == P.OPT_ISOLATED and r.kind != P.REGION_MAILBOX
        backing = {s.backing for s in m.gpa if s.kind == name}
        assert backing == {"mirror-only copy" if copied else "guest DRAM"}


def test_window_and_markers(booted) -> None:
    m, bi, _mirror, host = booted
    phys_bits = (48 if m.cbit < 48 else 52) - 5  # CpuidModel: MAXPHYADDR 48/52, reduction 5
    expect_base = FOUR_GIB if m.option == P.OPT_SHIFT and not m.shift_high else 1 << (
        phys_bits - 1)
    assert m.ram_base == bi.ram_base == expect_base
    assert m.ram_max == bi.ram_max
    window = -(-host.ram_size // (2 << 20)) * (2 << 20)
    for spans in (m.gpa, m.va):
        assert covered([s for s in spans if s.kind == WINDOW]) == [(m.ram_base,
                                                                    m.ram_base + window)]
    for s in m.va:
        if s.kind == WINDOW:
            assert (s.gpa, s.writable, s.executable, s.encrypted) == (s.start, True, False, True)
    blocks = {b.name: b.offset for b in host.blocks}
    for s in m.gpa:
        if s.kind == WINDOW:
            name = s.label.split(": ")[1].split(",")[0]
            assert s.start == m.ram_base + blocks[name]
    marks = {mk.key: mk.addr for mk in m.markers}
    assert marks["ram0"] == bi.ram_base
    assert marks["window-limit"] == bi.ram_base + bi.ram_max
    assert marks["cbit"] == 1 << bi.c_bit == 1 << m.cbit
    assert marks["maxphyaddr"] == 1 << (phys_bits + 5)
    assert marks["phys-limit"] == 1 << phys_bits


def test_nothing_else_is_mapped(booted) -> None:
    """shift: the rest of the low 4 GiB 1:1, private, RW, NX; tuples/isolated: nothing else."""
    m, _bi, _mirror, _host = booted
    rest = [s for s in m.va if s.kind not in (*(k for k, _ in REGION_KINDS.values()), WINDOW)]
    if m.option != P.OPT_SHIFT:
        assert rest == []
        return
    assert all(s.kind == GUEST for s in rest)
    assert all((s.gpa, s.writable, s.executable, s.encrypted) == (s.start, True, False, True)
               for s in rest)
    low = covered([s for s in m.va if s.start < FOUR_GIB])
    assert low == [(0, FOUR_GIB)]


def test_spans_agree_with_an_independent_walk(booted) -> None:
    """Three addresses in every span translate as the span says; the middle of every gap in
    the virtual space faults."""
    m, bi, mirror, _host = booted
    vm = mirror.vm

    def tr(va: int):
        return walk(lambda g, e: vm.read_u64(g, encrypted=e), bi.cr3, va, "read", vm.layout)

    for s in m.va:
        for va in (s.start, (s.start + s.end) // 2 & ~(PAGE - 1), s.end - 1):
            t = tr(va)
            assert t.gpa == s.gpa + (va - s.start)
            assert (t.writable, t.executable, t.encrypted) == (s.writable, s.executable,
                                                               s.encrypted)
            assert (vm.gpa_to_hpa(t.gpa) is not None) == s.backed
    spans = sorted(m.va, key=lambda s: s.start)
    for a, b in itertools.pairwise(spans):
        if b.start > a.end:
            with pytest.raises(PageFault):
                tr((a.end + b.start) // 2 & ~(PAGE - 1))
    for s in m.gpa:  # the GPA spans are the memslots
        assert vm.gpa_to_hpa(s.start) == s.hpa
        assert vm.gpa_to_hpa(s.end - 1) == s.hpa + s.size - 1


def test_table_lists_every_span(booted) -> None:
    m = booted[0]
    text = m.table()
    for s in (*m.gpa, *m.va):
        assert f"{s.start:#x}" in text and f"{s.end:#x}" in text
    assert f"C-bit {m.cbit}" in text and f"{m.ram_base:#x}" in text


def test_same_seed_same_map() -> None:
    a = read_map(efi_path(), P.OPT_TUPLES, 51, MEM, seed=SEED)
    b = read_map(efi_path(), P.OPT_TUPLES, 51, MEM, seed=SEED)
    assert a == b


# -- the drawing ---------------------------------------------------------------------------------
def _svg_ids(svg: bytes) -> dict[str, ET.Element]:
    root = ET.fromstring(svg)
    return {el.get("id"): el for el in root.iter() if el.get("id")}


def _top_y(el: ET.Element) -> float:
    """Smallest SVG y of a drawn rectangle (SVG y grows downwards)."""
    path = next(el.iter("{http://www.w3.org/2000/svg}path")).get("d", "")
    nums = [float(x) for x in path.replace("M", " ").replace("L", " ").replace("z", " ").split()]
    return min(nums[1::2])


def test_drawing_contains_the_model(booted) -> None:
    pytest.importorskip("matplotlib")
    from helperfw.plots import render
    from helperfw.plots.addrmap import draw_maps, gpa_label, va_label

    m: AddressMap = booted[0]
    svg = render(draw_maps([m]), "svg")
    ids = _svg_ids(svg)
    for s in (*m.gpa, *m.va):
        assert s.ident in ids, s.ident
        label = ids[f"label-{s.ident}"]
        texts = [t.text for t in label.iter("{http://www.w3.org/2000/svg}text")]
        want = (gpa_label(s, m) if s.space == "gpa" else va_label(s)).split("\n")
        assert texts == want
        assert f"{s.start:#x}" in " ".join(texts)
    for mk in m.markers:
        assert f"marker-{mk.key}" in ids
    for space in (m.gpa, m.va):  # drawn in address order, upwards, without overlap
        tops = [_top_y(ids[s.ident]) for s in sorted(space, key=lambda s: s.start)]
        assert tops == sorted(tops, reverse=True) and len(set(tops)) == len(tops)


def test_all_options_side_by_side_and_reproducible() -> None:
    pytest.importorskip("matplotlib")
    from helperfw.plots import render
    from helperfw.plots.addrmap import draw_maps

    maps = [read_map(efi_path(), o, 47, MEM, seed=SEED) for o in P.OPTION_NAMES]
    svg = render(draw_maps(maps), "svg")
    ids = _svg_ids(svg)
    for m in maps:
        for s in (*m.gpa, *m.va):
            assert f"{m.option_name}-c47-{s.ident}" in ids
    assert render(draw_maps(maps), "svg") == svg
    assert b"<dc:date>" not in svg
    png = render(draw_maps(maps[:1]), "png")
    assert png.startswith(b"\x89PNG") and render(draw_maps(maps[:1]), "png") == png
