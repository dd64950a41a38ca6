"""Mutants of the helper's security-relevant DSL code, generated from its AST.

A mutant is one small edit of one DSL function's Python source, the kind a hurried change
makes: a comparison flipped or relaxed, the condition of an `if … return` guard removed, a term
of an `and`/`or` dropped, an integer constant off by one, a statement (a call, a store) dropped,
or a read of a private copy replaced by a read of the shared memory it was copied from.

Mutants are found by walking the sources *as they are at run time* (no line numbers are stored
anywhere) and identified by what they change: `module.function:operator: original ->
replacement`, with `#k` when the same edit occurs k+1 times in one function. Applying a mutant
splices the replacement into the module's source text at the node's span; the compiler reads
DSL functions from their source files, so a rebuild from the spliced file is the mutant build.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from helperfw.dsl import Const, Function

# The security-relevant DSL modules (helperfw/runtime/<name>.py): the protocol and its checks,
# the secret-area parser, the page-table builder, the AEAD with what it is built from (gcmsiv
# and its wide path and key schedule: also the staging masks, the address binding and the hashed
# copy-out), and the SEV-ES paths
# (ghcb: hypercalls through the GHCB; vcpu: the exception handler that ends a faulted session,
# the register wipe before each exit, the staging-mask key).
MODULES = ("session", "secrets", "pagetables", "gcmsiv", "gcmsiv_keys", "gcmsiv_wide", "aes",
           "memops", "ghcb", "vcpu")
# Entry points that exist only for native tests and benchmarks: mutating them tests the tests.
SKIP_FUNCTIONS = re.compile(r"^mh_(test|bench)_")
# Status codes are not constants to be off by one: a changed code is a different, loud bug.
STATUS_NAME = re.compile(r"^(E_|PT_E_|OK$|PT_OK$)")
CONST_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
# A private copy that a function makes of host-controlled memory by a call rather than by
# copy_mem into HelperCtx: {function: {private name: shared name}} (gcmsiv: seal hashes the
# guest page into `stage` and must encrypt that copy, never the page again).
EXTRA_SHARED = {"siv_seal": {"stage": "pt"}}

CMP_MUTATIONS: dict[type, tuple[type, ...]] = {
    ast.Lt: (ast.LtE, ast.GtE),
    ast.LtE: (ast.Lt, ast.Gt),
    ast.Gt: (ast.GtE, ast.LtE),
    ast.GtE: (ast.Gt, ast.Lt),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
}
OPERATORS = ("cmp", "guard", "ifexp", "bool", "not", "const", "stmt", "shared")


@dataclass(frozen=True)
class Mutant:
    module: str  # helperfw.runtime.<module>
    function: str  # the DSL function's Python name
    operator: str  # one of OPERATORS
    original: str  # the source of what is replaced (ast.unparse)
    replacement: str
    occurrence: int  # the same (function, operator, original, replacement) seen before
    path: Path
    span: tuple[int, int, int, int]  # lineno, col, end_lineno, end_col (UTF-8 byte columns)
    text: str  # what is spliced in at `span`

    @property
    def id(self) -> str:
        k = f" #{self.occurrence}" if self.occurrence else ""
        return (f"{self.module}.{self.function}:{self.operator}: {self.original} -> "
                f"{self.replacement}{k}")

    def mutated_source(self, source: str | None = None) -> str:
        """The module's source with this mutant spliced in."""
        text = self.path.read_text() if source is None else source
        lines = text.splitlines(keepends=True)
        l0, c0, l1, c1 = self.span
        first = lines[l0 - 1].encode()
        last = lines[l1 - 1].encode()
        text = self.text
        if l1 > l0:  # keep the line count: nothing after this mutant moves
            pad = "\n" * (l1 - l0)
            text = text + pad if text == "pass" else text[:-1] + pad + text[-1:]
        new = (first[:c0] + text.encode() + last[c1:]).decode()
        out = "".join(lines[:l0 - 1]) + new + "".join(lines[l1:])
        ast.parse(out)  # a mutant is always valid Python (it may still not compile as DSL)
        return out


def _span(node: ast.AST) -> tuple[int, int, int, int]:
    return node.lineno, node.col_offset, node.end_lineno, node.end_col_offset  # type: ignore


def _src(node: ast.AST) -> str:
    return ast.unparse(node)


def _free_names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


