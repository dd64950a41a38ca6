"""Reference interpreter of the DSL: the compiler's semantics, executed in Python.

It follows the same front end as codegen/lower.py (helperfw/frontend.py: names, literal typing,
casts, intrinsic typing and every DslError come from there), so a differential test can hold the
compiled code to it; what is left here is evaluation: integers wrap; `//` and `%` truncate
toward zero; shift counts are taken modulo the width; comparisons and `>>` follow signedness;
`a if c else b` evaluates both arms (it lowers to a select); `and`/`or` short-circuit; pointer
arithmetic scales by the pointee size.

By concern:

- `memory.py`: the flat little-endian address space (`Memory`) and how typed values are held;
- `env.py`: the platform (`Env`), asked for what the interpreter cannot compute, and a model
  of the MMX-held staging masks (`MmxMasks`);
- `preparer.py`: a function turned into closures once, in the compiler's order;
- `machine.py`: `Interpreter`, which runs prepared functions (frames, stack, statics);
- the intrinsics' semantics are the registry's (helperfw/intrinsics), the SSE / AES-NI /
  PCLMULQDQ ones bit-exact models in helperfw/intrinsics/x86.py, re-exported here.
"""

from ..intrinsics.x86 import (
    SBOX,
    aesenc,
    aesenclast,
    aeskeygenassist,
    byte_shift,
    clmul64,
    lane_shift,
    pclmulqdq,
    pshufb,
    pshufd,
)
from .env import Env, MmxMasks
from .errors import InterpError, MemoryFault, Trap
from .machine import STACK_SIZE, STACK_TOP, STATIC_BASE, Interpreter
from .memory import MASK64, MASK128, Memory
from .preparer import LV, Frame, Prepared

__all__ = [
    "LV", "MASK64", "MASK128", "SBOX", "STACK_SIZE", "STACK_TOP", "STATIC_BASE", "Env", "Frame",
    "InterpError", "Interpreter", "Memory", "MemoryFault", "MmxMasks", "Prepared", "Trap", "aesenc",
    "aesenclast", "aeskeygenassist", "byte_shift", "clmul64", "lane_shift", "pclmulqdq",
    "pshufb", "pshufd",
]
