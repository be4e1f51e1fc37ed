"""``kernels.adam`` (``adam.cu``, ``cpu.adam``): one body, run over every
implementation present (the NumPy twin, the Numba kernel through the
dispatcher, ``adam.cu`` emulated on the CPU under three launch shapes, and
``adam.cu`` on a GPU), checks each against the twin over several steps. The
dispatcher runs twice: with the hyper-parameters, and as the optimizer calls
it, with :func:`kernels.adam_scalars` made once a step and ``check=False``.

``adam_multi`` (issue 19: one launch for every array of a list) the same way:
one body over its implementations (twin, Numba dispatcher, ``adam_multi_*``
emulated, GPU), each equal bit for bit to the per-array update of its kind;
and one body over the optimizer's (Numba, an emulated GPU, the GPU) training
``Adam(multi_tensor=True)`` beside the per-array ``Adam``, through a
redistribution, bit for bit, counting the launches of a step.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy
import pytest

import cupynn
from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import Backend, get_backend, to_numpy
from cupynn.kernels import numpy_twins as twins
from cupynn.kernels.adam import AdamPointers, adam_multi, adam_scalars, adam_setting, set_adam
from kernel_cases import (ADAM_MULTI_SIZES, ADAM_SIZES, ADAM_TABLE_ORDER, ADAM_TABLE_STEPS,
                          GUARD, LAUNCHES, STEPS, adam_argtypes, adam_hyper, adam_multi_argtypes,
                          adam_reference, adam_state, adam_table, assert_adam_step, dtype_params,
                          grid_and_block, guarded, host_library, suffix_of, to_gpu)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import launch
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import launch

adam_module = importlib.import_module("cupynn.kernels.adam")  # kernels.adam is the function


@dataclass(frozen=True)
class Adam:
    """One implementation: ``load`` the state (p, g, m, v) where it runs, ``step``
    it in place, ``read`` p, g, m, v back as NumPy (the first ``n`` values)."""

    load: Callable[[dict, int], Any]
    step: Callable[[Any, int, int], None]
    read: Callable[[Any, int], dict]
    sizes: tuple[int, ...]


def _host(state: dict, n: int) -> dict:
    return {k: state[k].copy() for k in "pgmv"}


def _read_host(arrays: dict, n: int) -> dict:
    return {k: arrays[k][:n] for k in "pgmv"}


def _twin_step(a: dict, n: int, step: int) -> None:
    twins.adam(a["p"], a["g"], a["m"], a["v"], **adam_hyper(step))


def _dispatcher_step(max_blocks: int | None = None, made: bool = False) -> Callable:
    """kernels.adam given the hyper-parameters, or (``made``) the scalars of
    adam_scalars and check=False, as Adam.step calls it."""
    def step(a: dict, n: int, t: int) -> None:
        if made:
            scalars = kernels.adam_scalars(a["p"].dtype, **adam_hyper(t))
            kernels.adam(a["p"], a["g"], a["m"], a["v"], scalars, check=False,
                         max_blocks=max_blocks)
        else:
            kernels.adam(a["p"], a["g"], a["m"], a["v"], max_blocks=max_blocks, **adam_hyper(t))
    return step


def _emulated(config: str) -> Adam:
    """adam.cu run on the CPU one (block, thread) at a time, outputs followed by
    NaN guard cells that it must not write."""
    def load(state: dict, n: int) -> dict:
        return {k: guarded(state[k]) for k in "pgmv"}

    def step(a: dict, n: int, t: int) -> None:
        dtype = a["p"].dtype.type
        h = adam_hyper(t)
        launch(host_library("adam.cu"), f"adam_{suffix_of(dtype)}", *grid_and_block(config, n),
               adam_argtypes(dtype),
               [a["p"], a["g"], a["m"], a["v"], h["lr"], h["b1"], h["b2"], 1 - h["b1"],
                1 - h["b2"], h["eps"], h["bc1"], h["bc2"], n])
        for name in "pmv":
            assert numpy.isnan(a[name][n:]).all(), "the kernel wrote past n"

    return Adam(load, step, _read_host, tuple(ADAM_SIZES))


def _gpu(max_blocks: int | None, made: bool = False) -> Adam:
    return Adam(lambda state, n: to_gpu(_host(state, n)), _dispatcher_step(max_blocks, made),
                lambda a, n: {k: to_numpy(a[k]) for k in "pgmv"}, tuple(ADAM_SIZES) + (3000,))


IMPLEMENTATIONS = {
    "twin": Adam(_host, _twin_step, _read_host, tuple(ADAM_SIZES)),
    "numba": Adam(_host, _dispatcher_step(), _read_host, tuple(ADAM_SIZES) + (100_003,)),
    "numba-scalars": Adam(_host, _dispatcher_step(made=True), _read_host, tuple(ADAM_SIZES)),
    **{f"emulated-{config}": _emulated(config) for config in LAUNCHES},
    "gpu-full_grid": _gpu(None),
    "gpu-max_blocks_2": _gpu(2),
    "gpu-scalars": _gpu(None, made=True),
}
CALLS = [pytest.param(name, n, id=f"{name}-{n}",
                      marks=needs_gpu if name.startswith("gpu") else ())
         for name, impl in IMPLEMENTATIONS.items() for n in impl.sizes]


@pytest.mark.parametrize("name, n", CALLS)
@dtype_params
def test_adam_matches_twin(name, n, dtype):
    impl = IMPLEMENTATIONS[name]
    arrays = impl.load(adam_state(n, dtype), n)
    for step in STEPS:
        ref = adam_reference(impl.read(arrays, n), step)
        impl.step(arrays, n, step)
        after = impl.read(arrays, n)
        assert_adam_step(after["p"], after["m"], after["v"], ref, dtype)


def test_adam_scalars_are_adam_cu_arguments_in_the_dtype():
    s = kernels.adam_scalars(numpy.float32, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, bc1=0.1,
                             bc2=0.001)
    assert isinstance(s, kernels.AdamScalars)
    assert all(type(value) is numpy.float32 for value in s)
    # 1 - b in double, then rounded: not 1 - float32(0.999)
    assert s.one_minus_b2 == numpy.float32(1.0 - 0.999) != 1 - numpy.float32(0.999)
    assert list(s) == [numpy.float32(x) for x in (1e-3, 0.9, 0.999, 1 - 0.9, 1 - 0.999,
                                                   1e-8, 0.1, 0.001)]


def test_adam_with_scalars_equals_adam_with_hyper_parameters():
    state = adam_state(37, numpy.float64)
    a, b = _host(state, 37), _host(state, 37)
    _dispatcher_step()(a, 37, 3)
    _dispatcher_step(made=True)(b, 37, 3)
    for k in "pmv":
        numpy.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("scalars, hyper, message", [
    (None, dict(lr=1e-3, b1=0.9), r"give either scalars or all of \['lr', 'b1', 'b2', 'eps', "
                                  r"'bc1', 'bc2'\]. Got \['lr', 'b1'\] instead"),
    ("made", dict(lr=1e-3), r"Got scalars and \['lr'\] instead"),
    ("float32", {}, r"scalars must be AdamScalars in float64 \(adam_scalars\('float64', ...\)\)"),
    ((1.0,) * 8, {}, r"scalars must be AdamScalars in float64"),
])
def test_adam_rejects_bad_scalars(scalars, hyper, message):
    a = _host(adam_state(5, numpy.float64), 5)
    if scalars in ("made", "float32"):
        scalars = kernels.adam_scalars("float64" if scalars == "made" else "float32",
                                       **adam_hyper(1))
    with pytest.raises(TypeError, match=message):
        kernels.adam(a["p"], a["g"], a["m"], a["v"], scalars, **hyper)


# --- adam_multi --------------------------------------------------------------------


@dataclass(frozen=True)
class Multi:
    """One implementation of adam_multi: ``load`` the states (a list of p, g, m, v
    dicts) and the table where it runs, ``step`` the list with row ``k`` in one
    call, ``single`` step one dict with the per-array update of the same kind,
    ``read`` a dict back as NumPy (its first ``n`` values)."""

    load: Callable[[list[dict], numpy.ndarray], tuple[list, Any]]
    step: Callable[[list, Any, int], None]
    single: Callable[[dict, int], None]
    read: Callable[[Any, int], dict]


def _lists(arrays: list[dict], sizes: tuple[int, ...] | None = None) -> list[list]:
    """[ps, gs, ms, vs] of a list of dicts (their first ``sizes`` values: views)."""
    sizes = sizes or [len(a["p"]) for a in arrays]
    return [[a[k][:n] for a, n in zip(arrays, sizes)] for k in "pgmv"]


def _row(xp: Any, k: int) -> Any:
    return xp.asarray(numpy.array([k], dtype=numpy.int64))


def _host_multi(states: list[dict], table: numpy.ndarray) -> tuple[list, Any]:
    return [_host(s, 0) for s in states], table.copy()


def _twin_multi(arrays: list[dict], table: Any, k: int) -> None:
    twins.adam_multi(*_lists(arrays), table, _row(numpy, k))


def _numba_multi(arrays: list[dict], table: Any, k: int) -> None:
    adam_multi(*_lists(arrays), table, _row(numpy, k))


def _emulated_multi(config: str, reverse: bool = False) -> Multi:
    """adam_multi_* run on the CPU, each array followed by NaN guard cells; the
    pointer tables are AdamPointers' (on NumPy: the arrays' host addresses)."""
    def load(states: list[dict], table: numpy.ndarray) -> tuple[list, Any]:
        return [{k: guarded(s[k]) for k in "pgmv"} for s in states], table.copy()

    def step(arrays: list[dict], table: Any, k: int) -> None:
        sizes = [len(a["p"]) - GUARD for a in arrays]
        pointers = AdamPointers()
        pointers.update(*_lists(arrays, sizes), numpy)
        grid, block = grid_and_block(config, max(pointers.total, 1))
        launch(host_library("adam.cu"), f"adam_multi_{suffix_of(table.dtype.type)}", grid, block,
               adam_multi_argtypes(table.dtype),
               [pointers.p_ptrs, pointers.g_ptrs, pointers.m_ptrs, pointers.v_ptrs,
                pointers.offsets, pointers.n_arrays, table, _row(numpy, k)], reverse=reverse)
        for a, n in zip(arrays, sizes):
            for name in "pmv":
                assert numpy.isnan(a[name][n:]).all(), "the kernel wrote past an array"

    return Multi(load, step, _twin_step, lambda a, n: _read_host(a, len(a["p"]) - GUARD))


def _gpu_multi(max_blocks: int | None) -> Multi:
    def load(states: list[dict], table: numpy.ndarray) -> tuple[list, Any]:
        return [to_gpu(s) for s in states], get_backend("gpu").xp.asarray(table)

    def step(arrays: list[dict], table: Any, k: int) -> None:
        adam_multi(*_lists(arrays), table, _row(get_backend("gpu").xp, k), max_blocks=max_blocks)

    return Multi(load, step, _dispatcher_step(max_blocks, made=True),
                 lambda a, n: {k: to_numpy(a[k]) for k in "pgmv"})


MULTI = {
    "twin": Multi(_host_multi, _twin_multi, _twin_step, _read_host),
    "numba": Multi(_host_multi, _numba_multi, _dispatcher_step(made=True), _read_host),
    **{f"emulated-{config}": _emulated_multi(config) for config in LAUNCHES},
    "emulated-grid2_block32-reversed": _emulated_multi("grid2_block32", reverse=True),
    "gpu-full_grid": _gpu_multi(None),
    "gpu-max_blocks_2": _gpu_multi(2),
}
MULTI_CALLS = [pytest.param(name, sizes, id=f"{name}-{label}",
                            marks=needs_gpu if name.startswith("gpu") else ())
               for name in MULTI for label, sizes in ADAM_MULTI_SIZES.items()]


@pytest.mark.parametrize("name, sizes", MULTI_CALLS)
@dtype_params
def test_adam_multi_equals_per_array_bit_for_bit(name, sizes, dtype):
    """adam_multi with row k of a table of steps is, array by array, the per-array
    update of that step (the twin's for the twin and the emulation, the dispatcher's
    for the Numba kernel and the GPU); the emulation also equals the twin."""
    impl = MULTI[name]
    states = [adam_state(n, dtype, seed=i) for i, n in enumerate(sizes)]
    multi, table = impl.load(states, adam_table(dtype))
    single, _ = impl.load(states, adam_table(dtype))
    twin = [_host(s, 0) for s in states]
    for k in ADAM_TABLE_ORDER:
        impl.step(multi, table, k)
        for a, b, n in zip(single, twin, sizes):
            impl.single(a, n, ADAM_TABLE_STEPS[k])
            _twin_step(b, n, ADAM_TABLE_STEPS[k])
        for a, b, c, n in zip(multi, single, twin, sizes):
            got, want = impl.read(a, n), impl.read(b, n)
            for key in "pgmv":
                numpy.testing.assert_array_equal(got[key], want[key], err_msg=key)
                if name.startswith("emulated"):
                    numpy.testing.assert_array_equal(got[key], c[key], err_msg=key)


def test_adam_multi_twin_reads_the_scalars_of_its_row():
    """The twin's row k is adam with step k's hyper-parameters, and the table is
    adam_scalars' rows: 1 - b in double, then rounded."""
    for dtype in (numpy.float32, numpy.float64):
        table = adam_table(dtype)
        assert table.dtype == dtype and table.shape == (len(ADAM_TABLE_STEPS), 8)
        assert tuple(table[3]) == tuple(adam_scalars(dtype, **adam_hyper(ADAM_TABLE_STEPS[3])))


