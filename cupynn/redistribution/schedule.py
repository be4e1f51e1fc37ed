"""When to redistribute, and how much (SPEC §3)."""

from __future__ import annotations

import math

from ..validation import check_int, check_real


def fraction_at(epoch: int, epochs: int, alpha: float = 0.5, every: int = 1,
                end_fraction: float = 0.75) -> float:
    """Fraction of active weights moved after (1-based) ``epoch``; 0 means none.

    Redistribution happens after every ``every``-th epoch while
    ``epoch < E_end = end_fraction * epochs``, moving
    ``α_e = alpha * ½ (1 + cos(π e / E_end))`` with ``e = epoch``; nothing at
    or after ``E_end``.
    """
    owner = "fraction_at"
    epoch = check_int(epoch, "epoch", owner, low=1)
    epochs = check_int(epochs, "epochs", owner, low=1)
    alpha = check_real(alpha, "alpha", owner, 0.0, 1.0)
    every = check_int(every, "every", owner, low=1)
    end_fraction = check_real(end_fraction, "end_fraction", owner, 0.0, 1.0)
    e_end = end_fraction * epochs
    if epoch % every or epoch >= e_end:
        return 0.0
    return alpha * 0.5 * (1.0 + math.cos(math.pi * epoch / e_end))
