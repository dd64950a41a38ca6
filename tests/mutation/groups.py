"""Which tests a mutant must face: test groups, what each builds, and who reaches what.

Each group is one pytest invocation and the DSL roots its tests compile. A mutant of function
`f` runs the groups whose roots reach `f` in the compiler's own call graph (the transitive
closure `ModuleLowerer` lowers), cheapest first: native groups (seconds) before emulator groups
(which build and boot the firmware). A mutant that replaces a private copy by its shared source
cannot be seen natively (nothing races the helper there): the double-fetch detector runs first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from helperfw.dsl import Function


@dataclass(frozen=True)
class Group:
    name: str
    args: tuple[str, ...]  # pytest arguments (files or node ids)
    roots: Callable[[], list[Function]]
    emulator: bool


def _secrets() -> list[Function]:
    from helperfw.runtime import secrets

    return [secrets.mh_test_secret_area_key]


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


GROUPS: tuple[Group, ...] = (
    Group("secrets", ("tests/test_secrets.py",), _secrets, False),
    Group("pagetables", ("tests/test_pagetables.py",), _pagetables, False),
    Group("aead", ("tests/test_gcmsiv.py",), _aead, False),
    Group("session", ("tests/test_session.py", "tests/test_hostile_model.py",
                      "tests/test_hostile_wipe.py::test_native_session_secrets_are_wiped",
                      "tests/test_hostile_stream.py::test_two_versions_of_a_page_in_one_epoch_native",
                      "tests/test_hostile_addrspace.py::test_window_overlapping_a_region_is_refused_native"),
          _session, False),
    Group("emu-doublefetch", ("tests/test_hostile_doublefetch.py",), _firmware, True),
    Group("emu-boot", ("tests/test_emu_helper_image.py", "tests/test_mirror.py"), _firmware, True),
    Group("emu-hostile", ("tests/test_hostile_wipe.py", "tests/test_hostile_addrspace.py",
                          "tests/test_hostile_toctou.py", "tests/test_hostile_stream.py"),
          _firmware, True),
    Group("emu-rollback", ("tests/test_hostile_rollback.py",), _firmware, True),
)
BY_NAME = {g.name: g for g in GROUPS}


def reach(group: Group) -> set[tuple[str, str]]:
    """(module, function) of every DSL function the group's roots compile (the compiler's own
    transitive closure, so it follows the sources as they are)."""
    from helperfw.codegen.lower import ModuleLowerer

    ml = ModuleLowerer()
    ml.lower(group.roots())
    return {(f.pyfunc.__module__.rsplit(".", 1)[-1], f.pyfunc.__name__) for f in ml.functions}


def plan(module: str, function: str, operator: str,
         reaches: dict[str, set[tuple[str, str]]]) -> list[Group]:
    """The groups a mutant of module.function faces, in the order they run."""
    gs = [g for g in GROUPS if (module, function) in reaches[g.name]]
    if operator == "shared":  # only a racing host (the emulator) sees a second fetch
        gs.sort(key=lambda g: g.name != "emu-doublefetch")
    return gs
