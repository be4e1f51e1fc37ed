"""Backend selection: the one module that imports CuPy.

A :class:`Backend` holds the array module ``xp`` (``numpy`` or ``cupy``) and
the matching sparse module (``scipy.sparse`` or ``cupyx.scipy.sparse``). The
rest of cupynn asks a backend for arrays and never imports CuPy itself, so the
same code runs on the GPU and on the CPU.

``device="auto"`` picks the GPU only when CuPy is importable *and* a CUDA
device really answers (a kernel launch succeeds); otherwise it falls back to
the CPU. ``device="gpu"`` without a working GPU raises an error that says what
to install. The default device can be set with the environment variable
``CUPYNN_DEVICE`` (``auto``, ``cpu`` or ``gpu``).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy
import scipy.sparse

DEVICES = ("auto", "cpu", "gpu")
DEVICE_ENV = "CUPYNN_DEVICE"
DTYPES = {"float32": numpy.float32, "float64": numpy.float64}

_GPU_HINT = (
    "Install CuPy for your CUDA version, for example "
    "`pip install 'cupynn[cuda12]'` (cupy-cuda12x) or `pip install 'cupynn[cuda13]'` "
    "(cupy-cuda13x), on a machine with an NVIDIA GPU and driver; or use device='cpu'."
)


class Backend:
    """Array and sparse modules of one device.

    Attributes
    ----------
    name : {"cpu", "gpu"}
    xp : module
        ``numpy`` or ``cupy``.
    sparse : module
        ``scipy.sparse`` or ``cupyx.scipy.sparse``.
    """

    def __init__(self, name: str, xp: Any, sparse: Any) -> None:
        self.name = name
        self.xp = xp
        self.sparse = sparse

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"

    def asarray(self, array: Any, dtype: Any = None) -> Any:
        """Move ``array`` to this backend's device (a no-op when already there)."""
        return self.xp.asarray(array, dtype=dtype)

    def device_name(self) -> str:
        """A human-readable name of the device, for results files."""
        if not self.is_gpu:
            import platform

            return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        props = self.xp.cuda.runtime.getDeviceProperties(self.xp.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)

    def synchronize(self) -> None:
        """Wait for queued device work (needed before reading a wall clock)."""
        if self.is_gpu:
            self.xp.cuda.get_current_stream().synchronize()

    def read_later(self, array: Any) -> "PendingValue":
        """Start copying a (small) device array to the host without waiting for the device.

        On the GPU the copy is queued on the current stream into pinned host
        memory, behind the work that computes the value, and an event marks
        its end: :meth:`PendingValue.ready` asks the event without blocking.
        On the CPU the value is there at once. The training loop shows its
        progress-bar loss this way, so that the bar never makes the host wait.
        """
        if not self.is_gpu:
            return PendingValue(numpy.array(array), None)
        cupy = self.xp
        array = cupy.ascontiguousarray(array)
        memory = cupy.cuda.alloc_pinned_memory(max(array.nbytes, 1))
        host = numpy.frombuffer(memory, array.dtype, array.size).reshape(array.shape)
        stream = cupy.cuda.get_current_stream()
        # The runtime call itself (stable across CuPy versions): queued, never waited for.
        cupy.cuda.runtime.memcpyAsync(host.ctypes.data, array.data.ptr, array.nbytes,
                                      cupy.cuda.runtime.memcpyDeviceToHost, stream.ptr)
        return PendingValue(host, stream.record())

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


class PendingValue:
    """A value on its way from the device to the host (see :meth:`Backend.read_later`)."""

    def __init__(self, host: numpy.ndarray, event: Any) -> None:
        self._host, self._event = host, event

    def ready(self) -> bool:
        """Whether the copy has landed (never waits)."""
        return self._event is None or bool(self._event.done)

    def value(self) -> Any:
        """The host copy; only meaningful once :meth:`ready`."""
        if not self.ready():
            raise RuntimeError("PendingValue.value: the copy has not landed yet; ask ready() first.")
        return self._host.copy()


@functools.lru_cache(maxsize=None)
def _gpu_backend_or_reason() -> tuple[Backend | None, str]:
    """Import CuPy and check once that a GPU answers; return (backend, why-not)."""
    try:
        import cupy
        import cupyx.scipy.sparse as cupy_sparse
    except Exception as exc:  # ImportError, or a CUDA library that fails to load
        return None, f"CuPy could not be imported ({type(exc).__name__}: {exc})."
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None, "CuPy found no CUDA device."
        # A real launch: a driver that lists devices may still fail to run kernels.
        probe = cupy.arange(4, dtype=cupy.float32).sum()
        if float(probe) != 6.0:
            return None, "a test kernel on the GPU returned a wrong result."
    except Exception as exc:
        return None, f"the GPU did not answer ({type(exc).__name__}: {exc})."
    return Backend("gpu", cupy, cupy_sparse), ""


CPU = Backend("cpu", numpy, scipy.sparse)


def gpu_available() -> bool:
    """True when CuPy is installed and a CUDA device runs kernels."""
    return _gpu_backend_or_reason()[0] is not None


def get_backend(device: str | Backend | None = None) -> Backend:
    """Return the backend for ``device``.

    Parameters
    ----------
    device : {"auto", "cpu", "gpu"}, Backend or None
        ``None`` reads ``$CUPYNN_DEVICE`` (default ``"auto"``).

    Raises
    ------
    ValueError
        For an unknown device name.
    RuntimeError
        When ``"gpu"`` is asked for and no GPU answers.
    """
    if isinstance(device, Backend):
        return device
    source = "device"
    if device is None:
        device = os.environ.get(DEVICE_ENV, "auto") or "auto"
        source = f"${DEVICE_ENV}"
    if not isinstance(device, str) or device.lower() not in DEVICES:
        raise ValueError(
            f"The {source!s} parameter must be one of {list(DEVICES)}. Got {device!r} instead."
        )
    device = device.lower()
    if device == "cpu":
        return CPU
    backend, reason = _gpu_backend_or_reason()
    if backend is not None:
        return backend
    if device == "gpu":
        raise RuntimeError(f"device='gpu' was asked for, but {reason} {_GPU_HINT}")
    return CPU


def backend_of(array: Any) -> Backend:
    """The backend an array lives on (CPU for NumPy arrays and scalars)."""
    if isinstance(array, numpy.ndarray) or not hasattr(array, "device"):
        return CPU
    backend, _ = _gpu_backend_or_reason()
    if backend is not None and isinstance(array, backend.xp.ndarray):
        return backend
    return CPU


def to_numpy(array: Any) -> Any:
    """Copy a device array to a NumPy array (NumPy arrays pass through).

    Also accepts Python and NumPy scalars and 0-d arrays; lists and tuples are
    converted element-wise.
    """
    if isinstance(array, (list, tuple)):
        return type(array)(to_numpy(a) for a in array)
    if hasattr(array, "get") and not isinstance(array, (numpy.ndarray, dict)):
        return array.get()
    return numpy.asarray(array)


def resolve_dtype(dtype: Any, owner: str = "MLP") -> Any:
    """Map ``"float32"``/``"float64"`` (or the NumPy types) to a NumPy dtype."""
    try:
        key = numpy.dtype(dtype).name
    except TypeError:
        key = None
    if key not in DTYPES:
        raise TypeError(
            f"The 'dtype' parameter of {owner} must be one of {list(DTYPES)}. "
            f"Got {dtype!r} instead."
        )
    return numpy.dtype(DTYPES[key])
