"""A UEFI stand-in: loads the same PE32+ file OVMF loads and provides the boot services a runtime
driver uses, so the helper image runs under the emulator exactly as shipped (SPEC §7).

Services are reached through the win64 ABI: every function pointer in the tables points into a
trap page; a UC_HOOK_CODE on that page reads rcx/rdx/r8/r9 and stack arguments ([rsp+0x28]...),
performs the service in Python, sets rax (EFI_STATUS) and simulates `ret`. Memory is identity
mapped (VA == GPA, OVMF style) with the C-bit set on every page when SEV is on.
Table layouts come from helperfw.runtime.efi, the single declaration shared with the helper.
"""

from __future__ import annotations

import random
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from unicorn import UC_HOOK_CODE, Uc

from emulate.faults import GuestFault
from emulate.flat import FlatGuest
from emulate.machine import VM, Exit, VCpu
from emulate.memctl import PAGE
from helperfw.runtime import efi
from ovmf_glue.pe_format import (
    IMAGE_DIRECTORY_ENTRY_BASERELOC,
    IMAGE_FILE_MACHINE_AMD64,
    IMAGE_REL_BASED_ABSOLUTE,
    IMAGE_REL_BASED_DIR64,
    IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER,
    PE32_PLUS_MAGIC,
)


# EFI_STATUS / constants from the shared declaration (UEFI 2.10 Appendix D, §7.2).
def _v(c: object) -> int:
    return int(getattr(c, "value", c))  # type: ignore[call-overload]


EFI_SUCCESS = _v(efi.EFI_SUCCESS)
EFI_INVALID_PARAMETER = _v(efi.EFI_INVALID_PARAMETER)
EFI_UNSUPPORTED = _v(efi.EFI_UNSUPPORTED)
EFI_OUT_OF_RESOURCES = _v(efi.EFI_OUT_OF_RESOURCES)
EFI_NOT_FOUND = _v(efi.EFI_NOT_FOUND)
EFI_LOAD_ERROR = _v(efi.EFI_LOAD_ERROR)
EFI_BUFFER_TOO_SMALL = (1 << 63) | 5

EFI_LOADER_CODE, EFI_LOADER_DATA = 1, 2
EFI_BOOT_SERVICES_CODE, EFI_BOOT_SERVICES_DATA = 3, 4
EFI_RUNTIME_SERVICES_CODE = efi.EFI_RUNTIME_SERVICES_CODE
EFI_RUNTIME_SERVICES_DATA = efi.EFI_RUNTIME_SERVICES_DATA
EFI_RESERVED_MEMORY_TYPE = 0
ALLOCATE_ANY_PAGES = efi.ALLOCATE_ANY_PAGES
ALLOCATE_MAX_ADDRESS = efi.ALLOCATE_MAX_ADDRESS
ALLOCATE_ADDRESS = efi.ALLOCATE_ADDRESS

# EFI_RUNTIME_SERVICES is not used by the driver at load; all members answer EFI_UNSUPPORTED.
_RUNTIME_SERVICES = ("GetTime", "SetTime", "GetWakeupTime", "SetWakeupTime",
                     "SetVirtualAddressMap", "ConvertPointer", "GetVariable",
                     "GetNextVariableName", "SetVariable", "GetNextHighMonotonicCount",
                     "ResetSystem", "UpdateCapsule", "QueryCapsuleCapabilities",
                     "QueryVariableInfo")
EFI_RUNTIME_SERVICES_SIGNATURE = 0x56524553544E5552  # "RUNTSERV"
EFI_TPL_APPLICATION = 4
HDR_SIZE = efi.EfiTableHeader.size


class PeError(ValueError):
    """The file is not a loadable PE32+ AMD64 image."""


@dataclass
class LoadedImage:
    base: int
    size: int
    entry: int
    image_base: int  # the link-time ImageBase
    subsystem: int
    sections: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (va, size)
    relocations_applied: int = 0

    def symbolizer(self, symbols: dict[str, int] | None = None) -> Callable[[int], str]:
        """rip -> "name+0xoff" using RVAs in `symbols`, else "image+0xrva"."""
        syms = sorted((rva, n) for n, rva in (symbols or {}).items())

        def sym(rip: int) -> str:
            rva = rip - self.base
            if not 0 <= rva < self.size:
                return ""
            best = None
            for s_rva, name in syms:
                if s_rva <= rva:
                    best = (s_rva, name)
            if best:
                return f"{best[1]}+{rva - best[0]:#x}"
            return f"image+{rva:#x}"

        return sym


