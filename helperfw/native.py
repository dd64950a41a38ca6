"""Run a LinkedImage's `abi="c"` functions natively: map it into executable memory and call.

Used by differential tests and the benchmarks: the exact bytes that go into the .efi run on the
host CPU (SysV ABI), so native speed and native results are those of the firmware's own code.
Only functions that touch no privileged state (no cpuid/msr/hlt/vmmcall) make sense here.
"""

from __future__ import annotations

import ctypes
import mmap

from .codegen.image import LinkedImage


class NativeImage:
    def __init__(self, image: LinkedImage) -> None:
        self.image = image
        self._mem = mmap.mmap(-1, image.size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self._mem))
        self._mem[:] = bytes(image.flat(self.base))
        # W^X on the host too: code becomes read+execute, nothing else is executable.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        text = image.section(".text")
        size = (text.vsize + 0xFFF) & ~0xFFF
        if libc.mprotect(self.base + text.rva, size, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            raise OSError(ctypes.get_errno(), "mprotect failed")
        self._fns: dict[str, ctypes._CFuncPtr] = {}

    def address(self, symbol: str) -> int:
        return self.base + self.image.symbol(symbol).rva

    def function(self, name: str, restype=ctypes.c_uint64, argtypes=None) -> ctypes._CFuncPtr:
        """A ctypes callable for the `abi="c"` DSL function `name` (pass ctypes types)."""
        key = name
        if key not in self._fns:
            proto = ctypes.CFUNCTYPE(restype, *(argtypes or []))
            self._fns[key] = proto(self.address(name))
        return self._fns[key]

    def call(self, name: str, *args: int, restype=ctypes.c_uint64) -> int:
        """Call with every argument passed as a 64-bit integer (pointers included)."""
        fn = self.function(name, restype, [ctypes.c_uint64] * len(args))
        return fn(*args)
