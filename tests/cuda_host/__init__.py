"""CPU emulation of CUDA kernels for the tests: see :mod:`.emulate` and ``cuda_host.h``."""

from .emulate import (HEADER, BlockError, HostCompileError, HostCompilerMissing, WarpError,
                      compile_cu, host_compiler, launch, pointer)

__all__ = ["HEADER", "BlockError", "HostCompileError", "HostCompilerMissing", "WarpError",
           "compile_cu", "host_compiler", "launch", "pointer"]