def test_adam_pointers_are_made_again_only_when_arrays_move():
    arrays = [_host(adam_state(n, numpy.float64, seed=n), 0) for n in (3, 0, 5)]
    pointers = AdamPointers()
    pointers.update(*_lists(arrays), numpy)
    first = pointers.p_ptrs
    assert pointers.n_arrays == 3 and pointers.total == 8
    numpy.testing.assert_array_equal(pointers.offsets, [0, 3, 3, 8])
    assert pointers.offsets.dtype == numpy.int64 and pointers.p_ptrs.dtype == numpy.uint64
    for k, name in enumerate("pgmv"):
        table = (pointers.p_ptrs, pointers.g_ptrs, pointers.m_ptrs, pointers.v_ptrs)[k]
        assert list(table) == [a[name].ctypes.data for a in arrays]
    pointers.update(*_lists(arrays), numpy)
    assert pointers.p_ptrs is first  # the same arrays: the same tables, nothing copied
    old = arrays[2]["p"]
    arrays[2]["p"] = old.copy()  # a redistribution swaps a layer's data
    pointers.update(*_lists(arrays), numpy)
    assert pointers.p_ptrs is not first and pointers.p_ptrs[2] == arrays[2]["p"].ctypes.data
    arrays[2]["p"] = old  # back at the old addresses (a memory pool's turn): kept
    pointers.update(*_lists(arrays), numpy)
    assert pointers.p_ptrs is first
    for n in range(AdamPointers.KEEP + 1):  # older tables go
        arrays[0]["g"] = arrays[0]["g"].copy()
        pointers.update(*_lists(arrays), numpy)
    assert len(pointers._tables) == AdamPointers.KEEP


