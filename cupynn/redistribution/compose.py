"""Redistribution composed of any removal, any growth and a scope.

``create(drop="set", grow="momentum")`` builds a :class:`Composed` redistributor;
its name is ``"<drop>+<grow>"``, followed by ``"/<scope>"`` when the scope is
not the growth's default (``"mest+gradient/global"``), and that name, given
to :func:`cupynn.redistribution.create`, :func:`cupynn.fit` or the scripts,
builds it again. The paper's seven names are presets of this composition
(SPEC §8): random = magnitude + random (layer); gradient = magnitude +
gradient (layer); gradient-global = magnitude + gradient (global); loss =
magnitude + loss (layer); woodfisher / woodtaylor = the second-order removal
+ proportional-random (global); the tests show each preset equal to its
composition bit for bit.

Removals (:data:`DROPS`): ``magnitude`` (smallest |w|), ``set`` (SET's sign
split), ``mest`` (|w| + λ|g|), ``random``, ``woodfisher``, ``woodtaylor``.
The first four remove round(α·nnz) per layer whatever the scope; the
second-order ones do so with ``scope="layer"`` and network-wide with
``"global"``.

Growths (:data:`GROWS`) and the scopes each takes (:data:`SCOPES`):

- ``random``: ``layer`` — each layer regrows what it lost, uniformly among its
  free positions; ``global`` — the total, uniformly among every layer's free
  positions together;
- ``gradient``: largest |dL/dW| on the redistribution batch, per layer or
  network-wide (streaming top-k, never the model's dense gradient at once);
- ``momentum`` (SNFS, ``global`` only): the total regrowth shared among the
  layers in proportion to the mean |m| of each layer's active weights (m, Adam's
  first moment, before the removal; largest remainder, capped by free
  positions), placed in each layer at the largest |dL/dW| of the batch — a truly
  sparse model keeps no dense momentum to rank positions by, as SNFS does;
  when every moment is 0 (no step taken yet) each layer regrows what it lost, and
  a layer whose moments are all 0 takes a share only when the others are full;
- ``loss`` (``layer`` only): the paper's neuron-error growth;
- ``proportional-random`` (``global`` only): the total shared in proportion to
  the layers' sizes, added at random (the paper's woodfisher growth).
"""

from __future__ import annotations

from typing import Any

import numpy

from ..validation import check_int, check_real
from .base import GradientProbe, Redistributor, magnitude_drop
from .gradient import BLOCK_ELEMENTS, grow_by_gradient, grow_by_gradient_globally, removed_counts
from .loss import grow_by_error_signal
from .random_growth import grow_at_random, grow_at_random_globally
from .removal import mest_drop, random_drop, set_drop
from .selection import allocate
from .woodfisher import WoodFisher, WoodTaylor, grow_in_proportion

DROPS = ("magnitude", "set", "mest", "random", "woodfisher", "woodtaylor")
GROWS = ("random", "gradient", "momentum", "loss", "proportional-random")
SCOPES = {"random": ("layer", "global"), "gradient": ("layer", "global"),
          "momentum": ("global",), "loss": ("layer",), "proportional-random": ("global",)}
SECOND_ORDER = {"woodfisher": WoodFisher, "woodtaylor": WoodTaylor}
MEST_LAMBDA = 0.01  # SPEC §8: our choice
# The parameters each part takes, with their defaults.
DROP_PARAMS: dict[str, dict[str, Any]] = {
    "magnitude": {}, "set": {}, "random": {}, "mest": {"mest_lambda": MEST_LAMBDA},
    "woodfisher": {"block_size": 34, "damp": None, "joint": False, "fisher_batches": None},
    "woodtaylor": {"block_size": 34, "damp": None, "joint": False, "fisher_batches": None},
}
GROW_PARAMS: dict[str, dict[str, Any]] = {
    "random": {}, "proportional-random": {}, "gradient": {"block_elements": BLOCK_ELEMENTS},
    "momentum": {"block_elements": BLOCK_ELEMENTS},
    "loss": {"neuron_share": 0.3, "block_elements": BLOCK_ELEMENTS},
}


def default_scope(grow: str) -> str:
    """``"layer"`` where the growth takes it, else its only scope."""
    return "layer" if "layer" in SCOPES[grow] else SCOPES[grow][0]


def composed_name(drop: str, grow: str, scope: str) -> str:
    return f"{drop}+{grow}" + ("" if scope == default_scope(grow) else f"/{scope}")


def parse_name(name: str) -> tuple[str, str, str | None]:
    """``"drop+grow[/scope]"`` -> (drop, grow, scope or None); no checks beyond the shape."""
    drop, _, rest = name.partition("+")
    grow, _, scope = rest.partition("/")
    return drop, grow, scope or None


def compositions() -> list[str]:
    """Every valid composition's name."""
    return [composed_name(d, g, s) for d in DROPS for g in GROWS for s in SCOPES[g]]


def _check_part(value: Any, what: str, valid: tuple[str, ...]) -> str:
    if value not in valid:
        raise ValueError(f"Unknown {what} {value!r}. Valid {what}s: {', '.join(valid)}.")
    return value


