"""The compiler's extension points: the intrinsic registry (a toy intrinsic added from a test and
run three ways), the declared backend protocols, internal errors reported at the DSL source, the
generated intrinsic table of docs/DSL.md."""

from __future__ import annotations

import inspect
import random
from pathlib import Path

import pytest
from llvmlite import ir

import helperfw
from helperfw import DslError, u64
from helperfw.codegen import llvm_compat
from helperfw.codegen.lower import FunctionLowerer
from helperfw.codegen.pipeline import build
from helperfw.frontend import Backend
from helperfw.interp import Env, InterpError, Interpreter
from helperfw.interp.preparer import Preparer
from helperfw.intrinsics import (
    INTRINSICS,
    PLATFORM,
    SIMD,
    Emitter,
    Lit,
    Machine,
    ask_env,
    doc_table,
    intrinsic,
    parse_signature,
    pure,
    unregister,
    with_doc_table,
)
from helperfw.intrinsics import builtin as builtin_intrinsics
from tests.dsl_snippets import load_module
from tests.test_dsl_differential import SEED, Case, make_runners, rand_int, run_case

ROOT = Path(__file__).resolve().parent.parent
I64, I128 = ir.IntType(64), ir.IntType(128)
MASK64 = (1 << 64) - 1


def _rotl64(x: int, n: int) -> int:
    return ((x << n) | (x >> (64 - n))) & MASK64


def _mul128(a: int, b: int) -> tuple[int, int]:
    return (a * b) >> 64, (a * b) & MASK64


@pytest.fixture
def toys():
    """Two intrinsics defined here, through the registry alone (one decorated lowering each),
    removed again afterwards."""

    @intrinsic("(x: u64, n: imm(0, 63)) -> u64", group=SIMD, evaluate=pure(_rotl64),
               doc="toy: rotate left by an immediate",
               arity_reason="toy_rotl takes a u64 and a literal count")
    def toy_rotl(em: Emitter, x: ir.Value, n: int) -> ir.Value:
        fshl = em.llvm_intrinsic("llvm.fshl.i64", I64, [I64, I64, I64])
        return em.b.call(fshl, [x, x, ir.Constant(I64, n)])

    @intrinsic("(a: u64, b: u64) -> (u64, u64)", group=SIMD, evaluate=pure(_mul128),
               doc="toy: the 128-bit product, high and low halves",
               unpack_reason="toy_mul128 returns two values: hi, lo = toy_mul128(a, b)")
    def toy_mul128(em: Emitter, a: ir.Value, b: ir.Value) -> list[ir.Value]:
        p = em.b.mul(em.b.zext(a, I128), em.b.zext(b, I128))
        hi = em.b.trunc(em.b.lshr(p, ir.Constant(I128, 64)), I64)
        return [hi, em.b.trunc(p, I64)]

    yield toy_rotl, toy_mul128
    unregister("toy_rotl")
    unregister("toy_mul128")


TOY_DSL = '''
@function(abi="c")
def toy_user(x: u64, y: u64) -> u64:
    hi, lo = toy_mul128(x, y)
    return toy_rotl(x, 13) ^ toy_rotl(y, 0) ^ (hi + toy_rotl(lo, 63))
'''


def _toy_model(x: int, y: int) -> int:
    hi, lo = _mul128(x, y)
    return _rotl64(x, 13) ^ y ^ ((hi + _rotl64(lo, 63)) & MASK64)


def test_toy_intrinsic_from_the_registry_alone_runs_three_ways(tmp_path, toys):
    """Compiled natively, under unicorn and in the interpreter, the toy intrinsics agree with
    each other and with a Python model; nothing but the two registry entries was added."""
    fn = load_module(tmp_path, TOY_DSL).toy_user
    runners = make_runners([fn])
    case = Case(fn, u64, lambda r: ([rand_int(r, u64), rand_int(r, u64)], []), n=200)
    run_case(runners, case, random.Random(f"{SEED}:toy"))
    rng = random.Random(f"{SEED}:toy-model")
    for _ in range(50):
        x, y = rng.getrandbits(64), rng.getrandbits(64)
        assert runners["interp"].call(fn, x, y) == _toy_model(x, y)
        assert runners["native"].call("toy_user", x, y) == _toy_model(x, y)
    assert "| SSE / AES-NI | `toy_rotl(x: u64, n: imm(0, 63)) -> u64` |" in doc_table()


