"""``loss`` (after Ertl): grow at the neurons with the largest error signal.

Per layer: drop the round(α·nnz) smallest |w|. Rank the layer's output
neurons by |δ|, the back-propagated error signal summed over the batch
(|Σ_b dY[r, b]|); take the top ``neuron_share`` of them (default 30 %,
at least one); compute only their rows of the dense gradient; give each an
equal share of the layer's removed count (the first ``k mod m`` neurons in
rank order get one more) and add it at the row's largest |g| among inactive
positions.

Surplus: a neuron whose row has fewer free positions than its share takes
what fits; the rest is shared among the other selected neurons by the same
rule and, when they are all full, among the next-ranked neurons. So a layer
always regains exactly what it lost.
"""

from __future__ import annotations

from typing import Any

import numpy

from ..backend import to_numpy
from ..validation import check_int, check_real
from .base import Redistributor
from .gradient import BLOCK_ELEMENTS
from .selection import allocate, round_half_up


def grow_by_error_signal(model: Any, kept_keys: list[Any], probe: Any, neuron_share: float,
                         block_elements: int) -> list[Any]:
    """Per sparse layer, what it lost, at the neurons of largest error signal (module doc)."""
    new = []
    for i, (layer, kept) in enumerate(zip(model.sparse_layers, kept_keys)):
        xp = layer.backend.xp
        k = layer.nnz - int(kept.shape[0])
        if k == 0:
            new.append(xp.empty(0, dtype=xp.int64))
            probe.release(i)
            continue
        n_rows, n_cols = layer.out_features, layer.in_features
        signal = probe.error_signal(i)
        ranking = numpy.lexsort((numpy.arange(n_rows), -signal))  # |δ| desc, index asc
        bounds = xp.arange(n_rows + 1, dtype=xp.int64) * n_cols
        kept_per_row = to_numpy(xp.diff(xp.searchsorted(kept, bounds)))
        free = (n_cols - kept_per_row)[ranking]
        # The top m neurons, widened by the next m in rank order while they are too full.
        m = max(1, round_half_up(neuron_share * n_rows))
        chosen = m
        while free[:chosen].sum() < k:
            chosen += m
        weights = (numpy.arange(n_rows) < chosen).astype(numpy.float64)
        shares = allocate(k, weights, free)
        rows = ranking[shares > 0]
        counts = shares[shares > 0]
        new.append(LossGrowth._grow_rows(probe, i, layer, kept, rows, counts, block_elements))
        probe.release(i)
    return new


class LossGrowth(Redistributor):
    """See the module doc. ``neuron_share`` in (0, 1]; the selected rows of
    the dense gradient are formed ``block_elements`` values at a time."""

    name = "loss"
    uses_batch = True

    def __init__(self, *, seed: int = 0, neuron_share: float = 0.3,
                 block_elements: int = BLOCK_ELEMENTS) -> None:
        super().__init__(seed=seed)
        owner = type(self).__name__
        self.neuron_share = check_real(neuron_share, "neuron_share", owner, 0.0, 1.0,
                                       closed="right")
        self.block_elements = check_int(block_elements, "block_elements", owner, low=1)

    def grow(self, model, drops, kept_keys, probe):
        return grow_by_error_signal(model, kept_keys, probe, self.neuron_share,
                                    self.block_elements)

    @staticmethod
    def _grow_rows(probe, index, layer, kept, rows, counts, block_elements=BLOCK_ELEMENTS):
        """In each of ``rows``, the ``counts`` largest |g| among inactive columns
        (ties: lower column), a block of rows at a time.

        Per row, the count-th largest value is read from a sorted copy of the
        row (values only, no index arrays); the row takes every entry above it
        and, of the entries equal to it, the ones in the lowest columns.
        """
        xp = layer.backend.xp
        n_cols = layer.in_features
        order = numpy.argsort(rows)  # ascending rows: keys come out sorted
        rows, counts = rows[order], counts[order]
        per_block = max(1, block_elements // n_cols)
        found = []
        for a in range(0, len(rows), per_block):
            rows_d = xp.asarray(rows[a:a + per_block]).astype(xp.int64, copy=False)
            count = xp.asarray(counts[a:a + per_block])
            n = int(rows_d.shape[0])
            g = probe.dense_gradient_rows(index, rows_d)
            g = xp.abs(g, out=g)
            # Mask the active entries of these rows: the runs kept[start:stop] per row.
            start = xp.searchsorted(kept, rows_d * n_cols)
            length = xp.searchsorted(kept, (rows_d + 1) * n_cols) - start
            ends = xp.cumsum(length)
            total = int(ends[-1])
            if total:
                j = xp.arange(total, dtype=xp.int64)
                row = xp.searchsorted(ends, j, side="right")
                j += start[row] - (ends - length)[row]  # index into kept
                g[row, kept[j] - rows_d[row] * n_cols] = -xp.inf
                del j, row
            line = xp.arange(n)
            bar = xp.sort(g, axis=1)[line, n_cols - count]  # each row's count-th largest
            take = g > bar[:, None]
            need = count - take.sum(axis=1)  # >= 1: how many ties at the bar to take
            ties = g == bar[:, None]
            ties &= xp.cumsum(ties, axis=1, dtype=xp.int32) <= need[:, None]
            take |= ties
            del g, ties
            flat = xp.flatnonzero(take)
            found.append(rows_d[flat // n_cols] * n_cols + flat % n_cols)  # row-major: ascending
        return xp.concatenate(found) if found else xp.empty(0, dtype=xp.int64)
