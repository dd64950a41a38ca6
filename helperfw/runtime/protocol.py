"""Host ↔ helper protocol v2: every wire layout, op and status code, declared once.

docs/PROTOCOL.md is generated from this module (`helperfw.protodoc`), the C header for QEMU and
OVMF authors from the same structs, and the host model parses the mailbox with their `construct`
views. Change a layout here and all of them follow.
"""

from __future__ import annotations

from helperfw import Array, Const, const, i32, struct, u8, u32, u64

from .platform import PAGE_SIZE

PROTOCOL_VERSION = const(u32, 2)
DEFAULT_SLOTS = 64
MAX_SLOTS = 64
MAX_REGIONS = 8

# -- lanes: several mirror vCPUs serving one session (docs/PROTOCOL.md, "Lanes") --------------
# The driver serves MhConfig.lanes lanes (0: DEFAULT_LANES), fixed at load; each has its own
# mailbox, stack and private state. A session uses the first `Command.count` of them (*_BEGIN;
# 0 means 1). Page ram_addr belongs to lane (ram_addr >> LANE_PAGE_SHIFT) mod lanes, and lane l's
# seqs are (l << LANE_SHIFT) | n: no two lanes ever use the same nonce under the one K_s.
MAX_LANES = 16
DEFAULT_LANES = 4
LANE_SHIFT = 56  # a seq's top byte is its lane
LANE_PAGE_SHIFT = 12  # pages go round-robin: a dirty run of any length spreads over every lane

# This project's hypercall announcing the boot-info page: a0 = its GPA, a1 = PROTOCOL_VERSION.
# Chosen outside Linux's KVM_HC_* range (which is small integers); see docs/PROTOCOL.md.
MH_HC_ANNOUNCE = 0x4D480001  # "MH" << 16 | 1

# -- address-space options (docs/PROTOCOL.md) -----------------------------------------------
# Boot parameter: a UEFI configuration table with this GUID whose VendorTable points at an
# MhConfig; without it the build's DEFAULT_OPTION applies.
MH_CONFIG_GUID = "1c3aadd0-dc27-4e59-816d-d1593b66ba29"
OPT_SHIFT = 0
OPT_TUPLES = 1
OPT_ISOLATED = 2
OPTION_NAMES = {OPT_SHIFT: "shift", OPT_TUPLES: "tuples", OPT_ISOLATED: "isolated"}
DEFAULT_OPTION = OPT_SHIFT


@struct
class MhConfig:
    """The boot parameter (see MH_CONFIG_GUID)."""

    option: u32  # OPT_*
    shift_high: u32  # shift only: RAM_BASE = 2^(MAXPHYADDR - reduction - 1) instead of 4 GiB
    lanes: u32  # lanes (mirror vCPUs) the driver serves: 0 = DEFAULT_LANES, at most MAX_LANES
    reserved: u32  # 0

# Region kinds in the boot-info block: what the host must map (tuples) or copy (isolated).
REGION_CODE = 1  # image .text: mapped RX
REGION_RODATA = 2  # image .rodata: R, NX
REGION_DATA = 3  # image .data/.bss, context, stack, page tables: RW, NX
REGION_MAILBOX = 4  # shared with the host: RW, NX, no C-bit

# -- ops ------------------------------------------------------------------------------------
OP_HELLO = 1
OP_SEND_BEGIN = 2
OP_SEND = 3
OP_SEND_END_EPOCH = 4
OP_SEND_FINISH = 5
OP_RECV_BEGIN = 6
OP_RECV = 7
OP_RECV_END_EPOCH = 8
OP_RECV_FINISH = 9
OP_ABORT = 10
OP_JOIN = 11  # lanes > 0: join the session lane 0 published (docs/PROTOCOL.md, "Lanes")

# -- status codes: every value the helper can return, one table ------------------------------
_MEANING: dict[int, tuple[str, bool]] = {}  # value -> (meaning, seen by the host)


def _status(value: int, meaning: str, *, wire: bool = True) -> Const:
    """Declare a status code (names stay spelled out below, so grep and linters see them)."""
    if value in _MEANING:
        raise ValueError(f"status {value} declared twice")
    _MEANING[value] = (meaning, wire)
    return const(i32, value)


