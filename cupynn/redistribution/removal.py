"""Removals beyond the smallest |w| (:func:`.base.magnitude_drop`), one layer at a time.

Each returns a :class:`.base.Drop` (which entries stay); ties in a score go to
the lower position, as everywhere in :mod:`.selection`.

- :func:`set_drop` — SET's own rule (Mocanu et al. 2018, as its reference
  code): round(ζ·n⁺) of the positive weights closest to 0 and round(ζ·n⁻) of the
  negative ones, n± the counts by sign, and every weight exactly 0 (the reference
  keeps only ``w > smallestPositive or w < largestNegative``, so zeros always go);
- :func:`mest_drop` — MEST (Yuan et al. 2021): the round(ζ·nnz) smallest
  ``|w| + λ·|g|``, g the gradient at the active entry on the redistribution batch;
- :func:`random_drop` — round(ζ·nnz) entries uniformly at random (drawn on the
  host from the redistributor's stream).
"""

from __future__ import annotations

from typing import Any

import numpy

from .base import Drop, magnitude_drop
from .selection import round_half_up, smallest_mask


def set_drop(layer: Any, fraction: float) -> Drop:
    xp = layer.backend.xp
    w = layer.data
    # Zeros go too: new entries start at 0, and one fed by a dead neuron gets gradient 0 and
    # stays 0 under Adam; kept as "neither sign", such entries pile up and training collapses.
    removed = w == 0
    for side, score in ((w > 0, w), (w < 0, -w)):
        k = round_half_up(fraction * int(xp.count_nonzero(side)))
        if k > 0:  # the k of this sign nearest 0; the other sign's entries score +inf
            removed |= smallest_mask(xp.where(side, score, xp.inf), k)
    return Drop(xp.logical_not(removed, out=removed))


def mest_drop(layer: Any, fraction: float, gradient: Any, lam: float) -> Drop:
    if gradient is None or gradient.shape != layer.data.shape:
        raise RuntimeError("MEST's removal needs the gradient at the layer's active entries "
                           "from the redistribution batch (GradientProbe.active_gradients).")
    xp = layer.backend.xp
    score = xp.abs(layer.data) + lam * xp.abs(gradient).astype(layer.dtype, copy=False)
    keep = smallest_mask(score, round_half_up(fraction * layer.nnz))
    return Drop(xp.logical_not(keep, out=keep))


def random_drop(rng: numpy.random.Generator, layer: Any, fraction: float) -> Drop:
    xp = layer.backend.xp
    k = min(layer.nnz, round_half_up(fraction * layer.nnz))
    keep = xp.ones(layer.nnz, dtype=bool)
    if k > 0:
        keep[xp.asarray(rng.choice(layer.nnz, size=k, replace=False))] = False
    return Drop(keep)


__all__ = ["magnitude_drop", "mest_drop", "random_drop", "set_drop"]