def test_toy_intrinsic_is_type_checked_by_its_entry(tmp_path, toys):
    """The entry's signature is its typing rule: arity, immediates and unpacking."""
    cases = {
        "return toy_rotl(x)": "toy_rotl takes a u64 and a literal count",
        "return toy_rotl(x, x)": r"argument 2 must be an integer literal in [0, 63]",
        "return toy_mul128(x, x)": "toy_mul128 returns two values: hi, lo = toy_mul128(a, b)",
    }
    for i, (line, reason) in enumerate(cases.items()):
        mod = load_module(tmp_path, f"@function\ndef f(x: u64) -> u64:\n    {line}\n",
                          name=f"toy_err{i}")
        with pytest.raises(DslError, match=reason.replace("[", r"\[").replace("(", r"\(")
                           .replace(")", r"\)")) as ei:
            build([mod.f])
        assert (ei.value.line, ei.value.col) == (5, 12)


@pytest.fixture
def broken():
    """Intrinsics whose lowering is wrong in the two ways a lowering can be."""

    @intrinsic("(x: u64) -> u64", group=PLATFORM, evaluate=pure(lambda x: x),
               doc="toy: llvmlite refuses its instruction")
    def toy_mistyped(em: Emitter, x: ir.Value) -> ir.Value:
        return em.b.add(x, ir.Constant(ir.IntType(32), 1))

    @intrinsic("(x: u64) -> u64", group=PLATFORM, evaluate=pure(lambda x: x),
               doc="toy: LLVM's verifier refuses its IR")
    def toy_unverifiable(em: Emitter, x: ir.Value) -> ir.Value:
        wrong = em.llvm_intrinsic("llvm.x86.aesni.aesenc", I64, [I64, I64])
        return em.b.call(wrong, [x, x])

    yield
    unregister("toy_mistyped")
    unregister("toy_unverifiable")


BROKEN_DSL = '''
@function(abi="c")
def fine(x: u64) -> u64:
    return x + 1


@function(abi="c")
def mistyped(x: u64) -> u64:
    y = fine(x)
    return y + toy_mistyped(y)


@function(abi="c")
def unverifiable(x: u64) -> u64:
    return toy_unverifiable(fine(x))
'''


def test_llvmlite_failure_in_a_lowering_is_a_dslerror_at_the_call(tmp_path, broken):
    mod = load_module(tmp_path, BROKEN_DSL)
    with pytest.raises(DslError) as ei:
        build([mod.fine, mod.mistyped])
    e = ei.value
    assert (e.line, e.col) == (12, 16), str(e)
    assert e.reason == ("internal compiler error: ValueError: Operands must be the same type, "
                        "got (i64, i32)")
    assert str(e).splitlines()[1:] == ["        return y + toy_mistyped(y)",
                                       "    " + " " * 15 + "^"]
    assert isinstance(e.__cause__, ValueError)


def test_verifier_failure_is_a_dslerror_at_the_functions_def(tmp_path, broken):
    """LLVM refuses the module; the error names the DSL function whose IR it refuses alone."""
    mod = load_module(tmp_path, BROKEN_DSL)
    with pytest.raises(DslError) as ei:
        build([mod.fine, mod.unverifiable])
    e = ei.value
    assert (e.line, e.col) == (16, 1)
    assert e.reason == ("LLVM rejected the code lowered for unverifiable: Intrinsic has "
                        "incorrect return type!")
    assert isinstance(e.__cause__, RuntimeError)


def test_backend_hook_failure_is_a_dslerror_at_the_expression(tmp_path, monkeypatch):
    """Not only intrinsics: any exception a backend hook raises is reported where it arose."""
    def broken_select(self, cond, a, b):
        raise AssertionError("select of mismatched types")

    monkeypatch.setattr(FunctionLowerer, "emit_select", broken_select)
    mod = load_module(tmp_path, "@function\ndef f(x: u64) -> u64:\n"
                                "    y = x + 1\n    return 7 if y > 3 else x\n")
    with pytest.raises(DslError) as ei:
        build([mod.f])
    assert (ei.value.line, ei.value.col) == (6, 12)
    assert ei.value.reason == ("internal compiler error: AssertionError: select of mismatched "
                               "types")
    assert isinstance(ei.value.__cause__, AssertionError)


