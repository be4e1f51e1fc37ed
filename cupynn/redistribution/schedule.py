"""When to redistribute, and how much (SPEC §3 and §8)."""

from __future__ import annotations

import math

from ..validation import check_choice, check_int, check_real

SCHEDULES = ("cosine", "constant", "linear")


def fraction_at(epoch: int, epochs: int, alpha: float = 0.5, every: int = 1,
                end_fraction: float = 0.75, schedule: str = "cosine") -> float:
    """Fraction of active weights moved after (1-based) ``epoch``; 0 means none.

    Redistribution happens after every ``every``-th epoch while
    ``epoch < E_end = end_fraction * epochs``, moving

    - ``cosine`` (the paper's): ``α_e = alpha * ½ (1 + cos(π e / E_end))``,
    - ``constant``: ``alpha``,
    - ``linear``: ``alpha * (1 - e / E_end)``,

    with ``e = epoch``; nothing at or after ``E_end``. The same function counts
    steps instead of epochs for redistribution every ``every`` steps (then
    ``epoch`` is the step and ``epochs`` the total number of steps).
    """
    owner = "fraction_at"
    epoch = check_int(epoch, "epoch", owner, low=1)
    epochs = check_int(epochs, "epochs", owner, low=1)
    alpha = check_real(alpha, "alpha", owner, 0.0, 1.0)
    every = check_int(every, "every", owner, low=1)
    end_fraction = check_real(end_fraction, "end_fraction", owner, 0.0, 1.0)
    schedule = check_choice(schedule, "schedule", owner, SCHEDULES)
    e_end = end_fraction * epochs
    if epoch % every or epoch >= e_end:
        return 0.0
    if schedule == "constant":
        return alpha
    if schedule == "linear":
        return alpha * (1.0 - epoch / e_end)
    return alpha * 0.5 * (1.0 + math.cos(math.pi * epoch / e_end))