@dataclass
class StartResult:
    """Outcome of start_image: EFI_STATUS (None if the entry point never returned)."""

    status: int | None
    conout: str
    debug_log: bytes
    image: LoadedImage
    exit: Exit

    @property
    def ok(self) -> bool:
        return self.status == EFI_SUCCESS


def parse_pe(data: bytes) -> dict:
    """Validate and parse the headers of a PE32+ AMD64 image (raises PeError)."""
    def u16(o: int) -> int:
        return struct.unpack_from("<H", data, o)[0]

    def u32(o: int) -> int:
        return struct.unpack_from("<I", data, o)[0]

    if len(data) < 0x40 or data[:2] != b"MZ":
        raise PeError("no MZ header")
    pe = u32(0x3C)
    if data[pe : pe + 4] != b"PE\0\0":
        raise PeError("no PE signature")
    coff = pe + 4
    if u16(coff) != IMAGE_FILE_MACHINE_AMD64:
        raise PeError(f"machine {u16(coff):#x} is not AMD64")
    nsec, opt_size = u16(coff + 2), u16(coff + 16)
    opt = coff + 20
    if u16(opt) != PE32_PLUS_MAGIC:
        raise PeError(f"optional header magic {u16(opt):#x} is not PE32+")
    ndirs = u32(opt + 108)
    dirs = [struct.unpack_from("<II", data, opt + 112 + 8 * i) for i in range(min(ndirs, 16))]
    sections = []
    for i in range(nsec):
        s = opt + opt_size + 40 * i
        name = data[s : s + 8].rstrip(b"\0").decode("ascii", "replace")
        vsize, va, rawsize, rawptr = struct.unpack_from("<IIII", data, s + 8)
        sections.append((name, va, vsize, rawptr, rawsize))
    return {
        "entry": u32(opt + 16), "image_base": struct.unpack_from("<Q", data, opt + 24)[0],
        "section_alignment": u32(opt + 32), "size_of_image": u32(opt + 56),
        "size_of_headers": u32(opt + 60), "subsystem": u16(opt + 68), "dirs": dirs,
        "sections": sections,
    }