def test_adam_multi_on_the_cpu_takes_the_rows_scalars():
    state = adam_state(37, numpy.float32)
    a, b = _host(state, 0), _host(state, 0)
    table = adam_table(numpy.float32)
    adam_multi([a["p"]], [a["g"]], [a["m"]], [a["v"]], table, _row(numpy, 2))
    kernels.adam(b["p"], b["g"], b["m"], b["v"], **adam_hyper(ADAM_TABLE_STEPS[2]))
    for k in "pmv":
        numpy.testing.assert_array_equal(a[k], b[k])
    adam_multi([], [], [], [], table, _row(numpy, 0))  # nothing to do


@pytest.mark.parametrize("change, error, message", [
    (dict(gs=[]), ValueError, r"ps, gs, ms, vs must be lists of one length. Got \[1, 0, 1, 1\]"),
    (dict(table=numpy.zeros((2, 7))), ValueError, r"table must have shape \(n_rows >= 1, 8\). "
                                                  r"Got \(2, 7\) instead"),
    (dict(table=numpy.zeros((0, 8))), ValueError, r"table must have shape"),
    (dict(table=numpy.zeros((2, 8), numpy.float32)), TypeError, r"all float arrays must have one "
                                                                r"dtype. Got float32 and float64"),
    (dict(row=numpy.zeros(1, numpy.int32)), TypeError, r"row must be a \(1,\) int64 array. "
                                                        r"Got int32 \(1,\) instead"),
    (dict(row=numpy.array([2])), ValueError, r"row must hold a row of table, in \[0, 2\). Got 2"),
    (dict(row=numpy.array([-1])), ValueError, r"Got -1 instead"),
    (dict(ms=[numpy.zeros(5)]), ValueError, r"ps\[0\], gs\[0\], ms\[0\], vs\[0\] must be "
                                            r"flat and of one length. Got \(6,\), \(6,\), "
                                            r"\(5,\), \(6,\) instead"),
    (dict(vs=[numpy.zeros(12)[::2]]), ValueError, r"'vs\[0\]' must be C-contiguous"),
])
def test_adam_multi_rejects_bad_input(change, error, message):
    flat = numpy.ones(6)
    args = dict(ps=[flat.copy()], gs=[flat.copy()], ms=[flat.copy()], vs=[flat.copy()],
                table=numpy.zeros((2, 8)), row=numpy.array([0]))
    args.update(change)
    with pytest.raises(error, match=message):
        adam_multi(**args)


