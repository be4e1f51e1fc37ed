"""Backend selection."""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn.backend import get_backend


def test_cpu_backend_is_numpy():
    backend = get_backend("cpu")
    assert backend.xp is numpy and backend.name == "cpu" and not backend.is_gpu
    assert "CPU" in backend.device_name()


def test_auto_matches_gpu_availability():
    assert get_backend("auto").is_gpu == cupynn.gpu_available()


def test_environment_variable_sets_default(monkeypatch):
    monkeypatch.setenv("CUPYNN_DEVICE", "cpu")
    assert get_backend(None).name == "cpu"
    monkeypatch.setenv("CUPYNN_DEVICE", "quantum")
    with pytest.raises(ValueError, match=r"The \$CUPYNN_DEVICE parameter must be one of"):
        get_backend(None)


def test_unknown_device_raises():
    with pytest.raises(ValueError, match=r"must be one of \['auto', 'cpu', 'gpu'\]. Got 'cuda'"):
        get_backend("cuda")


@pytest.mark.skipif(cupynn.gpu_available(), reason="only meaningful without a GPU")
def test_gpu_without_gpu_says_what_to_install():
    with pytest.raises(RuntimeError, match=r"device='gpu' was asked for.*cupy-cuda12x"):
        get_backend("gpu")


def test_to_numpy_passes_numpy_through():
    a = numpy.arange(3)
    assert cupynn.to_numpy(a) is a
    assert cupynn.to_numpy(numpy.float32(2.5)) == 2.5
