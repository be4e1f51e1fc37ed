"""``cupynn.kernels.loss`` (``loss.cu``, issue 19): one body checks every
implementation of the three losses against ``cupynn.losses`` (the twins, the
kernels emulated on the CPU under several launch shapes, the kernels on a GPU);
then the kernels against their twins to the last bits, the fixed order of the
mean, the twins' gradients, the arguments' checks and the choice of the GPU
path of ``cupynn.losses`` (``$CUPYNN_LOSS``), which the CPU never takes.
"""

from __future__ import annotations

import importlib
from typing import Callable

import numpy
import pytest

from conftest import needs_gpu
from cupynn import losses
from cupynn.backend import get_backend, to_numpy
from cupynn.kernels import cuda_function, numpy_twins as twins
from gradcheck import assert_close_gradient, numeric_gradient
from kernel_cases import (LAUNCHES, LOSS_CASES, assert_close, dtype_params, emulated_loss,
                          emulated_mean_of_rows, gpu, host_library, suffix_of, to_gpu)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import WarpError
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import WarpError

LOSS = importlib.import_module("cupynn.kernels.loss")
LOSSES = ("softmax_cross_entropy", "binary_cross_entropy", "mean_squared_error")
# The kernels and their twins differ only where exp, log and log1p of the C library
# and of NumPy round differently (and, on a GPU, where a * b + c becomes one fused
# multiply-add): a few units in the last place of each term.
ULPS = 8


def _inputs(loss: str, a: dict) -> tuple[numpy.ndarray, numpy.ndarray]:
    """The two arrays ``loss`` takes, from a LossCase's arrays."""
    return {"softmax_cross_entropy": (a["logits"], a["labels"]),
            "binary_cross_entropy": (a["z"], a["y"]),
            "mean_squared_error": (a["logits"], a["target"])}[loss]


def reference(loss: str, a: dict, case, dtype: type) -> dict:
    """``cupynn.losses``' value and gradient on the CPU, in ``dtype``, with error scales
    from float64: each is the same sum over the absolute values of its terms."""
    total = case.total
    den = case.den
    first, second = _inputs(loss, a)
    if loss == "softmax_cross_entropy":
        value, grad = losses.cross_entropy(first, second, total=total)
        z = first.astype(numpy.float64)
        top = z.max(axis=1, keepdims=True)
        p = numpy.exp(z - top) / numpy.exp(z - top).sum(axis=1, keepdims=True)
        onehot = numpy.zeros_like(p)
        onehot[numpy.arange(case.batch), second] = 1
        rows = numpy.arange(case.batch)
        # log(norm) >= 0 is off by about classes roundings of norm: the 1 per row.
        value_bound = (numpy.abs(numpy.log(numpy.exp(z - top).sum(axis=1)))
                       + numpy.abs(z[rows, second]) + numpy.abs(top[:, 0]) + 1).sum() / den
        grad_bound = (p + onehot) / den
    elif loss == "binary_cross_entropy":
        value, grad = losses.binary_cross_entropy(first, second, total=total)
        z, y = first.astype(numpy.float64), second.astype(numpy.float64)
        value_bound = (numpy.abs(z) * (1 + y) + numpy.log1p(numpy.exp(-numpy.abs(z)))).sum() / den
        grad_bound = (0.5 * (1 + numpy.tanh(z / 2)) + y) / den  # sigmoid(z) + y
    else:
        value, grad = losses.mean_squared_error(first, second, total=total)
        d = first.astype(numpy.float64) - second.astype(numpy.float64)
        value_bound = (d * d).sum() / (den * first.shape[1])
        grad_bound = numpy.abs(first) + numpy.abs(second)
        grad_bound = grad_bound * (2.0 / (den * first.shape[1]))
    return {"value": numpy.asarray(value, dtype=dtype), "grad": grad,
            "value_bound": numpy.asarray(value_bound), "grad_bound": grad_bound}


