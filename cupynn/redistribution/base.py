"""The redistribution template: drop by score, grow by score, rebuild, re-map.

Every algorithm is a :class:`Redistributor` that supplies only its scores:

1. **drop** — :meth:`Redistributor.drop` chooses, per sparse layer, which
   active entries stay (a boolean mask over ``data``), and may return updated
   values for the survivors (the OBS update of woodfisher/woodtaylor);
2. **grow** — :meth:`Redistributor.grow` chooses new positions per layer, as
   sorted linear keys ``row * in_features + col``, never at an entry that is
   active after the drop;
3. **rebuild** — the template merges survivors and new keys into canonical
   CSR (sorted, unique), new weights exactly 0;
4. **re-map** — the optimizer's moments follow: survivors keep theirs, new
   entries start at 0.

Layers marked dense (:class:`cupynn.Linear`) never take part. Everything runs
on the model's device; only small per-layer counts visit the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy

from ..layers import SparseLinear
from ..losses import LOSSES
from ..validation import check_int, check_real
from .selection import bottom_k, round_half_up


@dataclass
class Drop:
    """The outcome of the drop phase for one sparse layer.

    keep : (nnz,) bool — entries that stay active
    values : (nnz,) float or None — new values for the entries (used where
        ``keep``); None keeps the current ones
    """

    keep: Any
    values: Any = None


class GradientProbe:
    """One forward/backward pass on a batch, keeping each sparse layer's
    input ``X`` (in, batch) and output gradient ``dY`` (out, batch).

    From these a layer's dense weight gradient is ``dY @ X.T``, which growth
    criteria compute a block of rows at a time and discard. The pass also
    leaves ``grad_data`` / ``grad_bias`` set, like any backward pass.
    """

    def __init__(self, model: Any, x: Any, y: Any, loss: str) -> None:
        if loss not in LOSSES:
            raise ValueError(f"The 'loss' argument must be one of {list(LOSSES)}. Got {loss!r}.")
        xp = model.backend.xp
        layers = model.sparse_layers
        for layer in layers:
            layer.keep_output_grad = True
        try:
            logits = model.forward(x)
            value, grad = LOSSES[loss](logits, xp.asarray(y), check=False)
            model.backward(grad, need_input_grad=False)
        finally:
            for layer in layers:
                layer.keep_output_grad = False
        self.loss = float(value)
        self.inputs = [layer._x for layer in layers]
        self.output_grads = [layer._dy for layer in layers]
        for layer in layers:
            layer._dy = None

    def dense_gradient_rows(self, index: int, rows: Any) -> Any:
        """Rows of sparse layer ``index``'s dense weight gradient: dY[rows] @ X.T."""
        return self.output_grads[index][rows] @ self.inputs[index].T


def layer_keys(layer: SparseLinear) -> Any:
    """Linear keys ``row * in_features + col`` of a layer's entries (sorted)."""
    from ..csr import linear_keys

    return linear_keys(layer.indptr, layer.indices, layer.in_features)


def magnitude_drop(layer: SparseLinear, fraction: float) -> Drop:
    """Remove the round(fraction * nnz) entries of smallest |w| (ties: lower position)."""
    xp = layer.backend.xp
    k = round_half_up(fraction * layer.nnz)
    keep = xp.ones(layer.nnz, dtype=bool)
    keep[bottom_k(xp.abs(layer.data), k)] = False
    return Drop(keep)


