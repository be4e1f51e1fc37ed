"""A CuPy-shaped fake GPU: cupynn's GPU code paths run on the CPU (issue 19).

The next work captures the training step as a CUDA graph. Without a GPU this
fake proves everything but speed: which kernels a step launches, that a
captured region allocates nothing and never waits for the device, and that a
replay of the graph does what the eager step does.

* :class:`FakeGpu` is a device: ``fake.backend`` is a
  :class:`cupynn.backend.Backend` named ``"gpu"`` whose ``xp`` delegates to
  NumPy and makes :class:`DeviceArray` arrays (a ``numpy.ndarray`` subclass with
  CuPy's ``get``, ``set``, ``data.ptr`` and ``device``), and whose ``xp.cuda``
  has the streams, graph capture, events and runtime calls cupynn uses.
* Installed (``with FakeGpu() as fake:`` or the :func:`fake_gpu` fixture),
  ``get_backend("gpu")`` and ``backend_of(a DeviceArray)`` answer the fake, and
  ``cupynn.kernels._launch.cuda_function`` (and every cupynn module's copy of
  it) hands out :class:`EmulatedKernel` objects: called as CuPy calls a
  RawKernel, ``kernel(grid, block, args)``, they check the arguments against the
  ``.cu`` signature and run the kernel thread by thread (or warp by warp)
  through ``tests/cuda_host/emulate.py``. Uninstalling restores every reference.
* Capture as CUDA's: between ``stream.begin_capture()`` and ``end_capture()`` a
  kernel call is recorded, not run, and ``graph.launch()`` runs the recorded
  calls in order. NumPy work on device arrays during a capture runs once, then
  and there, and is not replayed (a real graph holds only what was launched on
  its stream; cupynn's graph step launches nothing but its own kernels): it is
  listed in ``graph.host_ops``. A capture records its launches
  (``graph.launches``), the NumPy buffers allocated during it
  (``graph.allocations``, from :mod:`tracemalloc`), and in strict mode
  (the default) fails as CUDA would on a host synchronisation (``.get()``,
  ``float()``/``int()``/``bool()`` of a device array, ``synchronize()``, a
  data-dependent shape such as ``nonzero``), a host-to-device copy, a module
  load, and, at ``end_capture()``, an allocation larger than
  ``allocation_limit`` bytes.

What is not faked raises :class:`NotFaked` (a NotImplementedError) naming it:
cuSPARSE (``backend.sparse``, ``cupyx.scipy.sparse``), ``RawModule``, CuPy
memory hooks and pools. Kernels must be 1-D launches (cupynn's are). Unlike
CuPy, ``numpy.asarray(device_array)`` gives a host view without complaint (a
subclass cannot refuse it), and cupynn code that tests
``isinstance(x, numpy.ndarray)`` sees a device array as a host one.

Use::

    from fake_gpu import FakeGpu, fake_gpu  # the fixture: def test_x(fake_gpu): ...

    with FakeGpu() as fake:
        model = cupynn.MLP([6, 8, 3], device=fake.backend, dtype="float64")
        stream = fake.xp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            ...  # kernels only, on buffers made before
            graph = stream.end_capture()
        graph.launch(stream)  # graph.launches, graph.allocations, graph.host_ops
"""

from __future__ import annotations

import collections
import ctypes
import re
import threading
import tracemalloc
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy
import pytest

import cupynn.backend
from cupynn.backend import Backend

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import compile_cu, launch, pointer
    from cuda_host.emulate import WARP_CALLS
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import compile_cu, launch, pointer
    from tests.cuda_host.emulate import WARP_CALLS

KERNEL_DIR = Path(cupynn.backend.__file__).resolve().parent / "kernels"
NUMPY_DOMAIN = numpy.lib.tracemalloc_domain
ALLOCATION_LIMIT = 256  # bytes: a larger NumPy buffer made during a strict capture fails it
DEVICE_NAME = "cupynn fake GPU (NumPy on the CPU)"
_HERE = str(Path(__file__).resolve())
_NUMPY_DIR = str(Path(numpy.__file__).resolve().parent)


class CaptureError(RuntimeError):
    """What CUDA refuses during stream capture (it would invalidate the capture)."""


class NotFaked(NotImplementedError, AttributeError):
    """CuPy API the fake does not provide. An AttributeError too, so that ``hasattr``
    and ``getattr(..., default)`` probes answer as for a missing attribute."""


def _not_faked(what: str) -> NotFaked:
    return NotFaked(f"The fake GPU (tests/fake_gpu.py) does not fake {what}; "
                    "this GPU path needs a real GPU.")


