"""``random`` (SET): drop the smallest |w| per layer, regrow as many at random."""

from __future__ import annotations

from .base import Redistributor
from .selection import sample_inactive


class RandomGrowth(Redistributor):
    """Per layer: remove round(α·nnz) smallest |w|; add the same count uniformly
    at random among the positions inactive after the drop."""

    name = "random"

    def grow(self, model, drops, kept_keys, probe):
        return [sample_inactive(self.rng, layer.backend.xp, kept, layer.out_features * layer.in_features,
                                layer.nnz - int(kept.shape[0]))
                for layer, kept in zip(model.sparse_layers, kept_keys)]
