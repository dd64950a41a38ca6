"""A mutation worker: runs test groups against mutants inside one private copy of the tree.

Started by the runner with the copy as its working directory and PYTHONPATH. It imports the
heavy modules once (pytest, llvmlite, unicorn, cryptography, the helper's sources: none of the
DSL functions' ASTs is read, so each mutant's source is read fresh), then for each job from stdin
(one JSON line: a file, its mutated text, the groups to run) writes the mutant in and forks one
child per group: the child runs pytest and exits with its status (a mutant that is not valid
DSL, seen as a DslError from a test's build or, before an emulator group, from compiling its
roots, is "invalid", never "killed"). A child that crashes
(a native test's SIGSEGV) or overruns its timeout kills the mutant too. One JSON line per job
goes back on stdout; the children's output goes to a log file.
"""

from __future__ import annotations

import json
import linecache
import os
import signal
import sys
import time
from pathlib import Path

PYTEST_ARGS = ("-x", "-q", "-n", "0", "--no-header", "-p", "no:cacheprovider",
               "-p", "no:hypothesispytest", "-p", "no:benchmark", "-W", "ignore::pytest.PytestAssertRewriteWarning")
EXIT_INVALID = 97  # the mutant does not compile as DSL


def preload() -> None:
    """Import what every test needs, without touching any DSL function's AST."""
    import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
    import pytest  # noqa: F401
    import unicorn  # noqa: F401

    import emulate.attacker
    import emulate.machine
    import emulate.uefi  # noqa: F401
    import helperfw.build
    import helperfw.native  # noqa: F401
    import tests.hostile_common
    import tests.mirror_host
    import tests.mutation.groups
    import tests.session_host  # noqa: F401


class _DslErrors:
    """pytest plugin: notes a test that failed because the mutant does not compile (the
    build in a fixture raised DslError): the mutant is invalid, not killed."""

    def __init__(self) -> None:
        self.seen = ""

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed and "DslError" in str(report.longrepr) and not self.seen:
            self.seen = report.nodeid


def _child(group: str, check: bool, log: Path) -> None:
    """In the forked child: own process group, output to the log, then pytest. `check`: first
    compile the group's roots (for a group whose build runs in a subprocess, where a DslError
    would only show as a failed build)."""
    os.setpgid(0, 0)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    linecache.clearcache()
    from helperfw.dsl import DslError
    from tests.mutation.groups import BY_NAME

    g = BY_NAME[group]
    if check:
        from helperfw.codegen.lower import ModuleLowerer

        try:
            ModuleLowerer().lower(g.roots())
        except DslError as e:
            print(f"INVALID: {e.headline}", flush=True)
            os._exit(EXIT_INVALID)
    import pytest

    print(f"== {group}", flush=True)
    errors = _DslErrors()
    rc = pytest.main([*g.args, *PYTEST_ARGS], plugins=[errors])
    if rc and errors.seen:
        print(f"INVALID: {errors.seen} did not compile", flush=True)
        rc = EXIT_INVALID
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(rc))


def run_group(group: str, timeout: float, check: bool, log: Path) -> tuple[str, float]:
    """('pass' | 'fail' | 'crash' | 'timeout' | 'invalid' | 'error:<rc>', seconds)."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            _child(group, check, log)
        finally:
            os._exit(98)
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.perf_counter() - t0 > timeout:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return "timeout", time.perf_counter() - t0
        time.sleep(0.02)
    dt = time.perf_counter() - t0
    if os.WIFSIGNALED(status):
        return "crash", dt
    rc = os.WEXITSTATUS(status)
    return {0: "pass", 1: "fail", EXIT_INVALID: "invalid"}.get(rc, f"error:{rc}"), dt


def failing_test(log: Path) -> str:
    """The first failing test named in the log's short summary."""
    try:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith(("FAILED ", "ERROR ")):
                return line[:300]
    except OSError:
        pass
    return ""


def run_job(root: Path, job: dict) -> dict:
    path = root / job["file"]
    original = path.read_text() if job.get("source") is not None else None
    log = Path(job["log"])
    log.write_text("")
    out = {"id": job.get("id"), "runs": []}
    try:
        if original is not None:
            path.write_text(job["source"])
        for i, (group, timeout) in enumerate(job["groups"]):
            verdict, dt = run_group(group, timeout, check=i == 0 and bool(job.get("check")),
                                    log=log)
            out["runs"].append([group, verdict, round(dt, 2)])
            if verdict != "pass":
                out["detail"] = failing_test(log)
                break
    finally:
        if original is not None:
            path.write_text(original)
    return out


def main() -> int:
    root = Path.cwd()
    preload()
    for line in sys.stdin:
        if not line.strip():
            continue
        res = run_job(root, json.loads(line))
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
