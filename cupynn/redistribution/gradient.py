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
from .selection import StreamingTopK, kth_largest

BLOCK_ELEMENTS = 1 << 18


def _key_dtype(n_keys: int) -> Any:
    return numpy.int32 if n_keys < 2**31 else numpy.int64


# A block is skipped when (this factor) x its bound cannot beat the top-k's bar: far
# more than the rounding of a float32 dot product of 2^20 terms or of the norms.
BOUND_MARGIN = 1.01
# Rows of a block of the dense gradient at the least, whatever ``block_elements`` says.
MIN_BLOCK_ROWS = 32


class Bounds:
    """Cauchy-Schwarz bounds on one layer's dense gradient |dY X^T| (one process).

    ``|g_rc| <= ||dy_r|| ||x_c||``: ``rows`` holds ``||dy_r||`` times
    :data:`BOUND_MARGIN` (host float64), ``columns`` the ``||x_c||`` sorted
    descending (host) and ``order`` the columns in that order (on the device).
    A row whose unit the ReLU shut for the batch, or a column whose input unit
    it shut, bounds to 0. ``sorted_inputs()`` is ``X[order]``, made once when a
    block first needs fewer than all columns (the size of ``X``).
    """

    def __init__(self, probe: GradientProbe, index: int) -> None:
        xp = probe.xp
        self.xp = xp
        self.dy, self.x = probe.output_grads[index], probe.inputs[index]
        self.rows = to_numpy(xp.sqrt(xp.einsum("ij,ij->i", self.dy, self.dy))).astype(
            numpy.float64) * BOUND_MARGIN
        norms = xp.sqrt(xp.einsum("ij,ij->i", self.x, self.x))
        self.order = xp.argsort(-norms)
        self.columns = to_numpy(norms[self.order]).astype(numpy.float64)
        self.widest = float(self.columns[0]) if self.columns.size else 0.0
        self._sorted: Any = None

    @classmethod
    def of(cls, probe: GradientProbe, index: int) -> "Bounds | None":
        """The bounds, or None with several ranks (each holds a share of the batch)."""
        if probe.comm is not None or probe.output_grads[index] is None:
            return None
        return cls(probe, index)

    def row_bounds(self) -> numpy.ndarray:
        """Per row, a bound on every |g_rc| of the row (margin included)."""
        return self.rows * self.widest

    def columns_over(self, row_norm: float, bar: float, floor: float) -> int:
        """How many columns, in ``order``, may give a score over ``bar`` and not under
        ``floor`` in rows of (margined) norm at most ``row_norm``: a prefix, the
        columns being sorted."""
        bound = self.columns * row_norm
        return int(numpy.count_nonzero((bound > bar) & (bound >= floor)))

    def sorted_inputs(self) -> Any:
        if self._sorted is None:
            self._sorted = self.x[self.order]
            self._unsorted = self.xp.argsort(self.order)
        return self._sorted

    def unsorted(self) -> Any:
        """Where each column sits in ``order`` (its inverse permutation)."""
        self.sorted_inputs()
        return self._unsorted