class _Collector:
    """Walks one DSL function and records its mutants."""

    def __init__(self, module: str, mod: object, path: Path, fdef: ast.FunctionDef) -> None:
        self.module, self.mod, self.path, self.fdef = module, mod, path, fdef
        self.found: list[tuple[str, str, str, ast.AST, str]] = []
        self.params = {a.arg for a in fdef.args.args}

    # -- recording -----------------------------------------------------------------------------
    def add(self, op: str, node: ast.AST, new_text: str, shown: str | None = None,
            original: str | None = None) -> None:
        """Record a mutant: `node`'s span becomes `new_text`. It is named by the enclosing
        statement (or if/while condition) before and after, so the name says where it is
        without a line number."""
        if original is None:
            new = ast.parse(new_text, mode="eval").body
            original, shown = self._context(node, new)
        self.found.append((op, original, shown if shown is not None else new_text, node,
                           new_text))

    def add_expr(self, op: str, node: ast.expr, new: ast.expr) -> None:
        self.add(op, node, f"({_src(new)})")

    def _context(self, node: ast.AST, new: ast.expr) -> tuple[str, str]:
        stmt, path = node, []
        while not isinstance(stmt, ast.stmt):
            parent = self.parents[id(stmt)]
            for f, v in ast.iter_fields(parent):
                if v is stmt:
                    path.append((f, None))
                elif isinstance(v, list) and any(x is stmt for x in v):
                    path.append((f, next(i for i, x in enumerate(v) if x is stmt)))
            stmt = parent
        head, prefix = stmt, ""
        if isinstance(stmt, (ast.If, ast.While)):
            head, prefix = stmt.test, "if " if isinstance(stmt, ast.If) else "while "
            assert path[-1] == ("test", None)
            path = path[:-1]
        elif isinstance(stmt, ast.For):
            prefix = f"for {_src(stmt.target)} in "
            head = stmt.iter
            path = path[:-1]
        after = copy.deepcopy(head)
        holder, last = after, None
        for f, i in reversed(path[1:]):
            holder = getattr(holder, f) if i is None else getattr(holder, f)[i]
        if path:
            f, i = path[0]
            if i is None:
                setattr(holder, f, new)
            else:
                getattr(holder, f)[i] = new
        else:
            after = new
        del last
        return prefix + _src(head), prefix + _src(after)

    # -- the walk ------------------------------------------------------------------------------
    def run(self, shared: dict[str, tuple[str, bool]]) -> None:
        self.parents = {id(c): p for p in ast.walk(self.fdef) for c in ast.iter_child_nodes(p)}
        aliases = self._aliases(shared)
        for stmt in self.fdef.body:
            self.stmt(stmt)
        self._shared(shared, aliases)

    def stmt(self, s: ast.stmt) -> None:
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant):
            return  # docstring
        if isinstance(s, ast.If) and not s.orelse and any(isinstance(b, ast.Return)
                                                          for b in s.body):
            self.add("guard", s.test, "(False)", shown="if False",
                     original=f"if {_src(s.test)}")
        if isinstance(s, ast.Expr) and isinstance(s.value, ast.Call):
            self.add("stmt", s, "pass", original=_src(s))
        if isinstance(s, (ast.Assign, ast.AugAssign)):
            targets = s.targets if isinstance(s, ast.Assign) else [s.target]
            if all(isinstance(t, (ast.Attribute, ast.Subscript)) for t in targets):
                self.add("stmt", s, "pass", original=_src(s))
        for field, value in ast.iter_fields(s):
            if field in ("annotation", "returns"):
                continue  # types, not values
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.stmt):
                    self.stmt(child)
                elif isinstance(child, ast.expr):
                    self.expr(child)

    def expr(self, e: ast.expr, bound: bool = False, bound_only: bool = False) -> None:
        """`bound`: e is a comparison operand or a loop bound, where both off-by-ones matter;
        `bound_only`: e is a literal array index (an index off by one is not a constant's
        meaning but the element's, and the compiler's own tests cover indexing)."""
        if isinstance(e, ast.Compare):
            for j, op in enumerate(e.ops):
                for alt in CMP_MUTATIONS.get(type(op), ()):
                    new = copy.deepcopy(e)
                    new.ops[j] = alt()
                    self.add_expr("cmp", e, new)
        elif isinstance(e, ast.IfExp):
            self.add_expr("ifexp", e, e.body)
            self.add_expr("ifexp", e, e.orelse)
        elif isinstance(e, ast.BoolOp):
            for j in range(len(e.values)):
                rest = e.values[:j] + e.values[j + 1:]
                new = rest[0] if len(rest) == 1 else ast.BoolOp(e.op, rest)
                self.add_expr("bool", e, new)
        elif isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.Not):
            self.add_expr("not", e, e.operand)
        elif isinstance(e, ast.Constant) and type(e.value) is int and not bound_only:
            for d in (1, -1) if bound else (1,):
                if e.value + d >= 0:
                    self.add_expr("const", e, ast.Constant(e.value + d))
        elif isinstance(e, ast.Name) and isinstance(e.ctx, ast.Load) and self._is_const(e.id):
            for d, op in ((1, ast.Add()), (-1, ast.Sub()))[:2 if bound else 1]:
                self.add_expr("const", e, ast.BinOp(ast.Name(e.id, ast.Load()), op,
                                                     ast.Constant(1)))
        for c, c_bound, c_index in _value_children(e):
            self.expr(c, c_bound, c_index)

    def _is_const(self, name: str) -> bool:
        if not CONST_NAME.match(name) or STATUS_NAME.match(name) or name in self.params:
            return False
        v = getattr(self.mod, name, None)
        return isinstance(v, Const) or (isinstance(v, int) and not isinstance(v, bool))

    # -- private copies and their shared sources -----------------------------------------------
    def _aliases(self, shared: dict[str, tuple[str, bool]]) -> dict[str, str]:
        """Locals that point into a private copy (`e = addr(c.cmd.entries[i])`) or hold a
        value read from shared memory once (`bell = vload(...)`): name -> shared expression."""
        out: dict[str, str] = {}
        for s in ast.walk(self.fdef):
            if not (isinstance(s, ast.Assign) and len(s.targets) == 1
                    and isinstance(s.targets[0], ast.Name)):
                continue
            v = s.value
            if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "addr":
                sh = self._shared_of(v.args[0], shared)
                if sh is not None:
                    out[s.targets[0].id] = f"addr({sh})"
            elif isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and \
                    v.func.id == "vload":
                out[s.targets[0].id] = _src(v)
        for private, source in EXTRA_SHARED.get(self.fdef.name, {}).items():
            out[private] = source
        return out

    def _shared_of(self, e: ast.expr, shared: dict[str, tuple[str, bool]]) -> str | None:
        """The shared counterpart of an expression rooted at `c.<copied field>`, or None."""
        chain = []
        node = e
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            chain.append(node)
            node = node.value
        if not chain or not (isinstance(node, ast.Name) and node.id == "c"):
            return None
        base = chain[-1]
        if not isinstance(base, ast.Attribute) or base.attr not in shared:
            return None
        expr, local = shared[base.attr]
        if local and self.fdef.name != shared_home(shared, base.attr):
            return None
        text = _src(e)
        return f"{expr}{text[len(_src(base)):]}"

    def _shared(self, shared: dict[str, tuple[str, bool]], aliases: dict[str, str]) -> None:
        written = self._written_fields(shared, aliases)
        defining = {id(n) for s in ast.walk(self.fdef) if _is_copy(s) for n in ast.walk(s)}
        alias_defs = {id(s.targets[0]) for s in ast.walk(self.fdef)
                      if isinstance(s, ast.Assign) and len(s.targets) == 1}
        for node in ast.walk(self.fdef):
            if id(node) in defining or id(node) in alias_defs:
                continue
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and \
                    node.id in aliases and node.id not in written:
                self.add("shared", node, f"({aliases[node.id]})")
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and \
                    isinstance(node.value, ast.Name) and node.value.id == "c" and \
                    node.attr in shared and node.attr not in written:
                sh = self._shared_of(node, shared)
                if sh is not None:
                    self.add("shared", node, f"({sh})")

    def _written_fields(self, shared, aliases) -> set[str]:
        """Copies this function writes into (a draft, not a copy) are not replaced here."""
        out = set()
        for node in ast.walk(self.fdef):
            if isinstance(node, (ast.Attribute, ast.Subscript)) and \
                    isinstance(node.ctx, ast.Store):
                root = node
                while isinstance(root, (ast.Attribute, ast.Subscript)):
                    inner = root
                    root = root.value
                if isinstance(root, ast.Name) and root.id in aliases:
                    out.add(root.id)
                if isinstance(root, ast.Name) and root.id == "c" and \
                        isinstance(inner, ast.Attribute):
                    out.add(inner.attr)
        return out