# ------------------------------------------------------------------ the installed fake
_ACTIVE: list["FakeGpu"] = []
_STATE = threading.local()  # depth: inside a NumPy function called on device arrays


def _active() -> "FakeGpu | None":
    return _ACTIVE[0] if _ACTIVE else None


def _depth() -> int:
    return getattr(_STATE, "depth", 0)


def _note(op: str) -> None:
    """A NumPy operation on device arrays: listed when it runs during a capture, and
    counted in ``array_ops`` otherwise (on a GPU each is a CuPy launch or copy)."""
    fake = _active()
    if fake is not None and _depth() == 0:
        if fake._capture is not None:
            fake._capture.host_ops.append(op)
        else:
            fake.array_ops.append(op)


def _sync(what: str) -> None:
    """A host synchronisation: fails a strict capture, is listed in a lax one."""
    fake = _active()
    if fake is not None and fake._capture is not None:
        capture = fake._capture
        if capture.strict:
            capture.failed = what
            raise CaptureError(f"{what} during stream capture: CUDA invalidates a capture that "
                               "waits for the device or copies host memory.")
        capture.syncs.append(what)


def _to_device(result: Any) -> Any:
    """NumPy results as CuPy gives them: arrays on the device, scalars as 0-d arrays."""
    if type(result) is numpy.ndarray:
        return result.view(DeviceArray)
    if isinstance(result, numpy.generic):
        return numpy.asarray(result).view(DeviceArray)
    if isinstance(result, tuple):
        return tuple(_to_device(r) for r in result)
    if isinstance(result, list):
        return [_to_device(r) for r in result]
    return result


def _host(value: Any) -> Any:
    return value.view(numpy.ndarray) if isinstance(value, DeviceArray) else value


# ------------------------------------------------------------------ device arrays
def _host_read(name: str, what: str) -> Callable:
    """ndarray's method ``name``, as a synchronisation (``what``) first."""
    read = getattr(numpy.ndarray, name)

    def method(self: numpy.ndarray, *args: Any) -> Any:
        _sync(what)
        return read(self.view(numpy.ndarray), *args)

    method.__name__ = method.__qualname__ = name
    return method


class MemoryPointer:
    """``array.data`` of CuPy: the address of the first element (``ptr``)."""

    def __init__(self, array: numpy.ndarray) -> None:
        self.ptr = int(array.ctypes.data) if array.size else 0
        self.device = FakeDevice()


class DeviceArray(numpy.ndarray):
    """An array "on the fake device": NumPy memory with CuPy's array API.

    NumPy operations on it give device arrays (reductions 0-d arrays, as CuPy);
    reading a value on the host (``get``, ``float``, ``int``, ``bool``, ``item``,
    ``tolist``, boolean-mask indexing) is a synchronisation, which a strict
    capture refuses. A ufunc that mixes it with a plain NumPy array raises
    TypeError, as CuPy does.
    """

    @property
    def data(self) -> MemoryPointer:  # type: ignore[override]
        return MemoryPointer(self)

    @property
    def device(self) -> "FakeDevice":  # type: ignore[override]
        return FakeDevice()

    def get(self, stream: Any = None, order: str = "C", out: Any = None,
            blocking: bool = True) -> numpy.ndarray:
        """A NumPy copy (a synchronisation)."""
        _sync("DeviceArray.get()")
        if out is not None:
            out[...] = self.view(numpy.ndarray)
            return out
        return numpy.array(self.view(numpy.ndarray), order=order, copy=True)

    def set(self, arr: Any, stream: Any = None) -> None:
        """Copy the NumPy array ``arr`` (of this shape) in (a host-to-device copy)."""
        _sync("DeviceArray.set() (a host-to-device copy)")
        arr = numpy.asarray(arr)
        if arr.shape != self.shape:
            raise ValueError(f"DeviceArray.set: shape mismatch {arr.shape} != {self.shape}.")
        self.view(numpy.ndarray)[...] = arr

    def __array_ufunc__(self, ufunc: numpy.ufunc, method: str, *inputs: Any, out: Any = None,
                        **kwargs: Any) -> Any:
        name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
        if _depth() == 0:
            for x in inputs + (out or ()):
                if type(x) is numpy.ndarray and x.ndim:
                    raise TypeError(f"fake GPU: {name} mixes a device array with a NumPy array "
                                    "(CuPy refuses host arrays in device operations).")
        _note(name)
        if out is not None:
            kwargs["out"] = tuple(_host(o) for o in out)
        result = getattr(ufunc, method)(*(_host(x) for x in inputs), **kwargs)
        if method == "at":
            return None
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _to_device(result)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func.__name__ not in _METADATA:
            _note(func.__name__)
        _STATE.depth = _depth() + 1
        try:
            result = super().__array_function__(func, types, args, kwargs)
        finally:
            _STATE.depth -= 1
        return _to_device(result)

    def __getitem__(self, key: Any) -> Any:
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, numpy.ndarray) and k.dtype == bool for k in keys):
            _sync("boolean-mask indexing of a device array (its size is read on the host)")
        result = super().__getitem__(key)
        return _to_device(result) if isinstance(result, numpy.generic) else result

    def __setitem__(self, key: Any, value: Any) -> None:
        if type(value) is numpy.ndarray and value.ndim:
            _sync("assigning a NumPy array into a device array (a host-to-device copy)")
        _note("__setitem__")
        super().__setitem__(key, value)

    def __iter__(self) -> Any:
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    # Reading a value on the host waits for the device.
    __float__ = _host_read("__float__", "float() of a device array")
    __int__ = _host_read("__int__", "int() of a device array")
    __index__ = _host_read("__index__", "a device array used as an index")
    __bool__ = _host_read("__bool__", "bool() of a device array")
    __complex__ = _host_read("__complex__", "complex() of a device array")
    item = _host_read("item", "DeviceArray.item()")
    tolist = _host_read("tolist", "DeviceArray.tolist()")


