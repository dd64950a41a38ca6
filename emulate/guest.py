"""Loading the guest workload (`emulate.workload`, a DSL program) into a main VM, host side.

`load` takes the program's built image (a LinkedImage), places it, a config page, a stack and a
page-table pool in the main VM through the UEFI stand-in's allocator (under SEV-ES also a GHCB,
a control page and an AP jump table page), writes the configuration and points the firmware's
vCPU at `guest_main(cfg)`; the helpers below describe the regions, check what the guest wrote
and ask it to park (`request_park`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from emulate.memctl import PAGE
from emulate.uefi import EFI_LOADER_CODE, EFI_LOADER_DATA
from emulate.workload import (
    GR_DIRTY,
    GR_PRIVATE,
    GR_SHARED,
    GUEST_MAGIC,
    MAX_GUEST_REGIONS,
    MIX,
    GuestCfg,
)

if TYPE_CHECKING:
    from emulate.host import Host
    from helperfw.codegen.image import LinkedImage

__all__ = [
    "GR_DIRTY",
    "GR_PRIVATE",
    "GR_SHARED",
    "GUEST_STACK",
    "PT_POOL_PAGES",
    "LoadedGuest",
    "Region",
    "config_bytes",
    "expected_page",
    "load",
    "read_cfg",
    "request_park",
]


@dataclass(frozen=True)
class Region:
    """Host-side description of one workload region (identity mapped: va == gpa)."""

    va: int
    pages: int
    flags: int = GR_PRIVATE | GR_DIRTY
    seed: int = 0


def config_bytes(regions: list[Region], *, pt_pool: int, pt_pool_pages: int, hot_va: int,
                 hot_pages: int, cold_shift: int = 3, seed: int = 1, ghcb: int = 0,
                 ctl: int = 0, jt: int = 0) -> bytes:
    if len(regions) > MAX_GUEST_REGIONS:
        raise ValueError(f"at most {MAX_GUEST_REGIONS} regions")
    regs = [{"va": r.va, "pages": r.pages, "flags": r.flags, "seed": r.seed} for r in regions]
    regs += [{"va": 0, "pages": 0, "flags": 0, "seed": 0}] * (MAX_GUEST_REGIONS - len(regs))
    return GuestCfg.build(
        magic=GUEST_MAGIC, nregions=len(regions), regions=regs, pt_pool=pt_pool,
        pt_pool_pages=pt_pool_pages, pt_pool_used=0, hot_va=hot_va, hot_pages=hot_pages,
        cold_shift=cold_shift, phase=0, rng=seed | 1, generation=0, touches=0, shared_calls=0,
        hc_errors=0, dirty_pages=0, ghcb=ghcb, ctl=ctl, jt=jt, park_seen=0, parks=0, sev_es=0,
        reserved=0)


def expected_page(va: int, gen: int) -> bytes:
    """What fill_page(va, gen) writes (for checks of the guest's own view)."""
    out = bytearray()
    m = (1 << 64) - 1
    for i in range(512):
        x = (((va + 8 * i) ^ (gen << 40)) * MIX) & m
        out += (x ^ (x >> 29)).to_bytes(8, "little")
    return bytes(out)


# -- host side: load and start the workload in a main VM ------------------------------------------
GUEST_STACK = 64 << 10
PT_POOL_PAGES = 16


@dataclass
class LoadedGuest:
    """The workload as placed in the main VM: where everything is, and its regions."""

    base: int
    cfg: int
    stack_top: int
    regions: list[Region]
    hot_va: int
    hot_pages: int
    ghcb: int = 0  # SEV-ES only: its GHCB, the host's control page, its AP jump table
    ctl: int = 0
    jt: int = 0


def load(host: Host, img: LinkedImage, regions: list[Region], *, hot_va: int, hot_pages: int,
         seed: int, cold_shift: int = 3) -> LoadedGuest:
    """Place the built workload `img`, a config page, a stack and a page-table pool in the main
    VM through the firmware's allocator, and point the (firmware's) vCPU at guest_main(cfg)."""
    u = host.uefi
    base = u.allocate_pages(img.size // 4096, EFI_LOADER_CODE)
    host.vm.write(base, bytes(img.flat(base)))
    cfg = u.allocate_pages(1, EFI_LOADER_DATA)
    stack = u.allocate_pages(GUEST_STACK // 4096, EFI_LOADER_DATA)
    pool = u.allocate_pages(PT_POOL_PAGES, EFI_LOADER_DATA)
    ghcb = ctl = jt = 0
    if host.vm.sev_es:
        ghcb, ctl, jt = (u.allocate_pages(1, EFI_LOADER_DATA) for _ in range(3))
    host.vm.write(cfg, config_bytes(regions, pt_pool=pool, pt_pool_pages=PT_POOL_PAGES,
                                    hot_va=hot_va, hot_pages=hot_pages, cold_shift=cold_shift,
                                    seed=seed, ghcb=ghcb, ctl=ctl, jt=jt))
    top = stack + GUEST_STACK
    regs = u.vcpu.regs  # the firmware starts the program: guest-side register access
    rsp = top - 16
    host.vm.write(rsp - 8, u.ret_trap.to_bytes(8, "little"))  # returns into the firmware's hlt
    regs["rsp"] = rsp - 8
    regs["rdi"] = cfg
    regs["rip"] = base + img.symbol("guest_main").rva
    return LoadedGuest(base, cfg, top, list(regions), hot_va, hot_pages, ghcb, ctl, jt)


def read_cfg(host: Host, g: LoadedGuest):
    return GuestCfg.parse(host.vm.read(g.cfg, GuestCfg.size))


def request_park(host: Host, g: LoadedGuest) -> int:
    """SEV-ES: the host asks the workload to park its vCPU (the next request number in the
    shared control page; QEMU's write is in the migration dirty log like any other)."""
    if not g.ctl:
        raise ValueError("the workload has no control page (not an SEV-ES guest)")
    hpa = host.vm.gpa_to_hpa(g.ctl)
    assert hpa is not None
    req = int.from_bytes(host.mc.host_read(hpa, 8), "little") + 1
    host.mc.host_write(hpa, req.to_bytes(8, "little"))
    host.vm.note_write(hpa & ~(PAGE - 1), PAGE)
    return req
