"""The choice between the AEAD's two paths (helperfw/runtime/gcmsiv_wide.py): the wide kernels
only where CPUID and XCR0 allow them, once per session, the baseline for good after a fault.

The crypto of both paths is tested in tests/test_gcmsiv.py. Here: the helper's own CPUID/XGETBV
check against the OS's view of this CPU; the decision rule under every CPUID/XCR0 answer (the
reference interpreter with a modelled platform, so it runs on any host); native sessions on a
VAES CPU choose the wide path, and a forced baseline interoperates with it both ways; the
emulator (unicorn: no AVX) is always dispatched to the baseline, even when CPUID lies; and a
fault in the wide path (what a lying CPUID and XCR0 lead to on a CPU without VAES) ends the
batch with E_FAULT through the helper's exception handler, which refuses the wide path for good.
"""

from __future__ import annotations

import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

from helperfw.codegen.pipeline import build
from helperfw.interp import Env, InterpError, Interpreter, MmxMasks
from helperfw.native import NativeImage
from helperfw.runtime import gcmsiv
from helperfw.runtime import platform as PF
from helperfw.runtime import protocol as P
from helperfw.runtime import session as S
from helperfw.runtime.gcmsiv_wide import (
    WIDE_OFF,
    WIDE_ON,
    WIDE_REFUSED,
    cpu_wide_ok,
    wide_choose,
    wide_refuse,
)
from tests.host_cpu import HAS_WIDE, needs_wide
from tests.session_host import PAGE, NativeHelper, open_record

KEY = bytes(range(50, 82))
ALL_LEAF1 = PF.CPUID_1_ECX_OSXSAVE | PF.CPUID_1_ECX_AVX
ALL_LEAF7_ECX = PF.CPUID_7_ECX_VAES | PF.CPUID_7_ECX_VPCLMULQDQ
XCR0_OK = 1 | PF.XCR0_SSE | PF.XCR0_AVX  # x87, SSE, AVX


def test_cpu_wide_ok_agrees_with_the_os() -> None:
    """Natively, the helper's CPUID + XGETBV answer is Linux's: avx2, vaes and vpclmulqdq in
    /proc/cpuinfo (listed only when the OS enabled the AVX state). Runs on any x86-64."""
    img = NativeImage(build([gcmsiv.mh_test_cpu_wide_ok]).image)
    assert bool(img.call("mh_test_cpu_wide_ok")) == HAS_WIDE