# ------------------------------------------------------------------ the array module
# NumPy functions that only read metadata: not device work, never listed.
_METADATA = frozenset({"result_type", "may_share_memory", "shares_memory", "can_cast",
                       "promote_types", "dtype", "ndim", "shape", "size", "isscalar",
                       "broadcast_shapes", "iinfo", "finfo", "issubdtype"})
# CuPy reads these results' sizes on the host: a synchronisation.
_SYNCING = frozenset({"nonzero", "flatnonzero", "argwhere", "unique", "compress", "extract"})
# From host data, these copy to the device (CuPy copies; so does the fake).
_TRANSFERS = frozenset({"asarray", "array", "asanyarray", "ascontiguousarray"})


class ArrayModule(types.ModuleType):
    """``xp`` of the fake device: NumPy, with device arrays and ``xp.cuda``."""

    def __init__(self, fake: "FakeGpu", numpy_module: Any = numpy, name: str = "fake_cupy") -> None:
        super().__init__(name)
        self._numpy = numpy_module
        self._fake = fake
        self._cache: dict[str, Any] = {}
        if numpy_module is numpy:
            self.ndarray = DeviceArray
            self.cuda = CudaModule(fake)
            self.__version__ = f"fake ({DEVICE_NAME}; NumPy {numpy.__version__})"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._cache:
            return self._cache[name]
        if name == "RawModule" or name == "RawKernel":
            raise _not_faked(f"cupy.{name} (cupynn's kernels reach the fake through "
                             "kernels._launch.cuda_function)")
        value = getattr(self._numpy, name)
        if isinstance(value, types.ModuleType):
            value = ArrayModule(self._fake, value, f"{self.__name__}.{name}")
        elif (callable(value) and not isinstance(value, (type, numpy.ufunc))
              and name not in _METADATA):
            value = _device_function(name, value)
        self._cache[name] = value
        return value


def _device_function(name: str, function: Callable) -> Callable:
    """``function`` as CuPy's: results on the device, host data copied in."""

    def call(*args: Any, **kwargs: Any) -> Any:
        if name in _SYNCING or (name == "where" and len(args) + len(kwargs) == 1):
            _sync(f"xp.{name} (its result's size is read on the host)")
        source = args[0] if name in _TRANSFERS and args else None
        if source is not None and not isinstance(source, DeviceArray):
            _sync(f"xp.{name} of host data (a host-to-device copy)")
            source = numpy.array(source, dtype=kwargs.get("dtype", args[1] if len(args) > 1
                                                          else None), copy=True)
            args = (source, *args[1:])
        elif source is None:
            _note(name)
        _STATE.depth = _depth() + 1
        try:
            result = function(*args, **kwargs)
        finally:
            _STATE.depth -= 1
        if source is not None:
            if result.ndim != source.ndim:  # NumPy's ascontiguousarray makes 0-d 1-d; CuPy's not
                result = result.reshape(source.shape)
            if isinstance(source, DeviceArray):
                if _same_view(result, source):
                    return source  # CuPy hands back the array itself when nothing changes
                _note(name)  # a copy or a conversion on the device
        return _to_device(result)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"numpy.{name} on the fake device."
    return call