class UefiStandIn:
    """Boot-services environment in one VM: identity-mapped RAM, system table, page/pool
    allocator, configuration tables, ConOut; `start_image` loads and runs a PE32+ driver."""

    LOW = 2 << 20  # bump-allocated firmware area (tables, trap page, stacks) below this

    def __init__(self, vm: VM, *, ram_size: int = 64 << 20, hpa: int = 0, seed: int = 0,
                 symbols: dict[str, int] | None = None) -> None:
        self.vm = vm
        self.rng = random.Random(seed)
        self.guest = FlatGuest(vm, ram_gpa=0, ram_size=ram_size, hpa=hpa, skip=PAGE)
        # identity map, RWX like OVMF's DXE page tables, page 0 left out to catch NULL pointers
        self.guest.map(PAGE, PAGE, ram_size - PAGE, writable=True, executable=True)
        self.guest.pages.end = self.LOW
        self.ram_size = ram_size
        self._free = [True] * (ram_size // PAGE)
        for i in range(self.LOW // PAGE):
            self._free[i] = False  # firmware area and page 0
        self.allocations: dict[int, tuple[int, int]] = {}  # base -> (pages, memory type)
        self.pools: dict[int, int] = {}  # pool buffer -> size
        self.conout: list[str] = []
        self.config_tables: list[tuple[bytes, int]] = []
        self.events: list[tuple[int, int, int, int]] = []
        self.tpl = EFI_TPL_APPLICATION
        self.symbols = symbols
        self.image: LoadedImage | None = None
        self.calls: list[str] = []  # service names in call order (for tests and debugging)
        self._build_tables()
        self.vcpu: VCpu = self.guest.vcpu(0, rsp=0, symbolize=self._symbolize)
        self.vcpu.uc.hook_add(UC_HOOK_CODE, self._on_trap, None, self.trap, self.trap + PAGE - 1)

    # ---- tables -------------------------------------------------------------------------------
    def _build_tables(self) -> None:
        g = self.guest
        self.trap = g.pages.alloc(1)
        self._services: dict[int, tuple[str, Callable[..., int]]] = {}
        slot = [0]

        def trap_for(name: str, fn: Callable[..., int] | None) -> int:
            addr = self.trap + 8 * slot[0]
            slot[0] += 1
            self._services[addr] = (name, fn or self._unsupported(name))
            return addr

        self.ret_trap = trap_for("<return>", None)
        trap_bytes = bytearray(b"\xcc" * PAGE)
        trap_bytes[self.ret_trap - self.trap] = 0xF4  # hlt: ends the run when the entry returns
        self.vm.write(self.trap, bytes(trap_bytes))

        bs_t = efi.EfiBootServices
        impl = {
            "RaiseTPL": self._raise_tpl, "RestoreTPL": self._restore_tpl,
            "AllocatePages": self._allocate_pages, "FreePages": self._free_pages,
            "AllocatePool": self._allocate_pool, "FreePool": self._free_pool,
            "InstallConfigurationTable": self._install_config_table,
            "Stall": self._success, "SetWatchdogTimer": self._success,
            "CopyMem": self._copy_mem, "SetMem": self._set_mem,
            "CalculateCrc32": self._crc32, "CreateEvent": self._create_event,
            "CreateEventEx": self._create_event_ex, "CloseEvent": self._success,
            "LocateProtocol": self._not_found, "HandleProtocol": self._unsupported("HandleProtocol"),
        }
        self.boot_services = g.pages.alloc(1)
        bs = bytearray(bs_t.size)
        struct.pack_into("<QIIII", bs, 0, efi.EFI_BOOT_SERVICES_SIGNATURE, 0x2000A, bs_t.size, 0, 0)
        for name in bs_t.fields:
            if name in ("Hdr", "Reserved"):
                continue
            struct.pack_into("<Q", bs, bs_t.offset(name), trap_for(name, impl.get(name)))
        struct.pack_into("<I", bs, 16, zlib.crc32(bs))
        self.vm.write(self.boot_services, bytes(bs))

        self.runtime_services = g.pages.alloc(1)
        rs = bytearray(HDR_SIZE + 8 * len(_RUNTIME_SERVICES))
        struct.pack_into("<QIIII", rs, 0, EFI_RUNTIME_SERVICES_SIGNATURE, 0x2000A, len(rs), 0, 0)
        for i, name in enumerate(_RUNTIME_SERVICES):
            struct.pack_into("<Q", rs, HDR_SIZE + 8 * i, trap_for(name, None))
        struct.pack_into("<I", rs, 16, zlib.crc32(rs))
        self.vm.write(self.runtime_services, bytes(rs))

        to_t = efi.EfiSimpleTextOutput
        self.conout_proto = g.pages.alloc(1)
        to = bytearray(to_t.size)
        for name in to_t.fields:
            if name == "Mode":
                continue
            fn = self._output_string if name == "OutputString" else self._success
            struct.pack_into("<Q", to, to_t.offset(name), trap_for("ConOut." + name, fn))
        self.vm.write(self.conout_proto, bytes(to))

        self.vendor = g.pages.alloc(1)
        self.vm.write(self.vendor, "helperfw emulate\0".encode("utf-16-le"))
        self.config_array = g.pages.alloc(1)
        self.system_table = g.pages.alloc(1)
        self.image_handle = g.pages.alloc(1)
        self._write_system_table()

    def _write_system_table(self) -> None:
        st_t = efi.EfiSystemTable
        st = bytearray(st_t.size)
        struct.pack_into("<QIIII", st, 0, efi.EFI_SYSTEM_TABLE_SIGNATURE, 0x2000A, st_t.size, 0, 0)
        vals = {
            "FirmwareVendor": self.vendor, "FirmwareRevision": 0x10000,
            "ConsoleOutHandle": self.conout_proto, "ConOut": self.conout_proto,
            "StandardErrorHandle": self.conout_proto, "StdErr": self.conout_proto,
            "RuntimeServices": self.runtime_services, "BootServices": self.boot_services,
            "NumberOfTableEntries": len(self.config_tables),
            "ConfigurationTable": self.config_array,
        }
        for name, v in vals.items():
            fmt = "<I" if st_t.fields[name].type.size == 4 else "<Q"
            struct.pack_into(fmt, st, st_t.offset(name), v)
        struct.pack_into("<I", st, 16, zlib.crc32(st))
        self.vm.write(self.system_table, bytes(st))
        ct_t = efi.EfiConfigurationTable
        arr = b"".join(g + struct.pack("<Q", p) for g, p in self.config_tables)
        assert len(self.config_tables) * ct_t.size == len(arr) <= PAGE
        self.vm.write(self.config_array, arr)

    def install_config_table(self, guid: str | uuid.UUID | bytes, table: int) -> None:
        """Host-side InstallConfigurationTable (table 0 removes the entry)."""
        g = guid if isinstance(guid, bytes) else uuid.UUID(str(guid)).bytes_le
        self.config_tables = [(k, p) for k, p in self.config_tables if k != g]
        if table:
            self.config_tables.append((g, table))
        self._write_system_table()

    def config_table(self, guid: str | uuid.UUID) -> int | None:
        g = uuid.UUID(str(guid)).bytes_le
        return next((p for k, p in self.config_tables if k == g), None)

    def install_launch_secret(self, entries: list[tuple[str | uuid.UUID, bytes]]) -> int:
        """Put an SEV launch-secret area in private RAM and announce it with the
        CONFIDENTIAL_COMPUTING_SECRET config table ({u64 base; u64 size}). Returns the base."""
        body = b""
        for g, data in entries:
            body += uuid.UUID(str(g)).bytes_le + struct.pack("<I", 20 + len(data)) + data
        total = 20 + len(body)
        area = efi.guid_bytes(efi.SECRET_TABLE_HEADER_GUID) + struct.pack("<I", total) + body
        pages = -(-total // PAGE)
        base = self.allocate_pages(pages, EFI_RESERVED_MEMORY_TYPE)
        self.vm.write(base, area)
        loc = self.allocate_pool(16, EFI_RUNTIME_SERVICES_DATA)
        self.vm.write(loc, struct.pack("<QQ", base, pages * PAGE))
        self.install_config_table(efi.CONFIDENTIAL_COMPUTING_SECRET_GUID, loc)
        return base

    # ---- page allocator -------------------------------------------------------------------
    def _range_free(self, first: int, pages: int) -> bool:
        return first >= 0 and first + pages <= len(self._free) and all(
            self._free[first : first + pages])

    def allocate_pages(self, pages: int, mem_type: int, how: int = ALLOCATE_ANY_PAGES,
                       address: int = 0) -> int:
        """AllocatePages semantics; raises MemoryError/ValueError on failure."""
        if pages <= 0:
            raise ValueError("zero pages")
        if how == ALLOCATE_ADDRESS:
            if address % PAGE or not self._range_free(address // PAGE, pages):
                raise MemoryError(f"{address:#x} not free")
            first = address // PAGE
        else:
            top = len(self._free) - pages
            if how == ALLOCATE_MAX_ADDRESS:
                top = min(top, (address + 1) // PAGE - pages)
            elif how != ALLOCATE_ANY_PAGES:
                raise ValueError(f"allocate type {how}")
            first = next((i for i in range(top, -1, -1) if self._range_free(i, pages)), -1)
            if first < 0:
                raise MemoryError("out of pages")
        for i in range(first, first + pages):
            self._free[i] = False
        base = first * PAGE
        self.allocations[base] = (pages, mem_type)
        self.vm.write(base, bytes(pages * PAGE))
        return base

    def free_pages(self, base: int, pages: int) -> None:
        if self.allocations.get(base, (None,))[0] != pages:
            raise ValueError("not an allocation")
        del self.allocations[base]
        for i in range(base // PAGE, base // PAGE + pages):
            self._free[i] = True

    def allocate_pool(self, size: int, mem_type: int) -> int:
        base = self.allocate_pages(max(1, -(-size // PAGE)), mem_type)
        self.pools[base] = size
        return base

    # ---- service implementations (args: vcpu, then the win64 arguments) ------------------
    @staticmethod
    def _unsupported(name: str) -> Callable[..., int]:
        def fn(*_a: object) -> int:
            return EFI_UNSUPPORTED
        fn.__name__ = name
        return fn

    @staticmethod
    def _success(*_a: object) -> int:
        return EFI_SUCCESS

    @staticmethod
    def _not_found(*_a: object) -> int:
        return EFI_NOT_FOUND

    def _raise_tpl(self, v: VCpu, new: int, *_: int) -> int:
        old, self.tpl = self.tpl, new
        return old

    def _restore_tpl(self, v: VCpu, old: int, *_: int) -> int:
        self.tpl = old
        return 0

    def _allocate_pages(self, v: VCpu, how: int, mem_type: int, pages: int, mem_ptr: int,
                        *_: int) -> int:
        if not mem_ptr:
            return EFI_INVALID_PARAMETER
        address = int.from_bytes(v.read_virt(mem_ptr, 8), "little")
        try:
            base = self.allocate_pages(pages, mem_type, how, address)
        except MemoryError:
            return EFI_NOT_FOUND if how == ALLOCATE_ADDRESS else EFI_OUT_OF_RESOURCES
        except ValueError:
            return EFI_INVALID_PARAMETER
        v.write_virt(mem_ptr, base.to_bytes(8, "little"))
        return EFI_SUCCESS

    def _free_pages(self, v: VCpu, base: int, pages: int, *_: int) -> int:
        try:
            self.free_pages(base, pages)
        except ValueError:
            return EFI_NOT_FOUND
        return EFI_SUCCESS

    def _allocate_pool(self, v: VCpu, mem_type: int, size: int, buf_ptr: int, *_: int) -> int:
        if not buf_ptr:
            return EFI_INVALID_PARAMETER
        try:
            base = self.allocate_pool(size, mem_type)
        except MemoryError:
            return EFI_OUT_OF_RESOURCES
        v.write_virt(buf_ptr, base.to_bytes(8, "little"))
        return EFI_SUCCESS

    def _free_pool(self, v: VCpu, buf: int, *_: int) -> int:
        size = self.pools.pop(buf, None)
        if size is None:
            return EFI_INVALID_PARAMETER
        self.free_pages(buf, self.allocations[buf][0])
        return EFI_SUCCESS

    def _install_config_table(self, v: VCpu, guid_ptr: int, table: int, *_: int) -> int:
        if not guid_ptr:
            return EFI_INVALID_PARAMETER
        guid = v.read_virt(guid_ptr, 16)
        if not table and all(k != guid for k, _p in self.config_tables):
            return EFI_NOT_FOUND
        self.install_config_table(guid, table)
        return EFI_SUCCESS

    def _copy_mem(self, v: VCpu, dst: int, src: int, n: int, *_: int) -> int:
        v.write_virt(dst, v.read_virt(src, n))
        return 0

    def _set_mem(self, v: VCpu, buf: int, n: int, value: int, *_: int) -> int:
        v.write_virt(buf, bytes([value & 0xFF]) * n)
        return 0

    def _crc32(self, v: VCpu, data: int, n: int, out: int, *_: int) -> int:
        if not data or not out or not n:
            return EFI_INVALID_PARAMETER
        v.write_virt(out, zlib.crc32(v.read_virt(data, n)).to_bytes(4, "little"))
        return EFI_SUCCESS

    def _create_event(self, v: VCpu, typ: int, tpl: int, fn: int, ctx: int, ev_ptr: int,
                      *_: int) -> int:
        handle = self.allocate_pool(8, EFI_BOOT_SERVICES_DATA)
        self.events.append((typ, tpl, fn, ctx))
        v.write_virt(ev_ptr, handle.to_bytes(8, "little"))
        return EFI_SUCCESS

    def _create_event_ex(self, v: VCpu, typ: int, tpl: int, fn: int, ctx: int, _group: int,
                         ev_ptr: int, *_: int) -> int:
        return self._create_event(v, typ, tpl, fn, ctx, ev_ptr)

    def _output_string(self, v: VCpu, _this: int, s: int, *_: int) -> int:
        out = bytearray()
        while len(out) < 1 << 16:
            ch = v.read_virt(s + len(out), 2)
            if ch == b"\0\0":
                break
            out += ch
        self.conout.append(out.decode("utf-16-le", "replace"))
        return EFI_SUCCESS

    def _on_trap(self, uc: Uc, addr: int, size: int, _ud: object) -> None:
        if addr == self.ret_trap:
            return  # the hlt there ends the run
        name, fn = self._services.get(addr, ("?", self._unsupported("?")))
        v = self.vcpu
        rsp = v.get("rsp")
        stack = v.read_virt(rsp, 0x28 + 8 * 4)
        args = [v.get("rcx"), v.get("rdx"), v.get("r8"), v.get("r9")]
        args += list(struct.unpack_from("<4Q", stack, 0x28))
        self.calls.append(name)
        status = fn(v, *args)
        v.set("rax", status)
        v.set("rsp", rsp + 8)
        v.set("rip", int.from_bytes(stack[:8], "little"))

    # ---- image loading and calls ------------------------------------------------------------
    def load_image(self, data: bytes) -> LoadedImage:
        """Copy headers+sections to a random page-aligned base and apply DIR64 relocations."""
        hdr = parse_pe(data)
        size = -(-hdr["size_of_image"] // PAGE) * PAGE
        pages = size // PAGE
        runtime = hdr["subsystem"] == IMAGE_SUBSYSTEM_EFI_RUNTIME_DRIVER
        mem_type = EFI_RUNTIME_SERVICES_CODE if runtime else EFI_BOOT_SERVICES_CODE
        lo, hi = self.LOW // PAGE, len(self._free) - pages
        for _ in range(1000):
            first = self.rng.randrange(lo, hi + 1)
            if self._range_free(first, pages):
                break
        else:
            raise MemoryError("no room for the image")
        base = self.allocate_pages(pages, mem_type, ALLOCATE_ADDRESS, first * PAGE)
        img = bytearray(size)
        img[: hdr["size_of_headers"]] = data[: hdr["size_of_headers"]]
        sections = {}
        for name, va, vsize, rawptr, rawsize in hdr["sections"]:
            if va + max(vsize, rawsize) > size and va + vsize > size:
                raise PeError(f"section {name} outside SizeOfImage")
            n = min(rawsize, vsize) if vsize else rawsize
            img[va : va + n] = data[rawptr : rawptr + n]
            sections[name] = (base + va, vsize)
        delta = (base - hdr["image_base"]) & (2**64 - 1)
        applied = 0
        dirs = hdr["dirs"]
        if len(dirs) > IMAGE_DIRECTORY_ENTRY_BASERELOC:
            rva, rsize = dirs[IMAGE_DIRECTORY_ENTRY_BASERELOC]
            pos, end = rva, rva + rsize
            while pos + 8 <= end:
                page_rva, block = struct.unpack_from("<II", img, pos)
                if block < 8:
                    raise PeError("bad relocation block")
                for i in range((block - 8) // 2):
                    (e,) = struct.unpack_from("<H", img, pos + 8 + 2 * i)
                    kind, off = e >> 12, e & 0xFFF
                    if kind == IMAGE_REL_BASED_ABSOLUTE:
                        continue
                    if kind != IMAGE_REL_BASED_DIR64:
                        raise PeError(f"relocation type {kind} not supported")
                    (val,) = struct.unpack_from("<Q", img, page_rva + off)
                    struct.pack_into("<Q", img, page_rva + off, (val + delta) & (2**64 - 1))
                    applied += 1
                pos += block
        self.vm.write(base, bytes(img))
        self.image = LoadedImage(base, size, base + hdr["entry"], hdr["image_base"],
                                 hdr["subsystem"], sections, applied)
        return self.image

    def _symbolize(self, rip: int) -> str:
        if self.image is not None:
            s = self.image.symbolizer(self.symbols)(rip)
            if s:
                return s
        if self.trap <= rip < self.trap + PAGE:
            return "uefi-trap:" + self._services.get(rip, ("?",))[0]
        return ""

    def call(self, fn: int, *args: int, budget: int | None = 50_000_000,
             stack_size: int = 256 << 10) -> tuple[int | None, Exit]:
        """Call a guest function with the win64 ABI; returns (rax or None, exit)."""
        if not hasattr(self, "_stack_top"):
            gpa = self.allocate_pages(stack_size // PAGE, EFI_BOOT_SERVICES_DATA)
            self._stack_top = gpa + stack_size
        v = self.vcpu
        regs = ("rcx", "rdx", "r8", "r9")
        extra = list(args[4:])
        frame = 0x20 + 8 * len(extra)
        rsp = (self._stack_top - frame) & ~0xF
        rsp -= 8  # return address: RSP = 8 (mod 16) at entry
        mem = struct.pack("<Q", self.ret_trap) + bytes(0x20) + b"".join(
            struct.pack("<Q", a & (2**64 - 1)) for a in extra)
        v.write_virt(rsp, mem)
        for r, a in zip(regs, args, strict=False):
            v.set(r, a)
        v.set("rsp", rsp)
        v.set("rip", fn)
        ex = v.run(budget)
        if ex.reason == "hlt" and ex.rip == self.ret_trap + 1:
            return v.get("rax"), ex
        return None, ex

    def start_image(self, image: str | Path | bytes) -> StartResult:
        """Load a PE32+ file and call its entry point (ImageHandle, SystemTable)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        self.calls = []
        loaded = self.load_image(data)
        status, ex = self.call(loaded.entry, self.image_handle, self.system_table)
        return StartResult(status, "".join(self.conout), bytes(self.vm.debug_log), loaded, ex)


__all__ = ["GuestFault", "LoadedImage", "PeError", "StartResult", "UefiStandIn", "parse_pe"]
