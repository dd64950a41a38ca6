"""The mailbox protocol v2: one batch per doorbell, sealed/opened pages, epochs, fresh sessions.

Everything the host wrote is copied into private memory (`HelperCtx.cmd`, `.env`, `.tok`)
before any field is examined, and every field is read from that copy only, so a host rewriting
the mailbox while the helper runs can change nothing but the ciphertext it gets back. Guest
memory is written only after a record's tag verified (`siv_open` decrypts into a private
scratch page, copies out on success and reads the page back: a host that rewound the scratch
in between gets the page zeroed and E_CHANGED); a page is sealed from a private snapshot of it,
so what is encrypted is what was authenticated.

Sessions are fresh on both sides: the destination's RECV_BEGIN draws a `challenge` with RDRAND,
the source's SEND_BEGIN takes it and draws the `session_id`, and the session keys bind both
(docs/PROTOCOL.md, "Transport crypto"). A destination that installed pages in a session that did
not finish refuses every later session (one-shot).
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    emms,
    function,
    i32,
    mfence,
    rdrand64,
    read_cr3,
    sizeof,
    static,
    struct,
    u8,
    u32,
    u64,
    v128,
    v128_hi,
    v128_lo,
    v128_make,
    vload,
    vstore,
    write_cr3,
)
from helperfw.structs import StructType

from .aes import Aes256Key, aes256_block, aes256_expand, aes256_expand_v
from .gcmsiv import (
    SIV_CHANGED,
    SIV_OK,
    SivKeys,
    siv_open,
    siv_open_on,
    siv_seal,
    siv_seal_on,
)
from .gcmsiv_wide import wide_choose
from .memops import copy_mem, wipe
from .pagetables import MAP_ENC, MAP_W, PAGE_1G, PAGE_2M, PT_OK, PtBuilder, pt_init, pt_map
from .platform import PAGE_SIZE
from .protocol import (
    CAP_GCM_SIV,
    COMMAND_OFFSET,
    CONTROL_OFFSET,
    DEFAULT_SLOTS,
    E_ABORTED,
    E_AUTH,
    E_BAD_ARG,
    E_BAD_COUNT,
    E_BAD_OP,
    E_BAD_STATE,
    E_CHANGED,
    E_DISCARDED,
    E_EPOCH,
    E_EXHAUSTED,
    E_HEADER,
    E_INCOMPLETE,
    E_LANE,
    E_NO_KEY,
    E_RANGE,
    E_REPLAY,
    E_RNG,
    E_SELF,
    E_SHARED,
    E_UNPUBLISHED,
    E_VERSION,
    ENTRY_F_SHARED,
    ENVELOPE_AAD_LEN,
    ENVELOPE_MAGIC,
    EPOCH_RECORDS_MAX,
    FINISH_EPOCH,
    FINISH_MAGIC,
    FIRST_EPOCH,
    FIRST_SEQ,
    KDF_LABEL_K1,
    KDF_LABEL_KA,
    KDF_LABEL_KS,
    LANE_PAGE_SHIFT,
    LANE_SHIFT,
    MAX_LANES,
    MAX_REGIONS,
    OK,
    OP_ABORT,
    OP_HELLO,
    OP_JOIN,
    OP_RECV,
    OP_RECV_BEGIN,
    OP_RECV_END_EPOCH,
    OP_RECV_FINISH,
    OP_SEND,
    OP_SEND_BEGIN,
    OP_SEND_END_EPOCH,
    OP_SEND_FINISH,
    PROTOCOL_VERSION,
    REGION_DATA,
    SLOT_SIZE,
    SLOTS_OFFSET,
    ST_ABORTED,
    ST_DONE,
    ST_IDLE,
    ST_RECEIVING,
    ST_SENDING,
    TOKEN_AAD_LEN,
    TOKEN_MAGIC,
    Command,
    Control,
    Envelope,
    EpochToken,
    HelloReply,
    Region,
)
from .secrets import KEY_SIZE

WORD_BITS = 64  # `seen` holds one bit per record in u64 words
SEEN_WORDS = EPOCH_RECORDS_MAX // WORD_BITS
ADDR_SLOTS = 2 * EPOCH_RECORDS_MAX  # open addressing, never more than half full
STACK_SIZE = 32768  # each lane's
RDRAND_TRIES = 32  # draws per random value (each value needs two distinct plausible draws)
ALL_ONES = 0xFFFFFFFFFFFFFFFF

CTX_F_NO_CR3 = 1  # native tests: the page tables are never loaded, do not touch CR3
NONCE_SLOT = 16  # a record's 12-byte nonce (SIV_NONCE_LEN) on the stack, in a 16-byte slot
NATIVE_C_BIT = 47  # native tests: the C-bit (and physical address bits) the tables assume


@struct
class LaneCtx:
    """One lane's private state (docs/PROTOCOL.md, "Lanes"): only the lane's own vCPU writes it.
    Lane 0's *_BEGIN and RECV_FINISH read the other lanes' (`lanes_clean`, `lanes_finished`),
    nothing else crosses lanes. Lane 0's lives inside HelperCtx; the driver allocates the
    others at load (`mirror.setup_lanes`)."""

    set_hash: v128  # XOR of AES_Ka(ram_addr ‖ seq) over the epoch's records. First: 16-byte
    #                 aligned, so HelperCtx can splice lane 0's fields in with these offsets
    shared: u64  # VA of the HelperCtx (read-only during batches)
    lane: u32  # this lane's number
    state: u32
    mailbox: u64  # VA of this lane's mailbox page 0
    stack_top: u64  # end of this lane's stack (its vCPU starts at stack_top - 8)
    last_bell: u64  # doorbell of the last batch handled
    cur_bell: u64  # doorbell of the batch in hand (a fault completes it: vcpu.mh_fault)
    faults: u32  # CPU exceptions caught (vcpu.mh_fault)
    processed: u32
    poisoned: u32  # RECEIVING saw a refusal: RECV_FINISH can never succeed
    refused: u32  # entries refused in the current batch
    session_id: u64
    challenge: u64  # the destination's RDRAND challenge the session is bound to
    bound: u32  # RECEIVING: session_id known and keys derived (first RECV-family command)
    installed_any: u32  # this lane wrote guest memory in its receiving session `gen`
    discarded: u32  # this lane wrote guest memory in a receiving session that did not finish
    lanes: u32  # lanes of the session (page rule, finish token)
    gen: u64  # the publication (lane 0's session) this lane's session belongs to
    rng_last: u64  # the last value accepted from RDRAND (a repeat is refused)
    ram_size: u64
    epoch: u32
    wide: u32  # the lane's AEAD path (gcmsiv_wide.WIDE_*), chosen when its session starts
    next_seq: u64  # SEND: next seq to assign
    epoch_first: u64  # first seq of the current epoch
    epoch_count: u64  # records sealed/accepted in the current epoch
    total: u64  # records in the lane's session
    ks: Aes256Key  # K_s: the AEAD's key-generating key
    ka: Aes256Key  # K_a: the set-hash key
    rec: SivKeys  # the current record's keys (wiped after each record)
    cmd: Command  # private copy of the host's command
    env: Envelope  # private copy of one envelope
    tok: EpochToken  # private copy / draft of a token
    seen: Array[u64, SEEN_WORDS]  # RECV: seqs of the current epoch already accepted
    installed: Array[u64, ADDR_SLOTS]  # RECV: ram_addr | 1 of each page installed this epoch
    scratch: Array[u8, PAGE_SIZE]  # seal: snapshot of the page; open: plaintext before release


@struct
class _Shared:
    """The state every lane reads and no lane writes during a batch: set at driver load, by lane
    0's *_BEGIN (the RAM window's mapping, which only grows, and the published session) and its
    RECV_FINISH (`finished_gen`)."""

    key: Array[u8, KEY_SIZE]  # transport key K from the SEV secret area
    have_key: u32
    option: u32
    c_bit: u32
    phys_bits: u32
    ram_base: u64  # mirror GPA (and VA) of ram_addr 0
    ram_max: u64
    window_mapped: u64  # bytes of the RAM window present in the page tables
    slots: u32
    nregions: u32
    regions: Array[Region, MAX_REGIONS]
    flags: u32
    sev_status: u32  # MSR_AMD64_SEV at driver load: bit 0 SEV, bit 1 SEV-ES
    nlanes: u32  # lanes served, fixed at load
    dest_discarded: u32  # one-shot: a receiving session installed pages and did not finish
    finished_gen: u64  # generation of the last session RECV_FINISH accepted
    # the published session (lane 0's *_BEGIN; generation written last, odd while unpublished)
    pub_gen: u64
    pub_state: u32
    pub_lanes: u32
    pub_session_id: u64
    pub_challenge: u64
    pub_ram_size: u64
    lane_ctx: Array[u64, MAX_LANES]  # VA of each lane's LaneCtx
    pt: PtBuilder  # the mirror's page tables


HelperCtx = StructType(
    "HelperCtx", [(f.name, f.type) for t in (_Shared, LaneCtx) for f in t.fields.values()],
    False, "All of the helper's private state (the image's .bss, private, RW+NX): the shared "
    "state, then lane 0's LaneCtx, so a one-lane helper is one block with flat field names.")
LANE0 = HelperCtx.offset("set_hash")
assert LANE0 % LaneCtx.align == 0 and all(
    HelperCtx.offset(f) - LANE0 == LaneCtx.offset(f) for f in LaneCtx.fields)

CTX = static(HelperCtx, align=PAGE_SIZE)
STACK = static(Array[u8, STACK_SIZE], align=PAGE_SIZE)  # lane 0's


@function
def shared(c: Ptr[LaneCtx]) -> Ptr[HelperCtx]:
    return Ptr[HelperCtx](c.shared)


@function
def lane0(h: Ptr[HelperCtx]) -> Ptr[LaneCtx]:
    return Ptr[LaneCtx](u64(h) + LANE0)


@function
def lane_ctx(h: Ptr[HelperCtx], lane: u32) -> Ptr[LaneCtx]:
    return Ptr[LaneCtx](h.lane_ctx[lane])


# -- small helpers -----------------------------------------------------------------------------
@function
def overlaps(a: u64, alen: u64, b: u64, blen: u64) -> bool:
    return a < b + blen and b < a + alen


@function
def make_nonce(out: Ptr[u8], epoch: u32, seq: u64) -> None:
    """nonce = epoch (u32 LE) ‖ seq (u64 LE)."""
    Ptr[u32](out)[0] = epoch
    Ptr[u64](out + sizeof(u32))[0] = seq


@function
def lane_seq(c: Ptr[LaneCtx], n: u64) -> u64:
    """Seq n of this lane's space: the lane in the top byte (no two lanes share a nonce)."""
    return (u64(c.lane) << LANE_SHIFT) | n


