"""Intrinsics: the registry (registry.py), the built-in entries (builtin.py) and the bit-exact
Python models of the x86 vector instructions the interpreter evaluates them with (x86.py).

Only the registry is imported here: builtin.py needs the front end, which needs the registry,
so helperfw/__init__.py imports builtin.py itself once the front end can load.
"""

from .registry import (
    GROUPS,
    IMAGE,
    INTRINSICS,
    MEMORY,
    PLATFORM,
    SIMD,
    WIDE,
    AskEnv,
    Checked,
    Emitter,
    Intrinsic,
    Lit,
    Machine,
    Signature,
    ask_env,
    doc_table,
    form,
    intrinsic,
    parse_signature,
    pure,
    register,
    unregister,
    with_doc_table,
)

__all__ = [
    "GROUPS",
    "IMAGE",
    "INTRINSICS",
    "MEMORY",
    "PLATFORM",
    "SIMD",
    "WIDE",
    "AskEnv",
    "Checked",
    "Emitter",
    "Intrinsic",
    "Lit",
    "Machine",
    "Signature",
    "ask_env",
    "doc_table",
    "form",
    "intrinsic",
    "parse_signature",
    "pure",
    "register",
    "unregister",
    "with_doc_table",
]