def _value_children(e: ast.expr) -> list[tuple[ast.expr, bool, bool]]:
    """(child, is a bound, is a literal index) for the children of `e` that are values:
    the type in `Ptr[u8](x)` is not, a comparison's operands and range()/unroll() arguments
    are bounds, a subscript's literal slice is an index."""
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Subscript):
        return [(a, False, False) for a in e.args]
    if isinstance(e, ast.Compare):
        return [(c, True, False) for c in (e.left, *e.comparators)]
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Name) and \
            e.func.id in ("range", "unroll"):
        return [(a, True, False) for a in e.args]
    if isinstance(e, ast.Subscript):
        return [(e.value, False, False), (e.slice, False, isinstance(e.slice, ast.Constant))]
    return [(c, False, False) for c in ast.iter_child_nodes(e) if isinstance(c, ast.expr)]


def _is_copy(s: ast.AST) -> bool:
    return isinstance(s, ast.Call) and isinstance(s.func, ast.Name) and s.func.id == "copy_mem"


_HOMES: dict[int, dict[str, str]] = {}


def shared_home(shared: dict, field: str) -> str:
    return _HOMES[id(shared)][field]


def private_copies(mod: object, tree: ast.Module) -> dict[str, tuple[str, bool]]:
    """Fields of the context that hold a private copy of shared memory, found from the copies
    themselves: `copy_mem(Ptr[u8](addr(c.F)), Ptr[u8](SRC), sizeof(T))` makes F a copy of the
    T at SRC. Returns F -> (`Ptr[T](SRC)`, SRC uses the copying function's locals)."""
    out: dict[str, tuple[str, bool]] = {}
    homes: dict[str, str] = {}
    for fdef in tree.body:
        if not isinstance(fdef, ast.FunctionDef):
            continue
        params = {a.arg for a in fdef.args.args}
        for call in ast.walk(fdef):
            if not _is_copy(call) or len(call.args) != 3:
                continue
            dst, src, n = call.args
            field = _addr_of_ctx_field(dst)
            inner = _ptr_u8_arg(src)
            if field is None or inner is None or not (
                    isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                    and n.func.id == "sizeof" and isinstance(n.args[0], ast.Name)):
                continue
            local = bool((_free_names(inner) - {"c"}) & (params | _locals(fdef)))
            out[field] = (f"Ptr[{n.args[0].id}]({_src(inner)})", local)
            homes[field] = fdef.name
    _HOMES[id(out)] = homes
    return out


