"""Platform facts: hypercall numbers, MSRs, CPUID leaves, ports, page size, PTE bits.

Declared once, each with its source, and imported by the firmware (the DSL runtime) and by the
emulator alike. Plain integers: DSL code uses them as literals. Where the emulator keeps a
deliberately independent copy to act as an oracle (the MMU walk in emulate/mmu.py), that copy
says so.
"""

from __future__ import annotations

PAGE_SIZE = 4096
PAGE_2M = 2 << 20
PAGE_1G = 1 << 30

# -- KVM (Linux Documentation/virt/kvm/x86/hypercalls.rst, msr.rst) ---------------------------
KVM_HC_MAP_GPA_RANGE = 12  # a0 GPA, a1 pages, a2 attributes (below)
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4  # a2 bit 4: the range becomes private
KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = 0xF  # a2 bits 3:0: the unit of a1
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 2
KVM_ENOSYS = 1000  # include/uapi/linux/kvm_para.h: an unknown hypercall returns -KVM_ENOSYS
KVM_EINVAL = 22  # hypercall errors are negative errno values
MSR_KVM_MIGRATION_CONTROL = 0x4B564D08
KVM_MIGRATION_READY = 1  # bit 0 of MSR_KVM_MIGRATION_CONTROL

# -- AMD SEV (AMD APM vol. 2 §15.34, vol. 3 CPUID Fn8000_001F) ---------------------------------
CPUID_SEV_LEAF = 0x8000001F  # EAX bit 1 SEV, bit 3 SEV-ES; EBX[5:0] C-bit, EBX[11:6] reduction
CPUID_SEV_EAX_SEV = 1 << 1
CPUID_SEV_EBX_CBIT_MASK = 0x3F  # EBX[5:0]: the C-bit position
CPUID_SEV_EBX_REDUCTION_SHIFT = 6  # EBX[11:6]: physical-address bits lost to encryption
CPUID_SEV_EBX_REDUCTION_MASK = 0x3F
CPUID_ADDR_SIZE_LEAF = 0x80000008  # EAX[7:0] MAXPHYADDR
CPUID_ADDR_SIZE_EAX_PHYS_MASK = 0xFF
CPUID_MAX_EXT_LEAF = 0x80000000
CPUID_FEATURES_LEAF = 1  # ECX bit 25 AES-NI, bit 1 PCLMULQDQ, bit 30 RDRAND
CPUID_1_ECX_PCLMULQDQ = 1 << 1
CPUID_1_ECX_AESNI = 1 << 25
MSR_AMD64_SEV = 0xC0010131  # SEV_STATUS: bit 0 SEV enabled, bit 1 SEV-ES enabled
MSR_AMD64_SEV_ENABLED = 1 << 0
MSR_AMD64_SEV_ES_ENABLED = 1 << 1
MSR_AMD64_SEV_ES_GHCB = 0xC0010130  # the GHCB MSR (SEV-ES guest-hypervisor communication)

# SVM intercept exit codes (AMD APM vol. 2 appendix C; Linux arch/x86/include/uapi/asm/svm.h):
# what a VM exit reports to the host and, under SEV-ES, the error code of the #VC the guest gets
SVM_EXIT_CPUID = 0x72
SVM_EXIT_HLT = 0x78
SVM_EXIT_IOIO = 0x7B
SVM_EXIT_MSR = 0x7C  # RDMSR and WRMSR (EXITINFO1 0 / 1)
SVM_EXIT_VMMCALL = 0x81
SVM_EXIT_WBINVD = 0x89
SVM_EXIT_NPF = 0x400  # nested page fault; under SEV-ES an MMIO/unbacked GPA access is a #VC
X86_TRAP_UD = 6  # #UD, invalid opcode (e.g. an instruction CPUID promised but the CPU lacks)
X86_TRAP_VC = 29  # #VC, the SEV-ES VMM communication exception