class Platform(Env):
    """CPUID leaves 0, 1, 7 and XCR0 as a test sets them; every question is logged. With `es`
    (SEV-ES) the CPUID instruction is a #VC (the test fails), and the host answers the GHCB MSR
    protocol's CPUID requests from the same table (`bad_answer`: with another response code)."""

    def __init__(self, *, max_leaf: int = 0xD, ecx1: int = ALL_LEAF1,
                 ebx7: int = PF.CPUID_7_EBX_AVX2, ecx7: int = ALL_LEAF7_ECX,
                 xcr0: int = XCR0_OK, es: bool = False, bad_answer: bool = False) -> None:
        self.max_leaf, self.ecx1, self.ebx7, self.ecx7, self.xcr0 = max_leaf, ecx1, ebx7, ecx7, xcr0
        self.es, self.bad_answer = es, bad_answer
        self.ghcb_msr = 0x5000  # the firmware's GHCB registration: it must survive
        self.asked: list[tuple] = []

    def _leaf(self, leaf: int) -> tuple[int, int, int, int]:
        self.asked.append(("cpuid", leaf))
        if leaf > self.max_leaf:
            raise AssertionError(f"leaf {leaf:#x} asked beyond the maximum {self.max_leaf:#x}")
        return {0: (self.max_leaf, 0, 0, 0), 1: (0, 0, self.ecx1, 0),
                7: (0, self.ebx7, self.ecx7, 0)}.get(leaf, (0, 0, 0, 0))

    def cpuid(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        if self.es:
            raise AssertionError("CPUID under SEV-ES: a #VC, the batch would end with E_FAULT")
        return self._leaf(leaf)

    def rdmsr(self, msr: int) -> int:
        assert self.es and msr == PF.MSR_AMD64_SEV_ES_GHCB, hex(msr)
        return self.ghcb_msr

    def wrmsr(self, msr: int, value: int) -> None:
        assert self.es and msr == PF.MSR_AMD64_SEV_ES_GHCB, hex(msr)
        self.ghcb_msr = value

    def vmgexit(self) -> None:
        """The host's side of the MSR protocol's CPUID request (emulate/ghcb.py serves the
        emulator's the same way)."""
        msr = self.ghcb_msr
        assert msr & PF.GHCB_MSR_INFO_MASK == PF.GHCB_MSR_CPUID_REQ, hex(msr)
        reg, leaf = (msr >> 30) & 3, msr >> 32
        self.asked.append(("msr-protocol", leaf, reg))
        code = PF.GHCB_MSR_SEV_INFO_RESP if self.bad_answer else PF.GHCB_MSR_CPUID_RESP
        self.ghcb_msr = self._leaf(leaf)[reg] << 32 | reg << 30 | code

    def xgetbv(self, xcr: int) -> int:
        self.asked.append(("xgetbv", xcr))
        if not self.ecx1 & PF.CPUID_1_ECX_OSXSAVE:
            raise InterpError("xgetbv without CR4.OSXSAVE: #UD")
        return self.xcr0


SEV, SEV_ES = 1, 3  # MSR_AMD64_SEV as the driver reads it


def _ok(platform: Platform) -> bool:
    return bool(Interpreter(env=platform).call(cpu_wide_ok, platform.es))


@pytest.mark.parametrize("lacking, change", [
    ("nothing", {}),
    ("OSXSAVE", {"ecx1": PF.CPUID_1_ECX_AVX}),
    ("AVX", {"ecx1": PF.CPUID_1_ECX_OSXSAVE}),
    ("AVX2", {"ebx7": 0}),
    ("VAES", {"ecx7": PF.CPUID_7_ECX_VPCLMULQDQ}),
    ("VPCLMULQDQ", {"ecx7": PF.CPUID_7_ECX_VAES}),
    ("XCR0.AVX", {"xcr0": 1 | PF.XCR0_SSE}),
    ("XCR0.SSE", {"xcr0": 1 | PF.XCR0_AVX}),
    ("leaf 7", {"max_leaf": 6}),
])
@pytest.mark.parametrize("es", [False, True], ids=["sev", "sev-es"])
def test_the_wide_path_needs_every_feature_and_the_avx_state(lacking: str, change: dict,
                                                             es: bool) -> None:
    """The same rule on SEV (the CPUID instruction) and under SEV-ES (the GHCB MSR protocol's
    CPUID, one register per request; the instruction would be a #VC)."""
    p = Platform(**change, es=es)
    assert _ok(p) == (lacking == "nothing")
    if lacking in ("OSXSAVE", "AVX", "leaf 7"):  # XGETBV would be #UD without CR4.OSXSAVE
        assert ("xgetbv", 0) not in p.asked
    if lacking == "leaf 7":
        assert ("cpuid", 7) not in p.asked
    if es:
        assert p.ghcb_msr == 0x5000  # the firmware's GHCB registration is put back
        if lacking == "nothing":
            assert [a[1:] for a in p.asked if a[0] == "msr-protocol"] == [
                (0, PF.CPUID_EAX), (1, PF.CPUID_ECX), (7, PF.CPUID_EBX), (7, PF.CPUID_ECX)]


def test_a_malformed_msr_protocol_answer_reads_as_no_feature() -> None:
    """Under SEV-ES a host that answers a CPUID request with anything but a CPUID response for
    that register gets the baseline (every feature reads as absent)."""
    assert _ok(Platform(es=True))
    assert not _ok(Platform(es=True, bad_answer=True))


def test_a_session_chooses_and_a_refusal_is_for_good() -> None:
    it = Interpreter(env=Platform())
    assert it.call(wide_choose, WIDE_OFF.value, SEV) == WIDE_ON.value
    assert it.call(wide_choose, WIDE_ON.value, SEV) == WIDE_ON.value
    assert Interpreter(env=Platform(es=True)).call(wide_choose, WIDE_OFF.value,
                                                   SEV_ES) == WIDE_ON.value
    assert Interpreter(env=Platform(ebx7=0)).call(wide_choose, WIDE_ON.value,
                                                  SEV) == WIDE_OFF.value
    p = Platform()
    it = Interpreter(env=p)
    cell = it.memory.map(0x10000, bytearray(WIDE_ON.value.to_bytes(4, "little")))
    it.call(wide_refuse, 0x10000)  # what the #UD handler calls
    path = int.from_bytes(cell, "little")
    assert path == WIDE_REFUSED.value
    assert it.call(wide_choose, path, SEV) == WIDE_REFUSED.value
    assert it.call(wide_choose, path, SEV_ES) == WIDE_REFUSED.value
    assert p.asked == []  # CPUID is not even asked again


def _ctx_wide(h: NativeHelper) -> int:
    return int.from_bytes(h.read(h.ctx + S.HelperCtx.offset("wide"), 4), "little")


def _force_baseline(h: NativeHelper) -> None:
    """What wide_refuse does after a #UD: this helper's later sessions take the baseline."""
    h.write(h.ctx + S.HelperCtx.offset("wide"), WIDE_REFUSED.value.to_bytes(4, "little"))


@needs_wide
@pytest.mark.parametrize("src_path, dst_path", [("wide", "base"), ("base", "wide"),
                                                 ("wide", "wide")])
def test_forced_baseline_and_wide_sessions_interoperate(src_path: str, dst_path: str) -> None:
    """On a VAES CPU, sessions choose the wide path unless a fault refused it; records sealed
    on either path open with cryptography and on the other path, pages intact."""
    rng = random.Random(f"{src_path}-{dst_path}")
    src, dst = NativeHelper(KEY, self_pages=(60, 2)), NativeHelper(KEY, self_pages=(60, 2))
    for h, path in ((src, src_path), (dst, dst_path)):
        if path == "base":
            _force_baseline(h)
    pages = {a * PAGE: rng.randbytes(PAGE) for a in range(12)}
    for a, data in pages.items():
        src.set_page(a, data)
    status, challenge = dst.recv_begin()
    assert status == 0
    dst.session_id = sid = src.send_begin(challenge)
    for h, path in ((src, src_path), (dst, dst_path)):
        assert _ctx_wide(h) == (WIDE_ON.value if path == "wide" else WIDE_REFUSED.value)
    addrs = sorted(pages)
    statuses, records = src.send(addrs)
    assert statuses == [0] * len(addrs)
    for a, rec in zip(addrs, records, strict=True):
        assert open_record(KEY, sid, challenge, rec)[1] == pages[a]
    assert dst.recv(list(zip(addrs, records, strict=True))) == [0] * len(addrs)
    assert all(dst.page(a) == pages[a] for a in addrs)
    extra = 20 * PAGE  # one more record, tampered in its ciphertext: refused, page untouched
    src.set_page(extra, rng.randbytes(PAGE))
    (rec,) = src.send([extra])[1]
    bad = bytearray(rec)
    bad[64 + 1000] ^= 1
    before = dst.page(extra)
    assert dst.recv([(extra, bytes(bad))]) == [P.STATUS["E_AUTH"][0]]
    assert dst.page(extra) == before


# -- under emulation (unicorn has no AVX) ----------------------------------------------------

def _mirror_wide(host) -> int:
    """HelperCtx.wide of the emulated helper, read as the guest sees its private memory."""
    from helperfw.runtime.session import HelperCtx

    raw = host.vm.read(host.symbol_gpa("CTX") + HelperCtx.offset("wide"), 4, encrypted=True)
    return int.from_bytes(raw, "little")


def _lie_about_cpuid(c) -> None:
    """The host's CPUID model `c` for the mirror vCPU claims AVX, AVX2, VAES and VPCLMULQDQ."""
    a, b, ecx, d = c.query(PF.CPUID_FEATURES_LEAF, 0)
    c.overrides[(PF.CPUID_FEATURES_LEAF, 0)] = (a, b, ecx | ALL_LEAF1, d)
    c.overrides[(PF.CPUID_EXT_FEATURES_LEAF, 0)] = (0, PF.CPUID_7_EBX_AVX2, ALL_LEAF7_ECX, 0)


@pytest.mark.parametrize("cpuid", ["honest", "lying"])
def test_the_emulated_helper_takes_the_baseline(cpuid: str) -> None:
    """unicorn's vCPU has no AVX (a ymm instruction is #UD), and its XCR0 has no AVX state, so
    the helper takes the baseline even when the host's CPUID claims VAES: the XGETBV check is
    what saves it. A whole SEND then runs without a fault."""
    from tests.mirror_host import MirrorHost, pack_command

    host = MirrorHost(track_writes=False)
    if cpuid == "lying":
        _lie_about_cpuid(host.mirror.cpuid)
    r = host.batch(pack_command(P.OP_SEND_BEGIN, ram_size=64 << 20, challenge=0x5EED))
    assert (r.exit.reason, r.status) == ("hlt", 0), str(r.exit)
    assert _mirror_wide(host) == WIDE_OFF.value
    r = host.batch(pack_command(P.OP_SEND, [(0x200000, 0), (0x201000, 0)]))
    assert (r.exit.reason, r.status, r.entry_status) == ("hlt", 0, [0, 0]), str(r.exit)


class Resumed(Exception):
    """mh_fault left through resume_at (it never returns)."""


class FaultPlatform(Env):
    """What mh_fault asks of the platform, for the interpreter: CR2, the image base, an entry's
    address; resume_at ends the call."""

    def read_cr2(self) -> int:
        return 0x7000

    def symbol_addr(self, name: str) -> int:
        return 0x100000

    def func_addr(self, fn: object) -> int:
        return 0x123456

    def resume_at(self, rsp: int, rip: int) -> None:
        raise Resumed


MAILBOX = 0x40000


def _fault(vector: int) -> tuple[Interpreter, int]:
    """The helper in a sending session on the wide path takes exception `vector` in a batch:
    mh_fault, on the interpreter. Returns the interpreter and CTX's address."""
    from helperfw.runtime import vcpu

    it = Interpreter(env=FaultPlatform())
    it.memory.map(MAILBOX, bytearray(4 * PAGE))
    ctx = it.static_addr(S.CTX)
    # one lane, lane 0 in CTX, whose stack holds the frame (mh_fault finds its lane from it)
    it.call(S.init_lane, ctx, 0, ctx + S.LANE0, MAILBOX, 0x20000 + PAGE)
    for field, size, value in (("nlanes", 4, 1), ("wide", 4, WIDE_ON.value),
                               ("state", 4, P.ST_SENDING), ("cur_bell", 8, 5)):
        it.memory.write(ctx + S.HelperCtx.offset(field), value.to_bytes(size, "little"))
    frame = it.memory.map(0x20000, bytearray(vcpu.IsrFrame.size))
    frame[0:8] = vector.to_bytes(8, "little")
    with pytest.raises(Resumed):
        it.call(vcpu.mh_fault, 0x20000)
    return it, ctx


def test_a_fault_in_the_wide_path_ends_as_a_status() -> None:
    """A host that lies in CPUID and XCR0 on a CPU without VAES gets the helper into the wide
    path, whose first ymm instruction is #UD. The helper's handler (vcpu.mh_fault) ends the
    batch with E_FAULT, records vector 6, and refuses the wide path: the next session chooses
    the baseline whatever CPUID says. Any other exception leaves the path alone (the host could
    otherwise demote it with a page it takes away). Without the wide_refuse call the path stays
    WIDE_ON and the next session faults again. Run on the interpreter, which runs the handler
    itself; the emulator runs the whole story below."""
    def u(it: Interpreter, a: int, n: int) -> int:
        return int.from_bytes(it.memory.read(a, n), "little")

    it, ctx = _fault(PF.X86_TRAP_UD)
    ctl = MAILBOX + P.CONTROL_OFFSET
    assert u(it, ctl + P.Control.offset("status"), 4) == P.STATUS["E_FAULT"][0] & 0xFFFFFFFF
    assert u(it, ctl + P.Control.offset("completed"), 8) == 5
    rec = P.FaultRecord.parse(it.memory.read(MAILBOX + P.FAULT_OFFSET, P.FaultRecord.size))
    assert (rec.count, rec.vector) == (1, PF.X86_TRAP_UD)
    assert u(it, ctx + S.HelperCtx.offset("state"), 4) == P.ST_ABORTED
    path = u(it, ctx + S.HelperCtx.offset("wide"), 4)
    assert path == WIDE_REFUSED.value
    assert Interpreter(env=Platform()).call(wide_choose, path, SEV) == WIDE_REFUSED.value
    for vector in (13, 14, PF.X86_TRAP_VC):  # #GP, #PF, #VC: nothing to do with VAES
        it, ctx = _fault(vector)
        assert u(it, ctx + S.HelperCtx.offset("wide"), 4) == WIDE_ON.value


def _boot(sev_es: bool):
    """The real image loaded by the UEFI stand-in in a VM with SEV (and SEV-ES), its mirror
    created: (host, channel)."""
    from emulate.host import Host, default_layout
    from emulate.mailbox import HelperChannel
    from tests.mirror_host import efi_path

    host = Host("h", default_layout(32 << 20), cbit=47, seed=12_2026, sev_es=sev_es)
    host.boot_helper(efi_path(), KEY, P.OPT_TUPLES)
    host.settle_private_views()
    ch = HelperChannel(host.mc, host.create_mirror())
    ch.hello()
    return host, ch


def _ctx_wide_of(host) -> int:
    """HelperCtx.wide of the emulated helper, as the guest sees its private memory."""
    from tests.mirror_host import symbols

    gpa = host.uefi.image.base + symbols()["CTX"] + S.HelperCtx.offset("wide")
    return int.from_bytes(host.vm.read(gpa, 4, encrypted=True), "little")


def _cpu_with_avx_state(host, ch) -> None:
    """The mirror's XGETBV answers XCR0 = x87|SSE|AVX: unicorn cannot enable the AVX state, so
    a code hook on the image's one XGETBV plays it. With the CPUID below that is the host's lie
    on a CPU without VAES (unicorn has no AVX at all)."""
    from unicorn import UC_HOOK_CODE
    from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RDX, UC_X86_REG_RIP

    img = host.uefi.image
    code = host.vm.read(img.base, img.size, encrypted=True)
    at = [i for i in range(len(code) - 2) if code[i:i + 3] == b"\x0f\x01\xd0"]
    assert len(at) == 1, f"XGETBV found {len(at)} times in the image"
    va = img.base + at[0]  # the mirror maps the image at VA = GPA

    def xgetbv(uc, address, size, _ud) -> None:
        uc.reg_write(UC_X86_REG_RAX, XCR0_OK)
        uc.reg_write(UC_X86_REG_RDX, 0)
        uc.reg_write(UC_X86_REG_RIP, address + 3)
    ch.vcpu.uc.hook_add(UC_HOOK_CODE, xgetbv, None, va, va)


@pytest.mark.parametrize("sev_es", [False, True], ids=["sev", "sev-es"])
@pytest.mark.parametrize("host_says", ["honest", "vaes"])
def test_the_emulated_mirror_chooses_and_survives_a_lie(sev_es: bool, host_says: str) -> None:
    """The real image in its mirror, on SEV and under SEV-ES. The choice at SEND_BEGIN never
    faults: under SEV-ES CPUID comes by the GHCB MSR protocol (four requests; the instruction
    would be a #VC and end the batch with E_FAULT). An honest host (unicorn's CPUID: no AVX)
    gets the baseline and a working SEND. A host that claims AVX, AVX2, VAES and VPCLMULQDQ,
    with the AVX state enabled in XCR0, on this CPU without them (unicorn) gets the wide path
    chosen, as a VAES CPU would: its SEND's first ymm instruction is #UD, which the helper's
    handler ends with E_FAULT (FaultRecord: vector 6), refusing the path; the next session
    takes the baseline without asking CPUID again, and its records are genuine."""
    from tests.hostile_common import Forger

    host, ch = _boot(sev_es)
    if host_says == "vaes":
        _lie_about_cpuid(ch.mirror.vm.cpuid)
        _cpu_with_avx_state(host, ch)
    pages = {ra: random.Random(ra).randbytes(PAGE) for ra in range(8 << 20, 8 << 20 | 4 * PAGE,
                                                                    PAGE)}
    for ra, data in pages.items():
        host.vm.write(ra, data, encrypted=True)
    window = 32 << 20
    sid = ch.send_begin(window, 0xC0FFEE)
    ghcb = [e.request for e in ch.mirror.vm.ghcb.log]
    # SEV-ES: one request per register until a feature is missing (leaf 1's AVX, honestly)
    assert ghcb == ["CPUID_REQ"] * (0 if not sev_es else 4 if host_says == "vaes" else 2)
    if host_says == "vaes":
        assert _ctx_wide_of(host) == WIDE_ON.value
        r = ch.batch(P.OP_SEND, list(pages))
        assert r.status == P.STATUS["E_FAULT"][0]
        rec = P.FaultRecord.parse(host.mc.host_read(ch.mb + P.FAULT_OFFSET, P.FaultRecord.size))
        assert (rec.count, rec.vector) == (1, PF.X86_TRAP_UD)
        assert _ctx_wide_of(host) == WIDE_REFUSED.value
        sid = ch.send_begin(window, 0xC0FFEF)
        assert [e.request for e in ch.mirror.vm.ghcb.log] == ghcb  # CPUID not asked again
        assert _ctx_wide_of(host) == WIDE_REFUSED.value
        forger = Forger(KEY, sid, 0xC0FFEF)
    else:
        assert _ctx_wide_of(host) == WIDE_OFF.value
        forger = Forger(KEY, sid, 0xC0FFEE)
    records = ch.send(list(pages))
    assert [forger.open(r) for r in records] == list(pages.values())


CPUID_SHAPES = [  # (what the host's CPUID says on top of the full lie, the path expected)
    ("everything, max leaf exactly 7", {"max_leaf": 7}, WIDE_ON),
    ("max leaf 6: no leaf 7", {"max_leaf": 6}, WIDE_OFF),
    ("no OSXSAVE", {"leaf1_clear": PF.CPUID_1_ECX_OSXSAVE}, WIDE_OFF),
    ("no AVX", {"leaf1_clear": PF.CPUID_1_ECX_AVX}, WIDE_OFF),
    ("no AVX2, FSGSBASE (EBX bit 0) instead", {"leaf7_ebx": 1}, WIDE_OFF),
    ("no VAES", {"leaf7_ecx_clear": PF.CPUID_7_ECX_VAES}, WIDE_OFF),
    ("no VPCLMULQDQ", {"leaf7_ecx_clear": PF.CPUID_7_ECX_VPCLMULQDQ}, WIDE_OFF),
]


def test_the_emulated_choice_needs_every_feature() -> None:
    """One mirror, one session per CPUID shape (each a lie on top of unicorn, XCR0 played with
    the AVX state on): the helper takes the wide path only when every bit it checks is there,
    and leaf 7 only when the maximum standard leaf reaches it."""
    host, ch = _boot(False)
    _cpu_with_avx_state(host, ch)
    c = ch.mirror.vm.cpuid
    for i, (what, shape, want) in enumerate(CPUID_SHAPES):
        c.overrides.clear()
        _lie_about_cpuid(c)
        a, b, ecx, d = c.query(PF.CPUID_STD_MAX_LEAF, 0)
        c.overrides[(PF.CPUID_STD_MAX_LEAF, 0)] = (shape.get("max_leaf", max(a, 7)), b, ecx, d)
        a, b, ecx, d = c.query(PF.CPUID_FEATURES_LEAF, 0)
        c.overrides[(PF.CPUID_FEATURES_LEAF, 0)] = (a, b, ecx & ~shape.get("leaf1_clear", 0), d)
        c.overrides[(PF.CPUID_EXT_FEATURES_LEAF, 0)] = (
            0, shape.get("leaf7_ebx", PF.CPUID_7_EBX_AVX2),
            ALL_LEAF7_ECX & ~shape.get("leaf7_ecx_clear", 0), 0)
        ch.send_begin(32 << 20, 0xC0DE00 + i)
        assert _ctx_wide_of(host) == want.value, what
        ch.abort()


# -- both paths on the interpreter (any host: the wide intrinsics and the masks are modelled) ---

@pytest.mark.parametrize("path", [WIDE_OFF.value, WIDE_ON.value], ids=["base", "wide"])
@pytest.mark.parametrize("n", [0, 255, 256, 529, 1024])
def test_both_paths_on_the_interpreter(path: int, n: int) -> None:
    """The AEAD's firmware code, both paths, on the reference interpreter with the MMX-held
    masks modelled (MmxMasks): a record sealed and opened agrees with cryptography, the stage
    and the scratch hold the page masked exactly as the tests/test_gcmsiv.py model says, and a
    tampered record is refused with the page untouched. This holds the wide kernels' source to
    the intrinsics' models on a CPU without VAES too."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

    from helperfw.interp import MmxMasks
    from tests.test_gcmsiv import MKEY, masked, scratch_ids, stage_ids

    rng = random.Random(f"interp-{path}-{n}")
    key, nonce, aad, pt = rng.randbytes(32), rng.randbytes(12), rng.randbytes(48), rng.randbytes(n)
    it = Interpreter(env=MmxMasks())
    base = 0x100000
    mem = it.memory.map(base, bytearray(0x8000))
    lay = {"key": 0, "nonce": 64, "aad": 128, "mkey": 192, "tag": 208, "pt": 0x1000,
           "stage": 0x2000, "ct": 0x3000, "out": 0x4000, "scratch": 0x5000}
    for name, data in (("key", key), ("nonce", nonce), ("aad", aad), ("pt", pt),
                       ("mkey", b"".join(x.to_bytes(8, "little") for x in MKEY))):
        mem[lay[name]:lay[name] + len(data)] = data
    at = {name: base + off for name, off in lay.items()}
    it.call(gcmsiv.mh_test_siv_seal, at["key"], at["nonce"], at["aad"], 48, at["pt"],
            at["stage"], at["ct"], n, at["tag"], path, at["mkey"])
    record = bytes(mem[lay["ct"]:lay["ct"] + n] + mem[lay["tag"]:lay["tag"] + 16])
    assert record == AESGCMSIV(key).encrypt(nonce, pt, aad)
    assert bytes(mem[lay["stage"]:lay["stage"] + n]) == masked(pt, stage_ids(n))
    r = it.call(gcmsiv.mh_test_siv_open, at["key"], at["nonce"], at["aad"], 48, at["ct"],
                at["out"], n, at["tag"], at["scratch"], path, at["mkey"])
    assert r == gcmsiv.SIV_OK and bytes(mem[lay["out"]:lay["out"] + n]) == pt
    assert bytes(mem[lay["scratch"]:lay["scratch"] + n]) == masked(pt, scratch_ids(at["out"], n))
    mem[lay["out"]:lay["out"] + n] = bytes(n)
    mem[lay["tag"]] ^= 1
    r = it.call(gcmsiv.mh_test_siv_open, at["key"], at["nonce"], at["aad"], 48, at["ct"],
                at["out"], n, at["tag"], at["scratch"], path, at["mkey"])
    assert r == gcmsiv.SIV_AUTH and bytes(mem[lay["out"]:lay["out"] + n]) == bytes(n)


# -- the rewinds on an emulated VAES CPU (the interpreter), with the defences' controls --------

class NoMasks(MmxMasks):
    """The platform without the register-anchored masks (every mask zero; the page is still
    bound through mm4): the code before that defence, for the controls below."""

    def _m(self, block_id: int) -> int:
        return 0


INTERP_AT = {"key": 0, "nonce": 64, "aad": 128, "mkey": 192, "tag": 208, "pt": 0x1000,
             "stage": 0x2000, "ct": 0x3000, "out": 0x4000, "scratch": 0x5000, "old": 0x6000}


class InterpSiv:
    """The AEAD's C-ABI test wrappers on the reference interpreter (any host: it models VAES,
    VPCLMULQDQ and the MMX-held masks), buffers at fixed addresses of one mapped region."""

    BASE = 0x100000

    def __init__(self, env: MmxMasks, path: int, key: bytes, aad: bytes) -> None:
        from tests.test_gcmsiv import MKEY

        self.it, self.path, self.aad_len = Interpreter(env=env), path, len(aad)
        self.mem = self.it.memory.map(self.BASE, bytearray(0x7000))
        self.put("key", key)
        self.put("aad", aad)
        self.put("mkey", b"".join(x.to_bytes(8, "little") for x in MKEY))

    def a(self, name: str) -> int:
        return self.BASE + INTERP_AT[name]

    def put(self, name: str, data: bytes) -> None:
        self.mem[INTERP_AT[name]:INTERP_AT[name] + len(data)] = data

    def get(self, name: str, n: int) -> bytes:
        return bytes(self.mem[INTERP_AT[name]:INTERP_AT[name] + n])

    def seal_rewound(self, nonce: bytes, pt: bytes, old: bytes, serial: int) -> bytes:
        """The record of pt sealed under `serial`, the stage replaced by old between the
        passes (mh_test_siv_seal_rewound)."""
        n = len(pt)
        self.put("nonce", nonce)
        self.put("pt", pt)
        self.put("old", old)
        self.it.call(gcmsiv.mh_test_siv_seal_rewound, self.a("key"), self.a("nonce"),
                     self.a("aad"), self.aad_len, self.a("pt"), self.a("stage"), self.a("ct"),
                     n, self.a("tag"), self.path, self.a("mkey"), self.a("old"), serial)
        return self.get("ct", n) + self.get("tag", 16)

    def open_rewound(self, nonce: bytes, record: bytes, old: bytes, serial: int,
                     check: int = 1) -> int:
        """mh_test_siv_open_rewound of record into `out`, the scratch replaced by old between
        the tag check and the copy-out."""
        n = len(record) - 16
        self.put("nonce", nonce)
        self.put("ct", record[:n])
        self.put("tag", record[n:])
        self.put("old", old)
        return self.it.call(gcmsiv.mh_test_siv_open_rewound, self.a("key"), self.a("nonce"),
                            self.a("aad"), self.aad_len, self.a("ct"), self.a("out"), n,
                            self.a("tag"), self.a("scratch"), self.path, self.a("mkey"),
                            self.a("old"), serial, check)


def _blocks_of(page: bytes, got: bytes) -> int:
    return len([j for j in range(0, len(page), 16) if got[j:j + 16] == page[j:j + 16]])


@pytest.mark.parametrize("masks", ["masks", "no-masks"])
@pytest.mark.parametrize("path", [WIDE_ON.value, WIDE_OFF.value], ids=["wide", "base"])
def test_stage_rewind_on_an_emulated_vaes_cpu(path: int, masks: str) -> None:
    """test_hostile_rollback's stage rewind (tests/test_gcmsiv.py's native form) with the wide
    path forced on an emulated VAES CPU: one nonce for page Y, page X, then X with the stage
    written back between the passes to Y's, in the next record (mm5 moved on). With the masks
    the third record XOR the second XOR X is noise; without them (NoMasks, the control) it is
    all of Y: the test fails without the defence."""
    from tests.test_gcmsiv import masked, stage_ids

    rng = random.Random(f"interp-stage-{path}")
    key, nonce, aad = rng.randbytes(32), rng.randbytes(12), rng.randbytes(48)
    page_x, page_y = rng.randbytes(PAGE), rng.randbytes(PAGE)
    env = MmxMasks() if masks == "masks" else NoMasks()
    siv = InterpSiv(env, path, key, aad)
    own_y = masked(page_y, stage_ids(PAGE)) if masks == "masks" else page_y
    siv.seal_rewound(nonce, page_y, own_y, 1)  # no rewind: the stage is what it holds anyway
    stage_y = siv.get("stage", PAGE)
    assert stage_y == own_y
    own_x = masked(page_x, stage_ids(PAGE)) if masks == "masks" else page_x
    rec_x = siv.seal_rewound(nonce, page_x, own_x, 1)
    assert rec_x == AESGCMSIV(key).encrypt(nonce, page_x, aad)
    rec_x2 = siv.seal_rewound(nonce, page_x, stage_y, 2)
    guess = bytes(a ^ b ^ c for a, b, c in zip(rec_x2, rec_x, page_x))
    assert _blocks_of(page_y, guess) == (0 if masks == "masks" else PAGE // 16)


@pytest.mark.parametrize("defence", ["masks+check", "masks", "check", "none"])
@pytest.mark.parametrize("path", [WIDE_ON.value, WIDE_OFF.value], ids=["wide", "base"])
def test_scratch_rewind_on_an_emulated_vaes_cpu(path: int, defence: str) -> None:
    """The destination's scratch written back, between record B's tag check and its copy-out,
    to what it held for record A, opened just before into the same page (next serial), with
    the wide path forced on an emulated VAES CPU. With the copy-out's check B is zeroed and
    SIV_CHANGED; with the masks alone noise is installed with SIV_OK; with neither (the
    control) page A is installed at B with SIV_OK."""
    from tests.test_gcmsiv import masked, scratch_ids

    rng = random.Random(f"interp-scratch-{path}")
    key, aad = rng.randbytes(32), rng.randbytes(48)
    page_a, page_b = rng.randbytes(PAGE), rng.randbytes(PAGE)
    na, nb = rng.randbytes(12), rng.randbytes(12)
    rec_a = AESGCMSIV(key).encrypt(na, page_a, aad)
    rec_b = AESGCMSIV(key).encrypt(nb, page_b, aad)
    env = MmxMasks() if "masks" in defence else NoMasks()
    check = int("check" in defence)
    siv = InterpSiv(env, path, key, aad)
    out = siv.a("out")
    own_a = masked(page_a, scratch_ids(out, PAGE)) if "masks" in defence else page_a
    assert siv.open_rewound(na, rec_a, own_a, 1, check) == gcmsiv.SIV_OK  # no rewind: A
    assert siv.get("out", PAGE) == page_a and siv.get("scratch", PAGE) == own_a
    r = siv.open_rewound(nb, rec_b, own_a, 2, check)
    got = siv.get("out", PAGE)
    if check:
        assert (r, got) == (gcmsiv.SIV_CHANGED, bytes(PAGE))
    else:
        assert r == gcmsiv.SIV_OK and got != page_b
        assert _blocks_of(page_a, got) == (0 if defence == "masks" else PAGE // 16)
