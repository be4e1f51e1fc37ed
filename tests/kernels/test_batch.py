"""``kernels.gather_batch``, ``gather_labels``, ``transpose`` and ``end_step``
(``batch.cu``, plain NumPy on the CPU; issue 19): one body per operation over
every implementation -- the NumPy twin, the CPU dispatcher, ``batch.cu``
emulated on the CPU under several launch shapes (grids smaller than the work
among them), the dispatcher's GPU path with ``batch.cu`` emulated, and
``batch.cu`` on a GPU -- each equal bit for bit to the twin (they copy values,
so there is no rounding to allow for). On the GPU path the counter and the
order are never read on the host.
"""

from __future__ import annotations

import ctypes
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy
import pytest

from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import get_backend, to_numpy
from cupynn.kernels import numpy_twins as twins
from kernel_cases import (GUARD, LAUNCHES, assert_same_bits, dtype_params, emulated_gpu,
                          grid_and_block, host_library, pointer, suffix_of, to_gpu)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import launch
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import launch

BATCH_MODULE = importlib.import_module("cupynn.kernels.batch")
LABEL_DTYPES = [numpy.int64, numpy.float32, numpy.float64]
label_dtype_params = pytest.mark.parametrize("dtype", LABEL_DTYPES,
                                             ids=lambda d: numpy.dtype(d).name)


class DeviceOnly(numpy.ndarray):
    """A NumPy array that the GPU path may hand to kernels but must not read on the
    host (a device counter or order: reading it would synchronise the device and
    would be frozen into a captured graph)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a device-only array was read on the host")

    __getitem__ = __int__ = __float__ = __index__ = __bool__ = item = tolist = _refuse


def device_only(array: numpy.ndarray) -> numpy.ndarray:
    return array.view(DeviceOnly)


@dataclass(frozen=True)
class GatherCase:
    """Data set of ``n`` samples of ``features``, an order, step ``counter`` of
    ``stride`` samples, ``rows`` gathered (rows < stride: the short last batch)."""

    name: str
    n: int
    features: int
    stride: int
    rows: int
    counter: int
    bad_order: bool = False  # order values outside [0, n) at two positions

    def arrays(self, dtype: type) -> dict[str, numpy.ndarray]:
        rng = numpy.random.default_rng(self.n + self.features)
        order = rng.permutation(self.n).astype(numpy.int64)
        if self.bad_order:
            order[self.counter * self.stride] = -1
            order[self.counter * self.stride + 2] = self.n
        x = rng.standard_normal((self.n, self.features))
        x.flat[::7] = -0.0
        if dtype == numpy.int64:
            labels = rng.integers(0, 10, self.n).astype(numpy.int64)
        else:
            labels = rng.standard_normal(self.n).astype(dtype)
        return {"x": x.astype(dtype if dtype != numpy.int64 else numpy.float64),
                "y": labels, "order": order,
                "counter": numpy.array([self.counter], dtype=numpy.int64)}


GATHER_CASES = [
    GatherCase("first_batch", 10, 5, 4, 4, 0),
    GatherCase("second_batch", 10, 5, 4, 4, 1),
    GatherCase("short_last_batch", 10, 5, 4, 2, 2),  # stride > rows
    GatherCase("one_feature", 10, 1, 3, 3, 2),
    GatherCase("one_sample", 6, 4, 1, 1, 5),
    GatherCase("past_the_order", 10, 3, 4, 4, 2),  # positions 8..11 of 10: two missing
    GatherCase("bad_order", 12, 3, 5, 5, 1, bad_order=True),
    # More elements (and labels) than the 64 threads of grid2_block32.
    GatherCase("grid_stride", 300, 7, 100, 90, 2),
]
gather_case_params = pytest.mark.parametrize("case", GATHER_CASES, ids=lambda c: c.name)

TRANSPOSE_SHAPES = [(1, 9), (9, 1), (1, 1), (3, 5), (7, 13), (17, 19), (0, 4), (4, 0)]


def _emulated(config: str) -> Callable:
    """A batch.cu kernel run on the CPU under launch ``config`` into ``out`` followed by
    guard cells holding a value no kernel writes (not the NaN or -1 of a missing row, which
    a write past the end could leave unseen), which must stay as they are."""
    def run(name: str, total: int, args: list, out: numpy.ndarray) -> numpy.ndarray:
        missing = 12345
        flat = numpy.full(out.size + GUARD, missing, dtype=out.dtype)
        args = [flat if a is out else a for a in args]
        argtypes = [pointer(a.dtype) if isinstance(a, numpy.ndarray) else t
                    for a, t in zip(args, _scalar_types(name))]
        launch(host_library("batch.cu"), name, *grid_and_block(config, total), argtypes, args)
        numpy.testing.assert_array_equal(flat[out.size:], missing, "wrote past its output")
        out[...] = flat[:out.size].reshape(out.shape)
        return out
    return run


def _scalar_types(name: str) -> list:
    """The C types of a batch.cu kernel's parameters (arrays: None, taken from the array)."""
    if name.startswith("gather_batch"):
        return [None] * 3 + [ctypes.c_longlong, None, ctypes.c_longlong, ctypes.c_longlong,
                             ctypes.c_int, ctypes.c_int]
    if name.startswith("gather_labels"):
        return [None] * 3 + [ctypes.c_longlong, None, ctypes.c_longlong, ctypes.c_longlong,
                             ctypes.c_int]
    if name.startswith("transpose"):
        return [None, None, ctypes.c_int, ctypes.c_int]
    return [None] * 3 + [ctypes.c_longlong]