@function
def mailbox_slot(c: Ptr[LaneCtx], i: u64) -> u64:
    return c.mailbox + SLOTS_OFFSET + i * SLOT_SIZE


@function
def mailbox_command(c: Ptr[LaneCtx]) -> Ptr[Command]:
    return Ptr[Command](c.mailbox + COMMAND_OFFSET)


@function
def set_entry_status(c: Ptr[LaneCtx], i: u64, status: i32) -> None:
    vstore(addr(mailbox_command(c).entries[i].status), status)


@function
def v128_store_bytes(p: Ptr[u8], v: v128) -> None:
    Ptr[u64](p)[0] = v128_lo(v)
    Ptr[u64](p)[1] = v128_hi(v)


@function
def flush_tlb(h: Ptr[HelperCtx]) -> None:
    """Drop cached translations (new window mappings); not in native tests (no tables)."""
    if (h.flags & CTX_F_NO_CR3) == 0:
        write_cr3(read_cr3())


# -- randomness ----------------------------------------------------------------------------------
@function(small=True)  # once per session
def rng64(c: Ptr[LaneCtx]) -> u64:
    """A RDRAND value the helper can trust, or 0 (never a valid result).

    RDRAND can fail (CF=0: retry) and some AMD parts return a constant with CF=1 (errata). A
    value is plausible if it is neither 0 nor all ones nor the last accepted one; a result takes
    two plausible draws in a row, so a constant generator is refused on first use."""
    got = False
    for i in range(RDRAND_TRIES):
        v, ok = rdrand64()
        if ok and v != 0 and v != ALL_ONES and v != c.rng_last:
            c.rng_last = v
            if got:
                return v
            got = True
    return 0


