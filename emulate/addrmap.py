"""The mirror VM's address spaces as data: what `helperfw map` draws and prints.

Why read them from a booted emulator rather than describe them: the picture must not drift from
the code. `read_map` boots the real image in the host model (`Host.boot_helper`, then
`Host.create_mirror`, as a migration does), opens a sending session so the helper maps its RAM
window, and then reads

* the guest-physical space from the mirror VM's memslots (what the host mapped, and whether
  each slot is the guest's own DRAM or a mirror-only copy), and
* the virtual space from the helper's own page tables, enumerating their present leaves and
  translating each with `emulate.mmu.walk` (the emulator's MMU oracle), so permissions and the
  C-bit are the effective ones the vCPU would see.

The result (`AddressMap`) is plain data with no plotting dependency: the drawing
(`helperfw.plots.addrmap`), the text table (`AddressMap.table`) and the tests all consume it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from emulate.host import FOUR_GIB, Host, Mirror, default_layout
from emulate.mailbox import HelperChannel
from emulate.mmu import ACCESS_READ, PTE_P, PTE_PS, PhysLayout, walk
from helperfw.runtime import protocol as P

PAGE = P.PAGE_SIZE
TWO_MIB = 2 << 20
CANONICAL_LIMIT = 1 << 47  # first non-canonical VA with 4-level paging (SDM vol. 1 §3.3.7.1)
MAP_KEY = bytes(range(0x40, 0x60))  # a transport key for the boot (the map does not use it)

# what each BootInfo region kind is, for labels (kinds are declared in protocol.py)
REGION_KINDS = {
    P.REGION_CODE: ("code", "helper code (.text)"),
    P.REGION_RODATA: ("rodata", "read-only data (.rodata)"),
    P.REGION_DATA: ("data", "data: .data/.bss, context, stack, page tables"),
    P.REGION_MAILBOX: ("mailbox", "mailbox: boot info, command, data slots"),
}
# span kinds that are not helper regions
GUEST = "guest"  # the guest's low memory, 1:1 (shift)
WINDOW = "window"  # the RAM window: ram_addr r at ram_base + r
OTHER = "other"  # anything the tables map that none of the above explains


@dataclass(frozen=True)
class Span:
    """One contiguous range of one address space ("gpa" or "va") with a single meaning.

    GPA spans are (parts of) mirror memslots; `backing` says whose DRAM backs them. VA spans are
    runs of page-table leaves with the same effective permissions and a contiguous GPA;
    `gpa` is where the run starts in the mirror's guest-physical space and `backed` whether a
    memslot is there (the tables may map more than the host backs: shift's low 4 GiB)."""

    space: str
    start: int
    end: int
    kind: str  # code/rodata/data/mailbox, GUEST, WINDOW, OTHER
    label: str
    backing: str = ""  # gpa: "guest DRAM" / "mirror-only copy"
    hpa: int | None = None  # gpa: DRAM offset of `start`
    gpa: int | None = None  # va: GPA of `start`
    readable: bool = True
    writable: bool = False
    executable: bool = False
    encrypted: bool | None = None  # va: C-bit of the leaves; gpa: None (a GPA has no C-bit)
    backed: bool = True
    pages: tuple[tuple[int, int], ...] = ()  # va: (page size, count), largest first

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def perms(self) -> str:
        return ("R" if self.readable else "-") + ("W" if self.writable else "-") + (
            "X" if self.executable else "-")

    @property
    def ident(self) -> str:
        """A stable identifier (the SVG element id of its drawing)."""
        return f"{self.space}-{self.kind}-{self.start:x}-{self.end:x}"


@dataclass(frozen=True)
class Marker:
    """A notable address: where ram_addr 0 lands, the C-bit, the MAXPHYADDR limit..."""

    key: str
    addr: int
    label: str
    spaces: tuple[str, ...] = ("gpa", "va")


@dataclass(frozen=True)
class Block:
    """A guest RAM block as the RAM window sees it."""

    name: str
    ram_addr: int
    size: int
    guest_gpa: int | None  # where the guest maps it (None: unplugged)


@dataclass(frozen=True)
class AddressMap:
    """The mirror's address spaces for one boot of the helper: BootInfo's claims plus what the
    memslots and the page tables really hold."""

    option: int
    cbit: int
    reduction: int
    maxphyaddr: int
    shift_high: bool
    mem: int
    ram_base: int
    ram_max: int
    window_size: int  # the RAM window the session mapped (guest RAM rounded up to 2 MiB)
    entry_rip: int
    rsp: int
    cr3: int
    regions: tuple[tuple[int, int, int, int], ...]  # BootInfo: (kind, main_gpa, length, mirror_gpa)
    blocks: tuple[Block, ...]
    gpa: tuple[Span, ...]
    va: tuple[Span, ...]
    markers: tuple[Marker, ...]

    @property
    def option_name(self) -> str:
        return P.OPTION_NAMES[self.option]

    @property
    def phys_bits(self) -> int:
        return self.maxphyaddr - self.reduction

    @property
    def title(self) -> str:
        high = " (shift_high)" if self.shift_high else ""
        return f"{self.option_name}{high}, C-bit {self.cbit}"

    def table(self) -> str:
        """The map as a text table for terminals and logs."""
        return "\n".join(_table_lines(self))


# -- reading a booted helper -----------------------------------------------------------------------
def read_map(image: Path | str, option: int, cbit: int, mem: int, *, seed: int = 1,
             shift_high: bool = False) -> AddressMap:
    """Boot `image` and read both address spaces of its mirror (see `boot_mirror`)."""
    host, mirror = boot_mirror(image, option, cbit, mem, seed=seed, shift_high=shift_high)
    return address_map(host, mirror, mem=mem, shift_high=shift_high)


def boot_mirror(image: Path | str, option: int, cbit: int, mem: int, *, seed: int = 1,
                shift_high: bool = False) -> tuple[Host, Mirror]:
    """A fresh host model with the helper booted from `image`, its mirror created and a
    receiving session open (RECV_BEGIN maps the RAM window into the helper's tables and needs
    no peer). Raises what the
    boot raises (PeError, RuntimeError, GuestFault, MailboxError) for a bad image."""
    host = Host("map", default_layout(mem), cbit=cbit, seed=seed * 2 + 1, uefi_seed=seed)
    host.boot_helper(image, MAP_KEY, option, shift_high=int(shift_high))
    mirror = host.create_mirror()
    ch = HelperChannel(host.mc, mirror)
    ch.hello()
    ch.recv_begin(window_size(host))
    return host, mirror


def window_size(host: Host) -> int:
    """The RAM window a session maps: guest RAM rounded up to 2 MiB, as emulate.migration does."""
    return -(-host.ram_size // TWO_MIB) * TWO_MIB


def address_map(host: Host, mirror: Mirror, *, mem: int, shift_high: bool) -> AddressMap:
    """Both address spaces of a booted mirror: BootInfo, the memslots, the walked tables."""
    bi = mirror.info.bootinfo
    regions = tuple((int(r.kind), int(r.main_gpa), int(r.length), int(r.mirror_gpa))
                    for r in mirror.info.regions)
    blocks = tuple(Block(b.name, b.offset, b.size, b.gpa) for b in host.blocks)
    layout = mirror.vm.layout
    assert layout.cbit is not None
    amap = AddressMap(
        option=int(bi.option), cbit=layout.cbit, reduction=layout.reduction,  # type: ignore[attr-defined]
        maxphyaddr=layout.maxphyaddr, shift_high=shift_high, mem=mem,
        ram_base=int(bi.ram_base), ram_max=int(bi.ram_max),  # type: ignore[attr-defined]
        window_size=window_size(host),
        entry_rip=int(bi.entry_rip), rsp=int(bi.rsp), cr3=int(bi.cr3),  # type: ignore[attr-defined]
        regions=regions, blocks=blocks, gpa=(), va=(), markers=())
    gpa = tuple(_gpa_spans(host, mirror, amap))
    va = tuple(_va_spans(mirror, amap))
    return replace(amap, gpa=gpa, va=va, markers=tuple(_markers(amap, layout)))


def _page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _region_at(m: AddressMap, addr: int, *, mirror_side: bool) -> tuple[int, int, int] | None:
    """(kind, start, end) of the BootInfo region holding `addr` (its mirror GPA range or its
    VA = main-GPA range)."""
    for kind, main, length, mgpa in m.regions:
        base = mgpa if mirror_side else main
        if base <= addr < base + _page_up(length):
            return kind, base, base + _page_up(length)
    return None


def _block_at(m: AddressMap, addr: int) -> Block | None:
    """The RAM block the window address `addr` belongs to."""
    ra = addr - m.ram_base
    return next((b for b in m.blocks if b.ram_addr <= ra < b.ram_addr + b.size), None)


def _cuts(m: AddressMap, *, mirror_side: bool) -> list[int]:
    """Addresses where a span's meaning changes: region edges, window and block edges, 4 GiB."""
    out = [FOUR_GIB, m.ram_base, m.ram_base + m.window_size]
    for _k, main, length, mgpa in m.regions:
        base = mgpa if mirror_side else main
        out += [base, base + _page_up(length)]
    out += [m.ram_base + b.ram_addr for b in m.blocks]
    return out


def _classify(m: AddressMap, addr: int, *, mirror_side: bool) -> tuple[str, str]:
    """(kind, label) of the address `addr` of one space."""
    reg = _region_at(m, addr, mirror_side=mirror_side)
    if reg is not None:
        return REGION_KINDS[reg[0]][0], REGION_KINDS[reg[0]][1]
    blk = _block_at(m, addr) if addr >= m.ram_base else None
    if blk is not None:
        where = ("unplugged in the guest" if blk.guest_gpa is None
                 else f"guest GPA {blk.guest_gpa:#x}")
        return WINDOW, f"RAM window: {blk.name}, ram_addr {blk.ram_addr:#x} ({where})"
    if addr < FOUR_GIB and m.option == P.OPT_SHIFT:
        return GUEST, "guest memory below 4 GiB, 1:1"
    return OTHER, "not described by BootInfo"


def _split(lo: int, hi: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({lo, hi, *(c for c in cuts if lo < c < hi)})
    return list(itertools.pairwise(points))


def _gpa_spans(host: Host, mirror: Mirror, m: AddressMap) -> list[Span]:
    """The mirror's memslots, split where their meaning changes, each with its backing."""
    out = []
    cuts = _cuts(m, mirror_side=True)
    for s in sorted(mirror.vm.slots.values(), key=lambda s: s.gpa):
        for lo, hi in _split(s.gpa, s.gpa + s.size, cuts):
            hpa = s.hpa + (lo - s.gpa)
            kind, label = _classify(m, lo, mirror_side=True)
            guest_hpa = any(b.hpa <= hpa < b.hpa + b.size for b in host.blocks)
            backing = "guest DRAM" if guest_hpa else "mirror-only copy"
            out.append(Span("gpa", lo, hi, kind, label, backing=backing, hpa=hpa,
                            writable=True))
    return out


def _leaves(read_qword: Callable[[int, bool], int], cr3: int,
            layout: PhysLayout) -> list[tuple[int, int]]:
    """(va, size) of every present leaf of the 4-level tables at `cr3` (low half only: the
    helper maps nothing above the canonical hole)."""
    out: list[tuple[int, int]] = []

    def visit(table: int, enc: bool, shift: int, va_base: int) -> None:
        for i in range(512):
            e = read_qword(table + 8 * i, enc)
            if not e & PTE_P:
                continue
            va = va_base | (i << shift)
            if shift == 12 or (e & PTE_PS and shift in (21, 30)):
                out.append((va, 1 << shift))
            else:
                visit(e & layout.addr_mask, bool(e & layout.c_mask), shift - 9, va)

    visit(cr3 & layout.addr_mask, bool(cr3 & layout.c_mask), 39, 0)
    return out


def _va_spans(mirror: Mirror, m: AddressMap) -> list[Span]:
    """Runs of leaves with one meaning and the same effective translation attributes."""
    vm = mirror.vm

    def rq(gpa: int, enc: bool) -> int:
        return vm.read_u64(gpa, encrypted=enc)

    runs: list[list] = []  # [va, end, gpa, (w, x, c), [leaf (va, size)...]]
    for va, size in _leaves(rq, m.cr3, vm.layout):
        t = walk(rq, m.cr3, va, ACCESS_READ, vm.layout)  # the oracle's view of this leaf
        attrs = (t.writable, t.executable, t.encrypted)
        last = runs[-1] if runs else None
        if last and last[1] == va and last[2] + (va - last[0]) == t.gpa and last[3] == attrs:
            last[1] = va + size
            last[4].append((va, size))
        else:
            runs.append([va, va + size, t.gpa, attrs, [(va, size)]])
    cuts = _cuts(m, mirror_side=False)
    slot_edges = [e for s in vm.slots.values() for e in (s.gpa, s.gpa + s.size)]
    out = []
    for va, end, gpa, (w, x, c), leaves in runs:
        gcuts = [va + (e - gpa) for e in slot_edges]
        for lo, hi in _split(va, end, cuts + gcuts):
            g = gpa + (lo - va)
            kind, label = _classify(m, lo, mirror_side=False)
            out.append(Span("va", lo, hi, kind, label, gpa=g, writable=w, executable=x,
                            encrypted=c, backed=vm.gpa_to_hpa(g) is not None,
                            pages=_count_pages(leaves, lo, hi)))
    return out


def _count_pages(leaves: list[tuple[int, int]], lo: int, hi: int) -> tuple[tuple[int, int], ...]:
    """(page size, count) of the leaves overlapping [lo, hi), largest size first."""
    sizes: dict[int, int] = {}
    for va, size in leaves:
        if va < hi and lo < va + size:
            sizes[size] = sizes.get(size, 0) + 1
    return tuple(sorted(sizes.items(), reverse=True))


def _markers(m: AddressMap, layout: PhysLayout) -> list[Marker]:
    """The addresses a reader needs to see: where ram_addr 0 lands, the window's limit, the
    C-bit, the usable physical-address limit and MAXPHYADDR, 4 GiB, the canonical limit."""
    phys = layout.phys_bits
    out = [
        Marker("ram0", m.ram_base, f"ram_addr 0 at {m.ram_base:#x} (ram_base)"),
        Marker("window-limit", m.ram_base + m.ram_max,
               f"window limit: ram_base + ram_max = {m.ram_base + m.ram_max:#x}"),
        Marker("four-gib", FOUR_GIB, "4 GiB"),
        Marker("phys-limit", 1 << phys,
               f"2^{phys}: GPA limit (MAXPHYADDR {layout.maxphyaddr} - reduction "
               f"{layout.reduction})", ("gpa",)),
        Marker("cbit", 1 << m.cbit, f"2^{m.cbit}: C-bit {m.cbit}", ("gpa",)),
        Marker("maxphyaddr", 1 << layout.maxphyaddr, f"2^{layout.maxphyaddr}: MAXPHYADDR",
               ("gpa",)),
        Marker("canonical", CANONICAL_LIMIT, "2^47: end of the canonical lower half", ("va",)),
    ]
    return sorted(out, key=lambda mk: (mk.addr, mk.key))


# -- the text table --------------------------------------------------------------------------------
def human_size(n: int) -> str:
    """4096 -> '4 KiB', 3 << 30 -> '3 GiB', 0x6000 -> '24 KiB'; 1.5 MiB keeps a decimal."""
    for shift, unit in ((50, "PiB"), (40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) or v >= 100 else f"{v:.1f} {unit}"
    return f"{n} B"


def page_summary(pages: tuple[tuple[int, int], ...]) -> str:
    return " ".join(f"{n}x{human_size(s).replace(' ', '').replace('iB', '')}" for s, n in pages)


def _table_lines(m: AddressMap) -> list[str]:
    lines = [
        (f"mirror address space: option {m.title}; reduction {m.reduction}, MAXPHYADDR "
         f"{m.maxphyaddr} ({m.phys_bits} usable GPA bits); guest RAM {human_size(m.mem)}"),
        (f"ram_addr 0 at GPA = VA {m.ram_base:#x}; window {human_size(m.window_size)} mapped, "
         f"at most {human_size(m.ram_max)}"),
        f"entry RIP {m.entry_rip:#x}, RSP {m.rsp:#x}, CR3 {m.cr3:#x}",
        "",
        "guest-physical (mirror VM memslots)",
        f"  {'start':>18} {'end':>18} {'size':>9}  {'kind':<8} {'backing':<16} what",
    ]
    for s in m.gpa:
        lines.append(f"  {s.start:>#18x} {s.end:>#18x} {human_size(s.size):>9}  {s.kind:<8} "
                     f"{s.backing:<16} {s.label}")
    lines += ["", "virtual (the helper's page tables, walked)",
              (f"  {'start':>18} {'end':>18} {'size':>9}  {'kind':<8} perm C  "
               f"{'-> GPA':>18}  {'pages':<14} what")]
    for s in m.va:
        note = "" if s.backed else " [no memslot]"
        lines.append(f"  {s.start:>#18x} {s.end:>#18x} {human_size(s.size):>9}  {s.kind:<8} "
                     f"{s.perms}  {'1' if s.encrypted else '0'}  {s.gpa:>#18x}  "
                     f"{page_summary(s.pages):<14} {s.label}{note}")
    lines += ["", "markers"]
    for mk in m.markers:
        lines.append(f"  {mk.addr:>#18x}  {'/'.join(mk.spaces):<6} {mk.label}")
    return lines
