"""Shared fixtures: every test that takes ``backend`` runs on each backend present.

Tests that run on the GPU carry the marker ``gpu``: every ``backend``-parametrised
test with the GPU backend, and the tests marked for it by hand (the GPU-only
kernel tests, and tests that compare the backends). ``pytest -m gpu tests`` runs
just those: what ``scripts/gpu_check.py`` runs on a lent GPU (where none answers,
all of them skip or have nothing GPU to do).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy
import pytest

import cupynn

BACKENDS = ["cpu"] + (["gpu"] if cupynn.gpu_available() else [])
# ../shared/data beside the checkout, or $CUPYNN_TEST_DATA (a copy of it: the GPU check
# carries one to the GPU machine, where ../shared does not travel).
DATA_DIR = Path(os.environ.get("CUPYNN_TEST_DATA")
                or Path(__file__).resolve().parents[1].parent / "shared" / "data")


GPU_SKIP_REASON = "needs a CUDA GPU that runs kernels (cupynn.gpu_available() is False)"
# For test modules: skip without a GPU, and mark the test as a GPU test.
needs_gpu = [pytest.mark.gpu,
             pytest.mark.skipif(not cupynn.gpu_available(), reason=GPU_SKIP_REASON)]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on the GPU backend (selected by "
                                       "scripts/gpu_check.py with -m gpu)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend") == "gpu":
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(params=BACKENDS)
def backend(request):
    return cupynn.get_backend(request.param)


@pytest.fixture
def rng():
    return numpy.random.default_rng(1234)


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data; missing data fails under CI and skips elsewhere."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI must have ../shared/data beside the checkout.")
        pytest.skip(f"{path} is not available on this machine")
    return path