# -- keys ----------------------------------------------------------------------------------------
@function(small=True)  # once per session
def wipe_session_keys(c: Ptr[LaneCtx]) -> None:
    wipe(Ptr[u8](addr(c.ks)), sizeof(Aes256Key))
    wipe(Ptr[u8](addr(c.ka)), sizeof(Aes256Key))
    wipe(Ptr[u8](addr(c.rec)), sizeof(SivKeys))
    wipe(addr(c.scratch[0]), PAGE_SIZE)


@function(small=True)  # once per session
def kdf_pair(k: Ptr[Aes256Key], x: u64, label: u32, out: Ptr[Aes256Key]) -> None:
    """out = the schedule of AES256_k(x ‖ label ‖ 0) ‖ AES256_k(x ‖ label ‖ 1), x a u64 LE."""
    b0 = aes256_block(k, v128_make(x, u64(label)))
    b1 = aes256_block(k, v128_make(x, u64(label) | (u64(1) << 32)))
    aes256_expand_v(b0, b1, out)


@function(small=True)  # once per session
def derive_session_keys(c: Ptr[LaneCtx]) -> None:
    """K_1 = AES256_K(s ‖ "MHK2" ‖ 0) ‖ AES256_K(s ‖ "MHK2" ‖ 1); K_s and K_a likewise from K_1
    with the challenge and the labels "MHS2", "MHA2" (s, c: u64 LE; counters: u32 LE). Every
    lane derives its own copy from K (shared, read-only) and the session's ids."""
    k: Aes256Key
    k1: Aes256Key
    aes256_expand(addr(shared(c).key[0]), addr(k))
    kdf_pair(addr(k), c.session_id, KDF_LABEL_K1, addr(k1))
    kdf_pair(addr(k1), c.challenge, KDF_LABEL_KS, addr(c.ks))
    kdf_pair(addr(k1), c.challenge, KDF_LABEL_KA, addr(c.ka))
    wipe(Ptr[u8](addr(k)), sizeof(Aes256Key))
    wipe(Ptr[u8](addr(k1)), sizeof(Aes256Key))


@function
def count_record(c: Ptr[LaneCtx], ram_addr: u64, seq: u64) -> None:
    """The accounting an epoch token attests, done identically by sealer and opener: the set-hash
    of (ram_addr, seq), the epoch's count and the session's total."""
    c.set_hash = c.set_hash ^ aes256_block(addr(c.ka), v128_make(ram_addr, seq))
    c.epoch_count += 1
    c.total += 1


@function(small=True)  # once per session or epoch
def clear_epoch_marks(c: Ptr[LaneCtx]) -> None:
    for i in range(SEEN_WORDS):
        c.seen[i] = 0
    for i in range(ADDR_SLOTS):
        c.installed[i] = 0


@function
def installed_slot(c: Ptr[LaneCtx], ram_addr: u64) -> u64:
    """Index of ram_addr's entry in `installed`, or of the empty entry where it goes. A page
    may be installed once per epoch: two records of one page in an epoch (the host had the
    source seal it twice) would let the host choose, by delivery order, which version the
    destination keeps, i.e. roll the page back inside an epoch. The probe start is keyed with
    K_a (block ram_addr ‖ 0; set-hash blocks have seq >= 1), so the host cannot choose pages
    that collide; at most EPOCH_RECORDS_MAX entries (the seq window) fill half the table."""
    i = v128_lo(aes256_block(addr(c.ka), v128_make(ram_addr, 0))) & (ADDR_SLOTS - 1)
    while c.installed[i] != 0 and c.installed[i] != (ram_addr | 1):
        i = (i + 1) & (ADDR_SLOTS - 1)
    return i


