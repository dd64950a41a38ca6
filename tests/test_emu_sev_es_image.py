"""The real helper image (built from the current sources) under SEV-ES in the host model: it
loads, self-tests and announces itself through OVMF-like #VC handling (its hypercalls reach the
host with their arguments through the GHCB), the mirror runs batches that exit by HLT only, a
CPU exception in the mirror reaches the host as E_FAULT with a FaultRecord (on SEV and SEV-ES),
the host API refuses SEV-ES registers, and preempting a batch at random instructions yields the
host no register under SEV-ES (all of them on plain SEV)."""

from __future__ import annotations

import random

import pytest

from emulate.attacker import HostHands
from emulate.host import Host, default_layout
from emulate.machine import RegisterAccessDenied, VCpu
from emulate.mailbox import HelperChannel, MailboxError
from helperfw.runtime import protocol as P
from helperfw.runtime.platform import KVM_HC_MAP_GPA_RANGE, SVM_EXIT_NPF, X86_TRAP_VC
from tests.hostile_common import Forger
from tests.mirror_host import efi_path, symbol_sizes, symbols

KEY = bytes(range(100, 132))
MEM = 32 << 20
CHALLENGE = 0x0123_4567_89AB_CDEF
SEED = 18_2026
PAGE = P.PAGE_SIZE


def boot(sev_es: bool, cbit: int = 47, option: int = P.OPT_TUPLES) -> tuple[Host, HelperChannel]:
    print("seed", SEED, "sev_es", sev_es, "cbit", cbit)
    host = Host("h", default_layout(MEM), cbit=cbit, seed=SEED, sev_es=sev_es)
    host.boot_helper(efi_path(), KEY, option)
    host.settle_private_views()
    ch = HelperChannel(host.mc, host.create_mirror())
    ch.hello()
    return host, ch


def guest_pages(host: Host, n: int) -> dict[int, bytes]:
    """n private pages of pc.ram outside the firmware area and the helper, with known content."""
    skip = {a for start, ln in host.helper_ram_ranges() for a in range(start, start + ln, PAGE)}
    rng = random.Random(SEED)
    out = {}
    ra = 8 << 20
    while len(out) < n:
        if ra not in skip:
            out[ra] = rng.randbytes(PAGE)
            host.vm.write(ra, out[ra], encrypted=True)
        ra += PAGE
    return out


