"""The EFI entry point: self-test, SEV detection, and (with SEV) the helper's set-up.

Loaded by OVMF as a DXE runtime driver. Without SEV it proves it works (self-test on port 0x402
and ConOut) and returns EFI_UNSUPPORTED, so OVMF unloads it.
"""

from __future__ import annotations

from helperfw import (
    Array,
    Ptr,
    addr,
    cpuid,
    efi_call,
    function,
    rdmsr,
    static,
    struct,
    u8,
    u32,
    u64,
)

from .aes import Aes256Key, aes256_expand
from .console import con_hex, con_puts, con_set_conout, text
from .efi import (
    ALLOCATE_ANY_PAGES,
    EFI_BOOT_SERVICES_DATA,
    EFI_LOAD_ERROR,
    EFI_SUCCESS,
    EFI_UNSUPPORTED,
    GUID_SIZE,
    EfiBootServices,
    EfiSystemTable,
    guid_bytes,
)
from .gcmsiv import SIV_AUTH, SIV_OK, SivKeys, aad_base, siv_open, siv_seal
from .gcmsiv_keys import SIV_NONCE_LEN, SIV_TAG_LEN
from .memops import bytes_eq, wipe
from .mirror import SetupParams, announce, mirror_setup
from .pagetables import (
    MAP_ENC,
    MAP_W,
    MAP_X,
    PT_OK,
    PTE_NX,
    PTE_PS,
    PTE_RW,
    PtBuilder,
    pt_init,
    pt_lookup,
    pt_map,
)
from .platform import (
    CPUID_1_ECX_AESNI,
    CPUID_1_ECX_PCLMULQDQ,
    CPUID_ADDR_SIZE_EAX_PHYS_MASK,
    CPUID_ADDR_SIZE_LEAF,
    CPUID_FEATURES_LEAF,
    CPUID_MAX_EXT_LEAF,
    CPUID_SEV_EAX_SEV,
    CPUID_SEV_EBX_CBIT_MASK,
    CPUID_SEV_EBX_REDUCTION_MASK,
    CPUID_SEV_EBX_REDUCTION_SHIFT,
    CPUID_SEV_LEAF,
    MSR_AMD64_SEV,
    MSR_AMD64_SEV_ENABLED,
    PAGE_SIZE,
)
from .protocol import (
    CAP_GCM_SIV,
    DEFAULT_OPTION,
    DEFAULT_SLOTS,
    DESCRIPTOR_MAGIC,
    ENVELOPE_AAD_LEN,
    MH_CONFIG_GUID,
    OK,
    PROTOCOL_VERSION,
    ST_IDLE,
    ImageDescriptor,
    MhConfig,
)
from .secrets import KEY_ENTRY_GUID, KEY_SIZE, find_config_table, secret_find_key
from .session import CTX, lane0


def _siv_kat() -> bytes:
    """Inputs and expected output of the AES-256-GCM-SIV known-answer self-test.

    The expected ciphertext and tag come from an independent implementation (`cryptography`,
    i.e. OpenSSL) at build time; tests/test_gcmsiv.py checks the same code against RFC 8452.
    Layout: `SivKnownAnswer`."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

    key = bytes(range(KEY_SIZE))
    nonce = bytes(range(0xA0, 0xA0 + SIV_NONCE_LEN))
    aad = b"MHP2" + bytes(range(4, KAT_AAD_LEN))  # shaped like an envelope's AAD
    pt = bytes((7 * i + 3) & 0xFF for i in range(KAT_PT_LEN))
    sealed = AESGCMSIV(key).encrypt(nonce, pt, aad)
    return key + nonce + aad + pt + sealed


KAT_AAD_LEN = ENVELOPE_AAD_LEN
KAT_PT_LEN = 64  # four AES blocks: more than one POLYVAL/CTR step, less than a page


@struct
class SivKnownAnswer:
    """KAT_DATA: the self-test's inputs, then the ciphertext and tag it must produce."""

    key: Array[u8, KEY_SIZE]
    nonce: Array[u8, SIV_NONCE_LEN]
    aad: Array[u8, KAT_AAD_LEN]
    pt: Array[u8, KAT_PT_LEN]
    ct: Array[u8, KAT_PT_LEN]
    tag: Array[u8, SIV_TAG_LEN]


