"""RDRAND that misbehaves: the helper takes no session id or challenge it cannot trust.

The host cannot intercept RDRAND, but CPUs can fail it (CF=0) or, with known AMD errata, return
a constant with CF=1. The helper's rule (docs/PROTOCOL.md, "RDRAND"): a draw is plausible if it
is neither 0 nor all ones nor the last value accepted; a result takes two plausible draws, the
second one being the result; after RDRAND_TRIES draws without one, *_BEGIN fails with E_RNG and
no session starts. Here the mirror VM's RDRAND returns scripted values (the emulator models the
instruction; a script stands in for a broken CPU), and every SEND_BEGIN / RECV_BEGIN must
return exactly the value the rule picks, or E_RNG.

Replay: `pytest tests/test_hostile_rdrand.py -k <case>`.
"""

from __future__ import annotations

import random

import pytest

from helperfw.runtime import protocol as P
from helperfw.runtime import session as S
from tests.hostile_common import ST, name
from tests.mirror_host import RAM, MirrorHost

ONES = 2**64 - 1
A, B, C, D = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888, 0x9999_AAAA_BBBB_CCCC, 0x0123_4567
TRIES = S.RDRAND_TRIES
FAIL = None  # a draw with CF=0


class Script:
    """RDRAND values in order, then a seeded generator: the VM's RDRAND source
    (emulate.rdrand's `draw` interface). A value of FAIL is a draw with CF=0 (value 0)."""

    def __init__(self, values: list[int | None]) -> None:
        self.values = list(values)
        self.rest = random.Random(7019)
        self.drawn = 0

    def draw(self, bits: int) -> tuple[int, bool]:
        self.drawn += 1
        v = self.values.pop(0) if self.values else self.rest.getrandbits(64)
        if v is FAIL:
            return 0, False
        return v & ((1 << bits) - 1), True


@pytest.fixture(scope="module")
def booted():
    h = MirrorHost(47, P.OPT_TUPLES, seed=7019)
    # the mirror vCPU's first run draws its staging-mask key (vcpu.draw_mask_key) before the
    # batch: one batch first, so each case's script feeds only the *_BEGIN it scripts
    assert h.command(P.OP_HELLO).status == 0
    return h, h.save()


def begin(h: MirrorHost, op: int, values: list[int]) -> tuple[str, int, Script]:
    """(status, the random value the reply carries, the script) of one *_BEGIN."""
    s = Script(values)
    h.mirror.rdrand = s
    r = h.command(op, ram_size=RAM, challenge=0xC4A1)
    reply = P.HelloReply.parse(h.read_slot(0, P.HelloReply.size))
    return name(r.status), reply.session_id if op == P.OP_SEND_BEGIN else reply.challenge, s


CASES = {  # script -> what the rule returns (None: E_RNG)
    "two-plausible": ([A, B], B),
    "zero-skipped": ([0, A, B], B),
    "ones-skipped": ([ONES, A, B], B),
    "repeat-skipped": ([A, A, B], B),
    "zero-between": ([A, 0, B], B),
    "cf0-skipped": ([FAIL, A, FAIL, B], B),
    "cf0-always": ([FAIL] * TRIES, None),
    "constant": ([C] * TRIES, None),
    "zeros": ([0] * TRIES, None),
    "ones": ([ONES] * TRIES, None),
    "alternating-zero": ([C, 0] * (TRIES // 2), None),
    "last-two-tries": ([0] * (TRIES - 2) + [A, B], B),
    "one-try-too-late": ([0] * (TRIES - 1) + [A, B], None),
}


@pytest.mark.parametrize("op", [P.OP_SEND_BEGIN, P.OP_RECV_BEGIN], ids=["send", "recv"])
@pytest.mark.parametrize("case", CASES)
def test_rdrand_rule(booted, op, case):
    h, saved = booted
    h.restore(saved)
    values, want = CASES[case]
    status, got, script = begin(h, op, values)
    if want is None:
        assert status == "E_RNG" and script.drawn == TRIES, (status, script.drawn)
        assert h.command(P.OP_SEND, [(0x400000, 0)]).status == ST["E_BAD_STATE"]  # no session
    else:
        assert status == "OK" and got == want, (status, hex(got))


def test_the_last_accepted_value_is_not_taken_again(booted):
    """A CPU stuck on its last output: the value a session took is refused for the next one
    (the previous accepted value is remembered across sessions)."""
    h, saved = booted
    h.restore(saved)
    assert begin(h, P.OP_SEND_BEGIN, [A, B])[:2] == ("OK", B)
    assert h.command(P.OP_ABORT).status == 0
    assert begin(h, P.OP_RECV_BEGIN, [B, C, D])[:2] == ("OK", D)
    assert h.command(P.OP_ABORT).status == 0
    status, _got, _s = begin(h, P.OP_SEND_BEGIN, [D] * TRIES)
    assert status == "E_RNG"
