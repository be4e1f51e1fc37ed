"""Redistribution: move a fraction of a sparse network's weights while it trains.

``create(name, seed=0, **params)`` builds one of the algorithms of SPEC §4 by
name; each follows the template of :mod:`.base` (drop by score, grow by score,
rebuild canonical CSR, new weights 0, optimizer moments re-mapped).

=================== ======================================== =========================================
name                removes                                  adds
=================== ======================================== =========================================
``static``          nothing                                  nothing
``random``          per layer, smallest |w|                  same count per layer, uniformly at random
``gradient``        per layer, smallest |w|                  same count per layer, largest |dL/dW|
``gradient-global`` per layer, smallest |w|                  total count, largest |dL/dW| network-wide
``loss``            per layer, smallest |w|                  top 30 % neurons by |δ|, equal shares
``woodfisher``      globally, smallest OBS score             random, in proportion to layer size
``woodtaylor``      globally, OBS score with gradient term   random, in proportion to layer size
=================== ======================================== =========================================
"""

from __future__ import annotations

from typing import Any

from .base import Drop, GradientProbe, Redistributor
from .gradient import Gradient, GradientGlobal
from .loss import LossGrowth
from .random_growth import RandomGrowth
from .schedule import fraction_at
from .static import Static
from .woodfisher import WoodFisher, WoodTaylor

REGISTRY: dict[str, type[Redistributor]] = {
    cls.name: cls
    for cls in (Static, RandomGrowth, Gradient, GradientGlobal, LossGrowth, WoodFisher, WoodTaylor)
}
NAMES = tuple(REGISTRY)


def create(name: str, *, seed: int = 0, **params: Any) -> Redistributor:
    """A redistributor by registry name; ``params`` go to its constructor.

    Raises
    ------
    ValueError
        For an unknown name (the message lists the valid ones).
    TypeError
        For a parameter the algorithm does not take.
    """
    if name not in REGISTRY:
        raise ValueError(f"Unknown redistribution {name!r}. Valid names: {', '.join(NAMES)}.")
    cls = REGISTRY[name]
    try:
        return cls(seed=seed, **params)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"The {name!r} redistribution does not take {sorted(params)}: {exc}") from None
        raise


__all__ = ["Drop", "GradientProbe", "NAMES", "REGISTRY", "Redistributor", "create", "fraction_at"]
