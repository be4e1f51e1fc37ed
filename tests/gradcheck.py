"""Central-difference and directional gradient checks, float64."""

from __future__ import annotations

from collections.abc import Callable

import numpy

from cupynn import to_numpy


def numeric_gradient(f: Callable[[], float], array, h: float = 1e-6) -> numpy.ndarray:
    """d f / d array by central differences, perturbing ``array`` in place.

    ``array`` may be a NumPy or CuPy array (float64); it is restored after.
    """
    flat = array.reshape(-1)
    grad = numpy.zeros(flat.shape[0])
    for i in range(flat.shape[0]):
        old = float(flat[i])
        flat[i] = old + h
        up = f()
        flat[i] = old - h
        down = f()
        flat[i] = old
        grad[i] = (up - down) / (2 * h)
    return grad.reshape(array.shape)


def assert_close_gradient(analytic, numeric, name: str, rtol: float = 1e-6, atol: float = 1e-8):
    analytic = numpy.asarray(to_numpy(analytic), dtype=numpy.float64)
    numeric = numpy.asarray(numeric, dtype=numpy.float64)
    assert analytic.shape == numeric.shape, f"{name}: shape {analytic.shape} != {numeric.shape}"
    err = numpy.abs(analytic - numeric)
    bound = atol + rtol * numpy.abs(numeric)
    worst = int(numpy.argmax(err - bound))
    assert numpy.all(err <= bound), (
        f"{name}: analytic and numeric gradients differ at flat index {worst}: "
        f"{analytic.ravel()[worst]!r} vs {numeric.ravel()[worst]!r} (max abs err {err.max():.3e})")
    # A check of all-zero gradients would prove nothing.
    assert numpy.abs(numeric).max() > 1e-6, f"{name}: the numeric gradient is all ~0"