def _twin(loss: str) -> Callable:
    """cupynn.kernels.loss on NumPy arrays: the twins."""
    def run(a: dict, case, dtype: type) -> tuple:
        return getattr(LOSS, loss)(*_inputs(loss, a), total=case.total)
    return run


def _emulated(loss: str, config: str) -> Callable:
    """loss.cu's per-row kernel under launch ``config``, then mean_of_rows on one warp."""
    def run(a: dict, case, dtype: type) -> tuple:
        value, grad = emulated_loss(loss, a, case, dtype, config)
        # The twins add in the kernels' order: within a few units in the last place.
        t_value, t_grad = _twin(loss)(a, case, dtype)
        ref = reference(loss, a, case, dtype)
        assert_ulps(grad, t_grad, ref["grad_bound"], dtype)
        assert_ulps(value, t_value, ref["value_bound"], dtype)
        if loss == "mean_squared_error":  # subtract, multiply: the same bits
            numpy.testing.assert_array_equal(grad, t_grad)
        return value, grad
    return run


def _gpu(loss: str, max_blocks: int | None) -> Callable:
    def run(a: dict, case, dtype: type) -> tuple:
        xp = get_backend("gpu").xp
        first, second = (xp.asarray(x) for x in _inputs(loss, a))
        grad_out = xp.full(first.shape, numpy.nan, dtype=dtype)
        value, grad = getattr(LOSS, loss)(first, second, total=case.total, grad_out=grad_out,
                                          max_blocks=max_blocks)
        assert grad is grad_out
        return to_numpy(value), to_numpy(grad)
    return run


def assert_ulps(actual, expected, bound, dtype: type, ulps: int = ULPS) -> None:
    """|actual - expected| <= ulps * eps * bound entrywise (NaN counts as a difference)."""
    actual, expected = to_numpy(actual), numpy.asarray(expected)
    assert actual.dtype == expected.dtype == numpy.dtype(dtype)
    assert actual.shape == expected.shape
    err = numpy.abs(actual.astype(numpy.float64) - expected)
    tol = ulps * numpy.finfo(dtype).eps * numpy.asarray(bound, dtype=numpy.float64)
    tol = tol + numpy.finfo(dtype).tiny
    assert (err <= tol).all(), f"differs by up to {float(numpy.max(err / tol)):.3g} x {ulps} ulps"


# name: (run(case arrays, case, dtype) -> (value, grad) NumPy, loss, marks)
IMPLEMENTATIONS = {
    **{f"twin-{loss}": (_twin(loss), loss, ()) for loss in LOSSES},
    **{f"emulated-{loss}-{config}": (_emulated(loss, config), loss, ())
       for loss in LOSSES for config in LAUNCHES},
    **{f"gpu-{loss}-{blocks}": (_gpu(loss, max_blocks), loss, needs_gpu)
       for loss in LOSSES for blocks, max_blocks in (("full_grid", None), ("max_blocks_2", 2))},
}
CALLS = [pytest.param(name, case, id=f"{name}-{case.name}", marks=marks)
         for name, (_, _, marks) in IMPLEMENTATIONS.items() for case in LOSS_CASES]


@pytest.mark.parametrize("name, case", CALLS)
@dtype_params
def test_loss_matches_cupynn_losses(name, case, dtype):
    """One body over every implementation: the twins, loss.cu emulated under several
    launch shapes, loss.cu on a GPU; each within rounding of cupynn.losses."""
    run, loss, _ = IMPLEMENTATIONS[name]
    a = case.arrays(dtype)
    value, grad = run(a, case, dtype)
    ref = reference(loss, a, case, dtype)
    assert_close(value, ref["value"], ref["value_bound"], dtype)
    assert_close(grad, ref["grad"], ref["grad_bound"], dtype)