KAT = _siv_kat()
assert len(KAT) == SivKnownAnswer.size
KAT_DATA = static(Array[u8, len(KAT)], KAT, readonly=True)
K_KEY, K_IV, K_AAD, K_PT, K_CT, K_TAG = (SivKnownAnswer.offset(f) for f in (
    "key", "nonce", "aad", "pt", "ct", "tag"))

SELFTEST_POOL_PAGES = 8
SELFTEST_POOL_PA = 0x7F00000000  # pretend mirror GPA of the pool: entries must carry it
SELFTEST_C_BIT = 47
SELFTEST_PHYS_BITS = 43

MSG_BANNER = text("MigrationHelper: loaded (protocol v2)\n")
MSG_PT_OK = text("MigrationHelper: selftest page tables ok\n")
MSG_PT_FAIL = text("MigrationHelper: selftest page tables FAILED at check ")
MSG_ALLOC_FAIL = text("MigrationHelper: AllocatePages failed ")
MSG_NL = text("\n")
MSG_AEAD_OK = text("MigrationHelper: selftest AES-256-GCM-SIV known answers ok\n")
MSG_AEAD_FAIL = text("MigrationHelper: selftest AES-256-GCM-SIV FAILED at check ")
MSG_NO_AESNI = text("MigrationHelper: CPU lacks AES-NI/PCLMULQDQ, "
                    "returning EFI_UNSUPPORTED (driver unloads)\n")
MSG_SELFTEST_OK = text("MigrationHelper: selftest passed\n")
MSG_NO_SEV = text("MigrationHelper: SEV not active, returning EFI_UNSUPPORTED (driver unloads)\n")
MSG_SEV = text("MigrationHelper: SEV active, C-bit ")
MSG_NO_KEY = text("MigrationHelper: no transport key in the SEV secret area, returning "
                  "EFI_UNSUPPORTED (driver unloads)\n")
MSG_SETUP_FAIL = text("MigrationHelper: mirror set-up failed, inactive: ")
MSG_ACTIVE = text("MigrationHelper: active, option ")
MSG_BOOTINFO = text("MigrationHelper: boot info at ")
MSG_NO_ACK = text("MigrationHelper: host did not acknowledge the announce: ")
mh_descriptor = static(ImageDescriptor, ImageDescriptor.build(
    magic=DESCRIPTOR_MAGIC, protocol_version=PROTOCOL_VERSION.value,
    default_option=DEFAULT_OPTION, slots=DEFAULT_SLOTS, capabilities=CAP_GCM_SIV,
    key_entry_guid=guid_bytes(KEY_ENTRY_GUID), config_guid=guid_bytes(MH_CONFIG_GUID),
), readonly=True, keep=True)
G_MH_CONFIG = static(Array[u8, GUID_SIZE], guid_bytes(MH_CONFIG_GUID), readonly=True)


@function(small=True)
def selftest_check_map(b: Ptr[PtBuilder], va: u64, want_pa: u64, want_bits: u64) -> bool:
    bits: u64 = 0
    pa = pt_lookup(b, va, addr(bits))
    return pa == want_pa and bits == want_bits


@function(small=True)
def selftest_pagetables(pool: u64) -> u32:
    """Build a small mirror address space and walk it back: returns 0 or the failing check."""
    b: PtBuilder
    c = u64(1) << SELFTEST_C_BIT
    if pt_init(addr(b), pool, SELFTEST_POOL_PA, SELFTEST_POOL_PAGES, SELFTEST_C_BIT,
               SELFTEST_PHYS_BITS) != PT_OK:
        return 1
    if pt_map(addr(b), 0x100000, 0x7E00000000, 0x3000, MAP_X | MAP_ENC) != PT_OK:
        return 2
    if pt_map(addr(b), 0x200000, 0x7E00200000, 0x200000, MAP_W | MAP_ENC) != PT_OK:
        return 3
    if pt_map(addr(b), u64(1) << 32, u64(1) << 32, u64(1) << 31, MAP_W | MAP_ENC) != PT_OK:
        return 4
    if pt_map(addr(b), 0x600000, 0x600000, PAGE_SIZE, MAP_W) != PT_OK:
        return 5
    if pt_map(addr(b), 0x700000, 0x700000, PAGE_SIZE, MAP_W | MAP_X) == PT_OK:
        return 6  # W^X must be refused
    if not selftest_check_map(addr(b), 0x101234, 0x7E00001234, c):
        return 7
    if not selftest_check_map(addr(b), 0x3FFFF8, 0x7E003FFFF8, c | PTE_NX | PTE_RW | PTE_PS):
        return 8
    if not selftest_check_map(addr(b), (u64(1) << 32) + 0x40000010, (u64(1) << 32) + 0x40000010,
                              c | PTE_NX | PTE_RW | PTE_PS):
        return 9
    if not selftest_check_map(addr(b), 0x600008, 0x600008, PTE_NX | PTE_RW):
        return 10
    bits: u64 = 0
    if pt_lookup(addr(b), 0x800000, addr(bits)) != ~u64(0):
        return 11
    # the tables' own entries must point at the pool's mirror GPA, not at its VA
    pa_mask = ~u64(PAGE_SIZE - 1) & ~c & ((u64(1) << SELFTEST_PHYS_BITS) - 1)
    if (Ptr[u64](pool)[0] & pa_mask) != SELFTEST_POOL_PA + PAGE_SIZE:
        return 12
    return 0


