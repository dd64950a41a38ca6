"""The whole compile: DSL functions → IR → optimised module → ELF object → LinkedImage."""

from __future__ import annotations

from dataclasses import dataclass

from ..dsl import Function, Static
from . import emit, link, lower
from .image import LinkedImage


@dataclass
class Build:
    ir: str  # unoptimised IR as lowered
    optimized_ir: str
    obj: bytes
    image: LinkedImage


def build(roots: list[Function], entry: str | None = None, opt: int = 2,
          name: str = "helper", keep: tuple[tuple[str, Static], ...] = ()) -> Build:
    ml = lower.ModuleLowerer(name)
    ir_text = str(ml.lower(roots, keep)) + ml.module_asm()
    try:
        opt_mod = emit.optimize(ir_text, opt)
    except RuntimeError as exc:  # LLVM refused the IR: say which DSL function it came from
        raise ml.rejected(exc) from exc
    obj = emit.emit_object(opt_mod, opt)
    return Build(ir_text, str(opt_mod), obj, link.link(obj, entry))
