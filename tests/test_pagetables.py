"""The DSL page-table builder, compiled and run natively, checked with the emulator's walker.

Every mapping and permission is verified for C-bit 47 (MAXPHYADDR 48) and 51 (MAXPHYADDR 52),
reduction 5, with a 1 TiB RAM window (tables only, no backing memory)."""

from __future__ import annotations

import ctypes
import random

import pytest

from emulate.mmu import ACCESS_FETCH, ACCESS_READ, ACCESS_WRITE, PageFault, PhysLayout, walk
from helperfw.codegen.pipeline import build
from helperfw.native import NativeImage
from helperfw.runtime import pagetables as P

POOL_PAGES = 64
TiB = 1 << 40
GiB = 1 << 30
MiB = 1 << 20
W = P.MAP_W
SEED = 1234


@pytest.fixture(scope="module")
def img() -> NativeImage:
    return NativeImage(build([P.mh_test_pt_build, P.mh_test_pt_lookup]).image)


class Tables:
    """Runs the builder in a native buffer posing as the pool at mirror GPA `pool_pa`."""

    def __init__(self, img: NativeImage, layout: PhysLayout, pool_pa: int, specs):
        self.layout = layout
        self.raw = (ctypes.c_uint8 * ((POOL_PAGES + 1) * 4096))()
        self.va = (ctypes.addressof(self.raw) + 4095) & ~4095
        self.pool_pa = pool_pa
        self.b = (ctypes.c_uint8 * P.PtBuilder.size)()
        flat = [x for q in specs for x in q]
        arr = (ctypes.c_uint64 * max(len(flat), 1))(*flat)
        self.status = img.call("mh_test_pt_build", ctypes.addressof(self.b), self.va, pool_pa,
                               POOL_PAGES, layout.cbit, layout.phys_bits, ctypes.addressof(arr),
                               len(specs), restype=ctypes.c_int32)

    def read_qword(self, gpa: int, encrypted: bool) -> int:
        assert encrypted, "tables are private memory: every table reference carries the C-bit"
        off = gpa - self.pool_pa
        assert 0 <= off < POOL_PAGES * 4096, f"table reference {gpa:#x} outside the pool"
        return int.from_bytes(ctypes.string_at(self.va + off, 8), "little")

    @property
    def cr3(self) -> int:
        return self.pool_pa | self.layout.c_mask

    def walk(self, va: int, access: str = ACCESS_READ):
        return walk(self.read_qword, self.cr3, va, access, self.layout)

    def leaves(self):
        """Every leaf: (va, size, entry), by enumerating the tables."""
        out = []

        def rec(table_pa: int, shift: int, va_base: int) -> None:
            for i in range(512):
                e = self.read_qword(table_pa + 8 * i, True)
                if not e & 1:
                    continue
                va = va_base | (i << shift)
                if shift == 12 or e & P.PTE_PS:
                    out.append((va, 1 << shift, e))
                else:
                    rec(e & self.layout.addr_mask, shift - 9, va)

        rec(self.pool_pa, 39, 0)
        return out


LAYOUTS = [PhysLayout(maxphyaddr=48, cbit=47, reduction=5),
           PhysLayout(maxphyaddr=52, cbit=51, reduction=5)]


def mirror_specs(layout: PhysLayout):
    """A `tuples`-style space: code/rodata/data regions at a high mirror GPA, a shared mailbox,
    and a 1 TiB RAM window at 2^(phys_bits-1)."""
    ram_base = 1 << (layout.phys_bits - 1)
    mirror = ram_base - 64 * GiB
    enc = P.MAP_ENC
    return ram_base, [
        (0x7E00000, mirror, 0x5000, P.MAP_X | enc),  # code: RX
        (0x7E05000, mirror + 0x5000, 0x2000, enc),  # rodata: R, NX
        (0x7E07000, mirror + 0x7000, 0x9000, P.MAP_W | enc),  # data: RW, NX
        (0x7F00000, mirror + 0x100000, 0x43000, P.MAP_W),  # mailbox: shared, no C-bit
        (ram_base, ram_base, TiB, P.MAP_W | enc),  # RAM window: 1 GiB pages
    ]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"cbit{lay.cbit}")