@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 100, 1000])
@dtype_params
def test_emulated_mean_of_rows_is_its_twin(n, dtype):
    """Additions only: the kernel and its twin give the same bits, whatever the launch
    (threads past the first warp leave) and the order the lanes are handed out in."""
    rng = numpy.random.default_rng(n)
    per_row = (rng.standard_normal(n) * 10.0 ** (numpy.arange(n) % 7)).astype(dtype)
    den = max(n, 1) + 3
    expected = twins.mean_of_rows(per_row, den)
    assert expected.shape == () and expected.dtype == dtype
    for grid, block in [((1,), (32,)), ((1,), (64,)), ((2,), (32,))]:
        for reverse in (False, True):
            got = emulated_mean_of_rows(per_row, den, grid, block, reverse=reverse)
            numpy.testing.assert_array_equal(got, expected)
    assert_close(expected, numpy.asarray(per_row.astype(numpy.float64).sum() / den, dtype=dtype),
                 numpy.asarray(numpy.abs(per_row.astype(numpy.float64)).sum() / den), dtype)


def test_emulated_mean_of_rows_needs_a_whole_warp():
    """Fewer than 32 threads leave lanes out of the full-mask shuffles, which CUDA leaves
    undefined: the emulation says so instead of answering."""
    with pytest.raises(WarpError, match="have returned or are not part of the launch"):
        emulated_mean_of_rows(numpy.ones(40), 40.0, (1,), (16,))


def test_mean_of_rows_order():
    """Lane l adds rows l, l + 32, ... in turn, and the butterfly meets lanes 0 and 1
    last: with 1 at row 0, 2**53 at row 32 and -2**53 at row 1, lane 0 loses the 1
    (2**53 + 1 rounds to 2**53) and the mean is 0, where NumPy's sum gives 1."""
    per_row = numpy.zeros(33)
    per_row[0], per_row[1], per_row[32] = 1.0, -(2.0 ** 53), 2.0 ** 53
    assert float(per_row.sum()) == 1.0
    assert float(twins.mean_of_rows(per_row, 1)) == 0.0
    assert float(emulated_mean_of_rows(per_row, 1.0)) == 0.0


@pytest.mark.parametrize("loss", LOSSES)
@dtype_params
def test_no_rows(loss, dtype):
    """A rank without rows: 0 with a total; the mean of nothing (NaN) without."""
    case = next(c for c in LOSS_CASES if c.name == "total")
    a = {k: v[:0] for k, v in case.arrays(dtype).items()}
    value, grad = getattr(LOSS, loss)(*_inputs(loss, a), total=4)
    assert float(value) == 0.0 and grad.shape == _inputs(loss, a)[0].shape
    value, _ = getattr(LOSS, loss)(*_inputs(loss, a))
    assert numpy.isnan(float(value))
    assert float(emulated_mean_of_rows(numpy.zeros(0, dtype=dtype), 4.0)) == 0.0


@dtype_params
def test_out_of_range_label_gives_a_row_of_nan(dtype):
    """Unchecked labels outside [0, classes): NaN in the row and the loss, and no read
    out of bounds, in the kernel as in its twin."""
    case = next(c for c in LOSS_CASES if c.name == "total")
    a = case.arrays(dtype)
    a["labels"][2], a["labels"][5] = -1, case.classes
    value, grad = LOSS.softmax_cross_entropy(a["logits"], a["labels"], check=False)
    emulated_value, emulated_grad = emulated_loss("softmax_cross_entropy", a, case, dtype,
                                                  "grid2_block32")
    for v, g in ((value, grad), (emulated_value, emulated_grad)):
        assert numpy.isnan(v)
        assert numpy.isnan(g[[2, 5]]).all()
        assert numpy.isfinite(numpy.delete(g, [2, 5], axis=0)).all()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("total", [None, 11])
def test_twin_gradient_is_the_derivative(loss, total):
    """Central differences of the twins' value (float64) give their gradient."""
    case = next(c for c in LOSS_CASES if c.name == "two_classes")
    a = case.arrays(numpy.float64)
    first, second = _inputs(loss, a)
    if loss == "softmax_cross_entropy":
        first = numpy.random.default_rng(4).standard_normal((6, 4))
        second = numpy.array([0, 3, 1, 1, 2, 0])
    f = getattr(LOSS, loss)
    _, grad = f(first, second, total=total)
    numeric = numeric_gradient(lambda: float(f(first, second, total=total)[0]), first)
    assert_close_gradient(grad, numeric, loss)


