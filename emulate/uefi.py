"""A UEFI stand-in: loads the same PE32+ file OVMF loads and provides the boot services a runtime
driver uses, so the helper image runs under the emulator exactly as shipped.

Services are reached through the win64 ABI: every function pointer in the tables points into a
trap page; a UC_HOOK_CODE on that page reads rcx/rdx/r8/r9 and stack arguments ([rsp+0x28]...),
performs the service in Python, sets rax (EFI_STATUS) and simulates `ret`. Each implemented
service is declared once with its parameter spec (`@service`: name and UEFI type per argument,
UEFI 2.10 chapter 7), so the call log reads `AllocatePages(Type=AllocateMaxAddress, ...)`.
Memory is identity mapped (VA == GPA, OVMF style) with the C-bit set on every page when SEV is on.
Table layouts come from helperfw.runtime.efi, the single declaration shared with the helper.

The stand-in models guest firmware, so it drives its vCPU's registers from the inside
(`vcpu.regs`), not through the host's register API.

Under SEV-ES (the VM's `sev_es`) it also sets up what OVMF has before DXE drivers run: a GHCB
page mapped shared and registered in the GHCB MSR, an IDT whose #VC gate enters the trap page,
and a #VC handler that serves CPUID, IN/OUT, RDMSR/WRMSR, VMMCALL and WBINVD the way OVMF's
CcExitLib does: it decodes the faulting instruction, fills the GHCB with exactly the inputs
OVMF puts there (VMMCALL: RAX and CPL only), performs the VMGEXIT through the host's handler,
copies the answer into the guest's registers and returns past the instruction. Anything it
cannot serve ends the guest with a GHCB termination request, as OVMF does. A migration target
parks its vCPU in the AP reset hold (`park_for_incoming`) until the host wakes it, then enters
the AP jump table the guest registered.
"""

from __future__ import annotations

import random
import struct
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from unicorn import UC_HOOK_CODE, Uc
from unicorn.x86_const import UC_X86_REG_IDTR

from emulate import idt
from emulate.exits import Insn
from emulate.faults import VECTORS, GuestFault, Symbolizer, image_symbolizer
from emulate.flat import FlatGuest
from emulate.ghcb import GhcbPage
from emulate.machine import VM, Exit, VCpu
from emulate.memctl import PAGE
from emulate.mmu import PageFault
from helperfw.codegen.image import Symbol, SymbolTable
from helperfw.runtime import efi
from helperfw.runtime.platform import (
    GHCB_CPL,
    GHCB_HV_RESP_ISSUE_EXCEPTION,
    GHCB_HV_RESP_NO_ACTION,
    GHCB_MSR_INFO_MASK,
    GHCB_MSR_TERM_REQ,
    GHCB_MSR_TERM_SET_SHIFT,
    GHCB_PROTOCOL_VERSION,
    GHCB_RAX,
    GHCB_RBX,
    GHCB_RCX,
    GHCB_RDX,
    GHCB_SHARED_BUFFER,
    GHCB_SW_EXIT_CODE,
    GHCB_SW_EXIT_INFO1,
    GHCB_SW_EXIT_INFO2,
    GHCB_USAGE,
    GHCB_VALID_BITMAP,
    GHCB_VERSION_MIN,
    GHCB_XCR0,
    IOIO_DATA_8,
    IOIO_DATA_16,
    IOIO_DATA_32,
    IOIO_PORT_SHIFT,
    IOIO_TYPE_IN,
    KVM_HC_MAP_GPA_RANGE,
    MSR_AMD64_SEV_ES_GHCB,
    SVM_EVTINJ_VECTOR_MASK,
    SVM_EXIT_CPUID,
    SVM_EXIT_IOIO,
    SVM_EXIT_MSR,
    SVM_EXIT_VMMCALL,
    SVM_EXIT_WBINVD,
    SVM_VMGEXIT_AP_JUMP_TABLE,
    SVM_VMGEXIT_AP_JUMP_TABLE_GET,
    X86_TRAP_VC,
)
from ovmf_glue import pe_format as F
from ovmf_glue.linkmap import map_path_for, read_symbol_map
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
EFI_BUFFER_TOO_SMALL = _v(efi.EFI_BUFFER_TOO_SMALL)

EFI_LOADER_CODE, EFI_LOADER_DATA = efi.EFI_LOADER_CODE, efi.EFI_LOADER_DATA
EFI_BOOT_SERVICES_CODE = efi.EFI_BOOT_SERVICES_CODE
EFI_BOOT_SERVICES_DATA = efi.EFI_BOOT_SERVICES_DATA
EFI_RUNTIME_SERVICES_CODE = efi.EFI_RUNTIME_SERVICES_CODE
EFI_RUNTIME_SERVICES_DATA = efi.EFI_RUNTIME_SERVICES_DATA
EFI_RESERVED_MEMORY_TYPE = efi.EFI_RESERVED_MEMORY_TYPE
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
EFI_TABLE_REVISION = 0x2000A  # what each table header reports as its Revision
FIRMWARE_REVISION = 0x10000
QWORD = 8  # a pointer, a stack slot
CPUID_XSAVE_LEAF = 0xD  # the one CPUID leaf whose GHCB request carries XCR0
# What the CPU pushes for an exception with an error code (long mode): error code, RIP, CS,
# RFLAGS, RSP, SS.
VC_FRAME = struct.Struct("<6Q")