def test_every_mapping_and_permission(img, layout):
    print(f"seed {SEED}")
    rng = random.Random(SEED)
    ram_base, specs = mirror_specs(layout)
    t = Tables(img, layout, pool_pa=(ram_base - 65 * GiB), specs=specs)
    assert t.status == P.PT_OK
    for va, pa, size, flags in specs:
        for off in [0, size - 1, *(rng.randrange(size) for _ in range(50))]:
            tr = t.walk(va + off)
            assert tr.gpa == pa + off
            assert tr.encrypted == bool(flags & P.MAP_ENC)
            assert tr.writable == bool(flags & P.MAP_W)
            assert tr.executable == bool(flags & P.MAP_X)
        if flags & P.MAP_X:
            t.walk(va, ACCESS_FETCH)
            with pytest.raises(PageFault, match="read-only"):
                t.walk(va, ACCESS_WRITE)
        else:
            with pytest.raises(PageFault, match="NX"):
                t.walk(va, ACCESS_FETCH)
    # nothing else is mapped
    for va in (0, 0x7E00000 - 0x1000, 0x7E10000, 0x7F43000, ram_base - 0x1000, ram_base + TiB):
        with pytest.raises(PageFault, match="not present"):
            t.walk(va)
    leaves = t.leaves()
    # W^X holds for every leaf, and the RAM window uses 1 GiB pages
    for va, size, e in leaves:
        assert not (e & P.PTE_RW and not e & P.PTE_NX.value), f"W+X leaf at {va:#x}"
    assert sum(1 for va, size, _ in leaves if size == GiB) == TiB // GiB
    assert sum(size for _, size, _ in leaves) == sum(s[2] for s in specs)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"cbit{lay.cbit}")
def test_shift_window_at_4gib_uses_large_pages(img, layout):
    """`shift` with RAM_BASE = 4 GiB: the identity-mapped low 4 GiB and the window above it."""
    specs = [(0, 0, 4 * GiB, P.MAP_W | P.MAP_ENC), (4 * GiB, 4 * GiB, TiB, P.MAP_W | P.MAP_ENC)]
    t = Tables(img, layout, pool_pa=0x7000000, specs=specs)
    assert t.status == P.PT_OK
    assert {size for _, size, _ in t.leaves()} == {GiB}
    assert t.walk(4 * GiB + 0x1234).gpa == 4 * GiB + 0x1234


@pytest.mark.parametrize("spec, status", [
    ((0x100000, 0x100000, 0x1000, P.MAP_W | P.MAP_X), P.PT_E_WX.value),
    ((0x100800, 0x100000, 0x1000, P.MAP_W), P.PT_E_ALIGN.value),
    ((1 << 47, 0x100000, 0x1000, P.MAP_W), P.PT_E_ALIGN.value),
    ((0x100000, 1 << 43, 0x1000, P.MAP_W), P.PT_E_RANGE.value),  # beyond 48 - 5 physical bits
    # above 2^47 the size bound alone would wrap (2^47 - va): only the va bound refuses it
    (((1 << 47) + 0x1000, 0x100000, 0x1000, P.MAP_W), P.PT_E_ALIGN.value),
    (((1 << 47) - 0x1000, 0x100000, 0x2000, P.MAP_W), P.PT_E_ALIGN.value),  # runs past 2^47
    # an empty range is refused for where it starts: the size bounds alone would let it pass
    ((1 << 47, 0x100000, 0, P.MAP_W), P.PT_E_ALIGN.value),
    ((0x100000, 1 << 43, 0, P.MAP_W), P.PT_E_RANGE.value),
    # above the limit, limit - pa wraps: only the pa bound refuses it
    ((0x100000, (1 << 43) + 0x1000, 0x1000, P.MAP_W), P.PT_E_RANGE.value),
    ((0x100000, (1 << 43) - 0x1000, 0x2000, P.MAP_W), P.PT_E_RANGE.value),  # runs past it
], ids=["wx", "unaligned", "noncanonical", "phys-range", "above-canonical",
        "across-canonical", "noncanonical-empty", "phys-limit-empty", "above-phys-limit",
        "across-phys-limit"])