class Redistributor:
    """Base class of the redistribution algorithms (see the module doc).

    Parameters
    ----------
    seed : int >= 0
        Seeds every random choice (random growth); same seed, same result on
        the same backend.

    Attributes
    ----------
    name : str
        Registry name.
    is_global : bool
        True when nnz is preserved over the whole network rather than per
        layer (gradient-global, woodfisher, woodtaylor).
    uses_batch : bool
        True when :meth:`redistribute` needs the batch ``x, y`` (a gradient
        or error signal).
    """

    name = "base"
    is_global = False
    uses_batch = False

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = check_int(seed, "seed", type(self).__name__, low=0)
        self.rng = numpy.random.default_rng(self.seed)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state between epochs (the random stream)."""
        return {"name": self.name, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"A {state.get('name')!r} state cannot be loaded into {self.name!r}.")
        self.rng.bit_generator.state = state["rng"]

    # -------------------------------------------------------------- hooks
    def start_epoch(self, model: Any, n_batches: int, will_redistribute: bool) -> None:
        """Called by the training loop before each epoch (no-op by default)."""

    def observe(self, model: Any) -> None:
        """Called by the training loop after every backward pass (no-op by default)."""

    def drop(self, model: Any, fraction: float, probe: GradientProbe | None) -> list[Drop]:
        """Per sparse layer, which entries stay. Default: smallest |w| per layer."""
        return [magnitude_drop(layer, fraction) for layer in model.sparse_layers]

    def grow(self, model: Any, drops: list[Drop], kept_keys: list[Any],
             probe: GradientProbe | None) -> list[Any]:  # pragma: no cover - interface
        """Per sparse layer, the sorted linear keys of the new entries."""
        raise NotImplementedError

    # -------------------------------------------------------------- template
    def redistribute(self, model: Any, optimizer: Any, fraction: float, x: Any = None,
                     y: Any = None, loss: str = "cross_entropy") -> list[dict[str, int]]:
        """Apply one redistribution moving ``fraction`` of the active weights.

        Parameters
        ----------
        model : MLP
        optimizer : Adam or None
            Its moments are re-mapped to the new topology.
        fraction : float in [0, 1]
        x, y : batch used where gradients or error signals are needed
        loss : {"cross_entropy", "binary_cross_entropy"}

        Returns
        -------
        One dict per sparse layer: ``layer`` (index in ``model.layers``),
        ``removed``, ``added``, ``nnz`` (after), ``empty_rows`` (neurons left
        without inputs — allowed, and counted).
        """
        fraction = check_real(fraction, "fraction", f"{type(self).__name__}.redistribute", 0.0, 1.0)
        layers = model.sparse_layers
        index_of = {id(layer): i for i, layer in enumerate(model.layers)}
        if fraction == 0.0 or not layers:
            return [self._report(index_of[id(l)], l, 0, 0) for l in layers]
        probe = None
        if self.uses_batch:
            if x is None or y is None:
                raise ValueError(f"The {self.name!r} redistribution needs a batch (x, y).")
            probe = GradientProbe(model, x, y, loss)
        drops = self.drop(model, fraction, probe)
        kept_keys = [layer_keys(layer)[d.keep] for layer, d in zip(layers, drops)]
        new_keys = self.grow(model, drops, kept_keys, probe)
        reports = []
        for layer, drop, kept, new in zip(layers, drops, kept_keys, new_keys):
            removed = layer.nnz - int(kept.shape[0])
            self._rebuild(layer, optimizer, drop, kept, new)
            reports.append(self._report(index_of[id(layer)], layer, removed, int(new.shape[0])))
        return reports

    @staticmethod
    def _report(index: int, layer: SparseLinear, removed: int, added: int) -> dict[str, int]:
        xp = layer.backend.xp
        empty = int((xp.diff(layer.indptr) == 0).sum())
        return {"layer": index, "removed": removed, "added": added, "nnz": layer.nnz,
                "empty_rows": empty}

    @staticmethod
    def _rebuild(layer: SparseLinear, optimizer: Any, drop: Drop, kept: Any, new: Any) -> None:
        """Merge survivors and new keys into canonical CSR; re-map the moments."""
        from .selection import keys_to_csr

        xp = layer.backend.xp
        values = layer.data if drop.values is None else drop.values
        old_positions = xp.flatnonzero(drop.keep)
        keys = xp.concatenate([kept, new])
        # Survivors carry their old position; new entries -1 and value exactly 0.
        mapping = xp.concatenate([old_positions, xp.full(new.shape[0], -1, dtype=xp.int64)])
        data = xp.concatenate([values[drop.keep], xp.zeros(new.shape[0], dtype=layer.dtype)])
        order = xp.argsort(keys, kind="stable")
        indptr, indices = keys_to_csr(keys[order], layer.out_features, layer.in_features)
        layer.set_topology(indptr, indices, xp.ascontiguousarray(data[order]))
        if optimizer is not None:
            optimizer.remap(layer, mapping[order])