OK = _status(0, "success")
E_BAD_OP = _status(-1, "unknown op code")
E_BAD_STATE = _status(-2, "op not allowed in the current session state")
E_BAD_COUNT = _status(-3, "entry count is zero or larger than the slot count")
E_RANGE = _status(-4, "ram_addr not page aligned or outside the RAM window")
E_SELF = _status(-5, "ram_addr inside the helper's own regions")
E_SHARED = _status(-6, "entry flagged as a shared page; the helper only moves private pages")
E_AUTH = _status(-7, "authentication failed (GCM-SIV tag of a record or token)")
E_REPLAY = _status(-8, "record or token of another session, challenge or epoch, duplicated, "
                       "or seq out of window")
E_EPOCH = _status(-9, "epoch token does not match the records received")
E_INCOMPLETE = _status(-10, "finish refused: epoch open, token missing, totals differ, or the "
                            "session was poisoned")
E_NO_KEY = _status(-11, "no transport key was provisioned in the SEV secret area")
E_RNG = _status(-12, "RDRAND failed or returned an implausible value (0, all ones, a repeat)")
E_VERSION = _status(-13, "unsupported protocol version")
E_BAD_ARG = _status(-14, "invalid argument (window size, flags, reserved fields, challenge)")
E_ABORTED = _status(-15, "session aborted; only HELLO and BEGIN are accepted")
E_HEADER = _status(-16, "malformed envelope or token header (magic, flags, lane, address)")
E_EXHAUSTED = _status(-17, "sequence space or epoch window exhausted")
E_DISCARDED = _status(-18, "this helper installed pages in a receiving session that ended "
                           "without RECV_FINISH: it refuses every new session (one-shot "
                           "destination)")
E_FAULT = _status(-19, "the CPU raised an exception while the helper ran the batch (an "
                       "instruction CPUID promised but the CPU lacks, a #VC, an unmapped page): "
                       "the session was ended, FaultRecord says where; entry statuses are void. "
                       "After a #UD later sessions use the baseline AEAD path (no VAES), "
                       "whatever CPUID says")
E_CHANGED = _status(-20, "private memory changed under the helper between a record's tag check "
                         "and its installation (the host wrote back older ciphertext of the "
                         "helper's scratch or of the guest page): the page was zeroed and the "
                         "session poisoned")
E_LANE = _status(-21, "not this lane's: the page belongs to another lane of the session (lane = "
                       "(ram_addr >> 12) mod lanes), or the op is not for this lane (*_BEGIN on "
                       "lane 0 only, JOIN on the others only, a lane beyond the session's count)")
E_UNPUBLISHED = _status(-22, "JOIN: lane 0 has no session published (none begun, its "
                             "publication under way, or ended) or it is bound to another "
                             "challenge than Command.challenge")
# firmware-internal: returned inside the image and reported on the console at driver load
E_SETUP_OPTION = _status(-100, "driver load: unknown address-space option", wire=False)
E_SETUP_HIGH_REGION = _status(-101, "driver load, shift: a region lies above 4 GiB", wire=False)
E_SETUP_TABLES = _status(-102, "driver load: page-table pool exhausted or a mapping conflict",
                         wire=False)
E_SETUP_ALLOC = _status(-103, "driver load: AllocatePages failed", wire=False)
E_SETUP_SHARE = _status(-104, "driver load: the guest's own page tables could not be changed",
                        wire=False)
E_SETUP_LANES = _status(-105, "driver load: MhConfig.lanes above MAX_LANES", wire=False)
PT_E_WX = _status(-201, "page tables: a mapping both writable and executable", wire=False)
PT_E_ALIGN = _status(-202, "page tables: va/pa/size not 4 KiB aligned, or va not canonical",
                     wire=False)
PT_E_POOL = _status(-203, "page tables: table pool exhausted", wire=False)
PT_E_OVERLAP = _status(-204, "page tables: range already mapped", wire=False)
PT_E_RANGE = _status(-205, "page tables: physical range beyond the usable address bits",
                     wire=False)


def _status_table(wire: bool) -> dict[str, tuple[int, str]]:
    """name -> (value, meaning) of the codes declared above, in declaration order."""
    return {name: (c.value, _MEANING[c.value][0]) for name, c in globals().items()
            if isinstance(c, Const) and c.value in _MEANING and _MEANING[c.value][1] == wire}


STATUS = _status_table(wire=True)  # what Control.status and Entry.status can hold
FIRMWARE_STATUS = _status_table(wire=False)  # never on the wire; reported at driver load