def test_refusals(img, spec, status):
    t = Tables(img, LAYOUTS[0], pool_pa=0x7000000, specs=[spec])
    assert t.status == status


def test_overlap_and_pool_exhaustion(img):
    t = Tables(img, LAYOUTS[0], 0x7000000,
               [(0x200000, 0x200000, 0x200000, P.MAP_W), (0x201000, 0x9000000, 0x1000, P.MAP_W)])
    assert t.status == P.PT_E_OVERLAP.value
    # 4 KiB pages spread 1 GiB apart need a PD and a PT each: the 64-page pool runs out. The
    # PML4, the PDPT and 2 x 31 pages hold the first 31; the 32nd finds no page for its PD and
    # leaves no entry behind (leaves() follows only references into the pool)
    specs = [(i * GiB, i * GiB, 0x1000, P.MAP_W) for i in range(40)]
    t = Tables(img, LAYOUTS[0], 0x7000000, specs)
    assert t.status == P.PT_E_POOL.value
    assert _mapped(t) == [(i * GiB, 0x1000, i * GiB) for i in range(31)]
    # ... and one whose PT finds no page: the PD's entry for it stays empty
    specs = [(i * GiB, i * GiB, 0x1000, P.MAP_W) for i in range(31)] + \
        [(30 * GiB + 2 * MiB, 0x1000, 0x1000, P.MAP_W)]
    t = Tables(img, LAYOUTS[0], 0x7000000, specs)
    assert t.status == P.PT_E_POOL.value
    assert _mapped(t) == [(i * GiB, 0x1000, i * GiB) for i in range(31)]


def _mapped(t: Tables):
    """The leaves as (va, size, pa)."""
    return [(va, size, e & t.layout.addr_mask) for va, size, e in t.leaves()]


def _pages(va: int, pa: int, n: int, size: int):
    return [(va + i * size, size, pa + i * size) for i in range(n)]


@pytest.mark.parametrize("spec, leaves", [
    ((2 * MiB, 4 * MiB, 2 * MiB), [(2 * MiB, 2 * MiB, 4 * MiB)]),
    ((2 * MiB, 4 * MiB, 2 * MiB - 0x1000), _pages(2 * MiB, 4 * MiB, 511, 0x1000)),
    ((2 * MiB, 4 * MiB, 2 * MiB + 0x1000), [(2 * MiB, 2 * MiB, 4 * MiB),
                                            (4 * MiB, 0x1000, 6 * MiB)]),
    ((2 * MiB, 4 * MiB + 0x1000, 2 * MiB), _pages(2 * MiB, 4 * MiB + 0x1000, 512, 0x1000)),
    ((2 * MiB + 0x1000, 4 * MiB, 2 * MiB), _pages(2 * MiB + 0x1000, 4 * MiB, 512, 0x1000)),
    # 4 KiB pages up to the first 2 MiB boundary, then a 2 MiB page, then the 4 KiB rest
    ((2 * MiB + 0x1000, 4 * MiB + 0x1000, 4 * MiB),
     _pages(2 * MiB + 0x1000, 4 * MiB + 0x1000, 511, 0x1000) +
     [(4 * MiB, 2 * MiB, 6 * MiB), (6 * MiB, 0x1000, 8 * MiB)]),
    ((GiB, 2 * GiB, GiB), [(GiB, GiB, 2 * GiB)]),
    ((GiB, 2 * GiB + 2 * MiB, GiB), _pages(GiB, 2 * GiB + 2 * MiB, 512, 2 * MiB)),
    ((GiB + 2 * MiB, 2 * GiB, GiB), _pages(GiB + 2 * MiB, 2 * GiB, 512, 2 * MiB)),
    ((GiB, 2 * GiB, GiB - 2 * MiB), _pages(GiB, 2 * GiB, 511, 2 * MiB)),
    ((GiB, 2 * GiB, GiB - 0x1000), _pages(GiB, 2 * GiB, 511, 2 * MiB) +
     _pages(2 * GiB - 2 * MiB, 3 * GiB - 2 * MiB, 511, 0x1000)),
    ((GiB, 2 * GiB, GiB + 0x1000), [(GiB, GiB, 2 * GiB), (2 * GiB, 0x1000, 3 * GiB)]),
], ids=["2m", "2m-4k", "2m+4k", "2m-pa-4k-aligned", "2m-va-4k-aligned", "4k-2m-4k",
        "1g", "1g-pa-2m-aligned", "1g-va-2m-aligned", "1g-2m", "1g-4k", "1g+4k"])
