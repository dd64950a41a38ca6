"""Host ↔ helper protocol v1: every wire layout, op and status code, declared once.

docs/PROTOCOL.md is generated from this module (`helperfw.protodoc`), the C header for QEMU and
OVMF authors from the same structs, and the host model parses the mailbox with their `construct`
views. Change a layout here and all of them follow.
"""

from __future__ import annotations

from helperfw import Array, const, i32, struct, u8, u32, u64

from .platform import PAGE_SIZE

PROTOCOL_VERSION = const(u32, 1)
DEFAULT_SLOTS = 64
MAX_SLOTS = 64
MAX_REGIONS = 8

# This project's hypercall announcing the boot-info page: a0 = its GPA, a1 = PROTOCOL_VERSION.
# Chosen outside Linux's KVM_HC_* range (which is small integers); see docs/PROTOCOL.md.
MH_HC_ANNOUNCE = 0x4D480001  # "MH" << 16 | 1

# -- address-space options (SPEC §4) --------------------------------------------------------
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

# -- status codes: every value the helper can return, one enum -------------------------------
STATUS = {
    "OK": (0, "success"),
    "E_BAD_OP": (-1, "unknown op code"),
    "E_BAD_STATE": (-2, "op not allowed in the current session state"),
    "E_BAD_COUNT": (-3, "entry count is zero or larger than the slot count"),
    "E_RANGE": (-4, "ram_addr not page aligned or outside the RAM window"),
    "E_SELF": (-5, "ram_addr inside the helper's own regions"),
    "E_SHARED": (-6, "entry flagged as a shared page; the helper only moves private pages"),
    "E_AUTH": (-7, "authentication failed (GCM tag or token MAC)"),
    "E_REPLAY": (-8, "record from another session/epoch, duplicated, or seq out of window"),
    "E_EPOCH": (-9, "epoch token does not match the records received"),
    "E_INCOMPLETE": (-10, "finish refused: epoch open, token missing or totals differ"),
    "E_NO_KEY": (-11, "no transport key was provisioned in the SEV secret area"),
    "E_RNG": (-12, "RDRAND failed repeatedly"),
    "E_VERSION": (-13, "unsupported protocol version"),
    "E_BAD_ARG": (-14, "invalid argument (window size, flags, reserved fields)"),
    "E_ABORTED": (-15, "session aborted; only HELLO and BEGIN are accepted"),
    "E_HEADER": (-16, "malformed envelope header (magic, flags, reserved, address)"),
    "E_EXHAUSTED": (-17, "sequence space or epoch window exhausted"),
}
for _name, (_val, _doc) in STATUS.items():
    globals()[_name] = const(i32, _val)

# -- envelope and tokens (SPEC §6, fixed contract) ------------------------------------------
ENVELOPE_MAGIC = 0x3150484D  # "MHP1" little-endian
TOKEN_MAGIC = 0x3145484D  # "MHE1": epoch token
FINISH_MAGIC = 0x3146484D  # "MHF1": finish token
KDF_LABEL = 0x314B484D  # "MHK1"
EPOCH_RECORDS_MAX = 8192  # records per epoch: bounds the destination's per-epoch tables


@struct
class Envelope:
    """Precedes each sealed page. nonce = epoch (u32 LE) ‖ seq (u64 LE); AAD = bytes 0x00–0x2F."""

    magic: u32
    flags: u32
    ram_addr: u64
    session_id: u64
    epoch: u32
    reserved0: u32
    seq: u64
    reserved1: u64
    tag: Array[u8, 16]


@struct
class EpochToken:
    """Ends an epoch: authenticated (GCM, empty plaintext, AAD = bytes 0x00–0x3F) with
    nonce = epoch ‖ 0 (seq 0 is never used by a record)."""

    magic: u32
    epoch: u32
    session_id: u64
    count: u64  # records sealed in this epoch
    first_seq: u64  # seq of the epoch's first record; records use [first_seq, first_seq+count)
    set_hash: Array[u8, 16]  # XOR over records of AES256_Ka(ram_addr ‖ seq)
    total_records: u64  # records sealed in the session so far, this epoch included
    reserved: u64
    tag: Array[u8, 16]


@struct
class SlotHeader:
    """What a data slot carries: an envelope (SEND output / RECV input) or an epoch token."""

    envelope: Envelope


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
    regions: Array[Region, MAX_REGIONS]


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
class Entry:
    ram_addr: u64
    flags: u32
    status: i32


ENTRY_F_SHARED = 1  # host declares the page shared: the helper refuses it


@struct
class Command:
    """Page 1 of the mailbox. The helper copies it whole into private memory before reading."""

    op: u32
    count: u32
    session_id: u64  # RECV_BEGIN: the source's session
    epoch: u32
    version: u32  # HELLO: the host's protocol version
    ram_size: u64  # *_BEGIN: RAM window size in bytes
    arg: u64
    entries: Array[Entry, MAX_SLOTS]


@struct
class HelloReply:
    """Written into slot 0 by HELLO."""

    version: u32
    slots: u32
    option: u32
    c_bit: u32
    capabilities: u64
    session_id: u64


CAP_AESNI_GCM = 1


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

MAILBOX_DATA_PAGES = (DEFAULT_SLOTS * SLOT_SIZE + PAGE_SIZE - 1) // PAGE_SIZE
MAILBOX_PAGES = 2 + MAILBOX_DATA_PAGES  # boot-info/control, command, slots

# helper session states
ST_IDLE = 0
ST_SENDING = 1
ST_RECEIVING = 2
ST_DONE = 3
ST_ABORTED = 4

WIRE_STRUCTS = [ImageDescriptor, MhConfig, Region, BootInfo, Control, Entry, Command, HelloReply, Envelope, EpochToken]
