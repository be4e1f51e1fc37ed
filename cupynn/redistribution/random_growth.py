"""``random`` (SET): drop the smallest |w| per layer, regrow as many at random."""

from __future__ import annotations

from typing import Any

import numpy

from .base import Redistributor
from .selection import sample_inactive


def grow_at_random(rng: numpy.random.Generator, model: Any, kept_keys: list[Any],
                   counts: Any = None) -> list[Any]:
    """Per sparse layer, ``counts[i]`` new keys (default: what it lost), uniformly among its
    positions inactive after the drop; the layers draw from ``rng`` in order."""
    layers = model.sparse_layers
    if counts is None:
        counts = [layer.nnz - int(kept.shape[0]) for layer, kept in zip(layers, kept_keys)]
    return [sample_inactive(rng, layer.backend.xp, kept, layer.out_features * layer.in_features,
                            int(count))
            for layer, kept, count in zip(layers, kept_keys, counts)]


def grow_at_random_globally(rng: numpy.random.Generator, model: Any, kept_keys: list[Any]
                            ) -> list[Any]:
    """The total removed count, uniformly among every sparse layer's inactive positions
    together (so each layer gets, on average, its share of the free positions)."""
    layers = model.sparse_layers
    xp = model.backend.xp
    offsets = [0]
    for layer in layers:
        offsets.append(offsets[-1] + layer.out_features * layer.in_features)
    total = sum(layer.nnz - int(kept.shape[0]) for layer, kept in zip(layers, kept_keys))
    active = xp.concatenate([kept + offset for kept, offset in zip(kept_keys, offsets)])
    chosen = sample_inactive(rng, xp, active, offsets[-1], total)
    del active
    bounds = [int(b) for b in xp.searchsorted(chosen, xp.asarray(offsets, dtype=xp.int64))]
    return [chosen[bounds[i]:bounds[i + 1]] - offsets[i] for i in range(len(layers))]


class RandomGrowth(Redistributor):
    """Per layer: remove round(α·nnz) smallest |w|; add the same count uniformly
    at random among the positions inactive after the drop."""

    name = "random"

    def grow(self, model, drops, kept_keys, probe):
        return grow_at_random(self.rng, model, kept_keys)