def test_leaves_are_as_large_as_alignment_and_size_allow(img, spec, leaves):
    """The exact leaves for ranges around the 2 MiB and 1 GiB sizes and alignments: a leaf of
    a size needs va, pa and the remaining size all to allow it; the walk agrees."""
    va, pa, size = spec
    t = Tables(img, LAYOUTS[0], 0x7000000, [(va, pa, size, W)])
    assert t.status == P.PT_OK
    assert _mapped(t) == leaves
    for off in (0, 0x1234, size // 2 + 0x567, size - 1):
        assert t.walk(va + off).gpa == pa + off


@pytest.mark.parametrize("specs, kept", [
    ([(GiB, GiB, GiB, 0), (GiB, 2 * GiB, GiB, W)], [(GiB, GiB, GiB)]),  # 1 GiB over 1 GiB
    ([(GiB, GiB, 0x1000, W), (GiB, 2 * GiB, GiB, W)], [(GiB, 0x1000, GiB)]),  # over a PD
    ([(2 * MiB, 2 * MiB, 2 * MiB, 0), (2 * MiB, 4 * MiB, 2 * MiB, W)],
     [(2 * MiB, 2 * MiB, 2 * MiB)]),  # 2 MiB over 2 MiB
    ([(2 * MiB, 2 * MiB, 0x1000, W), (2 * MiB, 4 * MiB, 2 * MiB, W)],
     [(2 * MiB, 0x1000, 2 * MiB)]),  # 2 MiB over a PT
    ([(0x1000, 0x1000, 0x1000, 0), (0x1000, 0x5000, 0x1000, W)],
     [(0x1000, 0x1000, 0x1000)]),  # 4 KiB over 4 KiB
    ([(0x1000, 0x1000, 0x2000, W), (0, 0x5000, 0x2000, W)],
     [(0x1000, 0x1000, 0x1000), (0x2000, 0x1000, 0x2000)]),  # the second page overlaps
    ([(GiB, GiB, GiB, W), (GiB + 0x1000, 0x9000000, 0x1000, W)], [(GiB, GiB, GiB)]),
    ([(GiB, GiB, GiB, W), (GiB + 2 * MiB, 2 * MiB, 2 * MiB, W)], [(GiB, GiB, GiB)]),
], ids=["1g-1g", "1g-table", "2m-2m", "2m-table", "4k-4k", "4k-second-page", "4k-in-1g",
        "2m-in-1g"])
def test_overlaps_are_refused(img, specs, kept):
    """Mapping over anything present (a leaf, read-only or not, or a table) is PT_E_OVERLAP,
    and the first mapping stays as it was (the pages before the overlap, if any, stay too:
    the builder does not roll back)."""
    t = Tables(img, LAYOUTS[0], 0x7000000, specs)
    assert t.status == P.PT_E_OVERLAP.value
    got = _mapped(t)
    assert [x for x in got if x in kept] == kept
    va2, pa2, size2, _ = specs[1]
    assert all(va2 <= va < va2 + size2 and pa == pa2 + va - va2
               for va, _, pa in got if (va, _, pa) not in kept)


@pytest.mark.parametrize("spec", [
    ((1 << 47) - 0x1000, 0x100000, 0x1000, W),  # ends exactly at 2^47
    ((1 << 47) - GiB, GiB, GiB, W),
    (0x100000, (1 << 43) - 0x1000, 0x1000, W),  # ends exactly at the physical limit
    (0x100000, (1 << 43) - 2 * MiB, 2 * MiB, W),
], ids=["va-4k", "va-1g", "pa-4k", "pa-2m"])
def test_ranges_ending_exactly_at_the_limits_are_mapped(img, spec):
    va, pa, size, _ = spec
    t = Tables(img, LAYOUTS[0], 0x7000000, [spec])
    assert t.status == P.PT_OK
    assert sum(s for _, s, _ in t.leaves()) == size
    assert t.walk(va + size - 1).gpa == pa + size - 1


def _build(img: NativeImage, pool_va: int, pool_pa: int, pool_pages: int, cbit: int,
           phys_bits: int, specs=()) -> int:
    """mh_test_pt_build with the pool's parameters given as they are (no Tables fix-ups)."""
    b = (ctypes.c_uint8 * P.PtBuilder.size)()
    flat = [x for q in specs for x in q]
    arr = (ctypes.c_uint64 * max(len(flat), 1))(*flat)
    return img.call("mh_test_pt_build", ctypes.addressof(b), pool_va, pool_pa, pool_pages, cbit,
                    phys_bits, ctypes.addressof(arr), len(specs), restype=ctypes.c_int32)


def test_pool_parameters_are_checked(img):
    """pt_init refuses an empty or unaligned pool, a C-bit inside the address field, and a pool
    that does not fit below the physical-address limit (one that ends exactly there fits)."""
    raw = (ctypes.c_uint8 * (5 * 4096))()
    va = (ctypes.addressof(raw) + 4095) & ~4095
    ok, align, rng = P.PT_OK, P.PT_E_ALIGN.value, P.PT_E_RANGE.value
    assert _build(img, va, 0x7000000, 4, 47, 43) == ok
    assert _build(img, va, 0x7000000, 0, 47, 43) == align
    assert _build(img, va + 8, 0x7000000, 4, 47, 43) == align
    assert _build(img, va, 0x7000008, 4, 47, 43) == align
    assert _build(img, va, 0x7000000, 4, 40, 43) == rng  # C-bit below bit 43
    assert _build(img, va, 0x7000000, 4, 42, 43) == rng  # the field's top bit
    assert _build(img, va, 0x7000000, 4, 43, 43) == ok  # the first bit above it (as natively)
    assert _build(img, va, (1 << 43) - 4 * 4096, 4, 47, 43) == ok  # ends at the limit
    assert _build(img, va, (1 << 43) - 3 * 4096, 4, 47, 43) == rng  # one page past it


def test_pool_pages_are_counted_exactly(img):
    """One 4 KiB page at va 0 needs exactly four table pages (PML4, PDPT, PD, PT): a pool of
    four suffices, a pool of three (two, one) runs out. Either way the builder writes nothing
    outside the pool's pages it used, and a table whose next level found no page keeps its
    entry empty: pages 0..n-1 are a chain of entry 0s, the last one all zero."""
    raw = (ctypes.c_uint8 * (6 * 4096))()
    va = (ctypes.addressof(raw) + 4095) & ~4095
    spec = [(0, 0x100000, 0x1000, P.MAP_W)]
    pool_pa = 0x7000000
    table_bits = (1 << 47) | P.PTE_P | P.PTE_RW | P.PTE_A
    for n in (4, 3, 2, 1):
        ctypes.memset(va, 0xA5, 5 * 4096)
        status = _build(img, va, pool_pa, n, 47, 43, spec)
        assert status == (P.PT_OK if n == 4 else P.PT_E_POOL.value)
        want = b""
        for k in range(n):  # page k: PML4, PDPT, PD, PT
            page = [0] * 512
            if k < n - 1:  # the next level's table, page k + 1
                page[0] = (pool_pa + (k + 1) * 4096) | table_bits
            elif k == 3:  # the PT: the leaf (no n < 4 gets this far)
                page[0] = 0x100000 | P.PTE_P | P.PTE_RW | P.PTE_A | P.PTE_D | P.PTE_NX.value
            want += b"".join(x.to_bytes(8, "little") for x in page)
        want += b"\xa5" * (5 * 4096 - len(want))  # the rest of the pool and the page after it
        assert ctypes.string_at(va, 5 * 4096) == want, n


def test_a_read_only_large_page_is_not_split(img):
    """A 2 MiB leaf without RW is present all the same: mapping a 4 KiB page inside it is an
    overlap, not a reason to put a table in its place."""
    t = Tables(img, LAYOUTS[0], 0x7000000,
               [(0x200000, 0x200000, 0x200000, 0), (0x201000, 0x9000000, 0x1000, P.MAP_W)])
    assert t.status == P.PT_E_OVERLAP.value


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"cbit{lay.cbit}")
def test_lookup_inside_each_leaf_size(img, layout):
    """pt_lookup's address inside a 4 KiB, a 2 MiB and a 1 GiB leaf whose va and pa differ in
    the bit just above the leaf (12, 21, 30), at offsets that are not multiples of the next
    smaller page: the leaf's frame plus the offset inside the leaf, as the walk has it."""
    specs = [(0x1000, 0x2000, 0x1000, W), (2 * MiB, 4 * MiB, 2 * MiB, 0),
             (GiB, 2 * GiB, GiB, W | P.MAP_ENC)]
    t = Tables(img, layout, 0x7000000, specs)
    assert t.status == P.PT_OK
    assert [s for _, s, _ in t.leaves()] == [0x1000, 2 * MiB, GiB]
    bits = ctypes.c_uint64()
    for va, pa, size, _ in specs:
        for off in [o for o in (0, 0x123, 0xFF8, 0x1F_F123, 0x3FFF_F123, size - 1) if o < size]:
            got = img.call("mh_test_pt_lookup", ctypes.addressof(t.b), va + off,
                           ctypes.addressof(bits), restype=ctypes.c_uint64)
            assert got == pa + off == t.walk(va + off).gpa, (hex(va + off), hex(got))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: f"cbit{lay.cbit}")