# -- validation ------------------------------------------------------------------------------
@function(small=True)  # per page, next to a page's crypto
def check_ram_addr(c: Ptr[LaneCtx], ram_addr: u64, flags: u32) -> i32:
    """A page this lane may seal or install: aligned, inside the window, this lane's by the
    page rule, private, not the helper's own."""
    h = shared(c)
    if (flags & ENTRY_F_SHARED) != 0:
        return E_SHARED
    if flags != 0:
        return E_BAD_ARG
    if (ram_addr & 0xFFF) != 0 or ram_addr >= c.ram_size:
        return E_RANGE
    if (ram_addr >> LANE_PAGE_SHIFT) % u64(c.lanes | u32(c.lanes == 0)) != u64(c.lane):
        return E_LANE
    gpa = h.ram_base + ram_addr
    for i in range(h.nregions):
        r = addr(h.regions[i])
        # its own pages as guest RAM (low RAM: ram_addr == GPA), and as mirror addresses
        if overlaps(ram_addr, PAGE_SIZE, r.main_gpa, r.length):
            return E_SELF
        if overlaps(gpa, PAGE_SIZE, r.mirror_gpa, r.length) or overlaps(
                gpa, PAGE_SIZE, r.main_gpa, r.length):
            return E_SELF
    return OK


@function(small=True)  # once per session or epoch
def setup_window(c: Ptr[LaneCtx], ram_size: u64) -> i32:
    """Validate the RAM window and extend its mapping (2 MiB granules, 1 GiB where aligned).
    Lane 0's *_BEGIN only: the mapping is shared, and it only ever grows."""
    h = shared(c)
    if ram_size == 0 or (ram_size & (PAGE_2M - 1)) != 0 or ram_size > h.ram_max:
        return E_BAD_ARG
    for i in range(h.nregions):
        r = addr(h.regions[i])
        if overlaps(h.ram_base, ram_size, r.mirror_gpa, r.length) or overlaps(
                h.ram_base, ram_size, r.main_gpa, r.length):
            return E_BAD_ARG
    if ram_size > h.window_mapped:
        # At most 1 GiB per pt_map, each recorded in window_mapped once mapped: a window larger
        # than the table pool can map fails here (E_BAD_ARG) but leaves the tables consistent.
        # One pt_map for the whole window used to leave leaves behind that window_mapped did
        # not cover, so every later *_BEGIN hit them (PT_E_OVERLAP) and failed for good.
        st: i32 = OK
        while st == OK and h.window_mapped < ram_size:
            start = h.ram_base + h.window_mapped
            n = min(ram_size - h.window_mapped, PAGE_1G - (start & (PAGE_1G - 1)))
            if pt_map(addr(h.pt), start, start, n, MAP_W | MAP_ENC) != PT_OK:
                st = E_BAD_ARG
            else:
                h.window_mapped += n
        flush_tlb(h)  # new mappings only; flushing keeps the rule simple
        if st != OK:
            return st
    c.ram_size = ram_size
    return OK


@function(small=True)  # once per session
def start_lane(c: Ptr[LaneCtx], state: u32) -> None:
    """A lane's session starts (lane 0's *_BEGIN, another lane's JOIN): its counters, seq
    space and epoch marks; the other fields were set by the caller."""
    c.epoch = FIRST_EPOCH
    c.next_seq = lane_seq(c, FIRST_SEQ)
    c.epoch_first = c.next_seq
    c.epoch_count = 0
    c.total = 0
    c.poisoned = 0
    c.bound = 0
    c.installed_any = 0
    c.set_hash = v128_make(0, 0)
    clear_epoch_marks(c)
    c.wide = wide_choose(c.wide, shared(c).sev_status)
    c.state = state


@function(small=True)  # once per session
def begin_session(c: Ptr[LaneCtx], state: u32) -> i32:
    """The parts of *_BEGIN both sides share: version, lanes, window, then the lane starts."""
    h = shared(c)
    if h.have_key == 0:
        return E_NO_KEY
    if c.cmd.version != PROTOCOL_VERSION:
        return E_VERSION
    n = c.cmd.count | u32(c.cmd.count == 0)
    if n > h.nlanes:
        return E_BAD_COUNT
    st = setup_window(c, c.cmd.ram_size)
    if st != OK:
        return st
    c.lanes = n
    start_lane(c, state)
    return OK


@function(small=True)  # once per session
def publish(c: Ptr[LaneCtx]) -> None:
    """Lane 0: publish its new session for the other lanes' JOIN. The generation is odd while
    the fields change and becomes even (complete) last, after a fence: a JOIN that reads the
    same even generation before and after copying the fields copied one whole session."""
    h = shared(c)
    g = vload(addr(h.pub_gen)) | 1
    vstore(addr(h.pub_gen), g)
    mfence()
    vstore(addr(h.pub_state), c.state)
    vstore(addr(h.pub_lanes), c.lanes)
    vstore(addr(h.pub_session_id), c.session_id)
    vstore(addr(h.pub_challenge), c.challenge)
    vstore(addr(h.pub_ram_size), c.ram_size)
    mfence()
    vstore(addr(h.pub_gen), g + 1)
    c.gen = g + 1


@function(small=True)  # once per session
def end_session(c: Ptr[LaneCtx], state: u32) -> None:
    """Wipe the lane's session keys and scratch; a receiving session that wrote guest memory
    and ends any other way than by RECV_FINISH discards this lane for good (one-shot
    destination). Lane 0's session ending withdraws its publication (odd generation)."""
    if c.state == ST_RECEIVING and c.installed_any != 0 and state != ST_DONE:
        c.discarded = 1
    wipe_session_keys(c)
    c.bound = 0
    c.state = state
    if c.lane == 0:
        h = shared(c)
        vstore(addr(h.pub_gen), vload(addr(h.pub_gen)) | 1)


