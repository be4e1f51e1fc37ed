"""Network health: exact-zero weights and dead neurons, recorded with every epoch.

A sparse network can collapse slowly without the loss saying why: weights stuck
at exactly 0 (an entry fed by a dead input gets gradient 0, and Adam leaves it
at 0) and hidden neurons cut off from the rest. :func:`network_health` counts
both, so that ``fit``'s history, the scripts' ``metrics.jsonl`` and the report
show a collapse as it builds up.

A hidden neuron is *dead* when any of these holds:

- **no input**: every weight into it is absent or exactly 0;
- **no output**: every weight out of it is absent or exactly 0;
- **inactive**: its activation is 0 on every row of the probe batch (a dead ReLU).
"""

from __future__ import annotations

from typing import Any

import numpy

from .backend import to_numpy
from .layers import SparseLinear


def _live_in_out(layer: Any) -> tuple[Any, Any, int]:
    """Per output neuron and per input feature: whether a nonzero weight joins it; and the
    count of the layer's stored weights exactly 0."""
    xp = layer.backend.xp
    if isinstance(layer, SparseLinear):
        live = layer.data != 0
        # Each row's count of nonzero weights, from the prefix sums of the live flags.
        prefix = xp.concatenate([xp.zeros(1, dtype=numpy.int64),
                                 xp.cumsum(live, dtype=numpy.int64)])
        rows = prefix[layer.indptr[1:]] - prefix[layer.indptr[:-1]]
        cols = xp.bincount(layer.indices[live], minlength=layer.in_features)
        return rows > 0, cols > 0, int(live.size - xp.count_nonzero(live))
    live = layer.weight != 0  # (out, in)
    return live.any(axis=1), live.any(axis=0), int(live.size - xp.count_nonzero(live))


def network_health(model: Any, x: Any) -> dict[str, Any]:
    """Exact-zero weights and dead hidden neurons of ``model`` on the probe rows ``x``.

    Parameters
    ----------
    model : MLP
    x : (batch, sizes[0]) array
        The probe batch (``fit`` uses its fixed batch of training rows).

    Returns
    -------
    dict with ``zero_weights`` (int: exact zeros among the stored weights of every
    layer), ``dead_neurons`` (int: hidden neurons dead by any rule above) and
    ``health``: ``zero_weights`` per layer, and per hidden layer ``neurons``,
    ``no_input``, ``no_output``, ``inactive`` and ``dead``.
    """
    xp = model.backend.xp
    live = [_live_in_out(layer) for layer in model.layers]
    zeros = [count for _, _, count in live]
    hidden = []
    h = xp.ascontiguousarray(xp.asarray(x, dtype=model.dtype).T)  # feature-major, as inside
    fused = model.activation == "relu"
    for i, layer in enumerate(model.layers[:-1]):
        h = layer.forward(h, relu=fused)
        if not fused:
            h = model.activations[i].forward(h)
        no_input = ~live[i][0]
        no_output = ~live[i + 1][1]
        inactive = xp.count_nonzero(h, axis=1) == 0  # h is (features, batch)
        counts = to_numpy(xp.stack([no_input.sum(), no_output.sum(), inactive.sum(),
                                    (no_input | no_output | inactive).sum()]))
        hidden.append({"neurons": layer.out_features,
                       **dict(zip(("no_input", "no_output", "inactive", "dead"),
                                  (int(c) for c in counts)))})
    model.clear_cache()
    return {"zero_weights": sum(zeros), "dead_neurons": sum(h["dead"] for h in hidden),
            "health": {"zero_weights": zeros, "hidden": hidden}}


__all__ = ["network_health"]
