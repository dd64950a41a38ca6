"""Hostile host, mailbox fuzzing.

Every CI run drives 100,000 fuzzed commands through the compiled session code natively (two
worker processes of 50,000, guarded buffers; see tests/hostile_fuzz.py for the generator and
every invariant) and 3 × 200 through the built .efi in its mirror VM, one run per address-space
option (faults, instruction budget and DRAM write tracking come from the emulator).
MH_FUZZ_LONG=1 runs ten times the native count and 3 × 6,000 in the mirror VM.

Where each invariant is checked:

| invariant | native (100k) | emulator (600) |
|---|---|---|
| never faults | SIGSEGV/SIGBUS kills the worker (reported with the command index) | every batch must end in HLT: no #PF/#GP/#UD/NPF |
| instruction budget | - (no instruction count natively) | `BATCH_BUDGET` = 5M per batch (worst measured: 3.86M, a refused maximal window with C-bit 51) |
| writes only RAM window / own data / mailbox | guard pages around context, mailbox, RAM, table pool; RAM read-only except the pages a RECV names; image .rodata read-only | UC_HOOK_MEM_WRITE on all DRAM except the data region and the mailbox; window writes only to pages of OK RECV entries |
| mailbox changes only where the op writes | byte diff | byte diff |
| no private plaintext in shared memory | leak scan of every changed mailbox byte (RAM, minted pages, K, K_s, K_a) | same (guest pages, minted pages, K as the helper holds it, K_s, K_a) |
| documented status | Control.status, every entry status, `processed` | same |
| SEND output exact, RECV installs exactly the authentic plaintext | AES-GCM-SIV check with the key | same |
| every status, entry status, state, record, token, reply and install is the reference model's (tests/hostile_model.py) | every command (rollbacks followed) | every command while in sync (resynced at the next *_BEGIN after a context rollback) |

A failure prints the command that replays it (seed and count fixed here).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helperfw.runtime import protocol as P
from tests import hostile_fuzz as F

ROOT = Path(__file__).resolve().parents[1]
LONG = os.environ.get("MH_FUZZ_LONG") == "1"
NATIVE_SEEDS = (70010, 70011)
NATIVE_PER_WORKER = 500_000 if LONG else 50_000
EMU_SEED = 70020
EMU_COMMANDS = 6_000 if LONG else 200


def replay_cmd(target: str, seed: int, n: int, option: str | None = None) -> str:
    opt = f" --option {option}" if option else ""
    return f"python -m tests.hostile_fuzz {target} --seed {seed} --commands {n}{opt}"


@pytest.fixture(scope="module", autouse=True)
def native_workers():
    """Start the native workers at module set-up: they run while the emulator tests do."""
    tmp = Path(tempfile.mkdtemp(prefix="mh-fuzz-"))
    procs = []
    for seed in NATIVE_SEEDS:
        prog = tmp / f"progress-{seed}"
        p = subprocess.Popen(
            [sys.executable, "-m", "tests.hostile_fuzz", "native", "--seed", str(seed),
             "--commands", str(NATIVE_PER_WORKER), "--progress", str(prog)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((seed, p, prog, time.perf_counter()))
    yield procs
    for _, p, _, _ in procs:
        if p.poll() is None:
            p.kill()


@pytest.mark.parametrize("option", ["shift", "tuples", "isolated"])
def test_fuzz_in_the_mirror_vm(option):
    seed = EMU_SEED + list(P.OPTION_NAMES.values()).index(option)
    print("replay:", replay_cmd("emu", seed, EMU_COMMANDS, option))
    t0 = time.perf_counter()
    rng = __import__("random").Random(seed ^ 0x7A11)
    target = F.EmuTarget(F.KEY, rng, {v: k for k, v in P.OPTION_NAMES.items()}[option])
    try:
        f = F.fuzz(target, seed, EMU_COMMANDS, replay=F.replay_command("emu", seed, option))
    except F.Violation as e:
        pytest.fail(str(e))
    print(f"emu {option}: {EMU_COMMANDS} commands in {time.perf_counter() - t0:.1f}s,",
          f"{f.stats['finished']} sessions finished;", dict(sorted(f.statuses.items())),
          dict(sorted(f.stats.items(), key=str)))
    assert f.stats["exact-steps"] > EMU_COMMANDS // 2  # the model decided most steps
    # the generator gets past validation: most batches run, pages move, epochs close
    assert f.statuses["OK"] > EMU_COMMANDS // 4 and f.statuses["entry:OK"] > 0
    assert f.statuses["E_EPOCH"] + f.statuses["E_INCOMPLETE"] + f.stats["finished"] > 0


def test_invariants_catch_planted_violations():
    """The checker has teeth: a leak into a slot, a page written without an OK RECV entry, an
    undocumented status and a stray mailbox write are each reported."""
    import random

    target = F.NativeTarget(F.KEY, random.Random(1))
    real = target.run

    def planted(kind):
        def run(index, command, slots, writable):
            out = real(index, command, slots, writable)
            after = bytearray(out.after)
            if kind == "leak":
                off = F.SLOTS_OFF + 5 * F.SLOT + 77
                after[off:off + 64] = target.page(0x1000)[:64]
            elif kind == "status":
                after[F.CTL_OFF + 16:F.CTL_OFF + 20] = (-99).to_bytes(4, "little", signed=True)
            elif kind == "stray":
                after[F.CMD_OFF] ^= 1
            elif kind == "page":
                out.changed_pages[0x3000] = bytes(F.PAGE)
            out.after = bytes(after)
            return out
        return run

    for kind in ("leak", "status", "stray", "page"):
        target.run = planted(kind)
        with pytest.raises(F.Violation):
            F.fuzz(target, 5, 50)
    target.run = real
    F.fuzz(target, 5, 200)


def test_fuzz_native_100k(native_workers):
    total = 0
    lines = []
    for seed, p, prog, t0 in native_workers:
        out, err = p.communicate(timeout=900)
        replay = replay_cmd("native", seed, NATIVE_PER_WORKER)
        if p.returncode != 0:
            idx = int.from_bytes(prog.read_bytes()[:8], "little") if prog.exists() else -1
            pytest.fail(f"native worker seed {seed} failed (rc {p.returncode}) at command "
                        f"{idx}:\n{err[-3000:]}\nreplay: {replay}")
        lines.append(out.strip())
        total += NATIVE_PER_WORKER
    print("\n".join(lines))
    print(f"native commands: {total}")
    assert total >= 100_000


@pytest.mark.parametrize("errata", ["stuck-ones", "stuck-value", "stuck-zero", "fail", "repeat",
                                    "fail-then-heal"])
def test_rdrand_errata_give_no_session(errata):
    """A RDRAND that returns a constant with CF=1 (known AMD errata), fails (CF=0) or repeats
    itself gives neither a session id nor a challenge: *_BEGIN says E_RNG and no session
    starts. Transient failures are retried: a generator that recovers within the retry bound
    still gives fresh, distinct values."""
    from tests.mirror_host import RAM, MirrorHost

    h = MirrorHost(47, P.OPT_TUPLES, seed=7044, track_writes=False)
    rd = h.mirror.rdrand
    {"stuck-ones": lambda: rd.stuck(), "stuck-value": lambda: rd.stuck(0x1234_5678_9ABC_DEF0),
     "stuck-zero": lambda: rd.stuck(0), "fail": lambda: rd.fail(), "repeat": lambda: rd.repeat(),
     "fail-then-heal": lambda: rd.fail(times=5)}[errata]()
    want = 0 if errata == "fail-then-heal" else F.ST["E_RNG"]
    for op in (P.OP_RECV_BEGIN, P.OP_SEND_BEGIN):
        r = h.command(op, ram_size=RAM, challenge=0xC4A1)
        assert r.status == want, (errata, op, F.name(r.status))
        if want == 0:
            reply = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size))
            assert reply.challenge not in (0, 2**64 - 1)
            assert h.command(P.OP_ABORT).status == 0
        else:
            assert h.command(P.OP_SEND, [(0x200000, 0)]).status == F.ST["E_BAD_STATE"]