def _label_suffix(dtype: type) -> str:
    return "i64" if dtype == numpy.int64 else suffix_of(dtype)


# Each implementation: name -> (kind, marks); kind says how the body runs it.
IMPLEMENTATIONS = {
    "twin": ("twin", ()),
    "cpu": ("cpu", ()),
    **{f"emulated-{config}": ("emulated", ()) for config in LAUNCHES},
    "emulated_gpu": ("emulated_gpu", ()),
    "gpu": ("gpu", needs_gpu),
}
implementation_params = pytest.mark.parametrize(
    "name", [pytest.param(n, marks=m) for n, (_, m) in IMPLEMENTATIONS.items()])


def _dispatch(name: str, monkeypatch) -> tuple[Any, Callable]:
    """(array module for the outputs, to-device conversion) of a dispatcher run, with
    batch.cu emulated behind the GPU path for ``emulated_gpu``."""
    kind = IMPLEMENTATIONS[name][0]
    if kind == "emulated_gpu":
        emulated_gpu(monkeypatch, BATCH_MODULE, "batch.cu")
        return numpy, lambda a: {k: device_only(v) if k in ("order", "counter") else v
                                 for k, v in a.items()}
    if kind == "gpu":
        return get_backend("gpu").xp, to_gpu
    return numpy, lambda a: a


@implementation_params
@gather_case_params
@dtype_params
def test_gather_batch(name, case, dtype, monkeypatch):
    a = case.arrays(dtype)
    expected = twins.gather_batch(a["x"], a["order"], a["counter"], case.stride, case.rows)
    kind = IMPLEMENTATIONS[name][0]
    if kind == "twin":
        got = expected
    elif kind == "emulated":
        out = numpy.empty((case.features, case.rows), dtype=dtype)
        got = _emulated(name.split("-", 1)[1])(
            f"gather_batch_{suffix_of(dtype)}", case.features * case.rows,
            [a["x"], a["order"], a["counter"], case.stride, out, case.n, case.n, case.features,
             case.rows], out)
    else:
        xp, device = _dispatch(name, monkeypatch)
        d = device(a)
        out = xp.full((case.features, case.rows), numpy.nan, dtype=dtype)
        got = kernels.gather_batch(d["x"], d["order"], d["counter"], case.stride, out)
        assert got is out
        numpy.testing.assert_array_equal(to_numpy(d["counter"]).view(numpy.ndarray),
                                         [case.counter])  # read, never changed
    assert_same_bits(got, expected)
    missing = numpy.isnan(expected).all(axis=0)
    assert missing.sum() == {"past_the_order": 2, "bad_order": 2}.get(case.name, 0)


