"""Topology and weight initialisation (SPEC §2, after Ertl).

Every output neuron of a sparse layer gets the same number ``n`` of inputs,
``n = max(1, round(density * in_features))`` (round half up). The input range
``[0, in_features)`` is cut into ``n`` contiguous, near-equal partitions and one
input is drawn uniformly inside each, so every row of the CSR pattern is sorted
and unique by construction.

Values: ``init="paper"`` draws weights from U(-1/k, 1/k) and biases from
U(-1/sqrt(k), 1/sqrt(k)), k being the neuron's number of inputs (``n`` for a
sparse layer, ``in_features`` for a dense one). ``init="fan_in"`` is the
fan-in-scaled (He-uniform) alternative: weights from U(-sqrt(6/k), sqrt(6/k)),
biases as above.

Everything is drawn on the host from an explicit ``numpy.random.Generator``, so
the same seed gives the same model on the CPU and on the GPU.
"""

from __future__ import annotations

import math

import numpy

INITS = ("paper", "fan_in")
ALLOCATIONS = ("uniform", "erdos-renyi")


def erdos_renyi_densities(shapes: list[tuple[int, int]], density: float) -> list[float]:
    """Per-layer densities of the Erdős–Rényi allocation (SET; RigL's ERK for dense layers).

    Layer l of ``(in_l, out_l)`` gets d_l = ε (in_l + out_l) / (in_l out_l), ε such that
    Σ d_l in_l out_l = density Σ in_l out_l; a layer whose d_l would exceed 1 is made
    dense (d_l = 1) and ε is worked out again over the others, until none exceeds 1.
    Small layers thus get more of their connections than large ones.
    """
    sizes = [fan_in * fan_out for fan_in, fan_out in shapes]
    budget = density * sum(sizes)
    dense: set[int] = set()
    while True:
        rest = [l for l in range(len(shapes)) if l not in dense]
        if not rest:
            return [1.0] * len(shapes)
        left = budget - sum(sizes[l] for l in dense)
        eps = left / sum(shapes[l][0] + shapes[l][1] for l in rest)
        over = [l for l in rest if eps * (shapes[l][0] + shapes[l][1]) > sizes[l]]
        if not over:
            return [1.0 if l in dense else eps * (shapes[l][0] + shapes[l][1]) / sizes[l]
                    for l in range(len(shapes))]
        dense.update(over)


def inputs_per_neuron(density: float, in_features: int) -> int:
    """n = max(1, round(density * in_features)), rounding halves up."""
    return max(1, min(in_features, int(math.floor(density * in_features + 0.5))))


def partition_topology(in_features: int, out_features: int, n: int,
                       rng: numpy.random.Generator) -> tuple[numpy.ndarray, numpy.ndarray]:
    """CSR pattern with one input per partition and ``n`` partitions per row.

    Returns
    -------
    indptr : (out_features + 1,) int32
    indices : (out_features * n,) int32, sorted and unique within each row.
    """
    edges = (numpy.arange(n + 1, dtype=numpy.int64) * in_features) // n  # near-equal cuts
    low, high = edges[:-1], edges[1:]  # high > low since n <= in_features
    cols = rng.integers(low, high, size=(out_features, n))
    indptr = numpy.arange(out_features + 1, dtype=numpy.int64) * n
    if indptr[-1] > 2**31 - 1:
        raise ValueError(f"A sparse layer with {indptr[-1]} nonzeros does not fit int32 indices.")
    return indptr.astype(numpy.int32), cols.astype(numpy.int32).ravel()


def weight_bound(k: int, init: str) -> float:
    """Half-width of the weights' uniform distribution for fan-in ``k``."""
    return 1.0 / k if init == "paper" else math.sqrt(6.0 / k)


def bias_bound(k: int) -> float:
    """Half-width of the biases' uniform distribution for fan-in ``k``."""
    return 1.0 / math.sqrt(k)


def uniform(rng: numpy.random.Generator, shape: int | tuple[int, ...], bound: float,
            dtype: numpy.dtype) -> numpy.ndarray:
    """U(-bound, bound) samples, drawn in float64 and cast (backend-independent)."""
    return rng.uniform(-bound, bound, size=shape).astype(dtype)