def _same_view(a: numpy.ndarray, b: numpy.ndarray) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype and a.strides == b.strides
            and a.__array_interface__["data"][0] == b.__array_interface__["data"][0])


class _NoSparse(types.ModuleType):
    """``backend.sparse`` of the fake: cuSPARSE is not faked."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise _not_faked(f"cuSPARSE (cupyx.scipy.sparse.{name}, backend.sparse; "
                         "e.g. spmm method='cusparse')")


# ------------------------------------------------------------------ cupy.cuda
class FakeDevice:
    """``cupy.cuda.Device``: device 0, the only one."""

    def __init__(self, device: int | None = None) -> None:
        if device not in (None, 0):
            raise ValueError(f"The fake GPU has one device, 0. Got {device!r}.")
        self.id = 0
        self.compute_capability = "90"

    def __enter__(self) -> "FakeDevice":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def synchronize(self) -> None:
        _sync("Device.synchronize()")

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, FakeDevice)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "<fake CUDA Device 0>"


class FakeEvent:
    """``cupy.cuda.Event``: every queued operation has finished when it is asked."""

    done = True

    def record(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        _sync("Event.synchronize()")


class FakeStream:
    """``cupy.cuda.Stream``: a context manager that makes it current, and graph capture."""

    _fake: "FakeGpu"

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False,
                 priority: int | None = None) -> None:
        self.is_null = bool(null)
        self.non_blocking = bool(non_blocking)
        self.ptr = 0 if null else id(self)

    def __enter__(self) -> "FakeStream":
        self._fake._streams.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fake._streams.pop()

    def use(self) -> "FakeStream":
        self._fake._streams[:] = [self]
        return self

    @property
    def done(self) -> bool:
        return True

    def synchronize(self) -> None:
        _sync("Stream.synchronize()")

    def record(self, event: Any = None) -> FakeEvent:
        return FakeEvent() if event is None else event

    def wait_event(self, event: Any) -> None:
        """Order this stream after ``event``: the fake runs everything in order already."""
        if not isinstance(event, FakeEvent):
            raise TypeError(f"Stream.wait_event takes an Event. Got {type(event).__name__}.")

    def is_capturing(self) -> bool:
        capture = self._fake._capture
        return capture is not None and capture.stream is self

    def begin_capture(self, mode: Any = None) -> None:
        """Start recording this stream's launches into a graph (see :class:`FakeGpu`)."""
        self._fake._begin_capture(self)

    def end_capture(self) -> "FakeGraph":
        """Stop recording; the graph of what was launched (strict: fails as CUDA would)."""
        return self._fake._end_capture(self)

    def __repr__(self) -> str:
        return f"<fake CUDA Stream {'null' if self.is_null else hex(self.ptr)}>"


class _Runtime:
    """``cupy.cuda.runtime``: what :class:`cupynn.backend.Backend` calls."""

    memcpyHostToHost, memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice = 0, 1, 2, 3

    def __init__(self, fake: "FakeGpu") -> None:
        self._fake = fake

    @staticmethod
    def getDeviceCount() -> int:
        return 1

    @staticmethod
    def getDeviceProperties(device: int) -> dict:
        return {"name": DEVICE_NAME.encode(), "totalGlobalMem": 0, "multiProcessorCount": 1,
                "major": 9, "minor": 0}

    @staticmethod
    def deviceSynchronize() -> None:
        _sync("runtime.deviceSynchronize()")

    def memcpyAsync(self, dst: int, src: int, size: int, kind: int, stream: int) -> None:
        """Queued on the stream: recorded into a capture, done at once otherwise."""
        self._fake._enqueue(_Call("memcpyAsync", lambda: ctypes.memmove(dst, src, size)))

    def __getattr__(self, name: str) -> Any:
        raise _not_faked(f"cupy.cuda.runtime.{name}")


class _MemoryHook:
    """``cupy.cuda.MemoryHook``: the fake has no memory pool to hook."""

    def __enter__(self) -> Any:
        raise _not_faked("CuPy memory hooks (cupynn.memory's GPU peak tracker)")

    def __exit__(self, *exc: Any) -> None:
        return None