def test_lookup_agrees_with_the_walk(img, layout):
    """pt_lookup (the driver checks its own tables with it) gives, for every mapping, the
    address and the leaf bits the CPU's walk sees (RW, NX, C-bit, PS for a large leaf), and
    ~0 where nothing is mapped."""
    rng = random.Random(SEED)
    ram_base, specs = mirror_specs(layout)
    t = Tables(img, layout, pool_pa=(ram_base - 65 * GiB), specs=specs)
    assert t.status == P.PT_OK
    leaf_size = {va: size for va, size, _ in t.leaves()}
    bits = ctypes.c_uint64()
    for va, pa, size, flags in specs:
        for off in [0, size - 1, *(rng.randrange(size) for _ in range(8))]:
            got = img.call("mh_test_pt_lookup", ctypes.addressof(t.b), va + off,
                           ctypes.addressof(bits), restype=ctypes.c_uint64)
            assert got == pa + off, (hex(va + off), hex(got))
            lva = max(v for v in leaf_size if v <= va + off)
            want = ((P.PTE_RW if flags & P.MAP_W else 0) |
                    (0 if flags & P.MAP_X else P.PTE_NX.value) |
                    (layout.c_mask if flags & P.MAP_ENC else 0) |
                    (P.PTE_PS if leaf_size[lva] > 4096 else 0))
            assert bits.value == want, (hex(va + off), hex(bits.value), hex(want))
    for va in (0, 0x7E00000 - 0x1000, ram_base - 0x1000, ram_base + TiB):
        got = img.call("mh_test_pt_lookup", ctypes.addressof(t.b), va, ctypes.addressof(bits),
                       restype=ctypes.c_uint64)
        assert got == 2**64 - 1, hex(va)