@function(small=True)  # once per session
def lanes_clean(c: Ptr[LaneCtx]) -> bool:
    """Lane 0's *_BEGIN: no lane holds pages of a receiving session that ended unfinished (one
    lane discarded, or its installs belong to a session RECV_FINISH did not accept). Lanes of
    lane 0's own live session are judged when it ends. Reads the other lanes (documented)."""
    h = shared(c)
    live = c.state == ST_SENDING or c.state == ST_RECEIVING
    for i in range(h.nlanes):
        o = lane_ctx(h, u32(i))
        g = vload(addr(o.gen))
        if vload(addr(o.discarded)) != 0 or (vload(addr(o.installed_any)) != 0 and
                                             g != h.finished_gen and not (live and g == c.gen)):
            h.dest_discarded = 1
    return h.dest_discarded == 0


@function(small=True)  # once per session
def may_begin(c: Ptr[LaneCtx]) -> i32:
    if c.lane != 0:
        return E_LANE
    if not lanes_clean(c):
        return E_DISCARDED
    if c.state == ST_SENDING or c.state == ST_RECEIVING:
        return E_BAD_STATE
    return OK


# -- SEND ------------------------------------------------------------------------------------
@function(small=True)  # once per session
def op_send_begin(c: Ptr[LaneCtx]) -> i32:
    st = may_begin(c)
    if st != OK:
        return st
    if c.cmd.challenge == 0:
        return E_BAD_ARG  # the destination's challenge is RDRAND output: never 0
    sid = rng64(c)
    if sid == 0:
        return E_RNG
    st = begin_session(c, ST_SENDING)
    if st != OK:
        return st
    c.session_id = sid
    c.challenge = c.cmd.challenge
    derive_session_keys(c)
    publish(c)
    write_hello(c)
    return OK


@function
def seal_one(c: Ptr[LaneCtx], ram_addr: u64, slot: u64) -> None:
    """Seal the page at ram_addr into the slot: the page is read once, into the private scratch,
    and hashed on the way, so what is encrypted is what was authenticated."""
    seq = c.next_seq
    c.next_seq = seq + 1
    env = addr(c.env)
    env.magic = ENVELOPE_MAGIC
    env.flags = 0
    env.ram_addr = ram_addr
    env.session_id = c.session_id
    env.epoch = c.epoch
    env.lane = c.lane
    env.seq = seq
    env.challenge = c.challenge
    nonce: Array[u8, NONCE_SLOT]
    make_nonce(addr(nonce[0]), c.epoch, seq)
    siv_seal_on(c.wide, addr(c.ks), addr(nonce[0]), Ptr[u8](env), ENVELOPE_AAD_LEN,
                shared(c).ram_base, addr(c.scratch[0]), Ptr[u8](slot + sizeof(Envelope)),
                PAGE_SIZE, addr(env.tag[0]), addr(c.rec))
    copy_mem(Ptr[u8](slot), Ptr[u8](env), sizeof(Envelope))
    count_record(c, ram_addr, seq)


@function(small=True)  # per batch
def op_send(c: Ptr[LaneCtx]) -> i32:
    if c.state != ST_SENDING:
        return E_BAD_STATE
    n = c.cmd.count
    if n == 0 or n > shared(c).slots:
        return E_BAD_COUNT
    for i in range(n):
        e = addr(c.cmd.entries[i])
        st = check_ram_addr(c, e.ram_addr, e.flags)
        if st == OK and c.epoch_count >= EPOCH_RECORDS_MAX:
            st = E_EXHAUSTED
        if st == OK:
            seal_one(c, e.ram_addr, mailbox_slot(c, u64(i)))
            c.processed += 1
        set_entry_status(c, u64(i), st)
    wipe(addr(c.scratch[0]), PAGE_SIZE)  # the last page's plaintext
    return OK


@function(small=True)  # once per session or epoch
def seal_token(c: Ptr[LaneCtx], magic: u32, epoch: u32, count: u64, first: u64,
               set_hash: v128, nonce_epoch: u32) -> None:
    t = addr(c.tok)
    t.magic = magic
    t.epoch = epoch
    t.session_id = c.session_id
    t.count = count
    t.first_seq = first
    v128_store_bytes(addr(t.set_hash[0]), set_hash)
    t.total_records = c.total
    t.challenge = c.challenge
    nonce: Array[u8, NONCE_SLOT]
    make_nonce(addr(nonce[0]), nonce_epoch, lane_seq(c, 0))
    siv_seal(addr(c.ks), addr(nonce[0]), Ptr[u8](t), TOKEN_AAD_LEN, 0, addr(c.scratch[0]),
             addr(c.scratch[0]), 0, addr(t.tag[0]), addr(c.rec))  # no data: no page
    copy_mem(Ptr[u8](mailbox_slot(c, 0)), Ptr[u8](t), sizeof(EpochToken))


@function(small=True)  # once per session or epoch
def next_epoch(c: Ptr[LaneCtx]) -> None:
    """Both sides, once an epoch's token is sealed or verified: its seqs are
    [epoch_first, epoch_first + epoch_count), the next epoch starts right after."""
    c.epoch += 1
    c.epoch_first += c.epoch_count
    c.epoch_count = 0
    c.set_hash = v128_make(0, 0)
    clear_epoch_marks(c)


@function(small=True)  # once per session or epoch
def op_send_end_epoch(c: Ptr[LaneCtx]) -> i32:
    if c.state != ST_SENDING:
        return E_BAD_STATE
    if c.epoch >= FINISH_EPOCH - 1:
        return E_EXHAUSTED
    seal_token(c, TOKEN_MAGIC, c.epoch, c.epoch_count, c.epoch_first, c.set_hash, c.epoch)
    next_epoch(c)
    return OK