class CudaModule(types.ModuleType):
    """``cupy.cuda`` of the fake: Stream, Device, Event, runtime, pinned memory."""

    def __init__(self, fake: "FakeGpu") -> None:
        super().__init__("fake_cupy.cuda")
        self.Stream = type("Stream", (FakeStream,), {"_fake": fake})
        self.Stream.null = self.Stream(null=True)
        self.Device = FakeDevice
        self.Event = FakeEvent
        self.MemoryHook = _MemoryHook
        self.runtime = _Runtime(fake)
        self._fake = fake

    def get_current_stream(self) -> FakeStream:
        streams = self._fake._streams
        return streams[-1] if streams else self.Stream.null

    def alloc_pinned_memory(self, size: int) -> bytearray:
        """Host memory a ``numpy.frombuffer`` can view (pinned allocation is a sync in CUDA)."""
        _sync("alloc_pinned_memory()")
        return bytearray(int(size))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise _not_faked(f"cupy.cuda.{name}")


# ------------------------------------------------------------------ kernels
_C_TYPES = {
    "int": (ctypes.c_int, numpy.int32), "long long": (ctypes.c_longlong, numpy.int64),
    "unsigned long long": (ctypes.c_ulonglong, numpy.uint64),
    "float": (ctypes.c_float, numpy.float32), "double": (ctypes.c_double, numpy.float64),
}
_SIGNATURE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')


@dataclass(frozen=True)
class Parameter:
    """One kernel parameter: its C type, and the NumPy type an argument must have
    (the pointee's for a pointer)."""

    text: str
    is_pointer: bool
    numpy_type: type
    ctype: type


def _parameter(text: str) -> Parameter:
    words = text.replace("*", " * ").replace("__restrict__", " ").split()
    is_pointer = "*" in words
    base = " ".join(w for w in words[:-1] if w not in ("const", "*"))
    if base not in _C_TYPES:
        raise TypeError(f"fake GPU: kernel parameter {text.strip()!r} has a type the fake "
                        f"does not map ({sorted(_C_TYPES)}).")
    ctype, numpy_type = _C_TYPES[base]
    return Parameter(" ".join(text.split()), is_pointer, numpy_type,
                     pointer(numpy_type) if is_pointer else ctype)


def kernel_signatures(source: Path) -> dict[str, tuple[Parameter, ...]]:
    """The ``extern "C" __global__`` kernels of a ``.cu`` file and their parameters."""
    text = re.sub(r"//[^\n]*", "", source.read_text())
    return {name: tuple(_parameter(p) for p in params.split(",") if p.strip())
            for name, params in _SIGNATURE.findall(text)}


_DEFINITION = re.compile(r"\b(\w+)\s*\([^(){};]*\)\s*\{")
_NOT_FUNCTIONS = frozenset({"if", "for", "while", "switch", "catch", "return", "sizeof"})


