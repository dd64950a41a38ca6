"""Throughput of guest code touching C=1 (private) memory vs plain unicorn RAM.

Why: the SEV memory controller must not slow guest code down (native unicorn speed);
this prints MB/s for the same byte-copy loop in both settings and their ratio (target >= 0.5).
Run: python bench/bench_memctl.py [--mib N] [--reps R]
"""

from __future__ import annotations

import argparse
import json
import time

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc
from unicorn import x86_const as X

from emulate.cpuid import CpuidModel
from emulate.flat import FlatGuest
from emulate.machine import VM
from emulate.memctl import MemoryController
from helperfw.codegen.emit import assemble


def copy_loop(src: int, dst: int, n: int, reps: int) -> bytes:
    return assemble(f"""
    mov ${reps}, %r8
2:
    movabs ${src}, %rsi
    movabs ${dst}, %rdi
    mov ${n}, %rcx
1:
    movb (%rsi), %al
    movb %al, (%rdi)
    inc %rsi
    inc %rdi
    dec %rcx
    jnz 1b
    dec %r8
    jnz 2b
    hlt
""")


def bench_sev(n: int, reps: int, cbit: int) -> float:
    mc = MemoryController(2 * n + (8 << 20))
    vm = VM(mc, cpuid=CpuidModel(cbit=cbit))
    g = FlatGuest(vm, ram_size=mc.size)
    src = g.place(bytes(range(256)) * (n // 256), writable=True, executable=False)
    dst = g.place(bytes(n), writable=True, executable=False)
    v = g.vcpu(g.place(copy_loop(src, dst, n, reps)))
    t = time.perf_counter()
    ex = v.run(budget=None)
    dt = time.perf_counter() - t
    assert ex.reason == "hlt", ex
    assert vm.read(dst, 256) == bytes(range(256))
    return n * reps / dt / 1e6


def bench_plain(n: int, reps: int) -> float:
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    src, dst, code_at = 0x100000, 0x100000 + n, 0x100000 + 2 * n
    code = copy_loop(src, dst, n, reps)
    uc.mem_map(0, 0x100000 + 2 * n + 0x10000, UC_PROT_ALL)
    uc.mem_write(src, bytes(range(256)) * (n // 256))
    uc.mem_write(code_at, code)
    uc.reg_write(X.UC_X86_REG_RSP, 0x8000)
    t = time.perf_counter()
    uc.emu_start(code_at, code_at + len(code))
    dt = time.perf_counter() - t
    assert uc.mem_read(dst, 256) == bytes(range(256))
    return n * reps / dt / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=4)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--cbit", type=int, default=51)
    a = ap.parse_args()
    n = a.mib << 20
    plain = bench_plain(n, a.reps)
    sev = bench_sev(n, a.reps, a.cbit)
    print(f"plain unicorn RAM      : {plain:8.1f} MB/s")
    print(f"C=1 via TLB fill+memctl: {sev:8.1f} MB/s")
    print(f"ratio                  : {sev / plain:.2f} (target >= 0.5)")
    # no `common` import here: tests/test_emu_speed.py loads this file by path
    print(json.dumps({"bench": "memctl", "mib": a.mib, "reps": a.reps, "cbit": a.cbit,
                      "plain_mbs": round(plain, 1), "sev_mbs": round(sev, 1),
                      "ratio": round(sev / plain, 2)}))


if __name__ == "__main__":
    main()