# -- the registry as the one list ------------------------------------------------------------

def test_docs_intrinsic_table_is_generated_from_the_registry():
    text = (ROOT / "docs" / "DSL.md").read_text()
    assert with_doc_table(text) == text, "run: python -m helperfw.intrinsics docs/DSL.md"
    for name in builtin_intrinsics.__all__:
        assert f"| `{name}(" in text


def test_every_builtin_intrinsic_is_exported_and_registered():
    assert builtin_intrinsics.__all__ == [n for n in INTRINSICS if n in builtin_intrinsics.__all__]
    assert len(builtin_intrinsics.__all__) == 71  # 54 scalar and 128-bit, 17 wide
    for name in builtin_intrinsics.__all__:
        entry = INTRINSICS[name]
        assert getattr(helperfw, name) is entry and name in helperfw.__all__
        assert entry.__doc__.startswith(f"{name}(")
        with pytest.raises(TypeError, match="only exists inside DSL functions"):
            entry()


def test_signature_spelling_is_the_typing_rule():
    sig = parse_signature("(v: v128, n: imm(0, 63)) -> v128")
    assert sig.names == ("v", "n") and sig.params == (helperfw.v128, Lit(0, 63))
    assert sig.ret is helperfw.v128
    assert parse_signature("(msr: u32, value: u64)").ret is helperfw.void
    assert parse_signature("() -> (u64, bool)", unpack_reason="x").ret == (u64, helperfw.bool_)
    with pytest.raises(TypeError, match="several results need an unpack_reason"):
        parse_signature("() -> (u64, u64)")
    with pytest.raises(TypeError, match="has no DSL type"):
        parse_signature("(x: 3)")


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'cpuid' is already registered"):
        intrinsic("()", group=PLATFORM, evaluate=ask_env(), doc="again", name="cpuid")(
            lambda em: None)


def test_env_asks_follow_the_registry(tmp_path):
    """A platform intrinsic's semantics is the Env method named after it; an Env without it
    refuses, except for hints and fences, which do nothing."""

    @intrinsic("(x: u64) -> u64", group=PLATFORM, evaluate=ask_env(), doc="toy: ask the Env")
    def toy_ask(em: Emitter, x: ir.Value) -> ir.Value:
        return em.asm(I64, "", "=r,0", [x])

    try:
        mod = load_module(tmp_path, "@function\ndef f(x: u64) -> u64:\n"
                                    "    pause()\n    return toy_ask(x)\n")

        class Answers(Env):
            def toy_ask(self, x: int) -> int:
                return -x  # the interpreter wraps it to the result type, u64

        assert Interpreter(env=Answers()).call(mod.f, 5) == (-5) & MASK64
        with pytest.raises(InterpError, match="toy_ask: the interpreter's Env models no toy_ask"):
            Interpreter().call(mod.f, 5)
    finally:
        unregister("toy_ask")
    assert Env().mfence() is None
    with pytest.raises(InterpError, match="models no rdmsr"):
        Env().rdmsr(0x10)
    with pytest.raises(AttributeError):
        Env().toy_ask  # noqa: B018 - unregistered: no longer a platform method


def _members(proto: type) -> list[str]:
    return [n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")]


@pytest.mark.parametrize("proto, impls", [
    (Backend, (FunctionLowerer, Preparer)),
    (Emitter, (FunctionLowerer,)),
    (Machine, (Interpreter,)),
], ids=["Backend", "Emitter", "Machine"])
def test_backends_implement_the_declared_protocols(proto, impls):
    """Every hook of the protocol is implemented, with the protocol's parameters."""
    for name in _members(proto):
        want = list(inspect.signature(getattr(proto, name)).parameters)
        for impl in impls:
            assert name in vars(impl), f"{impl.__name__} lacks {proto.__name__}.{name}"
            got = list(inspect.signature(getattr(impl, name)).parameters)
            assert len(got) == len(want), f"{impl.__name__}.{name}{got} vs {want}"


def test_llvm_compat_targets_the_installed_llvmlite():
    """An llvmlite upgrade fails here first: re-check llvm_compat's work-arounds, then bump."""
    assert llvm_compat.installed_version() == llvm_compat.LLVMLITE_VERSION