def _locals(fdef: ast.FunctionDef) -> set[str]:
    return {t.id for s in ast.walk(fdef) if isinstance(s, (ast.Assign, ast.AnnAssign))
            for t in (s.targets if isinstance(s, ast.Assign) else [s.target])
            if isinstance(t, ast.Name)}


def _addr_of_ctx_field(e: ast.expr) -> str | None:
    inner = _ptr_u8_arg(e)
    if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and \
            inner.func.id == "addr" and isinstance(inner.args[0], ast.Attribute):
        a = inner.args[0]
        if isinstance(a.value, ast.Name) and a.value.id == "c":
            return a.attr
    return None


def _ptr_u8_arg(e: ast.expr) -> ast.expr | None:
    if isinstance(e, ast.Call) and isinstance(e.func, ast.Subscript) and \
            _src(e.func) == "Ptr[u8]" and len(e.args) == 1:
        return e.args[0]
    return None


def dsl_functions(mod: object) -> dict[str, Function]:
    """The module's own DSL functions by Python name (imports from other modules excluded)."""
    return {f.pyfunc.__name__: f for f in vars(mod).values()
            if isinstance(f, Function) and f.pyfunc.__module__ == mod.__name__}


def module_mutants(name: str) -> list[Mutant]:
    mod = importlib.import_module(f"helperfw.runtime.{name}")
    path = Path(inspect.getsourcefile(mod))  # type: ignore[arg-type]
    tree = ast.parse(path.read_text())
    shared = private_copies(mod, tree)
    funcs = dsl_functions(mod)
    out: list[Mutant] = []
    for fdef in tree.body:
        if not isinstance(fdef, ast.FunctionDef) or fdef.name not in funcs or \
                SKIP_FUNCTIONS.match(funcs[fdef.name].name):
            continue
        col = _Collector(name, mod, path, fdef)
        col.run(shared)
        seen: Counter = Counter()
        for op, original, shown, node, text in col.found:
            key = (op, original, shown)
            out.append(Mutant(name, fdef.name, op, original, shown, seen[key], path,
                              _span(node), text))
            seen[key] += 1
    return out


def all_mutants(modules: tuple[str, ...] = MODULES) -> list[Mutant]:
    return [m for name in modules for m in module_mutants(name)]


def by_id(mutants: list[Mutant]) -> dict[str, Mutant]:
    out = {m.id: m for m in mutants}
    assert len(out) == len(mutants), "mutant ids must be unique"
    return out