def test_adam_setting_reads_the_environment(monkeypatch):
    monkeypatch.setattr(adam_module._ADAM, "chosen", None)
    monkeypatch.delenv("CUPYNN_ADAM", raising=False)
    assert adam_setting() == "per-array"
    monkeypatch.setattr(adam_module._ADAM, "chosen", None)
    monkeypatch.setenv("CUPYNN_ADAM", "multi")
    assert adam_setting() == "multi"
    assert cupynn.Adam(cupynn.MLP([3, 2], device="cpu")).multi_tensor is True
    assert cupynn.Adam(cupynn.MLP([3, 2], device="cpu"), multi_tensor=False).multi_tensor is False
    set_adam("per-array")
    assert adam_setting() == "per-array"
    with pytest.raises(ValueError, match=r"The Adam update \(set_adam\) must be one of "
                                         r"\['per-array', 'multi'\]. Got 'fused' instead"):
        set_adam("fused")
    monkeypatch.setattr(adam_module._ADAM, "chosen", None)
    monkeypatch.setenv("CUPYNN_ADAM", "multi-tensor")
    with pytest.raises(ValueError, match=r"\(\$CUPYNN_ADAM\) must be one of"):
        adam_setting()


# --- the optimizer: Adam(multi_tensor=True) beside the per-array Adam ----------------


