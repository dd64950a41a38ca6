"""Which tests a mutant must face: test groups, what each builds, and who reaches what.

(The tests that check the checkers themselves, "planted" in their names, are left out: they
show a checker catches a planted fault, not that the helper is right.)

Each group is one pytest invocation and the DSL roots its tests compile. A mutant of function
`f` runs the groups whose roots reach `f` in the compiler's own call graph (the transitive
closure `ModuleLowerer` lowers), cheapest first: native groups (seconds) before emulator groups
(which build and boot the firmware). A mutant that replaces a private copy by its shared source
cannot be seen natively (nothing races the helper there): the double-fetch detector runs first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from helperfw.dsl import Function
from tests.mutation.mutants import MODULES


@dataclass(frozen=True)
class Group:
    name: str
    args: tuple[str, ...]  # pytest arguments (files or node ids)
    roots: Callable[[], list[Function]]
    emulator: bool
    # the mutated modules it runs for: an emulator group adds nothing for code whose every
    # path the native groups drive with exact expectations (the AEAD against `cryptography`,
    # the secret-area parser on guarded buffers); it runs where the emulator sees more:
    # races (double fetch), the driver's load, the page tables in use, memory replay
    modules: frozenset[str] = frozenset(MODULES)


def _secrets() -> list[Function]:
    from helperfw.runtime import secrets

    return [secrets.mh_test_secret_area_key, secrets.mh_test_secret_find_key]


def _pagetables() -> list[Function]:
    from helperfw.runtime import pagetables

    return [pagetables.mh_test_pt_build, pagetables.mh_test_pt_lookup]


def _aead() -> list[Function]:
    from helperfw.runtime import gcmsiv

    return list(gcmsiv.TEST_FUNCTIONS)


def _session() -> list[Function]:
    from helperfw.runtime import session

    return [session.mh_test_process, session.mh_test_ctx_init]


def _firmware() -> list[Function]:
    from helperfw.build import firmware_roots

    return firmware_roots()


SESSION = frozenset({"session", "pagetables", "memops"})
AEAD = frozenset({"gcmsiv", "gcmsiv_keys", "gcmsiv_wide"})
GROUPS: tuple[Group, ...] = (
    Group("secrets", ("tests/test_secrets.py",), _secrets, False),
    Group("pagetables", ("tests/test_pagetables.py",), _pagetables, False),
    Group("aead", ("tests/test_gcmsiv.py", "tests/test_gcmsiv_wide.py"), _aead, False),
    Group("session", ("tests/test_hostile_model.py", "tests/test_session.py", "tests/test_lanes.py",
                      "tests/test_lanes_checks.py", "tests/test_hostile_state.py",
                      "tests/test_hostile_wipe.py::test_native_session_secrets_are_wiped",
                      "tests/test_hostile_wipe.py::test_native_each_batch_wipes_its_record_keys_and_plaintext",
                      "tests/test_hostile_wipe.py::test_native_session_end_wipes_a_written_back_scratch",
                      # sessions choose their AEAD path (runs on a VAES/VPCLMULQDQ host only)
                      "tests/test_gcmsiv_wide.py::test_forced_baseline_and_wide_sessions_interoperate",
                      "tests/test_hostile_stream.py::test_two_versions_of_a_page_in_one_epoch_native",
                      "tests/test_hostile_addrspace.py::test_window_overlapping_a_region_is_refused_native",
                      "-k", "not planted"),
          _session, False),
    # the image under SEV and SEV-ES: hypercalls through the GHCB, faults reported by the
    # helper's own handler (E_FAULT, FaultRecord), no register left to the host at an exit
    Group("emu-sev-es", ("tests/test_emu_sev_es_image.py",), _firmware, True,
          frozenset({"ghcb", "vcpu"})),
    # the path choice in the image: CPUID shapes, a CPUID lie (#UD, the path refused for good)
    Group("emu-wide", ("tests/test_gcmsiv_wide.py", "-k", "emulated"), _firmware, True,
          frozenset({"gcmsiv_wide", "gcmsiv", "session"})),
    # lanes in the image: publication preempted half-way, JOIN, lanes side by side
    Group("emu-lanes", ("tests/test_lanes_emu.py",), _firmware, True, frozenset({"session"})),
    Group("emu-boot", ("tests/test_emu_helper_image.py", "tests/test_mirror.py"), _firmware, True),
    Group("emu-doublefetch", ("tests/test_hostile_doublefetch.py", "-k", "not planted"),
          _firmware, True,
          SESSION | AEAD),
    Group("emu-rdrand", ("tests/test_hostile_rdrand.py",), _firmware, True,
          frozenset({"session"})),
    Group("emu-addrspace", ("tests/test_hostile_addrspace.py",), _firmware, True, SESSION),
    Group("emu-wipe", ("tests/test_hostile_wipe.py",), _firmware, True,
          SESSION | AEAD | {"vcpu"}),
    Group("emu-stream", ("tests/test_hostile_toctou.py", "tests/test_hostile_stream.py"),
          _firmware, True, SESSION),
    Group("emu-rollback", ("tests/test_hostile_rollback.py",), _firmware, True,
          frozenset({"session"}) | AEAD),
)
BY_NAME = {g.name: g for g in GROUPS}


def reach(group: Group) -> set[tuple[str, str]]:
    """(module, function) of every DSL function the group's roots compile (the compiler's own
    transitive closure, so it follows the sources as they are)."""
    return set(_reach(group.roots))


@functools.cache
def _reach(roots: Callable[[], list[Function]]) -> frozenset[tuple[str, str]]:
    """Per roots function: the emulator groups share the firmware's (lowered once)."""
    from helperfw.codegen.lower import ModuleLowerer

    ml = ModuleLowerer()
    ml.lower(roots())
    return frozenset((f.pyfunc.__module__.rsplit(".", 1)[-1], f.pyfunc.__name__)
                     for f in ml.functions)


def plan(module: str, function: str, operator: str,
         reaches: dict[str, set[tuple[str, str]]], native: bool = False) -> list[Group]:
    """The groups a mutant of module.function faces, in the order they run. `native`: only
    the native groups, and the double-fetch detector for a mutant that re-reads shared memory
    (nothing else can see one)."""
    gs = [g for g in GROUPS if (module, function) in reaches[g.name] and module in g.modules]
    if operator == "shared":  # only a racing host (the emulator) sees a second fetch
        gs.sort(key=lambda g: g.name != "emu-doublefetch")
    if native:
        gs = [g for g in gs if not g.emulator or
              (operator == "shared" and g.name == "emu-doublefetch")]
    return gs
