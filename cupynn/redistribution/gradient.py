"""``gradient`` (RigL) and ``gradient-global``: grow where |dL/dW| is largest.

Both drop the smallest |w| per layer. The dense gradient of a layer is formed
a block of rows at a time (at most ``block_elements`` values, written into
one reused buffer), its absolute value taken in place, the block's active
positions masked, and a running top-k keeps only the best candidates:
neither a layer's nor the model's full dense gradient is ever held at once.
``gradient`` keeps one running top-k per layer (k = the layer's removed
count); ``gradient-global`` one over all sparse layers (k = the total removed
count), with keys offset per layer. A layer's output gradient is released as
soon as its blocks are done.

Memory, beyond the layer's survivors' keys: the block buffer
(``block_elements`` values, or ``MIN_BLOCK_ROWS`` rows where rows are wider
than ``block_elements / MIN_BLOCK_ROWS``; twice that when rows bounded by the
top-k's bar are left out, see :func:`push_layer_gradient`), the running top-k
(at most 2k candidates, a score and a key each; int32 keys where they fit) and
the new keys. ``BLOCK_ELEMENTS`` = 2^18 keeps the block at 1 MiB in float32;
the products stay large enough for BLAS (64 rows of a 4096-wide layer, 334 of a
784-wide one, per call; 32 rows, 42 MB, of a 333 333-wide one).
"""

from __future__ import annotations

from typing import Any

import numpy

from ..backend import to_numpy
from ..validation import check_int
from .base import GradientProbe, Redistributor
from .selection import StreamingTopK

BLOCK_ELEMENTS = 1 << 18


def _key_dtype(n_keys: int) -> Any:
    return numpy.int32 if n_keys < 2**31 else numpy.int64


# A block is skipped when (this factor) x its bound cannot beat the top-k's bar: far
# more than the rounding of a float32 dot product of 2^20 terms or of the norms.
BOUND_MARGIN = 1.01
# Rows of a block of the dense gradient at the least, whatever ``block_elements`` says.
MIN_BLOCK_ROWS = 32


def row_bounds(probe: GradientProbe, index: int) -> numpy.ndarray | None:
    """Per output row of sparse layer ``index``, a bound on |dL/dW| over the whole row:
    ``||dy_r|| * max_c ||x_c||`` (Cauchy-Schwarz; host float64), or None with several
    ranks (each holds only its share of the batch). A row whose unit the ReLU shut
    for the batch has bound 0."""
    if probe.comm is not None:
        return None
    xp = probe.xp
    dy, x = probe.output_grads[index], probe.inputs[index]
    if dy is None:
        return None
    rows = to_numpy(xp.sqrt(xp.einsum("ij,ij->i", dy, dy))).astype(numpy.float64)
    widest = float(xp.sqrt(xp.einsum("ij,ij->i", x, x).max())) if x.shape[0] else 0.0
    return rows * widest