@pytest.mark.parametrize("loss", LOSSES)
@dtype_params
def test_given_buffers_are_filled(loss, dtype):
    """grad_out, value_out (shape (1,) here) and the first batch cells of a longer
    scratch receive the gradient, the mean and the per-row losses."""
    case = next(c for c in LOSS_CASES if c.name == "batch_37_classes_33")
    first, second = _inputs(loss, case.arrays(dtype))
    grad_out = numpy.full(first.shape, numpy.nan, dtype=dtype)
    value_out = numpy.full(1, numpy.nan, dtype=dtype)
    scratch = numpy.full(case.batch + 3, -7.0, dtype=dtype)
    value, grad = getattr(LOSS, loss)(first, second, grad_out=grad_out, value_out=value_out,
                                      scratch=scratch)
    assert value is value_out and grad is grad_out
    expected_value, expected_grad = getattr(LOSS, loss)(first, second)
    numpy.testing.assert_array_equal(grad_out, expected_grad)
    numpy.testing.assert_array_equal(value_out[0], expected_value)
    numpy.testing.assert_array_equal(scratch[case.batch:], -7.0)
    den = case.batch * (case.classes if loss == "mean_squared_error" else 1)
    numpy.testing.assert_array_equal(twins.mean_of_rows(scratch[:case.batch], den),
                                     expected_value)


def _bad(loss: str, **change) -> Callable:
    def call():
        a = LOSS_CASES[3].arrays(numpy.float64)
        first, second = _inputs(loss, a)
        kw = dict(change)
        first = kw.pop("first", first)
        second = kw.pop("second", second)
        if kw.pop("grad_is_first", False):
            kw["grad_out"] = first
        getattr(LOSS, loss)(first, second, **kw)
    return call


@pytest.mark.parametrize("call, error, message", [
    (_bad("softmax_cross_entropy", second=numpy.zeros(37, dtype=numpy.int32)), TypeError,
     r"labels must be int64 \(labels.astype\('int64'\)\). Got int32"),
    (_bad("softmax_cross_entropy", second=numpy.zeros(36, dtype=numpy.int64)), ValueError,
     r"logits must be \(batch, classes\) and labels \(batch,\)"),
    (_bad("softmax_cross_entropy", first=numpy.zeros((37, 0))), ValueError,
     "at least one class"),
    (_bad("softmax_cross_entropy", second=numpy.full(37, 33)), ValueError,
     r"labels must be in \[0, 33\). Got values in \[33, 33\]"),
    (_bad("softmax_cross_entropy", first=numpy.zeros((37, 33), dtype=numpy.float16)), TypeError,
     "must be float32 or float64. Got float16"),
    (_bad("softmax_cross_entropy", first=numpy.zeros((33, 37)).T), ValueError,
     "'logits' must be C-contiguous"),
    (_bad("softmax_cross_entropy", total=36), ValueError,
     r"total must be an int >= the batch size 37 \(and >= 1\). Got 36"),
    (_bad("softmax_cross_entropy", total=40.0), ValueError, "total must be an int"),
    (_bad("softmax_cross_entropy", grad_out=numpy.zeros((37, 32))), ValueError,
     r"grad_out must have shape \(37, 33\)"),
    (_bad("softmax_cross_entropy", grad_out=numpy.zeros((37, 33), dtype=numpy.float32)),
     TypeError, "one dtype"),
    (_bad("softmax_cross_entropy", grad_is_first=True), ValueError,
     "grad_out must not overlap logits"),
    (_bad("softmax_cross_entropy", value_out=numpy.zeros(2)), ValueError,
     "value_out must have one element"),
    (_bad("softmax_cross_entropy", scratch=numpy.zeros(36)), ValueError,
     "scratch must be flat with at least 37 cells"),
    (_bad("binary_cross_entropy", first=numpy.zeros((37, 2))), ValueError,
     r"logits must be \(batch,\) or \(batch, 1\)"),
    (_bad("binary_cross_entropy", second=numpy.full(37, 2.0)), ValueError,
     r"labels must be in \[0, 1\]. Got values in \[2.0, 2.0\]"),
    (_bad("binary_cross_entropy", second=numpy.zeros(37, dtype=numpy.float32)), TypeError,
     "one dtype"),
    (_bad("mean_squared_error", second=numpy.zeros((37, 32))), ValueError,
     "target of its shape"),
    (_bad("mean_squared_error", second=numpy.full((37, 33), numpy.inf)), ValueError,
     "target must be finite"),
])
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


