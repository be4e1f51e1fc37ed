"""``gradient`` (RigL) and ``gradient-global``: grow where |dL/dW| is largest.

Both drop the smallest |w| per layer. The dense gradient of a layer is formed
a block of rows at a time (at most ``block_elements`` values), the block's
active positions are masked, and a running top-k keeps only the best
candidates: neither a layer's nor the model's full dense gradient is ever
held at once. ``gradient`` keeps one running top-k per layer (k = the layer's
removed count); ``gradient-global`` one over all sparse layers (k = the total
removed count), with keys offset per layer.
"""

from __future__ import annotations

from typing import Any

from ..validation import check_int
from .base import GradientProbe, Redistributor
from .selection import StreamingTopK

BLOCK_ELEMENTS = 1 << 22


def push_layer_gradient(top: StreamingTopK, probe: GradientProbe, index: int, layer: Any,
                        kept: Any, key_offset: int, block_elements: int) -> None:
    """Offer every inactive position of one layer to ``top``, scored by |grad|."""
    xp = layer.backend.xp
    n_rows, n_cols = layer.out_features, layer.in_features
    rows_per_block = max(1, block_elements // n_cols)
    for r0 in range(0, n_rows, rows_per_block):
        r1 = min(n_rows, r0 + rows_per_block)
        scores = xp.abs(probe.dense_gradient_rows(index, slice(r0, r1))).ravel()
        lo, hi = (int(v) for v in xp.searchsorted(kept, xp.asarray([r0 * n_cols, r1 * n_cols])))
        scores[kept[lo:hi] - r0 * n_cols] = -xp.inf  # active after the drop: not eligible
        top.push(scores, key_offset + r0 * n_cols)


class Gradient(Redistributor):
    """Per layer: remove round(α·nnz) smallest |w|; add as many at the largest
    |dL/dW| among inactive positions (gradient on the redistribution batch)."""

    name = "gradient"
    uses_batch = True

    def __init__(self, *, seed: int = 0, block_elements: int = BLOCK_ELEMENTS) -> None:
        super().__init__(seed=seed)
        self.block_elements = check_int(block_elements, "block_elements", type(self).__name__, low=1)

    def grow(self, model, drops, kept_keys, probe):
        new = []
        for i, (layer, kept) in enumerate(zip(model.sparse_layers, kept_keys)):
            top = StreamingTopK(layer.backend.xp, layer.nnz - int(kept.shape[0]))
            push_layer_gradient(top, probe, i, layer, kept, 0, self.block_elements)
            new.append(top.result())
        return new


class GradientGlobal(Gradient):
    """Per layer: remove round(α·nnz) smallest |w|; add the total removed count
    at the largest |dL/dW| over all sparse layers together."""

    name = "gradient-global"
    is_global = True

    def grow(self, model, drops, kept_keys, probe):
        layers = model.sparse_layers
        xp = model.backend.xp
        offsets = [0]
        for layer in layers:
            offsets.append(offsets[-1] + layer.out_features * layer.in_features)
        total = sum(layer.nnz - int(kept.shape[0]) for layer, kept in zip(layers, kept_keys))
        top = StreamingTopK(xp, total)
        for i, (layer, kept) in enumerate(zip(layers, kept_keys)):
            push_layer_gradient(top, probe, i, layer, kept, offsets[i], self.block_elements)
        chosen = top.result()
        bounds = xp.searchsorted(chosen, xp.asarray(offsets, dtype=xp.int64))
        bounds = [int(b) for b in bounds]
        return [chosen[bounds[i]:bounds[i + 1]] - offsets[i] for i in range(len(layers))]