def push_layer_gradient(top: StreamingTopK, probe: GradientProbe, index: int, layer: Any,
                        kept: Any, key_offset: int, block_elements: int) -> None:
    """Offer every inactive position of one layer to ``top``, scored by |grad|.

    Blocks hold at least ``MIN_BLOCK_ROWS`` rows, so that the dense gradient is
    a matrix product that reads ``X`` once per block, not once per row (one row
    of a 333 333-wide layer is 1.3 MB, past ``block_elements``).

    Rows whose scores are bounded (:func:`row_bounds`, with
    :data:`BOUND_MARGIN`) by the top-k's bar cannot place a candidate: they are
    not formed (their scores are pushed as -inf, a block of only such rows is
    not pushed at all). The rows of units the ReLU shut for the batch, a third
    to a half of a wide layer's, bound to 0. The same keys are chosen: the
    scores that could beat the bar are the same.
    """
    xp = layer.backend.xp
    n_rows, n_cols = layer.out_features, layer.in_features
    rows_per_block = min(n_rows, max(MIN_BLOCK_ROWS, block_elements // n_cols, 1))
    starts = list(range(0, n_rows, rows_per_block)) + [n_rows]
    bounds = xp.asarray(numpy.asarray(starts, dtype=numpy.int64) * n_cols)
    cuts = [int(c) for c in to_numpy(xp.searchsorted(kept, bounds))]  # one sync per layer
    row_bound = row_bounds(probe, index)
    if row_bound is not None:
        row_bound *= BOUND_MARGIN
    dtype = probe.output_grads[index].dtype
    buffer = xp.empty((rows_per_block, n_cols), dtype=dtype)
    work = None  # the formed rows of a block with some rows bounded by the bar
    for b in range(len(starts) - 1):
        r0, r1 = starts[b], starts[b + 1]
        formed = (numpy.flatnonzero(row_bound[r0:r1] > top.bar) if row_bound is not None
                  else None)
        if formed is not None and formed.size == 0:
            continue  # no score of the block can beat the bar
        if formed is None or formed.size == r1 - r0:
            scores = probe.dense_gradient_rows(index, slice(r0, r1), out=buffer[:r1 - r0])
            scores = xp.abs(scores, out=scores).reshape(-1)
        else:
            if work is None:
                work = xp.empty((rows_per_block, n_cols), dtype=dtype)
            slots = xp.asarray(formed)
            part = probe.dense_gradient_rows(index, slots + r0, out=work[:formed.size])
            scores = buffer[:r1 - r0]
            scores.fill(-xp.inf)  # may not be chosen (they could not beat the bar)
            scores[slots] = xp.abs(part, out=part)
            scores = scores.reshape(-1)
        scores[kept[cuts[b]:cuts[b + 1]] - r0 * n_cols] = -xp.inf  # active after the drop
        top.push(scores, key_offset + r0 * n_cols)


def removed_counts(model: Any, kept_keys: list[Any]) -> list[int]:
    """Per sparse layer, how many entries the drop removed."""
    return [layer.nnz - int(kept.shape[0]) for layer, kept in zip(model.sparse_layers, kept_keys)]


def grow_by_gradient(model: Any, kept_keys: list[Any], probe: GradientProbe, block_elements: int,
                     counts: Any = None) -> list[Any]:
    """Per sparse layer, ``counts[i]`` new keys (default: what it lost) at its largest
    |dL/dW| among inactive positions; each layer's output gradient released when done."""
    counts = removed_counts(model, kept_keys) if counts is None else counts
    new = []
    for i, (layer, kept, k) in enumerate(zip(model.sparse_layers, kept_keys, counts)):
        top = StreamingTopK(layer.backend.xp, int(k), dtype=layer.dtype,
                            key_dtype=_key_dtype(layer.out_features * layer.in_features))
        push_layer_gradient(top, probe, i, layer, kept, 0, block_elements)
        probe.release(i)
        new.append(top.result())
    return new


def grow_by_gradient_globally(model: Any, kept_keys: list[Any], probe: GradientProbe,
                              block_elements: int) -> list[Any]:
    """The total removed count at the largest |dL/dW| over all sparse layers together."""
    layers = model.sparse_layers
    xp = model.backend.xp
    offsets = [0]
    for layer in layers:
        offsets.append(offsets[-1] + layer.out_features * layer.in_features)
    total = sum(removed_counts(model, kept_keys))
    top = StreamingTopK(xp, total, dtype=model.dtype, key_dtype=_key_dtype(offsets[-1]))
    for i, (layer, kept) in enumerate(zip(layers, kept_keys)):
        push_layer_gradient(top, probe, i, layer, kept, offsets[i], block_elements)
        probe.release(i)
    chosen = top.result()
    del top
    bounds = xp.searchsorted(chosen, xp.asarray(offsets, dtype=xp.int64))
    bounds = [int(b) for b in bounds]
    return [chosen[bounds[i]:bounds[i + 1]] - offsets[i] for i in range(len(layers))]


class Gradient(Redistributor):
    """Per layer: remove round(α·nnz) smallest |w|; add as many at the largest
    |dL/dW| among inactive positions (gradient on the redistribution batch)."""

    name = "gradient"
    uses_batch = True

    def __init__(self, *, seed: int = 0, block_elements: int = BLOCK_ELEMENTS) -> None:
        super().__init__(seed=seed)
        self.block_elements = check_int(block_elements, "block_elements", type(self).__name__, low=1)

    def grow(self, model, drops, kept_keys, probe):
        return grow_by_gradient(model, kept_keys, probe, self.block_elements)


class GradientGlobal(Gradient):
    """Per layer: remove round(α·nnz) smallest |w|; add the total removed count
    at the largest |dL/dW| over all sparse layers together."""

    name = "gradient-global"
    is_global = True

    def grow(self, model, drops, kept_keys, probe):
        return grow_by_gradient_globally(model, kept_keys, probe, self.block_elements)