# The choice of cupynn.losses' GPU path.


@pytest.fixture
def fresh_setting(monkeypatch):
    """Forget the setting read so far: the next call reads $CUPYNN_LOSS again."""
    monkeypatch.setattr(LOSS._LOSS, "chosen", None)
    return monkeypatch


@pytest.mark.parametrize("text, expected", [("", "arrays"), ("arrays", "arrays"),
                                            (" fused ", "fused")])
def test_loss_setting_comes_from_the_environment(fresh_setting, text, expected):
    fresh_setting.setenv(LOSS.LOSS_ENV, text)
    assert LOSS.loss_setting() == expected
    LOSS.set_loss("fused")
    assert LOSS.loss_setting() == "fused"
    LOSS.set_loss()
    assert LOSS.loss_setting() == "arrays"


def test_loss_setting_is_checked(fresh_setting):
    fresh_setting.setenv(LOSS.LOSS_ENV, "kernel")
    with pytest.raises(ValueError, match=r"\$CUPYNN_LOSS\) must be one of \['arrays', 'fused'\]. "
                                         r"Got 'kernel'"):
        LOSS.loss_setting()
    with pytest.raises(ValueError, match=r"set_loss\) must be one of"):
        LOSS.set_loss("fast")


def _losses_calls(dtype: type) -> list[tuple[Callable, tuple, dict]]:
    case = next(c for c in LOSS_CASES if c.name == "grid_stride")
    a = case.arrays(dtype)
    return [(losses.cross_entropy, (a["logits"], a["labels"]), {}),
            (losses.cross_entropy, (a["logits"], a["labels"].astype(numpy.int32)),
             {"total": case.total, "check": False}),
            (losses.binary_cross_entropy, (a["z"][:, None], a["y"]), {}),
            (losses.binary_cross_entropy, (a["z"], a["y"]), {"total": case.total}),
            (losses.mean_squared_error, (a["logits"], a["target"]), {"total": case.total}),
            (losses.mean_squared_error, (a["z"], a["y"]), {})]


@dtype_params
def test_fused_setting_changes_nothing_on_the_cpu(fresh_setting, dtype):
    """$CUPYNN_LOSS=fused: cupynn.losses on the CPU gives the same bits and never calls
    the kernels' module (nor reads the setting)."""
    before = [f(*args, **kw) for f, args, kw in _losses_calls(dtype)]
    fresh_setting.setenv(LOSS.LOSS_ENV, "fused")

    def refuse(*args, **kwargs):
        raise AssertionError("the CPU took the fused path")

    for name in (*LOSSES, "loss_setting"):
        fresh_setting.setattr(LOSS, name, refuse)
    after = [f(*args, **kw) for f, args, kw in _losses_calls(dtype)]
    for (value, grad), (value_after, grad_after) in zip(before, after):
        assert numpy.asarray(value_after).tobytes() == numpy.asarray(value).tobytes()
        assert grad_after.tobytes() == grad.tobytes()
        assert grad_after.dtype == grad.dtype == dtype


