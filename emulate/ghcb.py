"""The host's side of VMGEXIT for an SEV-ES VM: the GHCB MSR protocol and the GHCB page
protocol, served as KVM serves them (arch/x86/kvm/svm/sev.c), with a log of what guests sent.

Why: under SEV-ES the host cannot read a vCPU's registers, so a guest asks for everything it
needs (CPUID, port and MSR accesses, hypercalls, parking its vCPU) by VMGEXIT: it puts a request
into the GHCB MSR (MSR protocol: bits 11:0 name the request) or the GPA of a shared GHCB page
holding the exit code, its two info words and exactly the registers the request needs, marked
in the page's valid bitmap. The host sees those values and nothing else; what it answers goes
back the same way. Layout facts: helperfw/runtime/platform.py (GHCB_*).

What KVM does and this does too:

* MSR protocol: SEV information (GHCB versions, C-bit), CPUID (one register of a leaf, no
  subleaf), AP reset hold, termination request; anything else fails KVM_RUN ("invalid").
* Page protocol: the GHCB GPA must be in a memslot; GhcbUsage must be 0; the exit code and both
  info words must be valid, and each exit its inputs (CPUID: RAX, RCX and XCR0 for leaf 0xD;
  IOIO: RAX for OUT; MSR: RCX, and RAX/RDX for WRMSR; VMMCALL: RAX and CPL); a missing input
  or an unknown exit answers SwExitInfo1 = 2 (malformed input) with the reason in SwExitInfo2.
  The valid bitmap is cleared; the answer sets SwExitInfo1/2 and RAX, RBX, RCX, RDX valid
  (the values the guest sent, or what the exit produced). An MSR the host does not model
  answers SwExitInfo1 = 1 with a #GP for the guest to raise.
* AP_JUMP_TABLE set/get keeps one GPA per VM; AP_RESET_HOLD parks the vCPU until `VCpu.sipi`,
  which answers SwExitInfo2 = 1 (page protocol) or result 1 in bits 63:12 (MSR protocol).

Observers (`GhcbHost.observers`) see every VMGEXIT at the moment of the exit, before it is
served: the leak tests scan shared memory there.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from emulate.exits import PortIo, port_io
from emulate.memctl import PAGE
from helperfw.runtime.platform import (
    GHCB_CPL,
    GHCB_ERR_INVALID_EVENT,
    GHCB_ERR_INVALID_INPUT,
    GHCB_ERR_INVALID_USAGE,
    GHCB_ERR_MISSING_INPUT,
    GHCB_HV_RESP_ISSUE_EXCEPTION,
    GHCB_HV_RESP_MALFORMED_INPUT,
    GHCB_HV_RESP_NO_ACTION,
    GHCB_MSR_AP_RESET_HOLD_REQ,
    GHCB_MSR_AP_RESET_HOLD_RESP,
    GHCB_MSR_CPUID_REQ,
    GHCB_MSR_CPUID_RESP,
    GHCB_MSR_INFO_MASK,
    GHCB_MSR_SEV_INFO_REQ,
    GHCB_MSR_SEV_INFO_RESP,
    GHCB_MSR_TERM_CODE_MASK,
    GHCB_MSR_TERM_CODE_SHIFT,
    GHCB_MSR_TERM_REQ,
    GHCB_MSR_TERM_SET_MASK,
    GHCB_MSR_TERM_SET_SHIFT,
    GHCB_PROTOCOL_VERSION,
    GHCB_RAX,
    GHCB_RBX,
    GHCB_RCX,
    GHCB_RDX,
    GHCB_SW_EXIT_CODE,
    GHCB_SW_EXIT_INFO1,
    GHCB_SW_EXIT_INFO2,
    GHCB_SW_SCRATCH,
    GHCB_USAGE,
    GHCB_VALID_BITMAP,
    GHCB_VALID_BYTES,
    GHCB_VERSION_MAX,
    GHCB_VERSION_MIN,
    GHCB_XCR0,
    IOIO_DATA_8,
    IOIO_DATA_16,
    IOIO_DATA_32,
    IOIO_PORT_SHIFT,
    IOIO_STR,
    IOIO_TYPE_IN,
    MSR_AMD64_SEV,
    MSR_KVM_MIGRATION_CONTROL,
    SVM_EVTINJ_TYPE_EXCEPTION,
    SVM_EVTINJ_VALID,
    SVM_EXIT_CPUID,
    SVM_EXIT_IOIO,
    SVM_EXIT_MSR,
    SVM_EXIT_VMMCALL,
    SVM_EXIT_WBINVD,
    SVM_VMGEXIT_AP_JUMP_TABLE,
    SVM_VMGEXIT_AP_JUMP_TABLE_GET,
    SVM_VMGEXIT_AP_JUMP_TABLE_SET,
    SVM_VMGEXIT_AP_RESET_HOLD,
)

if TYPE_CHECKING:
    from emulate.machine import VM, VCpu

MASK32 = 0xFFFF_FFFF
MASK64 = 2**64 - 1
X86_TRAP_GP = 13
EXIT_NAMES = {SVM_EXIT_CPUID: "CPUID", SVM_EXIT_IOIO: "IOIO", SVM_EXIT_MSR: "MSR",
              SVM_EXIT_VMMCALL: "VMMCALL", SVM_EXIT_WBINVD: "WBINVD",
              SVM_VMGEXIT_AP_RESET_HOLD: "AP_RESET_HOLD",
              SVM_VMGEXIT_AP_JUMP_TABLE: "AP_JUMP_TABLE"}
MSR_REQUESTS = {GHCB_MSR_SEV_INFO_REQ: "SEV_INFO_REQ", GHCB_MSR_CPUID_REQ: "CPUID_REQ",
                GHCB_MSR_AP_RESET_HOLD_REQ: "AP_RESET_HOLD_REQ", GHCB_MSR_TERM_REQ: "TERM_REQ"}
# The save-area fields a guest may hand over (name by offset), in page order.
FIELDS = {GHCB_CPL: "cpl", GHCB_RAX: "rax", GHCB_RCX: "rcx", GHCB_RDX: "rdx", GHCB_RBX: "rbx",
          GHCB_SW_EXIT_CODE: "sw_exit_code", GHCB_SW_EXIT_INFO1: "sw_exit_info1",
          GHCB_SW_EXIT_INFO2: "sw_exit_info2", GHCB_SW_SCRATCH: "sw_scratch",
          GHCB_XCR0: "xcr0"}
IOIO_SIZES = ((IOIO_DATA_8, 1), (IOIO_DATA_16, 2), (IOIO_DATA_32, 4))
GPRS = (("rax", GHCB_RAX), ("rbx", GHCB_RBX), ("rcx", GHCB_RCX), ("rdx", GHCB_RDX))


class GhcbPage:
    """The bytes of a GHCB page and its valid bitmap (bit n: qword n of the page is valid)."""

    def __init__(self, data: bytes | None = None) -> None:
        self.data = bytearray(data if data is not None else bytes(PAGE))

    @staticmethod
    def _bit(off: int) -> tuple[int, int]:
        qword = off // 8
        return GHCB_VALID_BITMAP + qword // 8, 1 << (qword % 8)

    def is_valid(self, off: int) -> bool:
        byte, mask = self._bit(off)
        return bool(self.data[byte] & mask)

    def get(self, off: int) -> int:
        size = 1 if off == GHCB_CPL else 8
        return int.from_bytes(self.data[off : off + size], "little")

    def set(self, off: int, value: int) -> None:
        """Store a field (CPL is one byte, the rest are qwords) and mark it valid."""
        size = 1 if off == GHCB_CPL else 8
        self.data[off : off + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        byte, mask = self._bit(off)
        self.data[byte] |= mask

    def clear_valid(self) -> None:
        self.data[GHCB_VALID_BITMAP : GHCB_VALID_BITMAP + GHCB_VALID_BYTES] = bytes(
            GHCB_VALID_BYTES)

    def valid_fields(self) -> dict[str, int]:
        return {name: self.get(off) for off, name in FIELDS.items() if self.is_valid(off)}

    @property
    def version(self) -> int:
        return struct.unpack_from("<H", self.data, GHCB_PROTOCOL_VERSION)[0]

    @version.setter
    def version(self, v: int) -> None:
        struct.pack_into("<H", self.data, GHCB_PROTOCOL_VERSION, v)

    @property
    def usage(self) -> int:
        return struct.unpack_from("<I", self.data, GHCB_USAGE)[0]


@dataclass
class VmgExit:
    """One VMGEXIT as the host saw it: the GHCB MSR, and for the page protocol the exit code,
    its info words and the registers the guest marked valid; `result` is the host's answer."""

    vcpu: str
    msr: int
    protocol: str  # "msr" or "ghcb"
    request: str  # the MSR request or the exit's name
    exit_code: int = 0
    info1: int = 0
    info2: int = 0
    inputs: dict[str, int] = field(default_factory=dict)
    result: str = ""

    def __str__(self) -> str:
        if self.protocol == "msr":
            return f"{self.vcpu}: MSR protocol {self.request} ({self.msr:#x}) -> {self.result}"
        regs = ", ".join(f"{k}={v:#x}" for k, v in self.inputs.items()
                         if not k.startswith("sw_exit"))
        return (f"{self.vcpu}: GHCB {self.msr:#x} {self.request} info1={self.info1:#x} "
                f"info2={self.info2:#x} [{regs}] -> {self.result}")


