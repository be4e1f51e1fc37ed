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

import numpy

from ..backend import to_numpy
from ..validation import check_real
from .base import Redistributor
from .selection import allocate, round_half_up


class LossGrowth(Redistributor):
    """See the module doc. ``neuron_share`` in (0, 1]."""

    name = "loss"
    uses_batch = True

    def __init__(self, *, seed: int = 0, neuron_share: float = 0.3) -> None:
        super().__init__(seed=seed)
        self.neuron_share = check_real(neuron_share, "neuron_share", type(self).__name__, 0.0, 1.0,
                                       closed="right")

    def grow(self, model, drops, kept_keys, probe):
        new = []
        for i, (layer, kept) in enumerate(zip(model.sparse_layers, kept_keys)):
            xp = layer.backend.xp
            k = layer.nnz - int(kept.shape[0])
            if k == 0:
                new.append(xp.empty(0, dtype=xp.int64))
                continue
            n_rows, n_cols = layer.out_features, layer.in_features
            signal = to_numpy(xp.abs(probe.output_grads[i].sum(axis=1)))
            ranking = numpy.lexsort((numpy.arange(n_rows), -signal))  # |δ| desc, index asc
            kept_rows = to_numpy(kept // n_cols)
            free = (n_cols - numpy.bincount(kept_rows, minlength=n_rows))[ranking]
            # The top m neurons, widened by the next m in rank order while they are too full.
            m = max(1, round_half_up(self.neuron_share * n_rows))
            chosen = m
            while free[:chosen].sum() < k:
                chosen += m
            weights = (numpy.arange(n_rows) < chosen).astype(numpy.float64)
            shares = allocate(k, weights, free)
            rows = ranking[shares > 0]
            counts = shares[shares > 0]
            new.append(self._grow_rows(probe, i, layer, kept, rows, counts))
        return new

    @staticmethod
    def _grow_rows(probe, index, layer, kept, rows, counts):
        """In each of ``rows``, the ``counts`` largest |g| among inactive columns."""
        xp = layer.backend.xp
        n_cols = layer.in_features
        order = numpy.argsort(rows)  # ascending rows: keys come out sorted
        rows, counts = rows[order], counts[order]
        rows_d = xp.asarray(rows)
        g = xp.abs(probe.dense_gradient_rows(index, rows_d))
        # Mask the active entries of the selected rows.
        kept_rows = kept // n_cols
        pos = xp.searchsorted(rows_d, kept_rows)
        pos_c = xp.minimum(pos, len(rows) - 1)
        hit = rows_d[pos_c] == kept_rows
        g[pos_c[hit], (kept - kept_rows * n_cols)[hit]] = -xp.inf
        # Per row, columns by score desc then column asc (a stable sort of -g).
        order_cols = xp.argsort(-g, axis=1, kind="stable")
        take = xp.arange(n_cols)[None, :] < xp.asarray(counts)[:, None]
        cols = xp.sort(xp.where(take, order_cols, n_cols), axis=1)  # unused slots sort last
        keys = rows_d[:, None].astype(xp.int64) * n_cols + cols
        return keys[cols < n_cols]  # row-major: ascending keys