@function(small=True)
def selftest_aead() -> u32:
    """Seal the known answer, compare, open it back, and check a flipped bit is refused
    without touching the output. Returns 0 or the failing check."""
    k = addr(KAT_DATA[0])
    kgk: Aes256Key
    rec: SivKeys
    buf: Array[u8, KAT_PT_LEN]
    out: Array[u8, KAT_PT_LEN]
    scratch: Array[u8, KAT_PT_LEN]
    tag: Array[u8, SIV_TAG_LEN]
    aes256_expand(k + K_KEY, addr(kgk))
    siv_seal(addr(kgk), k + K_IV, k + K_AAD, KAT_AAD_LEN, aad_base(k + K_PT, k + K_AAD,
                                                                   KAT_AAD_LEN),
             addr(scratch[0]), addr(buf[0]), KAT_PT_LEN, addr(tag[0]), addr(rec))
    if not bytes_eq(addr(buf[0]), k + K_CT, KAT_PT_LEN):
        return 1
    if not bytes_eq(addr(tag[0]), k + K_TAG, SIV_TAG_LEN):
        return 2
    base = aad_base(addr(out[0]), k + K_AAD, KAT_AAD_LEN)
    if siv_open(addr(kgk), k + K_IV, k + K_AAD, KAT_AAD_LEN, addr(buf[0]), base, KAT_PT_LEN,
                addr(tag[0]), addr(scratch[0]), addr(rec)) != SIV_OK:
        return 3
    if not bytes_eq(addr(out[0]), k + K_PT, KAT_PT_LEN):
        return 4
    for i in range(KAT_PT_LEN):
        out[i] = 0xEE
    buf[17] = buf[17] ^ 4
    if siv_open(addr(kgk), k + K_IV, k + K_AAD, KAT_AAD_LEN, addr(buf[0]), base, KAT_PT_LEN,
                addr(tag[0]), addr(scratch[0]), addr(rec)) != SIV_AUTH:
        return 5
    for i in range(KAT_PT_LEN):
        if out[i] != 0xEE:
            return 6
    return 0


@function(small=True)
def cpu_has_aesni() -> bool:
    _a, _b, c, _d = cpuid(CPUID_FEATURES_LEAF, 0)
    return (c & CPUID_1_ECX_AESNI) != 0 and (c & CPUID_1_ECX_PCLMULQDQ) != 0


@function(small=True)
def selftest(bs: Ptr[EfiBootServices]) -> bool:
    if not cpu_has_aesni():
        con_puts(addr(MSG_NO_AESNI[0]))
        return False
    g = selftest_aead()
    if g != 0:
        report(addr(MSG_AEAD_FAIL[0]), u64(g))
        return False
    con_puts(addr(MSG_AEAD_OK[0]))
    pool: u64 = 0
    st = efi_call(bs.AllocatePages, ALLOCATE_ANY_PAGES, EFI_BOOT_SERVICES_DATA,
                  SELFTEST_POOL_PAGES, addr(pool))
    if st != 0:
        report(addr(MSG_ALLOC_FAIL[0]), st)
        return False
    r = selftest_pagetables(pool)
    efi_call(bs.FreePages, pool, SELFTEST_POOL_PAGES)
    if r != 0:
        report(addr(MSG_PT_FAIL[0]), u64(r))
        return False
    con_puts(addr(MSG_PT_OK[0]))
    return True