MASK32 = 0xFFFF_FFFF
IDT_VECTORS = 32
IO_WIDTHS = {"al": (1, IOIO_DATA_8), "ax": (2, IOIO_DATA_16), "eax": (4, IOIO_DATA_32)}
GHCB_TERM_GENERAL = 0  # TERM_REQ reason set 0 (general), reason code 0: what OVMF sends
VECTOR_KINDS = {v: k for k, v in VECTORS.items()}
# The valid-bitmap byte holding the bits of SwExitCode, SwExitInfo1 and SwExitInfo2 (qwords
# 0x72-0x74 of the page: one byte, bits 2-4).
EXIT_VALID_BYTE = GHCB_VALID_BITMAP + GHCB_SW_EXIT_CODE // 64
assert EXIT_VALID_BYTE == GHCB_VALID_BITMAP + GHCB_SW_EXIT_INFO2 // 64
EXIT_VALID_BITS = sum(1 << (off // 8 % 8) for off in (GHCB_SW_EXIT_CODE, GHCB_SW_EXIT_INFO1,
                                                        GHCB_SW_EXIT_INFO2))
INFO2_VALID_BIT = 1 << (GHCB_SW_EXIT_INFO2 // 8 % 8)
# OVMF's SEV-ES AP reset hold, for a migration target: hold (GHCB MSR protocol) until woken,
# re-register the GHCB, ask for the AP jump table (page protocol) and enter it with RDI = the
# table; anything unexpected is a termination request. Position independent; no stack.
AP_HOLD_ASM = f"""
    mov ${MSR_AMD64_SEV_ES_GHCB}, %ecx
    rdmsr
    mov %eax, %r12d
    mov %edx, %r13d
1:  mov ${MSR_AMD64_SEV_ES_GHCB}, %ecx
    mov $6, %eax
    xor %edx, %edx
    wrmsr
    rep vmmcall
    rdmsr
    mov %eax, %esi
    and ${GHCB_MSR_INFO_MASK}, %esi
    cmp $7, %esi
    jne 8f
    shr $12, %eax
    or %edx, %eax
    jz 1b
    mov %r12d, %eax
    mov %r13d, %edx
    wrmsr
    mov %r13, %rdi
    shl $32, %rdi
    or %r12, %rdi
    lea {GHCB_SHARED_BUFFER}(%rdi), %rcx
    mov %rdi, %rsi
2:  movq $0, (%rsi)
    add $8, %rsi
    cmp %rcx, %rsi
    jne 2b
    mov ${SVM_VMGEXIT_AP_JUMP_TABLE}, %eax
    mov %rax, {GHCB_SW_EXIT_CODE}(%rdi)
    movq ${SVM_VMGEXIT_AP_JUMP_TABLE_GET}, {GHCB_SW_EXIT_INFO1}(%rdi)
    movq $0, {GHCB_SW_EXIT_INFO2}(%rdi)
    orb ${EXIT_VALID_BITS:#x}, {EXIT_VALID_BYTE:#x}(%rdi)
    movw ${GHCB_VERSION_MIN}, {GHCB_PROTOCOL_VERSION:#x}(%rdi)
    movl $0, {GHCB_USAGE:#x}(%rdi)
    rep vmmcall
    cmpl $0, {GHCB_SW_EXIT_INFO1}(%rdi)
    jne 8f
    testb ${INFO2_VALID_BIT:#x}, {EXIT_VALID_BYTE:#x}(%rdi)
    jz 8f
    mov {GHCB_SW_EXIT_INFO2}(%rdi), %rdi
    test %rdi, %rdi
    jz 8f
    jmp *(%rdi)
8:  mov ${MSR_AMD64_SEV_ES_GHCB}, %ecx
    mov ${GHCB_MSR_TERM_REQ}, %eax
    xor %edx, %edx
    wrmsr
    rep vmmcall
9:  hlt
    jmp 9b
"""


# AP_HOLD_ASM assembled (tests/test_sev_es.py checks they agree): the LLVM assembler costs
# seconds to load, too much for every SEV-ES VM the emulator creates.
AP_HOLD_CODE = bytes.fromhex(
    "b9300101c00f324189c44189d5b9300101c0b80600000031d20f30f30f01d90f3289c681e6ff0f000083fe07"
    "0f8593000000c1e80c09d074d44489e04489ea0f304c89ef48c1e7204c09e7488d8f000800004889fe48c706"
    "000000004883c6084839ce75f0b8050000804889879003000048c787980300000100000048c787a003000000"
    "000000808ffe0300001c66c787fa0f00000100c787fc0f000000000000f30f01d983bf98030000007517f687"
    "fe03000010740e488bbfa00300004885ff7402ff27b9300101c0b80001000031d20f30f30f01d9f4ebfd")


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


def _seal_table(table: bytearray, signature: int) -> bytes:
    """An EFI table as firmware publishes it: the header (HeaderSize is the whole table) and
    the CRC32 over the whole table, computed with the CRC32 field zero."""
    hdr = efi.EfiTableHeader
    table[: hdr.size] = hdr.build(Signature=signature, Revision=EFI_TABLE_REVISION,
                                  HeaderSize=len(table), CRC32=0, Reserved=0)
    struct.pack_into("<I", table, hdr.offset("CRC32"), zlib.crc32(table))
    return bytes(table)


def parse_pe(data: bytes) -> dict:
    """Validate and parse the headers of a PE32+ AMD64 image (raises PeError)."""
    if len(data) < F.DOS_HEADER_SIZE or data[:2] != F.DOS_MAGIC:
        raise PeError("no MZ header")
    (pe,) = struct.unpack_from("<I", data, F.DOS_E_LFANEW)
    if data[pe : pe + len(F.PE_SIGNATURE)] != F.PE_SIGNATURE:
        raise PeError("no PE signature")
    coff_at = pe + len(F.PE_SIGNATURE)
    opt_at = coff_at + F.COFF_FILE_HEADER.size
    try:
        coff = F.unpack_fields(F.COFF_FILE_HEADER, F.COFF_FIELDS, data, coff_at)
        if coff["Machine"] != IMAGE_FILE_MACHINE_AMD64:
            raise PeError(f"machine {coff['Machine']:#x} is not AMD64")
        (magic,) = struct.unpack_from("<H", data, opt_at)
        if magic != PE32_PLUS_MAGIC:
            raise PeError(f"optional header magic {magic:#x} is not PE32+")
        opt = F.unpack_fields(F.OPTIONAL_HEADER64, F.OPTIONAL64_FIELDS, data, opt_at)
        dirs_at = opt_at + F.OPTIONAL_HEADER64.size
        dirs = [F.DATA_DIRECTORY.unpack_from(data, dirs_at + F.DATA_DIRECTORY.size * i)
                for i in range(min(opt["NumberOfRvaAndSizes"], F.MAX_DATA_DIRECTORIES))]
        sections = []
        for i in range(coff["NumberOfSections"]):
            sh = F.unpack_fields(F.SECTION_HEADER, F.SECTION_FIELDS, data,
                                 opt_at + coff["SizeOfOptionalHeader"] + F.SECTION_HEADER.size * i)
            name = sh["Name"].rstrip(b"\0").decode("ascii", "replace")
            sections.append((name, sh["VirtualAddress"], sh["VirtualSize"],
                             sh["PointerToRawData"], sh["SizeOfRawData"]))
    except struct.error:
        raise PeError("headers cut short") from None
    return {
        "entry": opt["AddressOfEntryPoint"], "image_base": opt["ImageBase"],
        "section_alignment": opt["SectionAlignment"], "size_of_image": opt["SizeOfImage"],
        "size_of_headers": opt["SizeOfHeaders"], "subsystem": opt["Subsystem"], "dirs": dirs,
        "sections": sections,
    }


# ---- service parameter specs: what each argument is, for the call log -------------------------
MEMORY_TYPE_NAMES = (  # EFI_MEMORY_TYPE (UEFI 2.10 §7.2)
    "EfiReservedMemoryType", "EfiLoaderCode", "EfiLoaderData", "EfiBootServicesCode",
    "EfiBootServicesData", "EfiRuntimeServicesCode", "EfiRuntimeServicesData",
    "EfiConventionalMemory", "EfiUnusableMemory", "EfiACPIReclaimMemory", "EfiACPIMemoryNVS",
    "EfiMemoryMappedIO", "EfiMemoryMappedIOPortSpace", "EfiPalCode", "EfiPersistentMemory",
    "EfiUnacceptedMemoryType")
ALLOCATE_TYPE_NAMES = ("AllocateAnyPages", "AllocateMaxAddress", "AllocateAddress")
STATUS_NAMES = {EFI_SUCCESS: "EFI_SUCCESS", EFI_LOAD_ERROR: "EFI_LOAD_ERROR",
                EFI_INVALID_PARAMETER: "EFI_INVALID_PARAMETER",
                EFI_UNSUPPORTED: "EFI_UNSUPPORTED", EFI_BUFFER_TOO_SMALL: "EFI_BUFFER_TOO_SMALL",
                EFI_OUT_OF_RESOURCES: "EFI_OUT_OF_RESOURCES", EFI_NOT_FOUND: "EFI_NOT_FOUND"}
MAX_SHOWN_CHARS = 48  # CHAR16 strings in the call log are cut here
WIN64_STACK_ARGS = 0x28  # [rsp]: return address, then 32 bytes of shadow space, then arg 5...
STACK_ALIGN = 16  # win64: RSP is 16-byte aligned at a call (8 mod 16 at the entry)


def _named(names: tuple[str, ...]) -> Callable[[VCpu, int], str]:
    return lambda _v, x: names[x] if 0 <= x < len(names) else f"{x:#x}"


def _guid_at(v: VCpu, ptr: int) -> str:
    if not ptr:
        return "NULL"
    try:
        return str(uuid.UUID(bytes_le=v.read_virt(ptr, efi.GUID_SIZE)))
    except PageFault:
        return f"{ptr:#x} (unmapped)"


def _string_at(v: VCpu, ptr: int) -> str:
    if not ptr:
        return "NULL"
    out = bytearray()
    try:
        while len(out) < 2 * MAX_SHOWN_CHARS and (ch := v.read_virt(ptr + len(out), 2)) != b"\0\0":
            out += ch
    except PageFault:
        return f"{ptr:#x} (unmapped)"
    return repr(out.decode("utf-16-le", "replace"))


@dataclass(frozen=True)
class ArgType:
    """A UEFI parameter type: its name and how the call log shows a value of it."""

    name: str
    show: Callable[[VCpu, int], str]


UINTN = ArgType("UINTN", lambda _v, x: str(x))
HEX = ArgType("UINT64", lambda _v, x: f"{x:#x}")
POINTER = ArgType("VOID*", lambda _v, x: f"{x:#x}" if x else "NULL")
EFI_TPL = ArgType("EFI_TPL", lambda _v, x: str(x))
ALLOCATE_TYPE = ArgType("EFI_ALLOCATE_TYPE", _named(ALLOCATE_TYPE_NAMES))
MEMORY_TYPE = ArgType("EFI_MEMORY_TYPE", _named(MEMORY_TYPE_NAMES))
GUID_PTR = ArgType("EFI_GUID*", _guid_at)
CHAR16_PTR = ArgType("CHAR16*", _string_at)


@dataclass(frozen=True)
class Param:
    name: str
    type: ArgType


@dataclass(frozen=True)
class Service:
    """One UEFI service: its parameters, what it returns, and the stand-in's implementation
    (`impl(stand_in, vcpu, *args)`; None: answers EFI_UNSUPPORTED without reading arguments)."""

    name: str
    params: tuple[Param, ...] | None
    impl: Callable[..., int] | None
    returns: str = "EFI_STATUS"


SERVICES: dict[str, Service] = {}


def service(name: str, *params: Param, returns: str = "EFI_STATUS") -> Callable:
    """Declare the method below as the implementation of UEFI service `name`."""
    def register(fn: Callable[..., int]) -> Callable[..., int]:
        SERVICES[name] = Service(name, params, fn, returns)
        return fn
    return register


@dataclass
class ServiceCall:
    """One entry of the call log: the service, its arguments as named by the spec, the result."""

    name: str
    args: tuple[tuple[str, str], ...] | None  # None: a service without a spec here
    returns: str
    result: int | None = None

    def __str__(self) -> str:
        args = "..." if self.args is None else ", ".join(f"{n}={v}" for n, v in self.args)
        text = f"{self.name}({args})"
        if self.result is None or self.returns == "VOID":
            return text
        shown = STATUS_NAMES.get(self.result, f"{self.result:#x}") if (
            self.returns == "EFI_STATUS") else str(self.result)
        return f"{text} = {shown}"


class UefiStandIn:
    """Boot-services environment in one VM: identity-mapped RAM, system table, page/pool
    allocator, configuration tables, ConOut; `start_image` loads and runs a PE32+ driver."""

    LOW = 2 << 20  # bump-allocated firmware area (tables, trap page, stacks) below this

    def __init__(self, vm: VM, *, ram_size: int = 64 << 20, hpa: int = 0, seed: int = 0,
                 symbols: Mapping[str, Symbol | int] | None = None, label: str = "ram") -> None:
        self.vm = vm
        self.rng = random.Random(seed)
        self.guest = FlatGuest(vm, ram_gpa=0, ram_size=ram_size, hpa=hpa, skip=PAGE, label=label)
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
        self.symbols = symbols  # type: ignore[assignment]  # normalised by the setter
        self.image: LoadedImage | None = None
        self.calls: list[str] = []  # service names in call order (for tests and debugging)
        self.call_log: list[ServiceCall] = []  # the same calls with named arguments and results
        self._build_tables()
        self.vcpu: VCpu = self.guest.vcpu(0, rsp=0, symbolize=self.symbolize)
        self.vcpu.uc.hook_add(UC_HOOK_CODE, self._on_trap, None, self.trap, self.trap + PAGE - 1)
        self.ghcb = self.idt = self.ap_hold = 0
        self.vc_count = 0  # #VCs the handler served
        if vm.sev_es:
            self._setup_sev_es()

    # ---- symbols ------------------------------------------------------------------------------
    @property
    def symbols(self) -> dict[str, Symbol] | None:
        """The loaded image's link map (None: unknown; `start_image` reads a sidecar .map)."""
        return self._symbols

    @symbols.setter
    def symbols(self, symbols: Mapping[str, Symbol | int] | None) -> None:
        """Accepts a link map or bare RVAs (name -> rva: symbols of unknown size)."""
        self._symbols = None if symbols is None else {
            n: s if isinstance(s, Symbol) else Symbol(n, s, 0, "", "")
            for n, s in symbols.items()}
        self._table = SymbolTable(self._symbols.values()) if self._symbols else None

    def symbol_rva(self, name: str) -> int | None:
        sym = (self._symbols or {}).get(name)
        return None if sym is None else sym.rva

    def image_symbolizer(self, base: int | None = None) -> Symbolizer:
        """Names addresses of the loaded image, as loaded here or (`base`) mapped at another
        VA, e.g. in a mirror VM."""
        assert self.image is not None, "no image loaded"
        base = self.image.base if base is None else base
        return image_symbolizer(self._table or SymbolTable(()), base, self.image.size)

    def symbolize(self, rip: int) -> str:
        """rip -> "sym+0xoff" in the loaded image, "uefi-trap:Service" on the trap page, else ""."""
        if self.image is not None:
            name = self.image_symbolizer()(rip)
            if name:
                return name
        if self.trap <= rip < self.trap + PAGE:
            svc = self._services.get(rip)
            return "uefi-trap:" + (svc.name if svc else "?")
        return ""

    # ---- tables -------------------------------------------------------------------------------
    def _build_tables(self) -> None:
        g = self.guest
        self.trap = g.pages.alloc(1)
        self._services: dict[int, Service] = {}
        slot = [0]

        def trap_for(name: str) -> int:
            addr = self.trap + QWORD * slot[0]  # one int3 a service: a distinct address each
            slot[0] += 1
            self._services[addr] = SERVICES.get(name) or Service(name, None, None)
            return addr

        self.ret_trap = trap_for("<return>")
        self.vc_trap = trap_for("<#VC handler>")
        trap_bytes = bytearray(b"\xcc" * PAGE)
        trap_bytes[self.ret_trap - self.trap] = 0xF4  # hlt: ends the run when the entry returns
        self.vm.write(self.trap, bytes(trap_bytes))

        bs_t = efi.EfiBootServices
        self.boot_services = g.pages.alloc(1)
        bs = bytearray(bs_t.size)
        for name in bs_t.fields:
            if name in ("Hdr", "Reserved"):
                continue
            struct.pack_into("<Q", bs, bs_t.offset(name), trap_for(name))
        self.vm.write(self.boot_services, _seal_table(bs, efi.EFI_BOOT_SERVICES_SIGNATURE))

        self.runtime_services = g.pages.alloc(1)
        rs = bytearray(HDR_SIZE + QWORD * len(_RUNTIME_SERVICES))
        for i, name in enumerate(_RUNTIME_SERVICES):
            struct.pack_into("<Q", rs, HDR_SIZE + QWORD * i, trap_for(name))
        self.vm.write(self.runtime_services, _seal_table(rs, EFI_RUNTIME_SERVICES_SIGNATURE))

        to_t = efi.EfiSimpleTextOutput
        self.conout_proto = g.pages.alloc(1)
        to = bytearray(to_t.size)
        for name in to_t.fields:
            if name == "Mode":
                continue
            struct.pack_into("<Q", to, to_t.offset(name), trap_for("ConOut." + name))
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
        vals = {
            "FirmwareVendor": self.vendor, "FirmwareRevision": FIRMWARE_REVISION,
            "ConsoleOutHandle": self.conout_proto, "ConOut": self.conout_proto,
            "StandardErrorHandle": self.conout_proto, "StdErr": self.conout_proto,
            "RuntimeServices": self.runtime_services, "BootServices": self.boot_services,
            "NumberOfTableEntries": len(self.config_tables),
            "ConfigurationTable": self.config_array,
        }
        for name, v in vals.items():
            fmt = "<I" if st_t.fields[name].type.size == 4 else "<Q"
            struct.pack_into(fmt, st, st_t.offset(name), v)
        self.vm.write(self.system_table, _seal_table(st, efi.EFI_SYSTEM_TABLE_SIGNATURE))
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
        CONFIDENTIAL_COMPUTING_SECRET config table (CcSecretLocation). Returns the base."""
        body = b"".join(
            efi.SecretEntryHeader.build(Guid=uuid.UUID(str(g)).bytes_le,
                                        Len=efi.SecretEntryHeader.size + len(data)) + data
            for g, data in entries)
        total = efi.SecretTableHeader.size + len(body)
        area = efi.SecretTableHeader.build(Guid=efi.guid_bytes(efi.SECRET_TABLE_HEADER_GUID),
                                           Len=total) + body
        pages = -(-total // PAGE)
        base = self.allocate_pages(pages, EFI_RESERVED_MEMORY_TYPE)
        self.vm.write(base, area)
        loc = self.allocate_pool(efi.CcSecretLocation.size, EFI_RUNTIME_SERVICES_DATA)
        self.vm.write(loc, efi.CcSecretLocation.build(Base=base, Size=pages * PAGE))
        self.install_config_table(efi.CONFIDENTIAL_COMPUTING_SECRET_GUID, loc)
        return base

    def map_ram(self, gpa: int, size: int) -> None:
        """Add hot-plugged RAM at `gpa` to the firmware's identity map (RW, NX)."""
        self.guest.map(gpa, gpa, size, writable=True, executable=False)

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

    # ---- services (each with its parameter spec; args: vcpu, then the win64 arguments) -----
    @service("Stall", Param("Microseconds", UINTN))
    @service("SetWatchdogTimer", Param("Timeout", UINTN), Param("WatchdogCode", HEX),
             Param("DataSize", UINTN), Param("WatchdogData", CHAR16_PTR))
    @service("CloseEvent", Param("Event", POINTER))
    @service("ConOut.Reset", Param("This", POINTER), Param("ExtendedVerification", UINTN))
    @service("ConOut.TestString", Param("This", POINTER), Param("String", CHAR16_PTR))
    @service("ConOut.QueryMode", Param("This", POINTER), Param("ModeNumber", UINTN),
             Param("Columns", POINTER), Param("Rows", POINTER))
    @service("ConOut.SetMode", Param("This", POINTER), Param("ModeNumber", UINTN))
    @service("ConOut.SetAttribute", Param("This", POINTER), Param("Attribute", HEX))
    @service("ConOut.ClearScreen", Param("This", POINTER))
    @service("ConOut.SetCursorPosition", Param("This", POINTER), Param("Column", UINTN),
             Param("Row", UINTN))
    @service("ConOut.EnableCursor", Param("This", POINTER), Param("Visible", UINTN))
    def _success(self, v: VCpu, *_: int) -> int:
        """Services with nothing to model here (no timer, no watchdog, a plain console)."""
        return EFI_SUCCESS

    @service("LocateProtocol", Param("Protocol", GUID_PTR), Param("Registration", POINTER),
             Param("Interface", POINTER))
    def _locate_protocol(self, v: VCpu, *_: int) -> int:
        return EFI_NOT_FOUND  # no protocols are installed

    @service("RaiseTPL", Param("NewTpl", EFI_TPL), returns="EFI_TPL")
    def _raise_tpl(self, v: VCpu, new: int) -> int:
        old, self.tpl = self.tpl, new
        return old

    @service("RestoreTPL", Param("OldTpl", EFI_TPL), returns="VOID")
    def _restore_tpl(self, v: VCpu, old: int) -> int:
        self.tpl = old
        return 0

    @service("AllocatePages", Param("Type", ALLOCATE_TYPE), Param("MemoryType", MEMORY_TYPE),
             Param("Pages", UINTN), Param("Memory", POINTER))
    def _allocate_pages(self, v: VCpu, how: int, mem_type: int, pages: int, mem_ptr: int) -> int:
        if not mem_ptr:
            return EFI_INVALID_PARAMETER
        address = int.from_bytes(v.read_virt(mem_ptr, QWORD), "little")
        try:
            base = self.allocate_pages(pages, mem_type, how, address)
        except MemoryError:
            return EFI_NOT_FOUND if how == ALLOCATE_ADDRESS else EFI_OUT_OF_RESOURCES
        except ValueError:
            return EFI_INVALID_PARAMETER
        v.write_virt(mem_ptr, base.to_bytes(QWORD, "little"))
        return EFI_SUCCESS

    @service("FreePages", Param("Memory", HEX), Param("Pages", UINTN))
    def _free_pages(self, v: VCpu, base: int, pages: int) -> int:
        try:
            self.free_pages(base, pages)
        except ValueError:
            return EFI_NOT_FOUND
        return EFI_SUCCESS

    @service("AllocatePool", Param("PoolType", MEMORY_TYPE), Param("Size", UINTN),
             Param("Buffer", POINTER))
    def _allocate_pool(self, v: VCpu, mem_type: int, size: int, buf_ptr: int) -> int:
        if not buf_ptr:
            return EFI_INVALID_PARAMETER
        try:
            base = self.allocate_pool(size, mem_type)
        except MemoryError:
            return EFI_OUT_OF_RESOURCES
        v.write_virt(buf_ptr, base.to_bytes(QWORD, "little"))
        return EFI_SUCCESS

    @service("FreePool", Param("Buffer", POINTER))
    def _free_pool(self, v: VCpu, buf: int) -> int:
        size = self.pools.pop(buf, None)
        if size is None:
            return EFI_INVALID_PARAMETER
        self.free_pages(buf, self.allocations[buf][0])
        return EFI_SUCCESS

    @service("InstallConfigurationTable", Param("Guid", GUID_PTR), Param("Table", POINTER))
    def _install_config_table(self, v: VCpu, guid_ptr: int, table: int) -> int:
        if not guid_ptr:
            return EFI_INVALID_PARAMETER
        guid = v.read_virt(guid_ptr, efi.GUID_SIZE)
        if not table and all(k != guid for k, _p in self.config_tables):
            return EFI_NOT_FOUND
        self.install_config_table(guid, table)
        return EFI_SUCCESS

    @service("CopyMem", Param("Destination", POINTER), Param("Source", POINTER),
             Param("Length", UINTN), returns="VOID")
    def _copy_mem(self, v: VCpu, dst: int, src: int, n: int) -> int:
        v.write_virt(dst, v.read_virt(src, n))
        return 0

    @service("SetMem", Param("Buffer", POINTER), Param("Size", UINTN), Param("Value", HEX),
             returns="VOID")
    def _set_mem(self, v: VCpu, buf: int, n: int, value: int) -> int:
        v.write_virt(buf, bytes([value & 0xFF]) * n)
        return 0

    @service("CalculateCrc32", Param("Data", POINTER), Param("DataSize", UINTN),
             Param("Crc32", POINTER))
    def _crc32(self, v: VCpu, data: int, n: int, out: int) -> int:
        if not data or not out or not n:
            return EFI_INVALID_PARAMETER
        v.write_virt(out, zlib.crc32(v.read_virt(data, n)).to_bytes(4, "little"))
        return EFI_SUCCESS

    @service("CreateEvent", Param("Type", HEX), Param("NotifyTpl", EFI_TPL),
             Param("NotifyFunction", POINTER), Param("NotifyContext", POINTER),
             Param("Event", POINTER))
    def _create_event(self, v: VCpu, typ: int, tpl: int, fn: int, ctx: int, ev_ptr: int) -> int:
        handle = self.allocate_pool(QWORD, EFI_BOOT_SERVICES_DATA)
        self.events.append((typ, tpl, fn, ctx))
        v.write_virt(ev_ptr, handle.to_bytes(QWORD, "little"))
        return EFI_SUCCESS

    @service("CreateEventEx", Param("Type", HEX), Param("NotifyTpl", EFI_TPL),
             Param("NotifyFunction", POINTER), Param("NotifyContext", POINTER),
             Param("EventGroup", GUID_PTR), Param("Event", POINTER))
    def _create_event_ex(self, v: VCpu, typ: int, tpl: int, fn: int, ctx: int, _group: int,
                         ev_ptr: int) -> int:
        return self._create_event(v, typ, tpl, fn, ctx, ev_ptr)

    @service("ConOut.OutputString", Param("This", POINTER), Param("String", CHAR16_PTR))
    def _output_string(self, v: VCpu, _this: int, s: int) -> int:
        out = bytearray()
        while len(out) < 1 << 16:
            ch = v.read_virt(s + len(out), 2)
            if ch == b"\0\0":
                break
            out += ch
        self.conout.append(out.decode("utf-16-le", "replace"))
        return EFI_SUCCESS

    def _on_trap(self, uc: Uc, addr: int, size: int, _ud: object) -> None:
        """A call into the trap page: read the arguments the spec names (win64: rcx, rdx, r8,
        r9, then the stack above the shadow space), log, run the service, return."""
        if addr == self.ret_trap:
            return  # the hlt there ends the run
        if addr == self.vc_trap:
            self._on_vc()
            return
        svc = self._services.get(addr) or Service("?", None, None)
        v = self.vcpu
        r = v.regs
        rsp = r["rsp"]
        nargs = len(svc.params or ())
        stack = v.read_virt(rsp, WIN64_STACK_ARGS + QWORD * max(nargs - 4, 0))
        args = [r["rcx"], r["rdx"], r["r8"], r["r9"]][:nargs]
        args += struct.unpack_from(f"<{max(nargs - 4, 0)}Q", stack, WIN64_STACK_ARGS)
        call = ServiceCall(svc.name, None if svc.params is None else tuple(
            (p.name, p.type.show(v, a)) for p, a in zip(svc.params, args, strict=True)),
            svc.returns)
        self.calls.append(svc.name)
        self.call_log.append(call)
        call.result = EFI_UNSUPPORTED if svc.impl is None else svc.impl(self, v, *args)
        r["rax"] = call.result
        r["rsp"] = rsp + QWORD
        r["rip"] = int.from_bytes(stack[:QWORD], "little")

    # ---- SEV-ES: the firmware's GHCB, #VC handler and AP reset hold -------------------------
    def _setup_sev_es(self) -> None:
        """OVMF's SEV-ES state before DXE drivers run: a GHCB page mapped shared (its PTE with
        C=0) and registered in the GHCB MSR, an IDT whose #VC gate points at the trap page
        (the other gates not present), and the AP reset-hold code."""
        g, v = self.guest, self.vcpu
        self.ghcb = g.pages.alloc(1, encrypted=False)
        g.map(self.ghcb, self.ghcb, PAGE, writable=True, executable=False, encrypted=False)
        v.ghcb_msr = self.ghcb
        self.idt = g.pages.alloc(1)
        h = self.vc_trap
        gate = idt.GATE.pack(h & 0xFFFF, v.regs["cs"], 0, idt.GATE_PRESENT | idt.GATE_INTERRUPT,
                             h >> 16 & 0xFFFF, h >> 32, 0)
        self.vm.write(self.idt + X86_TRAP_VC * idt.GATE_SIZE, gate)
        v.uc.reg_write(UC_X86_REG_IDTR, (0, self.idt, IDT_VECTORS * idt.GATE_SIZE - 1, 0))
        self.ap_hold = g.pages.alloc(1)
        self.vm.write(self.ap_hold, AP_HOLD_CODE)

    def report_shared_ghcb(self) -> int:
        """Tell the host the GHCB page is shared (KVM_HC_MAP_GPA_RANGE through the GHCB, as
        OVMF's SetMemoryEncDecHypercall3 does under SEV-ES); returns the hypercall's result."""
        page = self._ghcb_exit(self.vcpu, SVM_EXIT_VMMCALL, 0, 0, {
            GHCB_RAX: KVM_HC_MAP_GPA_RANGE, GHCB_RBX: self.ghcb, GHCB_RCX: 1, GHCB_RDX: 0,
            GHCB_CPL: 0})
        return -1 if page is None else page.get(GHCB_RAX)

    def _ghcb_exit(self, v: VCpu, code: int, info1: int, info2: int,
                   inputs: dict[int, int]) -> GhcbPage | None:
        """Fill the GHCB the GHCB MSR names (OVMF finds it there) with a fresh save area, the
        exit and `inputs`, VMGEXIT through the host's handler, and return the page as the host
        left it (None: no GHCB registered). The firmware's map is the identity with the GHCB
        shared, so the page is accessed by its GPA with C=0 (no page walk per #VC)."""
        gpa = v.ghcb_msr
        if not gpa or gpa & GHCB_MSR_INFO_MASK:
            return None
        page = GhcbPage(self.vm.read(gpa, PAGE, encrypted=False))
        page.data[:GHCB_SHARED_BUFFER] = bytes(GHCB_SHARED_BUFFER)  # OVMF's VmgInit
        page.version = GHCB_VERSION_MIN
        for off, value in inputs.items():
            page.set(off, value)
        page.set(GHCB_SW_EXIT_CODE, code)
        page.set(GHCB_SW_EXIT_INFO1, info1)
        page.set(GHCB_SW_EXIT_INFO2, info2)
        self.vm.write(gpa, bytes(page.data), encrypted=False)
        self.vm.note_write(self.vm.gpa_to_hpa(gpa) or 0, PAGE)
        self.vm.ghcb.vmgexit(v)
        return GhcbPage(self.vm.read(gpa, PAGE, encrypted=False))

    def _terminate(self, v: VCpu, rip: int) -> None:
        """OVMF's answer to what it cannot serve: a GHCB termination request (MSR protocol)."""
        v.ghcb_msr = GHCB_MSR_TERM_REQ | GHCB_TERM_GENERAL << GHCB_MSR_TERM_SET_SHIFT
        self.vm.ghcb.vmgexit(v)
        v.continue_at(rip)

    def _on_vc(self) -> None:
        """The #VC handler (entered through the IDT with the CPU's frame on the stack): serve
        the exit through the GHCB, then IRET past the instruction."""
        v = self.vcpu
        r = v.regs
        code, rip, cs, rflags, rsp, _ss = VC_FRAME.unpack(v.read_virt(r["rsp"], VC_FRAME.size))
        r["rsp"], r["rflags"] = rsp, rflags  # IRETQ (the frame is popped in every outcome)
        self.vc_count += 1
        insn = v.intercepts.decode(rip)
        served = self._serve_vc(v, code, insn, cs)
        if served is True:
            v.continue_at(insn.next)
        elif served is None:
            self._terminate(v, rip)
        else:  # the host asked for an exception: OVMF raises it
            kind = VECTOR_KINDS.get(served, f"vector {served}")
            v.take_fault(kind, rip, f"{kind} the host injected through the GHCB")

    def _serve_vc(self, v: VCpu, code: int, insn: Insn, cs: int) -> bool | int | None:
        """One exit through the GHCB: True when served (the registers updated), the vector of
        an exception the host asked the guest to raise, None when it cannot be served."""
        r = v.regs
        inputs: dict[int, int] = {}
        info1 = 0
        if code == SVM_EXIT_CPUID:
            inputs = {GHCB_RAX: r["rax"] & MASK32, GHCB_RCX: r["rcx"] & MASK32}
            if r["rax"] & MASK32 == CPUID_XSAVE_LEAF:
                inputs[GHCB_XCR0] = 1
        elif code == SVM_EXIT_IOIO:
            io = io_operands(insn, r["rdx"])
            if io is None:
                return None
            port, size, bit, is_in = io
            info1 = port << IOIO_PORT_SHIFT | bit | (IOIO_TYPE_IN if is_in else 0)
            if not is_in:
                inputs = {GHCB_RAX: r["rax"] & ((1 << 8 * size) - 1)}
        elif code == SVM_EXIT_MSR:
            inputs = {GHCB_RCX: r["rcx"] & MASK32}
            if insn.mnemonic == "wrmsr":
                info1 = 1
                inputs |= {GHCB_RAX: r["rax"] & MASK32, GHCB_RDX: r["rdx"] & MASK32}
        elif code == SVM_EXIT_VMMCALL:
            inputs = {GHCB_RAX: r["rax"], GHCB_CPL: cs & 3}  # OVMF passes nothing else
        elif code != SVM_EXIT_WBINVD:
            return None  # string I/O, MMIO (NPF), ...: not served here
        page = self._ghcb_exit(v, code, info1, 0, inputs)
        if page is None or not page.is_valid(GHCB_SW_EXIT_INFO1):
            return None
        status = page.get(GHCB_SW_EXIT_INFO1) & MASK32
        if status == GHCB_HV_RESP_ISSUE_EXCEPTION and page.is_valid(GHCB_SW_EXIT_INFO2):
            return page.get(GHCB_SW_EXIT_INFO2) & SVM_EVTINJ_VECTOR_MASK
        if status != GHCB_HV_RESP_NO_ACTION:
            return None
        return self._vc_results(v, code, insn, info1, page)

    @staticmethod
    def _vc_results(v: VCpu, code: int, insn: Insn, info1: int, page: GhcbPage) -> bool | None:
        """Copy the host's answer into the registers; None if an output is not valid."""
        r = v.regs
        outs = {SVM_EXIT_CPUID: (GHCB_RAX, GHCB_RBX, GHCB_RCX, GHCB_RDX),
                SVM_EXIT_VMMCALL: (GHCB_RAX,)}.get(code, ())
        if code == SVM_EXIT_MSR and info1 == 0:
            outs = (GHCB_RAX, GHCB_RDX)
        if code == SVM_EXIT_IOIO and info1 & IOIO_TYPE_IN:
            outs = (GHCB_RAX,)
        if not all(page.is_valid(o) for o in outs):
            return None
        names = {GHCB_RAX: "rax", GHCB_RBX: "rbx", GHCB_RCX: "rcx", GHCB_RDX: "rdx"}
        for off in outs:
            value = page.get(off)
            if code in (SVM_EXIT_CPUID, SVM_EXIT_MSR):
                value &= MASK32  # 32-bit results, zero-extended
            elif code == SVM_EXIT_IOIO:
                size = next(n for n, bit in IO_WIDTHS.values() if info1 & bit)
                mask = (1 << 8 * size) - 1
                value = r["rax"] & ~mask | value & mask
            r[names[off]] = value
        return True

    def park_for_incoming(self, budget: int = 100_000) -> Exit:
        """OVMF on an SEV-ES migration target: with its drivers loaded (the helper among them)
        the vCPU boots no OS but waits in the AP reset hold for the migrated guest. Woken by the
        host (`VCpu.sipi`), it asks for the AP jump table the guest registered and enters it."""
        if not self.ap_hold:
            raise RuntimeError("the AP reset hold exists under SEV-ES only")
        v = self.vcpu
        v.regs["rip"] = self.ap_hold
        ex = v.run(budget)
        if ex.reason != "reset_hold":
            raise RuntimeError(f"firmware did not reach the AP reset hold: {ex}")
        return ex

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
            blk, ent = F.BASE_RELOCATION_BLOCK, F.BASE_RELOCATION_ENTRY
            while pos + blk.size <= end:
                page_rva, block = blk.unpack_from(img, pos)
                if block < blk.size:
                    raise PeError("bad relocation block")
                for i in range((block - blk.size) // ent.size):
                    (e,) = ent.unpack_from(img, pos + blk.size + ent.size * i)
                    kind, off = e >> F.RELOC_TYPE_SHIFT, e & F.RELOC_OFFSET_MASK
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

    def call(self, fn: int, *args: int, budget: int | None = 50_000_000,
             stack_size: int = 256 << 10) -> tuple[int | None, Exit]:
        """Call a guest function with the win64 ABI; returns (rax or None, exit)."""
        if not hasattr(self, "_stack_top"):
            gpa = self.allocate_pages(stack_size // PAGE, EFI_BOOT_SERVICES_DATA)
            self._stack_top = gpa + stack_size
        v = self.vcpu
        regs = ("rcx", "rdx", "r8", "r9")
        extra = list(args[4:])
        shadow = WIN64_STACK_ARGS - QWORD
        frame = shadow + QWORD * len(extra)
        rsp = (self._stack_top - frame) & ~(STACK_ALIGN - 1)
        rsp -= QWORD  # return address: RSP = 8 (mod 16) at entry
        mem = struct.pack("<Q", self.ret_trap) + bytes(shadow) + b"".join(
            struct.pack("<Q", a & (2**64 - 1)) for a in extra)
        v.write_virt(rsp, mem)
        for r, a in zip(regs, args, strict=False):
            v.regs[r] = a
        v.regs["rsp"] = rsp
        v.regs["rip"] = fn
        ex = v.run(budget)
        if ex.reason == "hlt" and ex.rip == self.ret_trap + 1:
            return v.regs["rax"], ex
        return None, ex

    def start_image(self, image: str | Path | bytes) -> StartResult:
        """Load a PE32+ file and call its entry point (ImageHandle, SystemTable). A file's
        link map (`X.map` beside `X.efi`) names fault addresses unless symbols were given."""
        if isinstance(image, bytes):
            data = image
        else:
            data = Path(image).read_bytes()
            if self.symbols is None:
                self.symbols = _sidecar_symbols(Path(image))
        self.calls = []
        self.call_log = []
        loaded = self.load_image(data)
        status, ex = self.call(loaded.entry, self.image_handle, self.system_table)
        return StartResult(status, "".join(self.conout), bytes(self.vm.debug_log), loaded, ex)


def io_operands(insn: Insn, rdx: int) -> tuple[int, int, int, bool] | None:
    """(port, size, IOIO data-size bit, is IN) of an IN/OUT (Intel syntax from capstone: "in al,
    dx", "out 0x80, al"); None for what the handler does not serve (string I/O)."""
    if insn.mnemonic not in ("in", "out"):
        return None
    ops = [o.strip() for o in insn.op_str.split(",")]
    if len(ops) != 2:
        return None
    reg, port = (ops[0], ops[1]) if insn.mnemonic == "in" else (ops[1], ops[0])
    if reg not in IO_WIDTHS:
        return None
    size, bit = IO_WIDTHS[reg]
    return (rdx & 0xFFFF if port == "dx" else int(port, 0)), size, bit, insn.mnemonic == "in"


def _sidecar_symbols(efi_file: Path) -> dict[str, Symbol] | None:
    """The link map build.py writes beside the image, if there is one."""
    path = map_path_for(efi_file)
    return read_symbol_map(path) if path.exists() else None


__all__ = ["GuestFault", "LoadedImage", "PeError", "ServiceCall", "StartResult", "UefiStandIn",
           "parse_pe"]
