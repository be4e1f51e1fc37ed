"""``kernels.adam`` (``adam.cu``, ``cpu.adam``): emulated CUDA, Numba and GPU against
the twin over several steps.
"""

from __future__ import annotations

import numpy
import pytest

from cupynn import kernels
from cupynn.backend import to_numpy
from kernel_cases import (ADAM_SIZES, STEPS, adam_argtypes, adam_hyper, adam_reference, adam_state,
                          assert_adam_step, dtype_params, gpu, grid_and_block, guarded,
                          host_library, launch_params, suffix_of, to_gpu)

try:  # tests/ is on sys.path (pytest's default rootdir-relative import)
    from cuda_host import launch
except ModuleNotFoundError:  # tests/ became a package
    from tests.cuda_host import launch


@pytest.mark.parametrize("n", ADAM_SIZES)
@dtype_params
@launch_params
def test_emulated_adam_matches_twin(n, dtype, config):
    lib = host_library("adam.cu")
    state = adam_state(n, dtype)
    p, g, m, v = (guarded(state[k]) for k in "pgmv")
    grid, block = grid_and_block(config, n)
    suffix = suffix_of(dtype)
    for step in STEPS:
        ref = adam_reference({"p": p[:n], "g": g[:n], "m": m[:n], "v": v[:n]}, step)
        h = adam_hyper(step)
        launch(lib, f"adam_{suffix}", grid, block, adam_argtypes(dtype),
               [p, g, m, v, h["lr"], h["b1"], h["b2"], 1 - h["b1"], 1 - h["b2"], h["eps"],
                h["bc1"], h["bc2"], n])
        assert_adam_step(p[:n], m[:n], v[:n], ref, dtype)
        for buffer in (p, m, v):
            assert numpy.isnan(buffer[n:]).all(), "the kernel wrote past n"


@pytest.mark.parametrize("n", ADAM_SIZES + [100_003])
@dtype_params
def test_cpu_adam_matches_twin(n, dtype):
    state = adam_state(n, dtype)
    p, g, m, v = (state[k].copy() for k in "pgmv")
    for step in STEPS:
        ref = adam_reference({"p": p, "g": g, "m": m, "v": v}, step)
        kernels.adam(p, g, m, v, **adam_hyper(step))
        assert_adam_step(p, m, v, ref, dtype)


@gpu
@pytest.mark.parametrize("max_blocks", [None, 2], ids=["full_grid", "max_blocks_2"])
@pytest.mark.parametrize("n", ADAM_SIZES + [3000])
@dtype_params
def test_gpu_adam_matches_twin(n, dtype, max_blocks):
    d = to_gpu(adam_state(n, dtype))
    for step in STEPS:
        ref = adam_reference({k: to_numpy(d[k]) for k in "pgmv"}, step)
        kernels.adam(d["p"], d["g"], d["m"], d["v"], max_blocks=max_blocks, **adam_hyper(step))
        assert_adam_step(d["p"], d["m"], d["v"], ref, dtype)