# -- envelope and tokens (the fixed transport contract) -----------------------------------------
ENVELOPE_MAGIC = 0x3250484D  # "MHP2" little-endian: a sealed page
TOKEN_MAGIC = 0x3245484D  # "MHE2": epoch token
FINISH_MAGIC = 0x3246484D  # "MHF2": finish token
KDF_LABEL_K1 = 0x324B484D  # "MHK2": K_1 from (K, session_id)
KDF_LABEL_KS = 0x3253484D  # "MHS2": K_s from (K_1, challenge)
KDF_LABEL_KA = 0x3241484D  # "MHA2": K_a from (K_1, challenge)
FIRST_EPOCH = 1
FIRST_SEQ = 1
FINISH_EPOCH = 0xFFFFFFFF  # nonce epoch of the finish token: records and epoch tokens never use it
EPOCH_RECORDS_MAX = 8192  # records per epoch: bounds the destination's per-epoch tables
ENVELOPE_AAD_LEN = 0x30  # the envelope bytes a record's tag covers (all but the tag)
TOKEN_AAD_LEN = 0x40  # the token bytes a token's tag covers


@struct
class Envelope:
    """Precedes each sealed page. AES-256-GCM-SIV under K_s, nonce = epoch (u32 LE) ‖ seq (u64
    LE), AAD = bytes 0x00–0x2F, plaintext = the 4096-byte page. `lane` is the lane that sealed
    it, also the seq's top byte."""

    magic: u32  # ENVELOPE_MAGIC
    flags: u32  # 0
    ram_addr: u64  # where the page belongs (QEMU ram_addr_t)
    session_id: u64  # the source helper's RDRAND session id
    epoch: u32  # FIRST_EPOCH, then +1 per closed epoch
    lane: u32  # the lane that sealed it (0 with one lane)
    seq: u64  # per lane and session: (lane << LANE_SHIFT) | n, n = FIRST_SEQ, FIRST_SEQ + 1...
    challenge: u64  # the destination's RDRAND challenge this session is bound to
    tag: Array[u8, 16]


@struct
class EpochToken:
    """Ends a lane's epoch (magic MHE2) or its session (magic MHF2): AES-256-GCM-SIV under K_s
    with an empty plaintext, AAD = bytes 0x00–0x3F, nonce = epoch ‖ (lane << 56) (MHE2) or
    FINISH_EPOCH ‖ (lane << 56) (MHF2); no record has a seq whose low 56 bits are 0, so no record
    shares a token's nonce, and no lane another lane's."""

    magic: u32
    epoch: u32  # MHE2: the epoch it closes; MHF2: the last closed epoch (0 if none)
    session_id: u64
    count: u64  # MHE2: records the lane sealed in the epoch; MHF2: the session's lanes - 1
    first_seq: u64  # MHE2: seq of the epoch's first record; MHF2: the seq the next record would
    #                 have had. The epoch's records carry seqs [first_seq, first_seq + count).
    set_hash: Array[u8, 16]  # MHE2: XOR over the epoch's records of AES256_Ka(ram_addr ‖ seq); MHF2: 0
    total_records: u64  # records sealed in the session so far (this epoch included)
    challenge: u64  # as in the envelope
    tag: Array[u8, 16]


SLOT_SIZE = Envelope.size + PAGE_SIZE  # 64 + 4096


# -- mailbox ---------------------------------------------------------------------------------
@struct
class Region:
    main_gpa: u64  # where it lives in the main VM (also the helper's VA for it)
    length: u64
    mirror_gpa: u64  # where the host must place it in the mirror's address space
    kind: u32  # REGION_*
    flags: u32


@struct
class LaneEntry:
    """Where lane l's mirror vCPU starts and finds its mailbox (entry RIP and CR3 are shared)."""

    mailbox_gpa: u64  # main-VM GPA of the lane's mailbox (page 0: Control at CONTROL_OFFSET)
    mailbox_mirror_gpa: u64
    rsp: u64  # the lane's initial stack pointer (mirror VA): it also tells the helper the lane


@struct
class BootInfo:
    """Page 0 of the mailbox, filled at driver load and announced with MH_HC_ANNOUNCE."""

    magic: u32  # "MHBI"
    version: u32
    option: u32  # OPT_*
    c_bit: u32
    entry_rip: u64  # mirror VA of the helper's run loop
    cr3: u64  # value for the mirror's CR3 (mirror GPA of the PML4, with the C-bit)
    rsp: u64  # initial stack pointer (mirror VA)
    mailbox_gpa: u64  # main-VM GPA of this mailbox (page 0)
    mailbox_mirror_gpa: u64
    mailbox_pages: u32
    slots: u32
    ram_base: u64  # mirror GPA (and VA) of ram_addr 0
    ram_max: u64  # largest RAM window the mirror address space allows
    nregions: u32
    active: u32  # 0: no SEV or no key: the helper stays inactive
    sev_status: u32  # MSR_AMD64_SEV as the driver read it: bit 0 SEV, bit 1 SEV-ES
    lanes: u32  # lanes the helper serves (fixed at load); lane_info[0] repeats the fields above
    regions: Array[Region, MAX_REGIONS]
    lane_info: Array[LaneEntry, MAX_LANES]