@function(small=True)
def sev_c_bit() -> u32:
    """C-bit position if SEV is active, else 0. Active, as OVMF decides it: CPUID 0x8000001F
    reports SEV (EAX bit 1) and MSR_AMD64_SEV says it is enabled for this guest (bit 0); the
    MSR is read only once CPUID has promised it exists."""
    maxleaf, _b0, _c0, _d0 = cpuid(CPUID_MAX_EXT_LEAF, 0)
    if maxleaf < CPUID_SEV_LEAF:
        return 0
    a, b, _c, _d = cpuid(CPUID_SEV_LEAF, 0)
    if (a & CPUID_SEV_EAX_SEV) == 0:
        return 0
    if (rdmsr(MSR_AMD64_SEV) & MSR_AMD64_SEV_ENABLED) == 0:
        return 0
    return b & CPUID_SEV_EBX_CBIT_MASK


@function(abi="efi", name="efi_main", small=True)
def efi_main(image_handle: u64, system_table: u64) -> u64:
    st = Ptr[EfiSystemTable](system_table)
    con_set_conout(st.ConOut)
    con_puts(addr(MSG_BANNER[0]))
    if not selftest(Ptr[EfiBootServices](st.BootServices)):
        con_set_conout(0)
        if not cpu_has_aesni():
            return EFI_UNSUPPORTED  # not for this CPU: OVMF unloads the image
        return EFI_LOAD_ERROR  # a self-test failed: unloaded too, and the log says which
    con_puts(addr(MSG_SELFTEST_OK[0]))
    cbit = sev_c_bit()
    if cbit == 0:
        con_puts(addr(MSG_NO_SEV[0]))
        con_set_conout(0)
        return EFI_UNSUPPORTED  # not for this guest: OVMF unloads the image
    report(addr(MSG_SEV[0]), u64(cbit))
    active = activate(st, cbit)
    con_set_conout(0)
    if not active:
        return EFI_UNSUPPORTED  # no key or no mirror: nothing to serve, OVMF unloads the image
    return EFI_SUCCESS


@function(small=True)
def report(msg: Ptr[u8], value: u64) -> None:
    """One log line: `msg`, `value` in hex, a newline."""
    con_puts(msg)
    con_hex(value)
    con_puts(addr(MSG_NL[0]))


@function(small=True)
def activate(st: Ptr[EfiSystemTable], cbit: u32) -> bool:
    """SEV is on: fetch the key, set up the mirror's world, announce it. False if the helper
    cannot serve (no key, set-up failed): the driver then unloads and the guest boots without
    it (migration through the helper is refused)."""
    c = addr(CTX)
    if secret_find_key(st, addr(c.key[0])) != OK:
        con_puts(addr(MSG_NO_KEY[0]))
        return False
    p: SetupParams
    p.option = DEFAULT_OPTION
    p.shift_high = 0
    p.lanes = 0
    cfg = find_config_table(st, addr(G_MH_CONFIG[0]))
    if cfg != 0:
        p.option = Ptr[MhConfig](cfg).option
        p.shift_high = Ptr[MhConfig](cfg).shift_high
        p.lanes = Ptr[MhConfig](cfg).lanes
    _a, b, _c, _d = cpuid(CPUID_SEV_LEAF, 0)
    reduction = (b >> CPUID_SEV_EBX_REDUCTION_SHIFT) & CPUID_SEV_EBX_REDUCTION_MASK
    maxphy, _b2, _c2, _d2 = cpuid(CPUID_ADDR_SIZE_LEAF, 0)
    p.c_bit = cbit
    p.phys_bits = (maxphy & CPUID_ADDR_SIZE_EAX_PHYS_MASK) - reduction
    r = mirror_setup(c, Ptr[EfiBootServices](st.BootServices), addr(p))
    if r != OK:
        wipe(addr(c.key[0]), KEY_SIZE)
        report(addr(MSG_SETUP_FAIL[0]), u64(r))
        return False
    c.have_key = 1
    c.state = ST_IDLE
    report(addr(MSG_ACTIVE[0]), u64(p.option))
    report(addr(MSG_BOOTINFO[0]), lane0(c).mailbox)
    ack = announce(c)
    if ack != 0:
        report(addr(MSG_NO_ACK[0]), ack)
    return True
