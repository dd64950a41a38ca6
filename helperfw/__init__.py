"""helperfw: the migration helper's DSL, compiler and runtime.

DSL code imports its vocabulary from here: types (u8..u64, i8..i64, bool_, v128, Ptr, Array),
`struct`, `function`, `const`, `static` and the intrinsics (see helperfw/dsl.py).
"""

import os
import sys

# LLVM 22 only has opaque pointers; llvmlite's IR layer must print them too. This has to be set
# before llvmlite is first imported.
if "llvmlite" not in sys.modules:
    os.environ["LLVMLITE_ENABLE_IR_LAYER_TYPED_POINTERS"] = "0"
import llvmlite

if llvmlite.ir_layer_typed_pointers_enabled:
    raise ImportError(
        "llvmlite was imported before helperfw with typed pointers enabled; import helperfw first "
        "or set LLVMLITE_ENABLE_IR_LAYER_TYPED_POINTERS=0"
    )

from .dsl import INTRINSICS, Const, DslError, Function, Static, const, function, static
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
    void,
)

globals().update(INTRINSICS)

__all__ = [
    "Array", "Const", "DslError", "Function", "Ptr", "Static", "StructType", "Type", "bool_",
    "const", "function", "i8", "i16", "i32", "i64", "static", "struct", "u8", "u16", "u32",
    "u64", "v128", "void", *INTRINSICS,
]