@implementation_params
@gather_case_params
@label_dtype_params
def test_gather_labels(name, case, dtype, monkeypatch):
    a = case.arrays(dtype)
    expected = twins.gather_labels(a["y"], a["order"], a["counter"], case.stride, case.rows)
    kind = IMPLEMENTATIONS[name][0]
    if kind == "twin":
        got = expected
    elif kind == "emulated":
        out = numpy.empty(case.rows, dtype=dtype)
        got = _emulated(name.split("-", 1)[1])(
            f"gather_labels_{_label_suffix(dtype)}", case.rows,
            [a["y"], a["order"], a["counter"], case.stride, out, case.n, case.n, case.rows], out)
    else:
        xp, device = _dispatch(name, monkeypatch)
        d = device(a)
        out = xp.zeros(case.rows, dtype=dtype)
        got = kernels.gather_labels(d["y"], d["order"], d["counter"], case.stride, out)
        assert got is out
    assert_same_bits(got, expected)
    assert expected.dtype == dtype and expected.shape == (case.rows,)
    if case.name in ("past_the_order", "bad_order") and dtype == numpy.int64:
        assert (expected == -1).sum() == 2  # what the losses take for an invalid label


def test_gather_twin_takes_the_rows_of_the_order():
    """The twin against a plain indexing, on a batch within bounds."""
    case = GATHER_CASES[1]
    a = case.arrays(numpy.float64)
    rows = a["order"][case.counter * case.stride:][:case.rows]
    numpy.testing.assert_array_equal(
        twins.gather_batch(a["x"], a["order"], a["counter"], case.stride, case.rows),
        a["x"][rows].T)
    numpy.testing.assert_array_equal(
        twins.gather_labels(a["y"], a["order"], a["counter"], case.stride, case.rows),
        a["y"][rows])