Observer = Callable[["VCpu", VmgExit], None]


def required_inputs(code: int, info1: int, rax: int) -> set[int] | None:
    """The save-area fields exit `code` must have valid (KVM's sev_es_validate_vmgexit), or
    None for an exit this host does not serve."""
    if code == SVM_EXIT_CPUID:
        return {GHCB_RAX, GHCB_RCX} | ({GHCB_XCR0} if rax & MASK32 == 0xD else set())
    if code == SVM_EXIT_IOIO:
        if info1 & IOIO_STR:
            return {GHCB_SW_SCRATCH}
        return set() if info1 & IOIO_TYPE_IN else {GHCB_RAX}
    if code == SVM_EXIT_MSR:
        return {GHCB_RCX} | ({GHCB_RAX, GHCB_RDX} if info1 == 1 else set())
    if code == SVM_EXIT_VMMCALL:
        return {GHCB_RAX, GHCB_CPL}
    if code in (SVM_EXIT_WBINVD, SVM_VMGEXIT_AP_RESET_HOLD, SVM_VMGEXIT_AP_JUMP_TABLE):
        return set()
    return None


class GhcbHost:
    """KVM's VMGEXIT handling for one VM (`VM.ghcb`): `vmgexit(vcpu)` serves the request in the
    vCPU's GHCB MSR; `ap_jump_table` is the GPA the guest registered; `log` keeps every exit."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.ap_jump_table = 0
        self.log: list[VmgExit] = []
        self.observers: list[Observer] = []

    def vmgexit(self, v: VCpu) -> None:
        msr = v.ghcb_msr
        if msr & GHCB_MSR_INFO_MASK:
            self._msr_protocol(v, msr)
        else:
            self._page_protocol(v, msr)

    def _record(self, v: VCpu, rec: VmgExit) -> VmgExit:
        self.log.append(rec)
        for obs in self.observers:
            obs(v, rec)
        return rec

    # ---- MSR protocol ---------------------------------------------------------------------
    def _msr_protocol(self, v: VCpu, msr: int) -> None:
        fn = msr & GHCB_MSR_INFO_MASK
        rec = self._record(v, VmgExit(f"{self.vm.name}/{v.index}", msr, "msr",
                                      MSR_REQUESTS.get(fn, f"{fn:#x}")))
        if fn == GHCB_MSR_SEV_INFO_REQ:
            v.ghcb_msr = (GHCB_VERSION_MAX << 48 | GHCB_VERSION_MIN << 32
                          | self.vm.cpuid.cbit << 24 | GHCB_MSR_SEV_INFO_RESP)
        elif fn == GHCB_MSR_CPUID_REQ:
            reg, leaf = (msr >> 30) & 3, msr >> 32
            value = self.vm.cpuid.query(leaf, 0)[reg]
            v.ghcb_msr = value << 32 | reg << 30 | GHCB_MSR_CPUID_RESP
        elif fn == GHCB_MSR_AP_RESET_HOLD_REQ:
            v.ghcb_msr = GHCB_MSR_AP_RESET_HOLD_RESP  # result 0 until the host wakes it
            v.enter_reset_hold("msr")
        elif fn == GHCB_MSR_TERM_REQ:
            reason_set = msr >> GHCB_MSR_TERM_SET_SHIFT & GHCB_MSR_TERM_SET_MASK
            reason_code = msr >> GHCB_MSR_TERM_CODE_SHIFT & GHCB_MSR_TERM_CODE_MASK
            v.terminate(f"termination request: reason set {reason_set}, "
                        f"reason code {reason_code:#x}")
        else:
            rec.result = "unsupported"
            v.request_stop(f"unsupported GHCB MSR protocol request {fn:#x}", kind="invalid")
            return
        rec.result = f"{v.ghcb_msr:#x}"

    # ---- page protocol --------------------------------------------------------------------
    def _page_protocol(self, v: VCpu, gpa: int) -> None:
        hpa = self.vm.gpa_to_hpa(gpa) if gpa else None
        if hpa is None:
            self._record(v, VmgExit(f"{self.vm.name}/{v.index}", gpa, "ghcb", "?",
                                    result="GHCB GPA not in any memslot"))
            v.request_stop(f"VMGEXIT with GHCB GPA {gpa:#x} outside every memslot",
                           kind="invalid")
            return
        page = GhcbPage(self.vm.mc.host_read(hpa, PAGE))  # shared: the guest's plaintext
        inputs = page.valid_fields()
        code, info1, info2 = (page.get(o) for o in (GHCB_SW_EXIT_CODE, GHCB_SW_EXIT_INFO1,
                                                     GHCB_SW_EXIT_INFO2))
        rec = self._record(v, VmgExit(f"{self.vm.name}/{v.index}", gpa, "ghcb",
                                      EXIT_NAMES.get(code, f"{code:#x}"), code, info1, info2,
                                      inputs))
        valid = {off for off, name in FIELDS.items() if name in inputs}
        page.clear_valid()  # the guest sees valid only what the host answers
        error = self._malformed(page, code, info1, valid)
        if error is not None:
            page.set(GHCB_SW_EXIT_INFO1, GHCB_HV_RESP_MALFORMED_INPUT)
            page.set(GHCB_SW_EXIT_INFO2, error)
            rec.result = f"malformed input (reason {error})"
        else:
            rec.result = self._serve(v, page, gpa, code, info1, info2, inputs)
        self._write(hpa, page)

    @staticmethod
    def _malformed(page: GhcbPage, code: int, info1: int, valid: set[int]) -> int | None:
        """The GHCB_ERR_* reason a request is refused for, or None."""
        if page.usage != 0:
            return GHCB_ERR_INVALID_USAGE
        if not {GHCB_SW_EXIT_CODE, GHCB_SW_EXIT_INFO1, GHCB_SW_EXIT_INFO2} <= valid:
            return GHCB_ERR_MISSING_INPUT
        need = required_inputs(code, info1, page.get(GHCB_RAX))
        if need is None:
            return GHCB_ERR_INVALID_EVENT
        return None if need <= valid else GHCB_ERR_MISSING_INPUT

    def _serve(self, v: VCpu, page: GhcbPage, gpa: int, code: int, info1: int, info2: int,
               inputs: dict[str, int]) -> str:
        """Perform exit `code`; write the answer into `page`; return the log's result text."""
        regs = {name: inputs.get(name, 0) for name, _off in GPRS}
        page.set(GHCB_SW_EXIT_INFO1, GHCB_HV_RESP_NO_ACTION)
        page.set(GHCB_SW_EXIT_INFO2, 0)
        result = "ok"
        if code == SVM_EXIT_CPUID:
            a, b, c, d = self.vm.cpuid.query(regs["rax"] & MASK32, regs["rcx"] & MASK32)
            regs.update(rax=a, rbx=b, rcx=c, rdx=d)
        elif code == SVM_EXIT_IOIO:
            result = self._ioio(v, info1, regs)
        elif code == SVM_EXIT_MSR:
            result = self._msr(info1, regs)
        elif code == SVM_EXIT_VMMCALL:
            regs["rax"] = self.vm.hypercall(v, regs["rax"], regs["rbx"], regs["rcx"],
                                            regs["rdx"], 0) & MASK64
        elif code == SVM_VMGEXIT_AP_RESET_HOLD:
            v.enter_reset_hold("ghcb", gpa)
            result = "reset hold"
        elif code == SVM_VMGEXIT_AP_JUMP_TABLE:
            if info1 == SVM_VMGEXIT_AP_JUMP_TABLE_SET:
                self.ap_jump_table = info2
            elif info1 == SVM_VMGEXIT_AP_JUMP_TABLE_GET:
                page.set(GHCB_SW_EXIT_INFO2, self.ap_jump_table)
            else:
                result = "malformed input"
        if result == "malformed input":
            page.set(GHCB_SW_EXIT_INFO1, GHCB_HV_RESP_MALFORMED_INPUT)
            page.set(GHCB_SW_EXIT_INFO2, GHCB_ERR_INVALID_INPUT)
        elif result.startswith("exception"):
            page.set(GHCB_SW_EXIT_INFO1, GHCB_HV_RESP_ISSUE_EXCEPTION)
            page.set(GHCB_SW_EXIT_INFO2, X86_TRAP_GP | SVM_EVTINJ_TYPE_EXCEPTION
                     | SVM_EVTINJ_VALID)
        for name, off in GPRS:  # KVM's sev_es_sync_to_ghcb
            page.set(off, regs[name])
        return result

    def _ioio(self, v: VCpu, info1: int, regs: dict[str, int]) -> str:
        if info1 & IOIO_STR:
            return "malformed input"  # string I/O through the scratch area is not modelled
        size = next((n for bit, n in IOIO_SIZES if info1 & bit), 0)
        if not size:
            return "malformed input"
        mask = (1 << 8 * size) - 1
        io = PortIo(0, info1 >> IOIO_PORT_SHIFT & 0xFFFF, size, regs["rax"] & mask,
                    write=not info1 & IOIO_TYPE_IN)
        port_io(self.vm, io)
        if not io.write:
            regs["rax"] = regs["rax"] & ~mask | io.value & mask
        return "ok"

    def _msr(self, info1: int, regs: dict[str, int]) -> str:
        msr = regs["rcx"] & MASK32
        if info1 == 0:
            if msr == MSR_KVM_MIGRATION_CONTROL:
                value = self.vm.msr_read(msr)
            elif msr == MSR_AMD64_SEV:
                value = self.vm.sev_status
            else:
                return f"exception #GP (rdmsr {msr:#x})"
            regs["rax"], regs["rdx"] = value & MASK32, value >> 32 & MASK32
            return "ok"
        if info1 != 1:
            return "malformed input"
        if msr != MSR_KVM_MIGRATION_CONTROL:
            return f"exception #GP (wrmsr {msr:#x})"
        self.vm.msr_write(msr, (regs["rdx"] & MASK32) << 32 | regs["rax"] & MASK32)
        return "ok"

    def _write(self, hpa: int, page: GhcbPage) -> None:
        """KVM writes the GHCB back (and its dirty log sees the page)."""
        self.vm.mc.host_write(hpa, bytes(page.data))
        self.vm.note_write(hpa, PAGE)

    def wake(self, gpa: int) -> None:
        """INIT-SIPI for a vCPU held by the page protocol: SwExitInfo2 = 1."""
        hpa = self.vm.gpa_to_hpa(gpa)
        assert hpa is not None, "the held vCPU's GHCB left its memslot"
        page = GhcbPage(self.vm.mc.host_read(hpa, PAGE))
        page.set(GHCB_SW_EXIT_INFO2, 1)
        self._write(hpa, page)
