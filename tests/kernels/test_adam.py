"""``kernels.adam`` (``adam.cu``, ``cpu.adam``): one body, run over every
implementation present (the NumPy twin, the Numba kernel through the
dispatcher, ``adam.cu`` emulated on the CPU under three launch shapes, and
``adam.cu`` on a GPU), checks each against the twin over several steps.
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


def _dispatcher_step(max_blocks: int | None = None) -> Callable:
    def step(a: dict, n: int, t: int) -> None:
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


def _gpu(max_blocks: int | None) -> Adam:
    return Adam(lambda state, n: to_gpu(_host(state, n)), _dispatcher_step(max_blocks),
                lambda a, n: {k: to_numpy(a[k]) for k in "pgmv"}, tuple(ADAM_SIZES) + (3000,))


IMPLEMENTATIONS = {
    "twin": Adam(_host, _twin_step, _read_host, tuple(ADAM_SIZES)),
    "numba": Adam(_host, _dispatcher_step(), _read_host, tuple(ADAM_SIZES) + (100_003,)),
    **{f"emulated-{config}": _emulated(config) for config in LAUNCHES},
    "gpu-full_grid": _gpu(None),
    "gpu-max_blocks_2": _gpu(2),
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
