"""Redistribution: move a fraction of a sparse network's weights while it trains.

``create(name, seed=0, **params)`` builds one of the algorithms of SPEC §4 by
name, and ``create(drop=..., grow=..., scope=...)`` any composition of a
removal and a growth (:mod:`.compose`; its name, such as ``"set+momentum"``,
works as a name too). Each follows the template of :mod:`.base` (drop by
score, grow by score, rebuild canonical CSR, new weights 0, optimizer moments
re-mapped). :data:`NAMES` are the paper's seven (presets of the composition);
:func:`parts` lists the removals, growths and scopes, and
:func:`compositions` every valid composition's name.

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
from .compose import DROPS, GROWS, SCOPES, Composed, compositions, parse_name
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


def parts() -> dict[str, Any]:
    """The removals, the growths, and the scopes each growth takes."""
    return {"drop": DROPS, "grow": GROWS, "scope": dict(SCOPES)}


def naming_rule(presets: bool = True) -> str:
    """How a redistribution is named, for messages: the presets, the parts and the rule.

    Not the list of every valid name (:func:`compositions`: dozens, which a
    reader cannot scan for the one they meant). ``presets=False`` leaves out
    the paper's seven names (for a message that has just listed them).
    """
    both = [g for g in GROWS if len(SCOPES[g]) > 1]
    only = "; ".join(f"{', '.join(g for g in GROWS if SCOPES[g] == (scope,))} {scope} only"
                     for scope in ("layer", "global")
                     if any(SCOPES[g] == (scope,) for g in GROWS))
    rule = (f"'<drop>+<grow>[/<scope>]' with <drop> a removal ({', '.join(DROPS)}), <grow> a "
            f"growth ({', '.join(GROWS)}) and /<scope> layer or global where the growth takes "
            f"both ({', '.join(both)}; default layer; {only}), e.g. set+momentum or "
            f"magnitude+gradient/global.")
    if not presets:
        return f"Compose one: {rule}"
    return f"Valid names: {', '.join(NAMES)}. Or compose one: {rule}"


def create(name: str | None = None, *, drop: str | None = None, grow: str | None = None,
           scope: str | None = None, seed: int = 0, **params: Any) -> Redistributor:
    """A redistributor: a preset by name (``params`` go to its constructor), or a
    composition, given by its parts or by its name ``"<drop>+<grow>[/<scope>]"``.

    Raises
    ------
    ValueError
        For an unknown name or part, or a scope the growth does not take (the
        message lists the valid ones).
    TypeError
        For a parameter the algorithm does not take.
    """
    if name is not None and (drop or grow or scope):
        raise ValueError("create takes a name, or drop= and grow= (and scope=), not both.")
    if name is None:
        if drop is None or grow is None:
            raise ValueError(f"create needs a name ({', '.join(NAMES)}) or drop= and grow=. "
                             f"Removals: {', '.join(DROPS)}; growths: {', '.join(GROWS)}.")
        return Composed(drop=drop, grow=grow, scope=scope, seed=seed, **params)
    if isinstance(name, str) and "+" in name:
        drop, grow, scope = parse_name(name)
        return Composed(drop=drop, grow=grow, scope=scope, seed=seed, **params)
    if name not in REGISTRY:
        raise ValueError(f"Unknown redistribution {name!r}. {naming_rule()}")
    cls = REGISTRY[name]
    try:
        return cls(seed=seed, **params)
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise TypeError(f"The {name!r} redistribution does not take {sorted(params)}: {exc}") from None
        raise


__all__ = ["Composed", "Drop", "GradientProbe", "NAMES", "REGISTRY", "Redistributor",
           "compositions", "create", "fraction_at", "naming_rule", "parts"]
