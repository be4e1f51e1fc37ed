"""``kernels.adam`` (``adam.cu``, ``cpu.adam``): one body, run over every
implementation present (the NumPy twin, the Numba kernel through the
dispatcher, ``adam.cu`` emulated on the CPU under three launch shapes, and
``adam.cu`` on a GPU), checks each against the twin over several steps. The
dispatcher runs twice: with the hyper-parameters, and as the optimizer calls
it, with :func:`kernels.adam_scalars` made once a step and ``check=False``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy
import pytest

from conftest import needs_gpu
from cupynn import kernels
from cupynn.backend import to_numpy
from cupynn.kernels import numpy_twins as twins
from kernel_cases import (ADAM_SIZES, LAUNCHES, STEPS, adam_argtypes, adam_hyper, adam_reference,
                          adam_state, assert_adam_step, dtype_params, grid_and_block, guarded,
                          host_library, suffix_of, to_gpu)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import launch
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import launch


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
