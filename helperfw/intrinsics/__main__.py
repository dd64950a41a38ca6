"""`python -m helperfw.intrinsics [DOC.md]`: print the intrinsic table generated from the
registry, or rewrite the generated block of DOC.md (docs/DSL.md) in place."""

from __future__ import annotations

import sys
from pathlib import Path

import helperfw  # noqa: F401  (registers the built-in intrinsics)

from .registry import doc_table, with_doc_table


def main(argv: list[str]) -> int:
    if not argv:
        sys.stdout.write(doc_table())
        return 0
    path = Path(argv[0])
    try:
        path.write_text(with_doc_table(path.read_text()))
    except (OSError, ValueError) as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