def sampled_floor(probe: GradientProbe, layers: list[Any], indices: list[int], kept: list[Any],
                  k: int) -> float:
    """A value the k-th best score of the growth cannot fall below: the k-th best of
    the exact scores of some inactive positions (a subset's k-th best is at most the
    whole set's). The rows with the largest bounds are formed, whole, until at least
    ``k`` inactive positions are scored: about ``k / in_features`` rows, a small
    part of the dense gradient. ``-inf`` when there are fewer positions than ``k``
    or several ranks."""
    if k <= 0 or probe.comm is not None:
        return -numpy.inf
    xp = probe.xp
    candidates = []  # (bound, place in indices, row)
    for j, i in enumerate(indices):
        bounds = Bounds.of(probe, i)
        if bounds is None:
            return -numpy.inf
        b = bounds.row_bounds()
        top = numpy.argsort(-b, kind="stable")[:max(1, -(-k // max(1, layers[j].in_features)) * 2)]
        candidates.extend((float(b[r]), j, int(r)) for r in top)
    candidates.sort(key=lambda c: -c[0])
    scores, have = [], 0
    for _, j, r in candidates:
        if have >= k:
            break
        layer, i = layers[j], indices[j]
        row = xp.abs(probe.output_grads[i][r] @ probe.inputs[i].T)
        n_cols = layer.in_features
        lo, hi = (int(v) for v in to_numpy(xp.searchsorted(
            kept[j], xp.asarray([r * n_cols, (r + 1) * n_cols], dtype=numpy.int64))))
        row[kept[j][lo:hi] - r * n_cols] = -xp.inf  # active: not a candidate
        scores.append(row)
        have += n_cols - (hi - lo)
    if have < k:
        return -numpy.inf
    return float(kth_largest(xp.concatenate(scores), k))


def push_layer_gradient(top: StreamingTopK, probe: GradientProbe, index: int, layer: Any,
                        kept: Any, key_offset: int, block_elements: int,
                        floor: float = -numpy.inf) -> None:
    """Offer every inactive position of one layer to ``top``, scored by |grad|.

    Blocks hold at least ``MIN_BLOCK_ROWS`` rows, so that the dense gradient is
    a matrix product that reads ``X`` once per block, not once per row (one row
    of a 333 333-wide layer is 1.3 MB, past ``block_elements``).

    Scores whose bound (:class:`Bounds`) does not beat the top-k's bar (a
    later score must beat it: an equal one loses the tie to a lower key), or
    is under ``floor`` (a value the final k-th best cannot fall below:
    :func:`sampled_floor`; a score equal to it may still tie in), cannot be
    chosen, and are not formed: rows so bounded (the rows of units the ReLU
    shut for the batch, a third to a half of a wide layer's, bound to 0), and
    in the other rows the columns so bounded with the block's largest row norm. They are
    pushed as -inf, and a block of only such rows is not pushed. The same keys
    are chosen: every score that could be chosen is formed as before.
    """
    xp = layer.backend.xp
    n_rows, n_cols = layer.out_features, layer.in_features
    rows_per_block = min(n_rows, max(MIN_BLOCK_ROWS, block_elements // n_cols, 1))
    starts = list(range(0, n_rows, rows_per_block)) + [n_rows]
    bounds = xp.asarray(numpy.asarray(starts, dtype=numpy.int64) * n_cols)
    cuts = [int(c) for c in to_numpy(xp.searchsorted(kept, bounds))]  # one sync per layer
    bound = Bounds.of(probe, index)
    row_bound = None if bound is None else bound.row_bounds()
    dtype = probe.output_grads[index].dtype
    buffer = xp.empty((rows_per_block, n_cols), dtype=dtype)
    work = None  # the formed part of a block with some scores bounded by the bar
    for b in range(len(starts) - 1):
        r0, r1 = starts[b], starts[b + 1]
        bar = top.bar  # a later score must beat it; the floor it must only reach (ties)
        formed = None if bound is None else numpy.flatnonzero(
            (row_bound[r0:r1] > bar) & (row_bound[r0:r1] >= floor))
        if formed is not None and formed.size == 0:
            continue  # no score of the block can be chosen
        m = n_cols if bound is None else bound.columns_over(
            float(bound.rows[r0 + formed].max()), bar, floor)
        if m == n_cols and (formed is None or formed.size == r1 - r0):
            scores = probe.dense_gradient_rows(index, slice(r0, r1), out=buffer[:r1 - r0])
            scores = xp.abs(scores, out=scores).reshape(-1)
        else:
            if work is None:
                work = xp.empty((rows_per_block, n_cols + 1), dtype=dtype)
            slots = xp.asarray(formed)
            scores = buffer[:r1 - r0]
            if formed.size < r1 - r0 or m == 0:
                scores.fill(-xp.inf)  # may not be chosen (they could not beat the bar)
            if m == n_cols:
                part = probe.dense_gradient_rows(
                    index, slots + r0, out=work.reshape(-1)[:formed.size * n_cols].reshape(
                        formed.size, n_cols))
                scores[slots] = xp.abs(part, out=part)
            elif m:  # formed in the columns' sorted order, then put back in theirs
                part = work[:formed.size, :m + 1]  # the last column: -inf for the rest
                part[:, :m] = xp.matmul(bound.dy[slots + r0], bound.sorted_inputs()[:m].T)
                xp.abs(part, out=part)
                part[:, m] = -xp.inf
                where = xp.minimum(bound.unsorted(), m)
                if formed.size == r1 - r0:
                    xp.take(part, where, axis=1, out=scores)
                else:
                    scores[slots] = xp.take(part, where, axis=1)
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
        floor = sampled_floor(probe, [layer], [i], [kept], int(k))
        push_layer_gradient(top, probe, i, layer, kept, 0, block_elements, floor)
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
    floor = sampled_floor(probe, layers, list(range(len(layers))), kept_keys, total)
    for i, (layer, kept) in enumerate(zip(layers, kept_keys)):
        push_layer_gradient(top, probe, i, layer, kept, offsets[i], block_elements, floor)
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
