"""Peak memory in use, on either backend.

CPU: :mod:`tracemalloc`, which sees every NumPy buffer (NumPy reports its
allocations to it, and cupynn's Numba kernels write into NumPy-allocated
arrays). GPU: a CuPy memory hook that follows the blocks taken from and
returned to the memory pool while it is installed.

Only allocations made after :meth:`MemoryTracker.start` count: start it
before building the model to include the model itself.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from .backend import Backend


def _gpu_hook(xp: Any) -> Any:
    class PeakBytesInUse(xp.cuda.MemoryHook):
        name = "cupynn_peak_bytes"

        def __init__(self) -> None:
            self.live: dict[int, int] = {}  # pointer -> bytes, for blocks taken while installed
            self.in_use = 0
            self.peak = 0

        def malloc_postprocess(self, **kw: Any) -> None:
            if kw["mem_ptr"]:
                self.live[kw["mem_ptr"]] = kw["mem_size"]
                self.in_use += kw["mem_size"]
                self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, **kw: Any) -> None:
            # A block taken before the hook was installed is not ours to count.
            self.in_use -= self.live.pop(kw["mem_ptr"], 0)

    return PeakBytesInUse()


class MemoryTracker:
    """Bytes in use now and at the peak since :meth:`start` or :meth:`reset_peak`.

    Use as a context manager or with explicit ``start()`` / ``stop()``.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._hook: Any = None
        self._owns_tracemalloc = False
        self.running = False

    def start(self) -> "MemoryTracker":
        if self.running:
            return self
        if self.backend.is_gpu:
            self.backend.synchronize()
            self._hook = _gpu_hook(self.backend.xp)
            self._hook.__enter__()
        elif not tracemalloc.is_tracing():
            tracemalloc.start()
            self._owns_tracemalloc = True
        self.running = True
        self.reset_peak()
        return self

    def current(self) -> int:
        self._check()
        if self._hook is not None:
            return int(self._hook.in_use)
        return int(tracemalloc.get_traced_memory()[0])

    def peak(self) -> int:
        self._check()
        if self._hook is not None:
            self.backend.synchronize()
            return int(self._hook.peak)
        return int(tracemalloc.get_traced_memory()[1])

    def reset_peak(self) -> None:
        """Start a new peak from the bytes in use now."""
        self._check()
        if self._hook is not None:
            self._hook.peak = self._hook.in_use
        else:
            tracemalloc.reset_peak()

    def stop(self) -> None:
        if not self.running:
            return
        if self._hook is not None:
            self._hook.__exit__(None, None, None)
            self._hook = None
        elif self._owns_tracemalloc:
            tracemalloc.stop()
            self._owns_tracemalloc = False
        self.running = False

    def _check(self) -> None:
        if not self.running:
            raise RuntimeError("MemoryTracker is not running: call start() first.")

    def __enter__(self) -> "MemoryTracker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
