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


# Values drawn per piece when a layer is built: the host holds this many draws at a
# time (8 bytes each), never the whole layer's (issue 21: a billion weights).
CHUNK = 1 << 20
MAX_NNZ = 2**31 - 1  # int32 indptr and positions


def _pieces(total: int, per: int):
    """(start, stop) ranges of at most ``per`` items covering [0, total)."""
    for start in range(0, total, per):
        yield start, min(total, start + per)


def partition_topology(in_features: int, out_features: int, n: int,
                       rng: numpy.random.Generator, xp=numpy) -> tuple[numpy.ndarray, numpy.ndarray]:
    """CSR pattern with one input per partition and ``n`` partitions per row.

    Returns
    -------
    indptr : (out_features + 1,) int32
    indices : (out_features * n,) int32, sorted and unique within each row.

    Both are built on ``xp``'s device (NumPy or CuPy) a piece of rows at a time
    (about :data:`CHUNK` draws), so building a layer needs no host array of its
    size: the draws are the same as one call for every row would make (NumPy's
    generators draw element after element), so the same seed gives the same
    pattern however it is cut.
    """
    nnz = out_features * n
    if nnz > MAX_NNZ:
        raise ValueError(f"A sparse layer with {nnz} nonzeros does not fit int32 indices "
                         f"(at most {MAX_NNZ}); split it into layers of fewer nonzeros.")
    edges = (numpy.arange(n + 1, dtype=numpy.int64) * in_features) // n  # near-equal cuts
    low, high = edges[:-1], edges[1:]  # high > low since n <= in_features
    indices = xp.empty(nnz, dtype=numpy.int32)
    for start, stop in _pieces(out_features, max(1, CHUNK // n)):
        cols = rng.integers(low, high, size=(stop - start, n))
        indices[start * n:stop * n] = xp.asarray(cols.astype(numpy.int32).ravel())
    indptr = xp.arange(0, nnz + 1, n, dtype=numpy.int32)
    return indptr, indices


def weight_bound(k: int, init: str) -> float:
    """Half-width of the weights' uniform distribution for fan-in ``k``."""
    return 1.0 / k if init == "paper" else math.sqrt(6.0 / k)


def bias_bound(k: int) -> float:
    """Half-width of the biases' uniform distribution for fan-in ``k``."""
    return 1.0 / math.sqrt(k)


def uniform(rng: numpy.random.Generator, shape: int | tuple[int, ...], bound: float,
            dtype: numpy.dtype, xp=numpy) -> numpy.ndarray:
    """U(-bound, bound) samples, drawn in float64 and cast (backend-independent), on
    ``xp``'s device, drawn and cast :data:`CHUNK` at a time (the same values as one
    draw of them all)."""
    out = xp.empty(shape, dtype=dtype)
    flat = out.reshape(-1)
    for start, stop in _pieces(flat.size, CHUNK):
        flat[start:stop] = xp.asarray(rng.uniform(-bound, bound, size=stop - start).astype(dtype))
    return out