def window(host: Host) -> int:
    return -(-host.ram_size // (2 << 20)) * (2 << 20)


@pytest.mark.parametrize("sev_es,cbit", [(True, 47), (True, 51), (False, 47)])
def test_image_loads_and_announces(sev_es: bool, cbit: int) -> None:
    """Under SEV-ES every CPUID and debug-port OUT of the driver is a #VC the firmware serves;
    its MAP_GPA_RANGE and ANNOUNCE arguments reach the host through the GHCB (a plain VMMCALL
    would pass RAX only); BootInfo says SEV-ES; the host cannot read the vCPU afterwards."""
    host, _ch = boot(sev_es, cbit)
    log = host.vm.debug_log
    assert b"selftest passed" in log and f"C-bit 0x{cbit:016x}".encode() in log
    info = host.info
    assert info is not None
    assert info.bootinfo.sev_status == (3 if sev_es else 1)
    if not sev_es:
        assert not host.vm.ghcb.log
        return
    exits = host.vm.ghcb.log
    assert {e.request for e in exits} >= {"CPUID", "IOIO", "VMMCALL"}
    calls = [e.inputs for e in exits if e.request == "VMMCALL"]
    mailbox = info.bootinfo.mailbox_gpa
    assert {"rax": KVM_HC_MAP_GPA_RANGE, "rbx": mailbox,
            "rcx": P.MAILBOX_PAGES * info.bootinfo.lanes,
            "rdx": 0}.items() <= calls[-2].items()
    assert {"rax": P.MH_HC_ANNOUNCE, "rbx": info.bootinfo_gpa,
            "rcx": P.PROTOCOL_VERSION.value}.items() <= calls[-1].items()
    with pytest.raises(RegisterAccessDenied):
        host.uefi.vcpu.get("rip")


@pytest.mark.parametrize("sev_es", [True, False])
def test_mirror_batches(sev_es: bool) -> None:
    """SEND_BEGIN, SEND, END_EPOCH, FINISH through the mirror: every exit is the HLT that ends
    a batch, but for SEND_BEGIN's GHCB MSR protocol CPUID requests under SEV-ES (the AEAD
    path's choice, gcmsiv_wide.wide_choose: the CPUID instruction would be a #VC; two here,
    leaf 1 has no AVX); the records open with the transport key to the guest's pages."""
    host, ch = boot(sev_es)
    pages = guest_pages(host, 8)
    sid = ch.send_begin(window(host), CHALLENGE)
    records = ch.send(list(pages))
    assert ch.token(P.OP_SEND_END_EPOCH)[:4] == b"MHE2"
    assert ch.token(P.OP_SEND_FINISH)[:4] == b"MHF2"
    forger = Forger(KEY, sid, CHALLENGE)
    assert [forger.open(r) for r in records] == list(pages.values())
    assert ch.exits == 5
    assert [e.request for e in ch.mirror.vm.ghcb.log] == (["CPUID_REQ"] * 2 if sev_es else [])


def image_hpas(host: Host, name: str) -> list[int]:
    base = host.uefi.image.base  # the main VM's VA == GPA; tuples maps it at the same VA
    gpa = base + symbols()[name]
    return HostHands.page_hpas(host.vm, gpa, symbol_sizes()[name])


def fault_record(host: Host, ch: HelperChannel):
    raw = host.mc.host_read(ch.mb + P.FAULT_OFFSET, P.FaultRecord.size)
    return P.FaultRecord.parse(raw)


@pytest.mark.parametrize("sev_es", [True, False])
def test_page_tables_replayed_give_e_fault_with_a_fault_record(sev_es: bool) -> None:
    """The host writes back its snapshot of the helper's page-table pool from before the RAM
    window was mapped (an allowed power: replay of private memory). SEND then takes a #PF in
    the mirror; the helper's own handler reports it: E_FAULT, a FaultRecord with vector 14,
    the faulting RIP as an image offset inside a function, CR2 in the window. The helper lives
    on: HELLO still answers."""
    host, ch = boot(sev_es)
    pages = guest_pages(host, 2)
    hands = HostHands(host.mc)
    pool = image_hpas(host, "PT_POOL")
    before = hands.snapshot(pool)
    ch.send_begin(window(host), CHALLENGE)
    hands.restore(before)
    r = ch.batch(P.OP_SEND, list(pages))
    assert r.status == P.E_FAULT.value
    rec = fault_record(host, ch)
    assert (rec.count, rec.vector) == (1, 14)
    assert rec.error_code & 1 == 0, "not present"
    name = host.uefi.image_symbolizer()(host.uefi.image.base + rec.rip)
    assert name and not name.startswith("image+"), name
    base = ch.mirror.ram_base
    assert base <= rec.cr2 < base + window(host)
    assert ch.batch(P.OP_HELLO).status == 0


def test_unmapped_window_is_a_vc_under_sev_es_and_an_exit_on_sev() -> None:
    """The host removes the memslot of the window's DIMM. Under SEV-ES the access is a #VC
    (NPF): the helper reports E_FAULT, vector 29, error code SVM_EXIT_NPF. On plain SEV it is
    an exit the host must handle (KVM: MMIO), so the batch never completes."""
    for sev_es in (True, False):
        host, ch = boot(sev_es)
        dimm = host.block("dimm0")
        m = ch.mirror
        slot = next(n for n, s in m.vm.slots.items() if s.label == "RAM window: dimm0")
        m.vm.set_user_memory_region(slot, 0, 0, 0)
        ch.send_begin(window(host), CHALLENGE)
        if not sev_es:
            with pytest.raises(MailboxError, match="NPF"):
                ch.batch(P.OP_SEND, [dimm.offset])
            continue
        r = ch.batch(P.OP_SEND, [dimm.offset])
        assert r.status == P.E_FAULT.value
        rec = fault_record(host, ch)
        assert (rec.vector, rec.error_code) == (X86_TRAP_VC, SVM_EXIT_NPF)


@pytest.mark.parametrize("sev_es", [True, False])
def test_host_api_and_registers(sev_es: bool) -> None:
    """SEV-ES: after launch the host API refuses every register of the main vCPU and of the
    mirror (read, write, whole-state snapshot). Plain SEV: all allowed."""
    host, ch = boot(sev_es)
    hands = HostHands(host.mc)
    for v in (host.uefi.vcpu, ch.vcpu):
        calls = [lambda v=v: v.get("rax"), lambda v=v: v.set("rip", 0),
                 lambda v=v: hands.registers(v, ["rsp"]), lambda v=v: hands.xmm(v),
                 lambda v=v: hands.snapshot_machine([v], [])]
        for call in calls:
            if sev_es:
                with pytest.raises(RegisterAccessDenied, match="SEV-ES vCPU"):
                    call()
            elif call is not calls[1]:  # (do not move a plain-SEV RIP: just read)
                call()


@pytest.mark.parametrize("sev_es", [True, False])
def test_preempting_a_batch_yields_no_register_under_sev_es(sev_es: bool) -> None:
    """The host stops the mirror at 40 random instructions of a SEND batch and reaches for the
    registers each time. SEV-ES: refused every time, the batch completes and its records are
    genuine. Plain SEV: the registers come back, XMM state included (the exposure SEV-ES
    closes)."""
    host, ch = boot(sev_es)
    pages = guest_pages(host, 16)
    sid = ch.send_begin(window(host), CHALLENGE)
    hands = HostHands(host.mc)
    rng = random.Random(SEED)
    stops = sorted(rng.sample(range(500, 100_000), 40))
    seen: dict[str, int] = {"denied": 0, "read": 0, "xmm_nonzero": 0}

    def grab(v: VCpu, n: int) -> None:
        try:
            hands.registers(v, ["rax", "rbx", "rsp", "rip"])
            xmm = hands.xmm(v)
        except RegisterAccessDenied:
            seen["denied"] += 1
            return
        seen["read"] += 1
        seen["xmm_nonzero"] += any(xmm)

    ch._run_mirror = lambda: hands.run_preempted(ch.vcpu, [(s, grab) for s in stops])
    records = ch.send(list(pages))
    assert Forger(KEY, sid, CHALLENGE).open(records[0]) == pages[next(iter(pages))]
    reached = seen["denied"] + seen["read"]
    assert reached >= 30, "most stops land inside the batch"
    if sev_es:
        assert seen == {"denied": reached, "read": 0, "xmm_nonzero": 0}
    else:
        assert seen["denied"] == 0 and seen["xmm_nonzero"] > 0