class Composed(Redistributor):
    """A redistributor from a removal, a growth and a scope (see the module doc).

    Parameters
    ----------
    drop : one of :data:`DROPS`
    grow : one of :data:`GROWS`
    scope : "layer" or "global", optional
        Default: ``"layer"`` where the growth takes it, else ``"global"``.
    seed : int
    **params
        The parts' parameters (:data:`DROP_PARAMS`, :data:`GROW_PARAMS`):
        ``mest_lambda``; ``block_size``, ``damp``, ``joint``, ``fisher_batches``
        (second-order removals); ``block_elements`` (gradient-based growths);
        ``neuron_share`` (loss growth).

    Raises
    ------
    ValueError
        An unknown part, a scope the growth does not take (the message lists
        the valid ones), or a bad parameter value.
    TypeError
        A parameter neither part takes (the message lists those they take).
    """

    def __init__(self, *, drop: str, grow: str, scope: str | None = None, seed: int = 0,
                 **params: Any) -> None:
        super().__init__(seed=seed)
        self.drop_name = _check_part(drop, "removal", DROPS)
        self.grow_name = _check_part(grow, "growth", GROWS)
        scope = default_scope(grow) if scope is None else scope
        if scope not in SCOPES[grow]:
            raise ValueError(f"The {grow!r} growth takes scope {' or '.join(map(repr, SCOPES[grow]))}. "
                             f"Got {scope!r} instead.")
        self.scope = scope
        self.name = composed_name(drop, grow, scope)
        taken = {**DROP_PARAMS[drop], **GROW_PARAMS[grow]}
        unknown = sorted(set(params) - set(taken))
        if unknown:
            raise TypeError(f"The {self.name!r} redistribution does not take {unknown}. It takes: "
                            f"{', '.join(sorted(taken)) or 'no parameters'}.")
        values = {**taken, **params}
        owner = "Composed"
        self.block_elements = check_int(values.get("block_elements", BLOCK_ELEMENTS),
                                        "block_elements", owner, low=1)
        self.neuron_share = check_real(values.get("neuron_share", 0.3), "neuron_share", owner,
                                       0.0, 1.0, closed="right")
        self.mest_lambda = check_real(values.get("mest_lambda", MEST_LAMBDA), "mest_lambda",
                                      owner, 0.0, None, closed="left")
        self.second = None
        if drop in SECOND_ORDER:
            self.second = SECOND_ORDER[drop](
                seed=seed, **{k: values[k] for k in ("block_size", "damp", "joint",
                                                     "fisher_batches")})
            self.second.per_layer = scope == "layer"
        self.is_global = scope == "global"
        self.uses_batch = drop == "mest" or grow in ("gradient", "momentum", "loss")
        self.keeps_active_gradients = drop == "mest"

    # ------------------------------------------------------------ hooks
    def start_epoch(self, model: Any, n_batches: int, will_redistribute: bool) -> None:
        if self.second is not None:
            self.second.start_epoch(model, n_batches, will_redistribute)

    def observe(self, model: Any) -> None:
        if self.second is not None:
            self.second.observe(model)

    def drop(self, model: Any, fraction: float, probe: GradientProbe | None) -> list[Any]:
        layers = model.sparse_layers
        if self.second is not None:
            return self.second.drop(model, fraction, probe)
        if self.drop_name == "set":
            return [set_drop(layer, fraction) for layer in layers]
        if self.drop_name == "mest":
            return [mest_drop(layer, fraction, grad, self.mest_lambda)
                    for layer, grad in zip(layers, probe.active_gradients)]
        if self.drop_name == "random":
            return [random_drop(self.rng, layer, fraction) for layer in layers]
        return [magnitude_drop(layer, fraction) for layer in layers]

    def grow(self, model: Any, drops: list[Any], kept_keys: list[Any],
             probe: GradientProbe | None) -> list[Any]:
        grow, per_layer = self.grow_name, self.scope == "layer"
        if grow == "random":
            return (grow_at_random(self.rng, model, kept_keys) if per_layer
                    else grow_at_random_globally(self.rng, model, kept_keys))
        if grow == "gradient":
            return (grow_by_gradient(model, kept_keys, probe, self.block_elements) if per_layer
                    else grow_by_gradient_globally(model, kept_keys, probe, self.block_elements))
        if grow == "loss":
            return grow_by_error_signal(model, kept_keys, probe, self.neuron_share,
                                        self.block_elements)
        if grow == "proportional-random":
            return grow_in_proportion(self.rng, model, kept_keys)
        return grow_by_gradient(model, kept_keys, probe, self.block_elements,
                                momentum_counts(model, self.optimizer, kept_keys))


def momentum_counts(model: Any, optimizer: Any, kept_keys: list[Any]) -> numpy.ndarray:
    """Each sparse layer's share of the total regrowth: in proportion to the mean |m| of its
    active weights (largest remainder, capped by its free positions)."""
    from ..backend import to_numpy

    if optimizer is None:
        raise RuntimeError("The momentum growth reads Adam's first moments: redistribute with "
                           "the optimizer (cupynn.fit does).")
    layers = model.sparse_layers
    removed = removed_counts(model, kept_keys)
    means = numpy.array([float(to_numpy(abs(optimizer.moments(layer, "data")[0]).mean()))
                         if layer.nnz else 0.0 for layer in layers])
    if not means.sum() > 0:  # no step yet: every layer regrows what it lost
        return numpy.asarray(removed)
    capacity = numpy.array([layer.out_features * layer.in_features - int(kept.shape[0])
                            for layer, kept in zip(layers, kept_keys)])
    total, moving = sum(removed), means > 0
    room = int(capacity[moving].sum())
    if total <= room:
        return allocate(total, means, capacity)
    # The layers with momentum are full; those whose moments are all 0 (a dead layer) take
    # the rest, in proportion to what each lost (it fits: what a layer lost is free in it).
    return numpy.where(moving, capacity, 0) + allocate(
        total - room, numpy.where(moving, 0, removed), numpy.where(moving, 0, capacity))