@gpu
@dtype_params
def test_gpu_losses_fused_match_arrays(fresh_setting, dtype):
    """On a GPU, CUPYNN_LOSS=fused runs the kernels (two launches) and agrees with the
    array expressions within rounding; weighted losses keep the array expressions."""
    calls = [(f, tuple(get_backend("gpu").asarray(x) for x in args), kw)
             for f, args, kw in _losses_calls(dtype)]
    fresh_setting.setenv(LOSS.LOSS_ENV, "arrays")
    arrays = [f(*args, **kw) for f, args, kw in calls]
    LOSS.set_loss("fused")
    used = []
    for name in LOSSES:
        original = getattr(LOSS, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            used.append(_name)
            return _original(*args, **kwargs)
        fresh_setting.setattr(LOSS, name, spy)
    fused = [f(*args, **kw) for f, args, kw in calls]
    assert sorted(set(used)) == sorted(LOSSES) and len(used) == len(calls)
    for (value, grad), (fused_value, fused_grad) in zip(arrays, fused):
        assert fused_value.shape == () and fused_grad.shape == grad.shape
        bound = numpy.abs(to_numpy(grad)) + 1.0 / 300
        assert_close(fused_grad, to_numpy(grad), bound, dtype)
        assert_close(fused_value, to_numpy(value), numpy.abs(to_numpy(value)) + 1.0, dtype)
    weight = get_backend("gpu").asarray(numpy.ones(300, dtype=dtype))
    f, args, _ = calls[0]
    used.clear()
    f(*args, weight=weight)
    assert not used


@gpu
@dtype_params
def test_gpu_mean_of_rows_is_its_twin(dtype):
    """Additions and one IEEE division: the GPU's mean_of_rows gives the twin's bits."""
    xp = get_backend("gpu").xp
    per_row = numpy.random.default_rng(0).standard_normal(1000).astype(dtype)
    out = xp.full((), numpy.nan, dtype=dtype)
    kernel = cuda_function("loss.cu", f"mean_of_rows_{suffix_of(dtype)}")
    kernel((1,), (32,), (xp.asarray(per_row), out, numpy.int32(1000), dtype(1003)))
    numpy.testing.assert_array_equal(to_numpy(out), twins.mean_of_rows(per_row, 1003))


@gpu
def test_gpu_loss_is_captured_in_a_cuda_graph():
    """With its buffers given, a loss is two launches and no allocation: it can be
    captured in a CUDA graph, and replaying the graph recomputes it from new logits."""
    cupy = get_backend("gpu").xp
    case = next(c for c in LOSS_CASES if c.name == "grid_stride")
    a = to_gpu(case.arrays(numpy.float32))
    logits, labels = a["logits"], a["labels"]
    grad_out = cupy.empty_like(logits)
    value_out = cupy.empty((), dtype=logits.dtype)
    scratch = cupy.empty(case.batch, dtype=logits.dtype)
    buffers = dict(grad_out=grad_out, value_out=value_out, scratch=scratch, check=False)
    LOSS.softmax_cross_entropy(logits, labels, **buffers)  # compiles loss.cu first
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        LOSS.softmax_cross_entropy(logits, labels, **buffers)
        graph = stream.end_capture()
    logits[...] = cupy.asarray(case.arrays(numpy.float32)["target"])
    cupy.cuda.Device().synchronize()  # the stream does not wait for the null stream's copy
    graph.launch(stream)
    stream.synchronize()
    expected_value, expected_grad = LOSS.softmax_cross_entropy(logits, labels)
    numpy.testing.assert_array_equal(to_numpy(grad_out), to_numpy(expected_grad))
    numpy.testing.assert_array_equal(to_numpy(value_out), to_numpy(expected_value))


def test_loss_cu_builds_for_the_cpu():
    """The kernels compile as host C++ (no __shared__, no __syncthreads, no atomics)."""
    lib = host_library("loss.cu")
    for family in ("softmax_cross_entropy_rows", "binary_cross_entropy_rows",
                   "squared_error_rows", "mean_of_rows"):
        assert hasattr(lib, f"{family}_f32") and hasattr(lib, f"{family}_f64")
        assert callable(getattr(twins, family))