@function(small=True)  # once per session
def op_send_finish(c: Ptr[LaneCtx]) -> i32:
    if c.state != ST_SENDING:
        return E_BAD_STATE
    if c.epoch_count != 0:
        return E_INCOMPLETE  # the last epoch must be closed by a token first
    seal_token(c, FINISH_MAGIC, c.epoch - 1, u64(c.lanes - 1), c.next_seq, v128_make(0, 0),
               FINISH_EPOCH)
    end_session(c, ST_DONE)
    return OK


# -- RECV ------------------------------------------------------------------------------------
@function(small=True)  # once per session
def op_recv_begin(c: Ptr[LaneCtx]) -> i32:
    """Draw the challenge and wait for the session id (the first RECV-family command binds it).
    A RECV_BEGIN during a receiving session ends that session first."""
    if c.state == ST_RECEIVING and c.lane == 0:
        end_session(c, ST_ABORTED)
    st = may_begin(c)
    if st != OK:
        return st
    ch = rng64(c)
    if ch == 0:
        return E_RNG
    st = begin_session(c, ST_RECEIVING)
    if st != OK:
        return st
    c.challenge = ch
    c.session_id = 0
    publish(c)
    write_hello(c)
    return OK


@function(small=True)  # once per session
def bind_session(c: Ptr[LaneCtx]) -> i32:
    """RECV, RECV_END_EPOCH, RECV_FINISH name the session in Command.session_id: the first one
    binds it and derives K_s and K_a from (K, session_id, own challenge); later ones must match.
    A host that names a wrong session only makes every record fail: the keys need the
    destination's challenge, which no earlier stream was bound to. Each lane binds its own;
    lane 0's RECV_FINISH requires them all equal."""
    if c.state != ST_RECEIVING:
        return E_BAD_STATE
    if c.bound != 0:
        return OK if c.cmd.session_id == c.session_id else E_REPLAY
    if c.cmd.session_id == 0:
        return E_BAD_ARG
    c.session_id = c.cmd.session_id
    derive_session_keys(c)
    c.bound = 1
    return OK


@function
def siv_status(r: u32) -> i32:
    """siv_open's result as a wire status."""
    if r == SIV_OK:
        return OK
    if r == SIV_CHANGED:
        return E_CHANGED
    return E_AUTH


@function
def open_one(c: Ptr[LaneCtx], ram_addr: u64, slot: u64) -> i32:
    copy_mem(Ptr[u8](addr(c.env)), Ptr[u8](slot), sizeof(Envelope))
    env = addr(c.env)
    if env.magic != ENVELOPE_MAGIC or env.flags != 0 or env.lane != c.lane:
        return E_HEADER
    if env.ram_addr != ram_addr:
        return E_HEADER
    if env.session_id != c.session_id or env.challenge != c.challenge or env.epoch != c.epoch:
        return E_REPLAY
    if env.seq < c.epoch_first or env.seq - c.epoch_first >= EPOCH_RECORDS_MAX:
        return E_REPLAY
    off = env.seq - c.epoch_first
    bit = u64(1) << (off & 63)
    if (c.seen[off >> 6] & bit) != 0:
        return E_REPLAY
    slot_i = installed_slot(c, ram_addr)
    if c.installed[slot_i] != 0:
        return E_REPLAY  # this page already came in this epoch (see installed_slot)
    nonce: Array[u8, NONCE_SLOT]
    make_nonce(addr(nonce[0]), c.epoch, env.seq)
    r = siv_open_on(c.wide, addr(c.ks), addr(nonce[0]), Ptr[u8](env), ENVELOPE_AAD_LEN,
                    Ptr[u8](slot + sizeof(Envelope)), shared(c).ram_base, PAGE_SIZE,
                    addr(env.tag[0]), addr(c.scratch[0]), addr(c.rec))
    if r == SIV_CHANGED:
        c.installed_any = 1  # the page was written (and zeroed): one-shot applies
    if r != SIV_OK:
        return siv_status(r)
    c.installed_any = 1
    c.seen[off >> 6] = c.seen[off >> 6] | bit
    c.installed[slot_i] = ram_addr | 1
    count_record(c, ram_addr, env.seq)
    return OK


@function(small=True)  # per batch
def op_recv(c: Ptr[LaneCtx]) -> i32:
    st = bind_session(c)
    if st != OK:
        return st
    n = c.cmd.count
    if n == 0 or n > shared(c).slots:
        return E_BAD_COUNT
    for i in range(n):
        e = addr(c.cmd.entries[i])
        st = check_ram_addr(c, e.ram_addr, e.flags)
        if st == OK:
            st = open_one(c, e.ram_addr, mailbox_slot(c, u64(i)))
        if st == OK:
            c.processed += 1
        else:
            c.refused += 1
        set_entry_status(c, u64(i), st)
    wipe(addr(c.scratch[0]), PAGE_SIZE)  # the last page's plaintext
    return OK


@function(small=True)  # once per session or epoch
def open_token(c: Ptr[LaneCtx], magic: u32, nonce_epoch_is_finish: bool) -> i32:
    """Copy slot 0 into private memory and authenticate it as a token of kind `magic` sealed by
    this lane (the nonce carries the lane: another lane's token does not verify)."""
    st = bind_session(c)
    if st != OK:
        return st
    copy_mem(Ptr[u8](addr(c.tok)), Ptr[u8](mailbox_slot(c, 0)), sizeof(EpochToken))
    t = addr(c.tok)
    if t.magic != magic:
        return E_HEADER
    if t.session_id != c.session_id or t.challenge != c.challenge:
        return E_REPLAY
    nonce: Array[u8, NONCE_SLOT]
    make_nonce(addr(nonce[0]), FINISH_EPOCH if nonce_epoch_is_finish else t.epoch,
               lane_seq(c, 0))
    return siv_status(siv_open(addr(c.ks), addr(nonce[0]), Ptr[u8](t), TOKEN_AAD_LEN,
                               addr(c.scratch[0]), 0, 0, addr(t.tag[0]), addr(c.scratch[0]),
                               addr(c.rec)))  # no data: no page