@implementation_params
@pytest.mark.parametrize("shape", TRANSPOSE_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@dtype_params
def test_transpose(name, shape, dtype, monkeypatch):
    rng = numpy.random.default_rng(sum(shape))
    src = rng.standard_normal(shape).astype(dtype)
    src.flat[::3] = -0.0
    expected = twins.transpose(src)
    numpy.testing.assert_array_equal(expected, src.T)
    kind = IMPLEMENTATIONS[name][0]
    if kind == "twin":
        got = expected
    elif kind == "emulated":
        out = numpy.empty(shape[::-1], dtype=dtype)
        got = _emulated(name.split("-", 1)[1])(
            f"transpose_{suffix_of(dtype)}", src.size, [src, out, shape[0], shape[1]], out)
    else:
        xp, device = _dispatch(name, monkeypatch)
        d = device({"src": src})
        out = xp.full(shape[::-1], numpy.nan, dtype=dtype)
        got = kernels.transpose(d["src"], out)
        assert got is out
    assert_same_bits(got, expected)


@implementation_params
@dtype_params
def test_end_step(name, dtype, monkeypatch):
    """Four steps into three slots: three losses recorded in turn, the fourth past the
    end skipped, and the counter at 4; values 0-d and (1,), rounded to float64 exactly."""
    values = [numpy.asarray(v, dtype=dtype) for v in (1.5, -0.1, 3e-8)]
    values.append(numpy.asarray([7.0], dtype=dtype))
    kind = IMPLEMENTATIONS[name][0]
    xp, device = (numpy, lambda a: a) if kind in ("twin", "emulated") else \
        _dispatch(name, monkeypatch)
    losses = xp.full(3, numpy.nan)
    counter = xp.zeros(1, dtype=numpy.int64)
    for value in values:
        if kind == "twin":
            twins.end_step(value, losses, counter)
        elif kind == "emulated":
            v = numpy.ascontiguousarray(value.reshape(-1))
            grid, block = grid_and_block(name.split("-", 1)[1], 1)
            launch(host_library("batch.cu"), f"end_step_{suffix_of(dtype)}", grid, block,
                   [pointer(dtype), pointer(numpy.float64), pointer(numpy.int64),
                    ctypes.c_longlong], [v, losses, counter, 3])
        else:
            d = device({"value": xp.asarray(value), "losses": losses, "counter": counter})
            if kind == "emulated_gpu":
                d["counter"] = device_only(counter)
            kernels.end_step(d["value"], d["losses"], d["counter"])
    assert_same_bits(losses, numpy.array([float(v.reshape(())) for v in values[:3]]))
    numpy.testing.assert_array_equal(to_numpy(counter), [4])


@pytest.mark.parametrize("config", list(LAUNCHES))
def test_emulated_end_step_runs_once_whatever_the_launch(config):
    """Every thread of a larger launch but one returns: one increment, not one a thread."""
    losses = numpy.zeros(5)
    counter = numpy.array([1], dtype=numpy.int64)
    grid, block = grid_and_block(config, 1000)
    launch(host_library("batch.cu"), "end_step_f64", grid, block,
           [pointer(numpy.float64), pointer(numpy.float64), pointer(numpy.int64),
            ctypes.c_longlong], [numpy.array([2.5]), losses, counter, 5])
    assert list(losses) == [0, 2.5, 0, 0, 0] and counter[0] == 2


def test_gather_never_reads_the_counter_on_the_host_path_it_is_given(monkeypatch):
    """Steps 0, 1, 2 of an epoch from one set of arguments: only the counter moves."""
    emulated_gpu(monkeypatch, BATCH_MODULE, "batch.cu")
    case = GatherCase("epoch", 10, 3, 4, 4, 0)
    a = case.arrays(numpy.float32)
    counter = numpy.zeros(1, dtype=numpy.int64)
    out = numpy.empty((3, 4), dtype=numpy.float32)
    losses = numpy.zeros(3)
    for step in range(3):
        kernels.gather_batch(a["x"], device_only(a["order"]), device_only(counter), 4, out)
        expected = twins.gather_batch(a["x"], a["order"], numpy.array([step]), 4, 4)
        assert_same_bits(out, expected)
        kernels.end_step(numpy.float32(step).reshape(1), losses, device_only(counter))
    assert list(losses) == [0, 1, 2] and counter[0] == 3


@pytest.mark.parametrize("call, error, message", [
    (lambda a: kernels.gather_batch(a["x"], a["order"].astype(numpy.int32), a["counter"], 4,
                                    a["out"]), TypeError, "order must be a flat int64 array"),
    (lambda a: kernels.gather_batch(a["x"], a["order"], a["counter"][:0], 4, a["out"]),
     TypeError, r"counter must be an int64 array of shape \(1,\)"),
    (lambda a: kernels.gather_batch(a["x"], a["order"], a["counter"], 4, a["out"][:2]),
     ValueError, r"out must be a C-contiguous array of shape \(5, 4\). Got shape \(2, 4\)"),
    (lambda a: kernels.gather_batch(a["x"], a["order"], a["counter"], 4,
                                    a["out"].astype(numpy.float32)),
     TypeError, "all float arrays must have one dtype"),
    (lambda a: kernels.gather_batch(a["x"], a["order"], a["counter"], 4, a["x"][:5, :4]),
     ValueError, "out must be a C-contiguous array"),
    (lambda a: kernels.gather_labels(a["y"].astype(numpy.int32), a["order"], a["counter"], 4,
                                     numpy.zeros(4, numpy.int32)),
     TypeError, "y must be int64, float32 or float64 and out of its dtype"),
    (lambda a: kernels.gather_labels(a["y"], a["order"], a["counter"], 4,
                                     numpy.zeros(4, numpy.float32)),
     TypeError, "y must be int64, float32 or float64 and out of its dtype"),
    (lambda a: kernels.transpose(a["x"], numpy.empty(a["x"].shape)),
     ValueError, r"out must be a C-contiguous array of shape \(5, 10\)"),
    (lambda a: kernels.transpose(a["x"][:, :4], numpy.empty((4, 10))),
     ValueError, "'src' must be C-contiguous"),
    (lambda a: kernels.end_step(numpy.zeros(2), numpy.zeros(3), a["counter"]),
     ValueError, r"value must be a 0-d or \(1,\) array"),
    (lambda a: kernels.end_step(numpy.zeros(1), numpy.zeros(3, numpy.float32), a["counter"]),
     TypeError, "losses must be a flat float64 array"),
    (lambda a: kernels.end_step(numpy.zeros(1, numpy.int64), numpy.zeros(3), a["counter"]),
     TypeError, "float arrays must be float32 or float64"),
])
def test_bad_arguments_are_rejected(call, error, message):
    a = GatherCase("errors", 10, 5, 4, 4, 0).arrays(numpy.float64)
    a["out"] = numpy.zeros((5, 4))
    with pytest.raises(error, match=message):
        call(a)
