"""Probe for issue 8's VAES question: AES-256 rounds with AES-NI (xmm) vs VAES (ymm), natively.

Not part of the helper. It checks, with the project's own LLVM (llvmlite) and target machine,
that (1) a function can carry its own "target-features" (+avx,+avx2,+vaes) inside a module built
for the firmware's -avx target, (2) llvm.x86.aesni.aesenc.256 selects to vaesenc ymm, and (3)
what that is worth: the same ECB kernel (8 registers in flight, 14 rounds, key schedule from the
helper's own aes256_expand) over 64 KiB, xmm (8 blocks in flight) vs ymm (16 blocks in flight).
Both outputs are checked against `cryptography`. See docs/PERFORMANCE.md, "VAES/VPCLMULQDQ".
Run: python bench/vaes_probe.py
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import lief
from common import best, json_line, machine
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from helperfw.codegen import emit
from helperfw.codegen.pipeline import build
from helperfw.native import NativeImage
from helperfw.runtime import gcmsiv

LANES = 8  # registers in flight: 8 blocks (xmm) or 16 blocks (ymm)
BIG = 1 << 16


def kernel(name: str, ymm: bool) -> str:
    """IR for `name(rk, in, out, groups)`: ECB-encrypt `groups` groups of LANES registers."""
    t = "<4 x i64>" if ymm else "<2 x i64>"
    vb = 32 if ymm else 16
    sfx = ".256" if ymm else ""
    out = [f"define void @{name}(ptr %rk, ptr %in, ptr %out, i64 %n) #{int(ymm)} {{", "entry:"]
    for r in range(15):
        out.append(f"  %kp{r} = getelementptr i8, ptr %rk, i64 {16 * r}")
        out.append(f"  %kx{r} = load <2 x i64>, ptr %kp{r}, align 1")
        lanes = "<i32 0, i32 1, i32 0, i32 1>" if ymm else "<i32 0, i32 1>"
        out.append(f"  %k{r} = shufflevector <2 x i64> %kx{r}, <2 x i64> %kx{r}, "
                   f"<{4 if ymm else 2} x i32> {lanes}")
    out += ["  br label %loop", "loop:", "  %i = phi i64 [0, %entry], [%i1, %loop]",
            f"  %off = mul i64 %i, {LANES * vb}", "  %src = getelementptr i8, ptr %in, i64 %off",
            "  %dst = getelementptr i8, ptr %out, i64 %off"]
    for j in range(LANES):
        out.append(f"  %ip{j} = getelementptr i8, ptr %src, i64 {j * vb}")
        out.append(f"  %d{j} = load {t}, ptr %ip{j}, align 1")
        out.append(f"  %s{j}_0 = xor {t} %d{j}, %k0")
    for r in range(1, 15):
        op = "aesenclast" if r == 14 else "aesenc"
        for j in range(LANES):
            out.append(f"  %s{j}_{r} = call {t} @llvm.x86.aesni.{op}{sfx}({t} %s{j}_{r - 1}, "
                       f"{t} %k{r})")
    for j in range(LANES):
        out.append(f"  %op{j} = getelementptr i8, ptr %dst, i64 {j * vb}")
        out.append(f"  store {t} %s{j}_14, ptr %op{j}, align 1")
    out += ["  %i1 = add i64 %i, 1", "  %c = icmp ult i64 %i1, %n",
            "  br i1 %c, label %loop, label %exit", "exit:", "  ret void", "}"]
    return "\n".join(out)


IR = f"""target triple = "{emit.TRIPLE}"
{kernel("ecb_xmm", False)}
{kernel("ecb_ymm", True)}
declare <2 x i64> @llvm.x86.aesni.aesenc(<2 x i64>, <2 x i64>)
declare <2 x i64> @llvm.x86.aesni.aesenclast(<2 x i64>, <2 x i64>)
declare <4 x i64> @llvm.x86.aesni.aesenc.256(<4 x i64>, <4 x i64>)
declare <4 x i64> @llvm.x86.aesni.aesenclast.256(<4 x i64>, <4 x i64>)
attributes #0 = {{ nounwind }}
attributes #1 = {{ nounwind "target-features"="+avx,+avx2,+vaes" }}
"""


def main() -> None:
    if not {"vaes", "avx2"} <= set(machine().get("flags", [])):
        sys.exit("this CPU has no VAES/AVX2: nothing to probe")
    mod = emit.optimize(IR, 2)
    asm = emit.emit_assembly(mod)
    assert "vaesenc\t%ymm" in asm or "vaesenc %ymm" in asm, "VAES ymm not selected"
    elf = lief.ELF.parse(list(emit.emit_object(mod)))
    text = bytes(elf.get_section(".text").content)
    syms = {s.name: s for s in elf.symbols if s.name in ("ecb_xmm", "ecb_ymm")}
    mem = mmap.mmap(-1, len(text), prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    mem[:] = text
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                             ctypes.c_uint64)
    fx, fy = proto(base + syms["ecb_xmm"].value), proto(base + syms["ecb_ymm"].value)

    key, data = os.urandom(32), os.urandom(BIG)
    img = NativeImage(build([gcmsiv.mh_test_aes256_expand]).image)
    kb, rk = ctypes.create_string_buffer(key, 32), ctypes.create_string_buffer(15 * 16)
    a = ctypes.addressof
    img.call("mh_test_aes256_expand", a(kb), a(rk))
    ib, ob = ctypes.create_string_buffer(data, BIG), ctypes.create_string_buffer(BIG)
    ref = Cipher(algorithms.AES(key), modes.ECB()).encryptor().update(data)
    res = {}
    for name, f, group in (("xmm", fx, LANES * 16), ("ymm", fy, LANES * 32)):
        f(a(rk), a(ib), a(ob), BIG // group)
        assert ob.raw == ref, f"{name} kernel disagrees with cryptography"

        def go(n: int, f=f, group=group) -> None:
            for _ in range(n):
                f(a(rk), a(ib), a(ob), BIG // group)

        res[f"aes_{name}_mbs"] = round(BIG / best(go, 100) / 1e6)
        res[f"aes_{name}_code_bytes"] = syms[f"ecb_{name}"].size
    res["ratio"] = round(res["aes_ymm_mbs"] / res["aes_xmm_mbs"], 2)
    print(f"AES-256 rounds over {BIG // 1024} KiB: AES-NI xmm ({LANES} blocks in flight) "
          f"{res['aes_xmm_mbs']} MB/s, VAES ymm ({2 * LANES} blocks) {res['aes_ymm_mbs']} MB/s, "
          f"ratio {res['ratio']}; code {res['aes_xmm_code_bytes']} vs "
          f"{res['aes_ymm_code_bytes']} bytes")
    print(json_line("vaes_probe", **res))


if __name__ == "__main__":
    main()