@function(small=True)  # once per session or epoch
def op_recv_end_epoch(c: Ptr[LaneCtx]) -> i32:
    st = open_token(c, TOKEN_MAGIC, False)
    if st != OK:
        return st
    t = addr(c.tok)
    if t.epoch != c.epoch:
        return E_REPLAY  # an authentic token of another epoch: a replay, changes nothing
    h0 = Ptr[u64](addr(t.set_hash[0]))[0]
    h1 = Ptr[u64](addr(t.set_hash[0]))[1]
    if t.count != c.epoch_count or t.first_seq != c.epoch_first or t.total_records != c.total or \
            h0 != v128_lo(c.set_hash) or h1 != v128_hi(c.set_hash):
        return E_EPOCH
    next_epoch(c)
    return OK


@function(small=True)  # once per session
def lanes_finished(c: Ptr[LaneCtx]) -> bool:
    """Lane 0's RECV_FINISH, its own lane verified: every other lane of the session verified its
    finish token in this very session (its state copied field by field with single volatile
    reads: a hostile host may run the lane meanwhile, and a lane's state only leaves DONE by
    ABORT or by joining a later publication), and no lane outside it can still install pages or
    holds pages of a session that did not finish. Reads the other lanes (documented)."""
    h = shared(c)
    for i in range(1, h.nlanes):
        o = lane_ctx(h, u32(i))
        st = vload(addr(o.state))
        g = vload(addr(o.gen))
        if u32(i) < c.lanes:
            if st != ST_DONE or g != c.gen or vload(addr(o.session_id)) != c.session_id or \
                    vload(addr(o.challenge)) != c.challenge or vload(addr(o.epoch)) != c.epoch \
                    or vload(addr(o.poisoned)) != 0:
                return False
        elif st == ST_RECEIVING or vload(addr(o.discarded)) != 0 or (
                vload(addr(o.installed_any)) != 0 and g != h.finished_gen):
            return False
    return True


@function(small=True)  # once per session
def op_recv_finish(c: Ptr[LaneCtx]) -> i32:
    st = open_token(c, FINISH_MAGIC, True)
    if st != OK:
        return st
    t = addr(c.tok)
    h0 = Ptr[u64](addr(t.set_hash[0]))[0]
    h1 = Ptr[u64](addr(t.set_hash[0]))[1]
    if c.poisoned != 0 or c.epoch_count != 0 or t.epoch != c.epoch - 1 or \
            t.count != u64(c.lanes - 1) or t.total_records != c.total or \
            t.first_seq != c.epoch_first or (h0 | h1) != 0:
        return E_INCOMPLETE
    if c.lane == 0:
        if not lanes_finished(c):
            return E_INCOMPLETE
        shared(c).finished_gen = c.gen
    end_session(c, ST_DONE)
    return OK


# -- JOIN (lanes > 0) ------------------------------------------------------------------------
@function(small=True)  # once per session
def op_join(c: Ptr[LaneCtx]) -> i32:
    """Copy the session lane 0 published into this lane: only a complete publication (the same
    even generation before and after the copy) of the challenge the command names, once per
    generation. The lane then seals or opens its own pages with its own seq space; on the
    destination it binds the session id itself, like lane 0 (bind_session)."""
    h = shared(c)
    if c.lane == 0:
        return E_LANE
    if c.discarded != 0 or (c.installed_any != 0 and c.gen != h.finished_gen):
        c.discarded = 1
        return E_DISCARDED
    if c.state == ST_SENDING or c.state == ST_RECEIVING:
        return E_BAD_STATE
    g = vload(addr(h.pub_gen))
    mfence()
    state = vload(addr(h.pub_state))
    n = vload(addr(h.pub_lanes))
    sid = vload(addr(h.pub_session_id))
    ch = vload(addr(h.pub_challenge))
    ram_size = vload(addr(h.pub_ram_size))
    mfence()
    if (g & 1) != 0 or g == 0 or vload(addr(h.pub_gen)) != g or ch != c.cmd.challenge:
        return E_UNPUBLISHED
    if c.lane >= n:
        return E_LANE
    if g == c.gen:
        return E_BAD_STATE  # joined this publication before: its seqs must not start again
    c.gen = g
    c.lanes = n
    c.ram_size = ram_size
    c.session_id = sid
    c.challenge = ch
    start_lane(c, state)
    if state == ST_SENDING:
        derive_session_keys(c)
    flush_tlb(h)  # the window lane 0 mapped
    write_hello(c)
    return OK


# -- HELLO / ABORT / dispatch --------------------------------------------------------------------
@function(small=True)  # once per session
def write_hello(c: Ptr[LaneCtx]) -> None:
    h = shared(c)
    r: HelloReply
    r.version = PROTOCOL_VERSION
    r.slots = h.slots
    r.option = h.option
    r.c_bit = h.c_bit
    r.capabilities = CAP_GCM_SIV
    r.session_id = c.session_id
    r.challenge = c.challenge
    copy_mem(Ptr[u8](mailbox_slot(c, 0)), Ptr[u8](addr(r)), sizeof(HelloReply))


