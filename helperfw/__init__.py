"""helperfw: the migration helper's DSL, compiler and runtime.

DSL code imports its vocabulary from here: types (u8..u64, i8..i64, bool_, v128, v256, Ptr, Array),
`struct`, `function`, `const`, `static`, `unroll` and the intrinsics (every entry of
helperfw/intrinsics/builtin.py, by its DSL name).
"""

from .codegen import llvm_compat  # noqa: F401  (first: configures llvmlite before its import)
from .dsl import (
    Const,
    DslError,
    Function,
    Routine,
    Static,
    const,
    function,
    routine,
    static,
    unroll,
)
from .intrinsics import builtin as _builtin
from .intrinsics.builtin import *  # every built-in intrinsic, by its DSL name
from .intrinsics.registry import INTRINSICS
from .structs import StructType, struct
from .types import (
    Array,
    Ptr,
    Type,
    bool_,
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
    v128,
    v256,
    void,
)

__all__ = [
    "INTRINSICS",
    "Array",
    "Const",
    "DslError",
    "Function",
    "Ptr",
    "Routine",
    "Static",
    "StructType",
    "Type",
    "bool_",
    "const",
    "function",
    "i8",
    "i16",
    "i32",
    "i64",
    "routine",
    "static",
    "struct",
    "u8",
    "u16",
    "u32",
    "u64",
    "unroll",
    "v128",
    "v256",
    "void",
]
__all__ += _builtin.__all__
