"""DSL → LLVM IR (lower) → x86-64 ELF object (emit) → linked image (link)."""
