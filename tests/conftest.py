"""Shared fixtures: every test that takes ``backend`` runs on each backend present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy
import pytest

import cupynn

BACKENDS = ["cpu"] + (["gpu"] if cupynn.gpu_available() else [])
DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