# -- SEV-ES GHCB (AMD pub. 56421; EDK2 MdePkg/Include/Register/Amd/Ghcb.h; Linux
# arch/x86/include/asm/sev-common.h, svm.h) -------------------------------------------------------
# MSR protocol: GHCB MSR bits 11:0 name the request/response, the rest carries its data.
GHCB_MSR_INFO_MASK = 0xFFF
GHCB_MSR_SEV_INFO_RESP = 0x001  # [63:48] max version, [47:32] min version, [31:24] C-bit
GHCB_MSR_SEV_INFO_REQ = 0x002
GHCB_MSR_CPUID_REQ = 0x004  # [31:30] register (0 eax .. 3 edx), [63:32] function (no subleaf)
GHCB_MSR_CPUID_RESP = 0x005  # [63:32] the value, [31:30] the register asked for
GHCB_MSR_AP_RESET_HOLD_REQ = 0x006
GHCB_MSR_AP_RESET_HOLD_RESP = 0x007  # [63:12] non-zero once the vCPU was woken
GHCB_MSR_TERM_REQ = 0x100  # [15:12] reason set, [23:16] reason code
GHCB_MSR_TERM_SET_SHIFT = 12
GHCB_MSR_TERM_SET_MASK = 0xF
GHCB_MSR_TERM_CODE_SHIFT = 16
GHCB_MSR_TERM_CODE_MASK = 0xFF
GHCB_VERSION_MIN = 1
GHCB_VERSION_MAX = 1  # SEV-ES; version 2 adds SNP's requests
# The GHCB page (4 KiB, shared): byte offsets of the fields used here.
GHCB_CPL = 0x0CB  # u8
GHCB_RAX = 0x1F8
GHCB_RCX = 0x308
GHCB_RDX = 0x310
GHCB_RBX = 0x318
GHCB_SW_EXIT_CODE = 0x390
GHCB_SW_EXIT_INFO1 = 0x398
GHCB_SW_EXIT_INFO2 = 0x3A0
GHCB_SW_SCRATCH = 0x3A8
GHCB_XCR0 = 0x3E8
GHCB_VALID_BITMAP = 0x3F0  # 16 bytes: bit n = qword n of the page is valid
GHCB_SHARED_BUFFER = 0x800  # 2032 bytes
GHCB_PROTOCOL_VERSION = 0xFFA  # u16
GHCB_USAGE = 0xFFC  # u32, 0 = standard
GHCB_VALID_BYTES = 16
# VMGEXIT-only exit codes
SVM_VMGEXIT_AP_RESET_HOLD = 0x80000004  # the AP "HLT loop": the vCPU waits for a wake-up
SVM_VMGEXIT_AP_JUMP_TABLE = 0x80000005  # info1 0 = set, 1 = get; info2 = the table's GPA
SVM_VMGEXIT_AP_JUMP_TABLE_SET = 0
SVM_VMGEXIT_AP_JUMP_TABLE_GET = 1
# SwExitInfo1 bits 31:0 after a VMGEXIT: the hypervisor's answer
GHCB_HV_RESP_NO_ACTION = 0
GHCB_HV_RESP_ISSUE_EXCEPTION = 1  # SwExitInfo2 = the event to raise (vector, type 3, valid)
GHCB_HV_RESP_MALFORMED_INPUT = 2  # SwExitInfo2 = GHCB_ERR_*
GHCB_ERR_NOT_REGISTERED = 1
GHCB_ERR_INVALID_USAGE = 2
GHCB_ERR_INVALID_SCRATCH_AREA = 3
GHCB_ERR_MISSING_INPUT = 4
GHCB_ERR_INVALID_INPUT = 5
GHCB_ERR_INVALID_EVENT = 6
# SVM IOIO exit information (SwExitInfo1 of an IOIO exit)
IOIO_TYPE_IN = 1 << 0
IOIO_STR = 1 << 2
IOIO_REP = 1 << 3
IOIO_DATA_8, IOIO_DATA_16, IOIO_DATA_32 = 1 << 4, 1 << 5, 1 << 6
IOIO_ADDR_64 = 1 << 9
IOIO_PORT_SHIFT = 16
# an injected event (SwExitInfo2 with GHCB_HV_RESP_ISSUE_EXCEPTION): vector | type << 8 | valid
SVM_EVTINJ_TYPE_EXCEPTION = 3 << 8
SVM_EVTINJ_VALID = 1 << 31
SVM_EVTINJ_VECTOR_MASK = 0xFF

# -- AVX state and the wide instructions (Intel SDM vol. 2A "CPUID" leaf 7, vol. 1 §13.3;
#    AMD APM vol. 3 appendix E) ---------------------------------------------------------------
CPUID_1_ECX_OSXSAVE = 1 << 27  # CR4.OSXSAVE is set: XGETBV may run (else it is #UD)
CPUID_1_ECX_AVX = 1 << 28
CPUID_STD_MAX_LEAF = 0  # EAX: the highest standard leaf
CPUID_EAX, CPUID_EBX, CPUID_ECX, CPUID_EDX = 0, 1, 2, 3  # a register's index, as GHCB_MSR_CPUID_REQ names it
CPUID_EXT_FEATURES_LEAF = 7  # subleaf 0
CPUID_7_EBX_AVX2 = 1 << 5
CPUID_7_ECX_VAES = 1 << 9
CPUID_7_ECX_VPCLMULQDQ = 1 << 10
XCR0 = 0  # XGETBV's ECX: the state components the OS enabled for XSAVE and for use
XCR0_SSE = 1 << 1  # xmm registers
XCR0_AVX = 1 << 2  # the upper halves of the ymm registers

# -- QEMU / OVMF ----------------------------------------------------------------------------------
DEBUG_PORT = 0x402  # QEMU isa-debugcon as OVMF configures it

# -- x86-64 paging (Intel SDM vol. 3A §4.5, AMD APM vol. 2 §5.3) ----------------------------------
PTE_P = 1 << 0
PTE_RW = 1 << 1
PTE_A = 1 << 5
PTE_D = 1 << 6
PTE_PS = 1 << 7
PTE_NX = 1 << 63
PTE_PAT_LARGE = 1 << 12  # the PAT bit of a 2 MiB / 1 GiB leaf (a 4 KiB leaf has it at bit 7)
PAGE_SHIFT = 12  # VA bits 11:0: the offset in a 4 KiB page
PT_LEVEL_BITS = 9  # each level of tables resolves 9 bits of the VA
PT_ENTRIES = 1 << PT_LEVEL_BITS  # 8-byte entries per 4 KiB table
PML4_SHIFT = PAGE_SHIFT + 3 * PT_LEVEL_BITS  # VA bits 47:39 index the PML4