def _emulated_gpu(monkeypatch) -> list[tuple[str, int]]:
    """Make kernels.adam and adam_multi take NumPy arrays for GPU arrays and run
    adam.cu's kernels emulated on the CPU: the optimizer's GPU path (address
    tables, the row view of its table of steps, the grids) without a GPU. Returns
    the list that each launch appends its (kernel, total elements) to."""
    fake = Backend("gpu", numpy, None)  # NumPy arrays, taken for device arrays
    launches: list[tuple[str, int]] = []

    def cuda_function(filename: str, name: str) -> Callable:
        assert filename == "adam.cu"
        dtype = numpy.float32 if name.endswith("f32") else numpy.float64
        multi = name.startswith("adam_multi")

        def kernel(grid: tuple, block: tuple, args: tuple) -> None:
            args = [a if isinstance(a, numpy.ndarray) else a.item() for a in args]
            launches.append((name, int(args[4][-1]) if multi else args[-1]))
            launch(host_library("adam.cu"), name, grid, block,
                   adam_multi_argtypes(dtype) if multi else adam_argtypes(dtype), args)
        return kernel

    monkeypatch.setattr(adam_module, "backend_of", lambda array: fake)
    monkeypatch.setattr(adam_module, "cuda_function", cuda_function)
    return launches


def _train(model: Any, optimizer: Any, x: Any, y: Any, steps: int) -> None:
    for _ in range(steps):
        _, grad = cupynn.losses.cross_entropy(model.forward(x), y)
        model.backward(grad, need_input_grad=False)
        optimizer.step()


TRAINING = {
    "numba": ("cpu", ()),
    "emulated_gpu": ("cpu", ()),
    "gpu": ("gpu", needs_gpu),
}


@pytest.mark.parametrize("name", [pytest.param(name, marks=marks, id=name)
                                  for name, (_, marks) in TRAINING.items()])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_multi_tensor_adam_trains_as_per_array_adam(name, dtype, monkeypatch):
    """A few training steps, a redistribution (new data arrays and moments: new
    address tables), more steps: the same bits either way, in one launch a step."""
    launches = _emulated_gpu(monkeypatch) if name == "emulated_gpu" else None
    backend = get_backend(TRAINING[name][0])
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((16, 12))
    y = backend.asarray(rng.integers(0, 3, 16))
    runs = []
    for multi_tensor in (False, True):
        model = cupynn.MLP([12, 20, 16, 3], density=0.3, seed=4, dtype=dtype, device=backend)
        optimizer = cupynn.Adam(model, lr=3e-3, multi_tensor=multi_tensor)
        n_arrays = sum(len(layer.parameters()) for layer in model.layers)
        counts = []
        for steps in (3, 2):
            start = len(launches) if launches is not None else 0
            _train(model, optimizer, x, y, steps)
            if launches is not None:
                counts.append((len(launches) - start) / steps)
            if steps == 3:
                cupynn.redistribution.create("random", seed=0).redistribute(
                    model, optimizer, 0.3, x, y)
        if launches is not None:
            assert counts == [1 if multi_tensor else n_arrays] * 2, counts
        runs.append((model.state_dict(), optimizer.state_dict()))
    (model_a, opt_a), (model_b, opt_b) = runs
    assert model_a.keys() == model_b.keys() and opt_a.keys() == opt_b.keys()
    for key in model_a:
        numpy.testing.assert_array_equal(model_a[key], model_b[key], err_msg=key)
    for key in opt_a:
        numpy.testing.assert_array_equal(opt_a[key], opt_b[key], err_msg=key)