def warp_kernels(source: Path) -> set[str]:
    """The kernels of a ``.cu`` file that meet their lanes (a warp-level call in their
    body or in a function they call): the emulation runs those warp by warp and
    the others thread by thread (much faster). A kernel misjudged as
    thread-by-thread fails loudly: ``cuda_host.h`` refuses a warp-level call
    outside a warp launch."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", source.read_text(), flags=re.S)
    bodies: dict[str, str] = collections.defaultdict(str)
    for match in _DEFINITION.finditer(text):
        if match.group(1) in _NOT_FUNCTIONS:
            continue
        depth, end = 0, match.end() - 1
        for end in range(match.end() - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        bodies[match.group(1)] += text[match.end():end]
    calls = {name: {other for other in bodies if other != name
                    and re.search(rf"\b{other}\s*[<(]", body)} for name, body in bodies.items()}
    found = set()
    for kernel in kernel_signatures(source):
        seen, todo = set(), [kernel]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(calls.get(name, ()))
        if any(WARP_CALLS.search(bodies.get(name, "")) for name in seen):
            found.add(kernel)
    return found


def _dims(value: Any, what: str, name: str) -> tuple[int]:
    dims = (value,) if isinstance(value, (int, numpy.integer)) else tuple(value)
    if not dims or any(int(d) != 1 for d in dims[1:]):
        raise ValueError(f"fake GPU: {name} was launched with {what} {value!r}; the emulation "
                         "runs 1-D launches only ((x,), (x, 1) or (x, 1, 1)).")
    return (int(dims[0]),)


@dataclass
class _Call:
    """One queued operation of a stream: a kernel launch or a copy."""

    name: str
    run: Callable[[], None]


class EmulatedKernel:
    """A kernel of a ``.cu`` file, called as CuPy calls a RawKernel:
    ``kernel(grid, block, args)``, run on the CPU by ``tests/cuda_host``.

    The arguments are checked against the kernel's signature as the GPU would
    read them: a device array (of the pointee's dtype) for each pointer, and
    for each scalar the NumPy type of its C type (``numpy.int32`` for ``int``,
    ``numpy.int64`` for ``long long``, ``numpy.float32`` for ``float``...):
    CuPy passes a Python int as 64 bits and a float as a double, which a
    kernel taking ``int`` or ``float`` would misread.
    """

    def __init__(self, fake: "FakeGpu", filename: str, name: str) -> None:
        self.fake, self.filename, self.name = fake, filename, name
        signatures = kernel_signatures(KERNEL_DIR / filename)
        if name not in signatures:
            raise AttributeError(f"{filename} has no extern \"C\" kernel {name!r} "
                                 f"(it has {sorted(signatures)}).")
        self.parameters = signatures[name]
        self.warps = name in warp_kernels(KERNEL_DIR / filename)

    def __call__(self, grid: Any, block: Any, args: tuple, *, shared_mem: int = 0,
                 stream: Any = None) -> None:
        grid, block = _dims(grid, "grid", self.name), _dims(block, "block", self.name)
        if shared_mem:
            raise ValueError(f"fake GPU: {self.name}: dynamic shared memory is not emulated.")
        args = tuple(args)  # scalars frozen as they are now; arrays by reference
        self._check(args)
        self.fake._enqueue(_Call(self.name, lambda: self._run(grid, block, args)))

    def _check(self, args: tuple) -> None:
        if len(args) != len(self.parameters):
            raise TypeError(f"fake GPU: {self.name} takes {len(self.parameters)} arguments "
                            f"({', '.join(p.text for p in self.parameters)}). "
                            f"Got {len(args)}.")
        for index, (param, arg) in enumerate(zip(self.parameters, args)):
            where = f"fake GPU: {self.name} argument {index} ({param.text})"
            if param.is_pointer:
                if not isinstance(arg, DeviceArray):
                    raise TypeError(f"{where} must be a device array. Got "
                                    f"{type(arg).__name__} (CuPy refuses host arrays).")
                if arg.dtype != numpy.dtype(param.numpy_type):
                    raise TypeError(f"{where} points at {numpy.dtype(param.numpy_type)}. "
                                    f"Got a {arg.dtype} array.")
                if not arg.flags.c_contiguous:
                    raise ValueError(f"{where}: the array must be C-contiguous (the kernel "
                                     "sees its data pointer only).")
            elif type(arg) is not param.numpy_type:
                raise TypeError(f"{where} must be numpy.{param.numpy_type.__name__}. Got "
                                f"{type(arg).__name__} {arg!r}.")

    def _run(self, grid: tuple[int], block: tuple[int], args: tuple) -> None:
        lib = compile_cu(KERNEL_DIR / self.filename)
        launch(lib, self.name, grid, block, [p.ctype for p in self.parameters],
               [a.view(numpy.ndarray) if isinstance(a, DeviceArray) else a for a in args],
               reverse=self.fake.reverse, warps=self.warps)

    def __repr__(self) -> str:
        return f"<EmulatedKernel {self.filename}:{self.name}>"


# ------------------------------------------------------------------ graphs
@dataclass
class Allocations:
    """NumPy buffers made during a capture: ``bytes`` and ``count`` in all, and by
    ``sites`` ((file:line, size in bytes, count), the innermost line outside NumPy
    and this module). Buffers alive at the capture's end or at one of its
    launches are seen (tracemalloc snapshots then); one made and freed between
    two of them is not."""

    bytes: int = 0
    count: int = 0
    sites: list[tuple[str, int, int]] = field(default_factory=list)

    def larger_than(self, limit: int) -> list[tuple[str, int, int]]:
        return [site for site in self.sites if site[1] > limit]


class FakeGraph:
    """What ``end_capture()`` returns: ``launch(stream=None)`` runs the recorded calls
    in order.

    Attributes
    ----------
    launches : list of str
        The kernels recorded (``"memcpyAsync"`` for a queued copy), in order.
    allocations : Allocations
    host_ops : list of str
        NumPy operations on device arrays that ran during the capture and are not
        part of the graph.
    syncs : list of str
        Synchronisations during a lax (``strict=False``) capture.
    """

    def __init__(self, fake: "FakeGpu", calls: list[_Call], allocations: Allocations,
                 host_ops: list[str], syncs: list[str]) -> None:
        self._fake = fake
        self.calls = calls
        self.launches = [c.name for c in calls]
        self.allocations = allocations
        self.host_ops = host_ops
        self.syncs = syncs
        self.replays = 0

    def launch(self, stream: Any = None) -> None:
        """Run the recorded calls (into a capture, when one is going: a child graph)."""
        capture = self._fake._capture
        if capture is not None:
            capture.calls.extend(self.calls)
            capture.snap()
            return
        for call in self.calls:
            call.run()
        self.replays += 1
        self._fake.replays += 1

    def upload(self, stream: Any = None) -> None:
        return None


class _Capture:
    """A capture in progress on ``stream``."""

    def __init__(self, stream: FakeStream, strict: bool) -> None:
        self.stream, self.strict = stream, strict
        self.calls: list[_Call] = []
        self.host_ops: list[str] = []
        self.syncs: list[str] = []
        self.failed: str | None = None
        self.started_tracing = not tracemalloc.is_tracing()
        if self.started_tracing:
            tracemalloc.start(16)
        self._before = self._traces()
        self._new: collections.Counter = collections.Counter()

    @staticmethod
    def _traces() -> collections.Counter:
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.DomainFilter(True, NUMPY_DOMAIN)])
        return collections.Counter((t.traceback, t.size) for t in snapshot.traces)

    def snap(self) -> None:
        """Note the NumPy buffers alive now that were not before the capture."""
        self._new |= self._traces() - self._before

    def finish(self) -> Allocations:
        self.snap()
        if self.started_tracing:
            tracemalloc.stop()
        sites = collections.Counter()
        for (traceback, size), count in self._new.items():
            sites[(_site(traceback), size)] += count
        report = Allocations(sites=[(where, size, count) for (where, size), count
                                    in sorted(sites.items())])
        report.bytes = sum(size * count for _, size, count in report.sites)
        report.count = sum(count for _, _, count in report.sites)
        return report


def _site(traceback: tracemalloc.Traceback) -> str:
    """The innermost frame outside NumPy and this module (frames run oldest first)."""
    frames = list(traceback)
    for frame in reversed(frames):
        if frame.filename != _HERE and not frame.filename.startswith(_NUMPY_DIR):
            return f"{frame.filename}:{frame.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


# ------------------------------------------------------------------ the device
class FakeGpu:
    """A fake CUDA device for cupynn (see the module doc).

    Parameters
    ----------
    strict : bool
        Captures fail as CUDA's would: on a synchronisation, a host-to-device
        copy or a module load during the capture (at once), and on a NumPy
        allocation larger than ``allocation_limit`` bytes (at ``end_capture``).
        With False they are recorded on the graph instead.
    allocation_limit : int
        Bytes; smaller buffers (0-d results, a few bytes) are tolerated.
    reverse : bool
        Run each kernel's blocks and threads last to first (a race shows).

    Attributes
    ----------
    backend : cupynn.backend.Backend
        ``"gpu"``, ``xp`` the fake's array module, ``sparse`` not faked.
    launches : list of str
        Kernels run eagerly (outside captures and replays), in order.
    array_ops : list of str
        NumPy operations on device arrays run eagerly, in order: on a GPU each
        would be one of CuPy's element-wise, reduction or copy launches.
    replays : int
        Graph launches so far.
    graphs : list of FakeGraph
        Every graph captured while installed.
    """

    def __init__(self, *, strict: bool = True, allocation_limit: int = ALLOCATION_LIMIT,
                 reverse: bool = False) -> None:
        self.strict, self.allocation_limit, self.reverse = strict, allocation_limit, reverse
        self.xp = ArrayModule(self)
        self.backend = Backend("gpu", self.xp, _NoSparse("fake_cupyx.scipy.sparse"))
        self.launches: list[str] = []
        self.array_ops: list[str] = []
        self.replays = 0
        self.graphs: list[FakeGraph] = []
        self.loaded: set[str] = set()  # .cu files "loaded" (a capture cannot load one)
        self._streams: list[FakeStream] = []
        self._capture: _Capture | None = None
        self._kernels: dict[tuple[str, str], EmulatedKernel] = {}
        self._patches: list[tuple[Any, str, Any]] = []

    # ---------------------------------------------------------------- arrays
    def asarray(self, array: Any, dtype: Any = None) -> DeviceArray:
        """A device copy of host data (``xp.asarray``)."""
        return self.xp.asarray(array, dtype=dtype)

    # ---------------------------------------------------------------- kernels
    def cuda_function(self, filename: str, name: str) -> EmulatedKernel:
        """What ``kernels._launch.cuda_function`` returns while the fake is installed."""
        if filename not in self.loaded:
            if self._capture is not None and self._capture.strict:
                self._capture.failed = f"loading {filename}"
                raise CaptureError(f"loading the module {filename} during stream capture: "
                                   "run its kernels once before capturing.")
            self.loaded.add(filename)
        key = (filename, name)
        if key not in self._kernels:
            self._kernels[key] = EmulatedKernel(self, filename, name)
        return self._kernels[key]

    def _enqueue(self, call: _Call) -> None:
        if self._capture is not None:
            self._capture.calls.append(call)
            self._capture.snap()  # the buffers this launch reads and writes
        else:
            call.run()
            self.launches.append(call.name)

    # ---------------------------------------------------------------- capture
    def _begin_capture(self, stream: FakeStream) -> None:
        if stream.is_null:
            raise CaptureError("the null stream cannot be captured; use "
                               "cuda.Stream(non_blocking=True).")
        if self._capture is not None:
            raise CaptureError("a capture is already in progress.")
        self._capture = _Capture(stream, self.strict)

    def _end_capture(self, stream: FakeStream) -> FakeGraph:
        capture = self._capture
        if capture is None or capture.stream is not stream:
            raise CaptureError("end_capture() on a stream that is not capturing.")
        self._capture = None
        allocations = capture.finish()
        if capture.failed is not None:
            raise CaptureError(f"the capture was invalidated ({capture.failed}).")
        large = allocations.larger_than(self.allocation_limit)
        if capture.strict and large:
            sites = "; ".join(f"{size} bytes x{count} at {where}" for where, size, count in large)
            raise CaptureError(f"{len(large)} NumPy allocation site(s) of more than "
                               f"{self.allocation_limit} bytes during the capture: {sites}. "
                               "A captured region must use buffers made before it.")
        graph = FakeGraph(self, capture.calls, allocations, capture.host_ops, capture.syncs)
        self.graphs.append(graph)
        return graph

    @property
    def capturing(self) -> bool:
        return self._capture is not None

    # ---------------------------------------------------------------- install
    def install(self) -> "FakeGpu":
        """Answer ``get_backend("gpu")`` and ``backend_of(DeviceArray)`` with this fake and
        emulate ``cuda_function``'s kernels, until :meth:`uninstall`."""
        if _ACTIVE:
            raise RuntimeError("A fake GPU is installed already.")
        backend = cupynn.backend
        from cupynn.kernels import _launch

        originals = {"backend_of": backend.backend_of, "to_numpy": backend.to_numpy,
                     "_gpu_backend_or_reason": backend._gpu_backend_or_reason,
                     "cuda_function": _launch.cuda_function}
        fake = self

        def _gpu_backend_or_reason() -> tuple[Backend, str]:
            return (fake.backend, "") if _ACTIVE else originals["_gpu_backend_or_reason"]()

        def backend_of(array: Any) -> Backend:
            if _ACTIVE and isinstance(array, DeviceArray):
                return fake.backend
            return originals["backend_of"](array)

        def to_numpy(array: Any) -> Any:
            if isinstance(array, DeviceArray):
                return array.get()
            return originals["to_numpy"](array)

        def cuda_function(filename: str, name: str) -> Any:
            return fake.cuda_function(filename, name) if _ACTIVE else \
                originals["cuda_function"](filename, name)

        _gpu_backend_or_reason.cache_clear = lambda: None  # type: ignore[attr-defined]
        self._replacements = {"backend_of": backend_of, "to_numpy": to_numpy,
                              "_gpu_backend_or_reason": _gpu_backend_or_reason,
                              "cuda_function": cuda_function}
        self._originals = originals
        _ACTIVE.append(self)
        try:
            for module in _cupynn_modules():
                for name, original in originals.items():
                    if module.__dict__.get(name) is original:
                        setattr(module, name, self._replacements[name])
                        self._patches.append((module, name, original))
        except BaseException:
            self.uninstall()
            raise
        return self

    def uninstall(self) -> None:
        """Put every patched reference back (also in modules imported meanwhile)."""
        if self._capture is not None:
            capture, self._capture = self._capture, None
            if capture.started_tracing:
                tracemalloc.stop()
        for module, name, original in reversed(self._patches):
            setattr(module, name, original)
        self._patches.clear()
        replacements = getattr(self, "_replacements", {})
        for module in _cupynn_modules():  # imported while installed: they took the fakes
            for name, replacement in replacements.items():
                if module.__dict__.get(name) is replacement:
                    setattr(module, name, self._originals[name])
        self._streams.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def __enter__(self) -> "FakeGpu":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


def _cupynn_modules() -> list[types.ModuleType]:
    import sys

    return [m for name, m in list(sys.modules.items())
            if (name == "cupynn" or name.startswith("cupynn.")) and isinstance(m, types.ModuleType)]


@pytest.fixture
def fake_gpu():
    """A :class:`FakeGpu` installed for the test (uninstalled after it, pass or fail)."""
    with FakeGpu() as fake:
        yield fake