@function(small=True)  # once per session
def op_hello(c: Ptr[LaneCtx]) -> i32:
    if c.cmd.version != PROTOCOL_VERSION:
        return E_VERSION
    write_hello(c)
    return OK


@function(small=True)  # per batch
def dispatch(c: Ptr[LaneCtx]) -> i32:
    op = c.cmd.op
    if op == OP_HELLO:
        return op_hello(c)
    if op == OP_ABORT:
        end_session(c, ST_ABORTED)
        return OK
    if c.state == ST_ABORTED and op != OP_SEND_BEGIN and op != OP_RECV_BEGIN and op != OP_JOIN:
        return E_ABORTED
    if op == OP_SEND_BEGIN:
        return op_send_begin(c)
    if op == OP_SEND:
        return op_send(c)
    if op == OP_SEND_END_EPOCH:
        return op_send_end_epoch(c)
    if op == OP_SEND_FINISH:
        return op_send_finish(c)
    if op == OP_RECV_BEGIN:
        return op_recv_begin(c)
    if op == OP_RECV:
        return op_recv(c)
    if op == OP_RECV_END_EPOCH:
        return op_recv_end_epoch(c)
    if op == OP_RECV_FINISH:
        return op_recv_finish(c)
    if op == OP_JOIN:
        return op_join(c)
    return E_BAD_OP


@function(small=True)  # per batch
def poison_on_refusal(c: Ptr[LaneCtx], st: i32) -> None:
    """Fail closed: once a destination session has refused anything of the stream (a record, a
    token, a malformed batch), RECV_FINISH can never succeed. An honest host never causes a
    refusal, so any refusal means tampering, loss or a host bug, and the guest must not resume.
    If the session already wrote guest memory, the lane is discarded for good (one-shot)."""
    op = c.cmd.op
    if c.state == ST_RECEIVING and (op == OP_RECV or op == OP_RECV_END_EPOCH or
                                    op == OP_RECV_FINISH) and (st != OK or c.refused != 0):
        c.poisoned = 1
        if c.installed_any != 0:
            c.discarded = 1


@function(small=True)  # per batch
def process_batch(c: Ptr[LaneCtx]) -> None:
    """One doorbell of this lane's mailbox: copy the command, run it, publish status, then
    completed = doorbell."""
    ctl = Ptr[Control](c.mailbox + CONTROL_OFFSET)
    bell = vload(addr(ctl.doorbell))
    c.processed = 0
    st: i32 = E_BAD_STATE
    if bell != c.last_bell:
        c.cur_bell = bell
        copy_mem(Ptr[u8](addr(c.cmd)), Ptr[u8](mailbox_command(c)), sizeof(Command))
        c.refused = 0
        st = dispatch(c)
        c.last_bell = bell
        poison_on_refusal(c, st)
    vstore(addr(ctl.status), st)
    vstore(addr(ctl.state), c.state)
    vstore(addr(ctl.processed), c.processed)
    mfence()
    vstore(addr(ctl.completed), bell)


@function(small=True)
def init_lane(h: Ptr[HelperCtx], lane: u32, c: Ptr[LaneCtx], mailbox: u64,
              stack_top: u64) -> None:
    """Register lane `lane` (its private state at c, zeroed) with the shared state."""
    c.shared = u64(h)
    c.lane = lane
    c.mailbox = mailbox
    c.stack_top = stack_top
    c.state = ST_IDLE
    h.lane_ctx[lane] = u64(c)


# -- native test entry points (the host plays both sides in-process) ----------------------------
@function(abi="c")
def mh_test_process(c: Ptr[HelperCtx]) -> i32:
    """Lane 0's batch (a one-lane helper: the context is one HelperCtx)."""
    return mh_test_lane_process(lane0(c))


@function(abi="c")
def mh_test_lane_process(c: Ptr[LaneCtx]) -> i32:
    process_batch(c)
    emms()  # the staging masks used MMX registers: leave the x87 stack free for the host
    return Ptr[Control](c.mailbox + CONTROL_OFFSET).status


@function(abi="c")
def mh_test_lane_init(h: Ptr[HelperCtx], lane: u32, c: Ptr[LaneCtx], mailbox: u64) -> None:
    """Add lane `lane` (lanes 1, 2, ... in order; c zeroed, sizeof(LaneCtx) bytes)."""
    init_lane(h, lane, c, mailbox, 0)
    h.nlanes = lane + 1


@function(abi="c")
def mh_test_ctx_init(c: Ptr[HelperCtx], key: Ptr[u8], mailbox: u64, ram_base: u64, ram_max: u64,
                     pool: u64, pool_pages: u32, self_gpa: u64, self_len: u64) -> i32:
    """Set up a context the way the driver does, with identity 'mirror' addresses (native)."""
    copy_mem(addr(c.key[0]), key, KEY_SIZE)
    c.have_key = 1
    c.c_bit = NATIVE_C_BIT
    c.phys_bits = NATIVE_C_BIT
    c.option = 1
    c.ram_base = ram_base
    c.ram_max = ram_max
    c.window_mapped = 0
    c.slots = DEFAULT_SLOTS
    c.nregions = 1
    c.regions[0].main_gpa = self_gpa
    c.regions[0].length = self_len
    c.regions[0].mirror_gpa = self_gpa
    c.regions[0].kind = REGION_DATA
    c.flags = CTX_F_NO_CR3
    c.nlanes = 1
    init_lane(c, 0, lane0(c), mailbox, 0)
    c.last_bell = 0
    return i32(pt_init(addr(c.pt), pool, pool, pool_pages, NATIVE_C_BIT, NATIVE_C_BIT))
