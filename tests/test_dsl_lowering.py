"""Compiler front end: struct layouts three ways, DSL errors with file:line:col, link checks,
reproducibility."""

from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import llvmlite.binding as llvm
import pytest

from helperfw import DslError
from helperfw.codegen import emit, link
from helperfw.codegen.pipeline import build
from helperfw.interp import Interpreter
from helperfw.native import NativeImage
from tests import dsl_samples as S
from tests.dsl_snippets import load_module

STRUCTS = [S.Inner, S.Mixed, S.Packed]


def _llvm_offsets(t):
    td = llvm.create_target_data(emit.data_layout())
    mod = llvm.parse_assembly(f"%T = type {t.llvm()}\n@g = external global %T\n")
    ty = mod.get_global_variable("g").global_value_type
    return td.get_abi_size(ty), {
        name: td.get_element_offset(ty, t.field_index(name)) for name in t.fields
    }


@pytest.mark.parametrize("t", STRUCTS, ids=lambda t: t.name)
def test_struct_offsets_agree_llvm_construct_and_gcc(t, tmp_path: Path):
    # 1. LLVM's data layout
    size, offs = _llvm_offsets(t)
    assert size == t.size
    assert offs == {n: f.offset for n, f in t.fields.items()}
    # 2. construct: build a struct with distinct values, check each lands at its offset
    values = {}
    for n, f in t.fields.items():
        if n in ("inner",):
            values[n] = {"a": 0x11, "b": 0x2233445566778899}
        elif f.type.name.startswith("Array"):
            values[n] = bytes(range(1, f.type.count + 1)) if f.type.elem.size == 1 and \
                f.type.elem.name == "u8" else list(range(1, f.type.count + 1))
        elif f.type.name == "v128":
            values[n] = bytes(range(16))
        else:
            values[n] = 5
    raw = t.build(**values)
    assert len(raw) == t.size
    assert t.construct().sizeof() == t.size
    parsed = t.parse(raw)
    for n in t.fields:
        assert parsed[n] == values[n] or dict(parsed[n]) == values[n]
    # 3. gcc: the generated C declaration carries static_asserts on size and offsets
    decls = "\n\n".join(s.c_decl() for s in STRUCTS if s is not t and s is S.Inner) + "\n\n"
    src = "#include <stdint.h>\n#include <stddef.h>\n" + (
        decls if t is not S.Inner else "") + t.c_decl() + "\nint main(void){return 0;}\n"
    c = tmp_path / "h.c"
    c.write_text(src)
    r = subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-c", str(c), "-o",
                        str(tmp_path / "h.o")], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr + src


def test_pystruct_view_agrees_with_construct():
    """The struct.Struct view packs what construct builds, padding and signedness included,
    for whole structs and for a prefix; a field that is not an integer is refused."""
    from helperfw.runtime import protocol as P

    for t in (P.Control, P.Entry, P.FaultRecord):
        values = {n: (-3 if f.type.signed else 7 + i) for i, (n, f) in enumerate(t.fields.items())}
        assert t.pystruct().pack(*values.values()) == t.build(**values)
    head = P.Command.pystruct(upto="entries")
    assert head.size == P.Command.offset("entries")
    names = list(P.Command.fields)[:len(head.unpack(bytes(head.size)))]
    vals = dict(zip(names, range(1, len(names) + 1), strict=True))
    assert head.pack(*vals.values()) == P.Command.build(**vals)[: head.size]
    assert S.Mixed.pystruct(upto="inner").format == "<BxxxI"  # u8, padding, u32
    with pytest.raises(TypeError, match="not an integer"):
        P.Envelope.pystruct()