BOOTINFO_MAGIC = 0x4942484D  # "MHBI"


@struct
class Control:
    """Follows BootInfo on page 0: the doorbell handshake (one exit per batch)."""

    doorbell: u64  # host increments before running the mirror vCPU
    completed: u64  # helper writes doorbell's value when the batch is done, then HLTs
    status: i32  # batch status (STATUS)
    state: u32  # helper session state, for diagnostics
    processed: u32  # entries handled in the last batch
    reserved: u32


CONTROL_OFFSET = 2048


@struct
class FaultRecord:
    """Follows Control on page 0: the last CPU exception the helper caught (Control.status is
    then E_FAULT). Written before the session's keys are wiped and the batch is completed."""

    count: u32  # exceptions caught since the driver loaded
    vector: u32  # 0 #DE, 6 #UD, 13 #GP, 14 #PF, 29 #VC, ...
    error_code: u64  # pushed by the CPU (0 for vectors without one); for #VC the exit code
    rip: u64  # faulting instruction, as an offset into the image (RVA)
    cr2: u64  # #PF: the faulting address


FAULT_OFFSET = CONTROL_OFFSET + Control.size


@struct
class Entry:
    ram_addr: u64
    flags: u32
    status: i32


ENTRY_F_SHARED = 1  # host declares the page shared: the helper refuses it


@struct
class Command:
    """Page 1 of the mailbox. The helper copies it whole into private memory before reading."""

    op: u32
    count: u32  # entries; *_BEGIN: the lanes the session uses (0 or 1: lane 0 alone)
    session_id: u64  # RECV, RECV_END_EPOCH, RECV_FINISH: the source's session id (the first
    #                  binds the receiving session to it)
    epoch: u32  # unused: 0
    version: u32  # HELLO and *_BEGIN: the host's protocol version
    ram_size: u64  # *_BEGIN: RAM window size in bytes
    challenge: u64  # SEND_BEGIN: the destination's challenge (from its RECV_BEGIN); JOIN: the
    #                 challenge of the session lane 0 published
    entries: Array[Entry, MAX_SLOTS]


@struct
class HelloReply:
    """Written into slot 0 by HELLO, SEND_BEGIN (with the new session id) and RECV_BEGIN (with
    the new challenge)."""

    version: u32
    slots: u32
    option: u32
    c_bit: u32
    capabilities: u64
    session_id: u64  # SEND_BEGIN: the session just begun
    challenge: u64  # RECV_BEGIN: the challenge the source must bind (SEND_BEGIN: echoed)


CAP_GCM_SIV = 1  # records and tokens are AES-256-GCM-SIV (protocol v2)


@struct
class ImageDescriptor:
    """In the image's .rodata as symbol `mh_descriptor`: what `helperfw inspect` and host tools
    read from a .efi without running it."""

    magic: u32  # "MHDS"
    protocol_version: u32
    default_option: u32
    slots: u32
    capabilities: u64
    key_entry_guid: Array[u8, 16]  # the secret-area entry holding the transport key
    config_guid: Array[u8, 16]  # the boot-parameter configuration table


DESCRIPTOR_MAGIC = 0x5344484D  # "MHDS"

# The mailbox: page 0 BootInfo (+ Control at CONTROL_OFFSET), page 1 the Command, then the slots.
COMMAND_OFFSET = PAGE_SIZE
SLOTS_OFFSET = 2 * PAGE_SIZE
MAILBOX_DATA_PAGES = (DEFAULT_SLOTS * SLOT_SIZE + PAGE_SIZE - 1) // PAGE_SIZE
MAILBOX_PAGES = SLOTS_OFFSET // PAGE_SIZE + MAILBOX_DATA_PAGES

# helper session states
ST_IDLE = 0
ST_SENDING = 1
ST_RECEIVING = 2
ST_DONE = 3
ST_ABORTED = 4

WIRE_STRUCTS = [ImageDescriptor, MhConfig, Region, LaneEntry, BootInfo, Control, FaultRecord,
                Entry, Command, HelloReply, Envelope, EpochToken]
MAILBOX_BYTES = MAILBOX_PAGES * PAGE_SIZE  # one lane's mailbox; lane l's follows lane l-1's