def test_struct_c_decl_catches_a_wrong_offset(tmp_path: Path):
    """The static_asserts are live: a tampered offset must fail to compile."""
    decl = S.Packed.c_decl().replace("== 9,", "== 10,")
    c = tmp_path / "bad.c"
    c.write_text("#include <stdint.h>\n#include <stddef.h>\n" + decl + "\n")
    r = subprocess.run(["gcc", "-std=c11", "-c", str(c), "-o", str(tmp_path / "b.o")],
                       capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "Packed.small" in r.stderr


def test_struct_access_compiled_matches_construct_layout():
    img = NativeImage(build([S.sum_words, S.touch_packed]).image)
    raw = bytearray(S.Mixed.build(tag=3, inner={"a": 1, "b": 1000}, words=[1, 2, 3, 4, 5]))
    buf = (ctypes.c_uint8 * len(raw)).from_buffer(raw)
    assert img.call("sum_words", ctypes.addressof(buf)) == 15 + 1000 + 3
    praw = bytearray(S.Packed.build(tag=1, value=0xDEADBEEF, small=41, arr=[1, 2, 3]))
    pbuf = (ctypes.c_uint8 * len(praw)).from_buffer(praw)
    assert img.call("touch_packed", ctypes.addressof(pbuf)) == 0xDEADBEEF
    p = S.Packed.parse(bytes(praw))
    assert p.small == 42 and list(p.arr) == [1, 2, -7]


# -- errors point at the DSL source ----------------------------------------------------------

def _load_snippet(tmp_path: Path, body: str):
    """Write a DSL module to a real file (so inspect finds its source); its function `f`."""
    return load_module(tmp_path, body).f


def _compile_snippet(tmp_path: Path, body: str):
    build([_load_snippet(tmp_path, body)])


ERROR_CASES = pytest.mark.parametrize(
    "body, line, col, reason",
    [
        ("@function\ndef f(a: u32, b: u64) -> u64:\n    x = a\n    return x + b\n",
         6, 12, r"type mismatch: u32 and u64"),
        ("@function\ndef f(a: u32) -> u32:\n    return a + nope\n", 5, 16,
         r"unknown name 'nope'"),
        ("@function\ndef f(a: u32) -> u32:\n    return [a][0]\n", 5, 12,
         r"unsupported expression: List"),
        ("@function\ndef f(a: u32) -> u32:\n    with a:\n        pass\n    return a\n", 5, 5,
         r"unsupported statement: With"),
        ("@function\ndef f(a: u8) -> u8:\n    return a + 300\n", 5, 12,
         r"literal 300 does not fit u8"),
        ("@function\ndef f(a: u32) -> u32:\n    if a:\n        return a\n", 5, 5,
         r"can reach its end without return"),
        ("@function\ndef f(a: u32) -> u32:\n    return a / 2\n", 5, 12, r"use '//'"),
        ("@function\ndef f(a: u32) -> u32:\n    buf: Array[u8, 4] = 0\n    return a\n", 5, 5,
         r"cannot initialise Array\[u8, 4\] with a value; assign its elements"),
        ("@function\ndef f(v: v128) -> u64:\n    return v128_lo(pshufd(v))\n", 5, 20,
         r"pshufd takes a v128 and a literal selector"),
        ("@function\ndef f(v: v128) -> u64:\n    return v128_lo(v128_shl64(v, 64))\n", 5, 20,
         r"argument 2 must be an integer literal in \[0, 63\]"),
        ("@function\ndef f() -> u64:\n    x, y = cpuid(1, 0)[0], 2\n    return x\n", 5, 12,
         r"cpuid returns four values: a, b, c, d = cpuid\(leaf, sub\)"),
        ("@function\ndef f() -> u64:\n    x, y = pshufd\n    return x\n", 5, 12,
         r"only cpuid\(\), mask8\(\), rdrand64\(\), mask8_256\(\) or a tuple can be unpacked"),
        ("@function\ndef f(n: u64) -> u64:\n    for j in unroll(n):\n        pass\n    return n\n",
         5, 21, r"unroll bounds must be integer literals"),
        (("@function\ndef f(n: u64) -> u64:\n    while n > 1:\n        for j in unroll(4):\n"
         "            if n == j:\n                break\n        n -= 1\n    return n\n"), 8, 17,
         r"break cannot leave an unroll\(...\) body"),
        ("@function\ndef f(n: u64) -> u64:\n    for j in unroll(4):\n        j = n\n    return n\n",
         6, 9, r"cannot assign to unroll variable 'j'"),
        (("@function\ndef f(n: u64) -> u64:\n    for j in unroll(300):\n        pass\n"
         "    return n\n"), 5, 14, r"unroll of 300 copies; at most 256"),
        ("@function\ndef f(n: u64) -> u64:\n    k = unroll(3)\n    return n\n", 5, 9,
         r"unroll\(...\) is only a for-loop header"),
        (("@function\ndef f(n: u64) -> u64:\n    for j in unroll(2):\n        x: u32 = 0\n"
         "    x: u32 = 1\n    return n\n"), 7, 5, r"local 'x' is already declared"),
        ("@function\ndef f(p: Ptr[u8]) -> u64:\n    x = v256_load(p)\n    return 0\n", 5, 9,
         r'v256_load needs @function\(features="\+avx2"\); f lacks \+avx2'),
        (("@function(features=\"+avx2\")\ndef f(p: Ptr[v256]) -> u64:\n"
          "    p[0] = vaesenc256(p[0], p[1])\n    return 0\n"), 5, 12,
         r'vaesenc256 needs @function\(features="\+vaes"\); f lacks \+vaes'),
        ("@function\ndef f(p: Ptr[v256]) -> u64:\n    p[1] = p[0]\n    return 0\n", 5, 12,
         r'a v256 value needs @function\(features="\+avx2"\); f lacks \+avx2'),
        ("@function\ndef f(x: v256) -> u64:\n    return 0\n", 4, 1,
         r"parameter 'x' v256 needs @function\(features=\"\+avx2\"\)"),
    ],
    ids=["mismatch", "unknown-name", "list", "with", "literal-range", "no-return", "div",
         "aggregate-init", "intrinsic-arity", "immediate-range", "unpack-only", "not-unpackable",
         "unroll-bound", "unroll-break", "unroll-assign", "unroll-size", "unroll-value",
         "unroll-scope", "wide-intrinsic", "wide-feature", "wide-value", "wide-param"],
)


@ERROR_CASES
def test_errors_carry_file_line_col_and_a_caret(tmp_path, body, line, col, reason):
    """`file:line:col: reason`, then the source line and a caret under the column."""
    with pytest.raises(DslError) as ei:
        _compile_snippet(tmp_path, body)
    head, source, caret = str(ei.value).split("\n")
    assert head.startswith(f"{tmp_path / 'snippet_mod.py'}:{line}:{col}: "), head
    assert re.search(reason, head), head
    assert ei.value.headline == head and (ei.value.line, ei.value.col) == (line, col)
    want = (tmp_path / "snippet_mod.py").read_text().splitlines()[line - 1]
    assert source == "    " + want
    assert caret == "    " + " " * (col - 1) + "^"


def test_column_of_a_nested_function_counts_its_indentation(tmp_path):
    """A DSL function defined inside a class or function is dedented before parsing; its
    columns are still the file's."""
    body = ("class Holder:\n    @function\n    def g(a: u32) -> u32:\n"
            "        return a + nope\n\n\nf = Holder.g\n")
    with pytest.raises(DslError) as ei:
        _compile_snippet(tmp_path, body)
    assert (ei.value.line, ei.value.col) == (6, 20)
    assert str(ei.value).splitlines()[2] == "    " + " " * 19 + "^"


@ERROR_CASES
def test_interpreter_reports_the_compilers_errors(tmp_path, body, line, col, reason):
    """One front end (helperfw/frontend.py) checks for both: the same text at the same place."""
    fn = _load_snippet(tmp_path, body)
    with pytest.raises(DslError) as compiled:
        build([fn])
    with pytest.raises(DslError) as interpreted:
        Interpreter().prepare(fn)
    assert str(interpreted.value) == str(compiled.value)


def test_unroll_expands_at_compile_time():
    """No loop is left of `for r in unroll(1, 14)`: thirteen aesenc calls, no loop blocks."""
    from tests.test_dsl_differential import unrolled

    ir_text = build([unrolled], opt=0).ir
    assert len(re.findall(r'call .*@"llvm\.x86\.aesni\.aesenc"\(', ir_text)) == 13
    # the only loop blocks are the range(3) loop's, once in each of the 8 copies of its unroll
    assert len(re.findall(r'^"?for\.head[^:]*:', ir_text, re.MULTILINE)) == 8
    assert "while.head" not in ir_text


# -- link ------------------------------------------------------------------------------------

def _obj_calling(name: str) -> bytes:
    ir_text = f"""
target triple = "{emit.TRIPLE}"
declare void @{name}(ptr, i32, i64)
define void @f(ptr %p) {{
  call void @{name}(ptr %p, i32 0, i64 8)
  ret void
}}
"""
    return emit.emit_object(emit.optimize(ir_text, 0), 0)


def test_link_places_lays_out_resolves_and_relocates():
    """An absolute pointer in data becomes a base relocation holding its target's RVA; code
    reaches data PC-relatively; linker-defined bounds resolve; the symbol table has both."""
    ir_text = f"""
target triple = "{emit.TRIPLE}"
@__data_end = external hidden global i8
@table = hidden global [2 x ptr] [ptr @f, ptr @__data_end], align 8
define hidden i64 @f() {{
  %p = load ptr, ptr getelementptr ([2 x ptr], ptr @table, i64 0, i64 1)
  %v = ptrtoint ptr %p to i64
  ret i64 %v
}}
"""
    img = link.link(emit.emit_object(emit.optimize(ir_text, 0), 0), entry="f")
    f, table = img.symbol("f"), img.symbol("table")
    assert (f.section, f.kind, table.section, table.kind) == (".text", "func", ".data", "object")
    assert img.relocs == (table.rva, table.rva + 8)
    flat = img.flat()
    data = img.section(".data")
    assert int.from_bytes(flat[table.rva:table.rva + 8], "little") == f.rva
    assert int.from_bytes(flat[table.rva + 8:table.rva + 16], "little") == data.rva + 0x1000
    assert [s.name for s in img.sections] == [".text", ".data"]
    assert img.section(".text").rva == 0x1000 and data.rva == 0x2000
    rebased = img.flat(0x40000000)
    assert int.from_bytes(rebased[table.rva:table.rva + 8], "little") == 0x40000000 + f.rva


@pytest.mark.parametrize("sym", ["memset", "memcpy", "__chkstk"])
def test_link_refuses_undefined_symbols(sym):
    with pytest.raises(link.LinkError, match=sym):
        link.link(_obj_calling(sym))


def test_no_memset_from_zeroing_loops():
    """-O2 would turn this loop into a memset call without "no-builtins"."""
    from tests import dsl_loops

    img = build([dsl_loops.zero_page, dsl_loops.copy_page]).image
    assert img.symbols.keys() >= {"zero_page", "copy_page"}


def test_function_attributes_present():
    ir = build([S.sum_words]).optimized_ir
    attrs = re.search(r"attributes #\d+ = \{([^}]*)\}", ir).group(1)
    for a in ("noredzone", '"no-builtins"', '"no-stack-arg-probe"'):
        assert a in attrs


def test_features_go_to_that_function_only(tmp_path):
    """@function(features=...) becomes that function's LLVM "target-features" (the baseline's
    plus the added ones and what they imply); its callers keep the module's SSE-only target."""
    mod = load_module(tmp_path, """
        @function(features="+vaes")
        def wide(p: Ptr[v256]) -> None:
            p[0] = vaesenc256(p[0], p[1])

        @function(abi="c")
        def f(p: Ptr[v256]) -> None:
            wide(p)
        """)
    ir = build([mod.f]).optimized_ir
    feats = re.findall(r'"target-features"="([^"]*)"', ir)
    assert feats == [emit.FEATURES.replace("-avx,-avx2,", "").replace(
        "+pclmul,", "+pclmul,+avx,+avx2,+vaes,")]
    groups = dict(re.findall(r"^attributes #(\d+) = \{(.*)\}$", ir, re.MULTILINE))
    defs = dict(re.findall(r"^define .*?@(\w+)\(.*\).* #(\d+) \{", ir, re.MULTILINE))
    assert "target-features" in groups[defs["wide"]]
    assert "target-features" not in groups[defs["f"]]
    assert "-avx,-avx2" in emit.FEATURES  # the firmware's own target has no AVX


@pytest.mark.parametrize("spec, reason", [
    ("+avx3", r"unknown target feature 'avx3'; known: \+avx, \+avx2, \+vaes, \+vpclmulqdq"),
    ("-avx", r"a function can only add features, spelled '\+name'"),
    ("avx2", r"a function can only add features"),
])
def test_bad_feature_spelling_is_one_line_at_decoration(spec, reason):
    from helperfw import function

    def g() -> None:
        pass

    with pytest.raises(ValueError, match=r"^@function g: .*" + reason) as ei:
        function(features=spec)(g)
    assert "\n" not in str(ei.value)


def test_reproducible_builds():
    a = build([S.sum_words, S.touch_packed, S.entry_like])
    b = build([S.sum_words, S.touch_packed, S.entry_like])
    assert a.obj == b.obj
    assert a.image.flat() == b.image.flat() and a.image.relocs == b.image.relocs
