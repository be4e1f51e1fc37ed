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


UNITS = ("epoch", "step")


class Schedule:
    """When to redistribute and how much: rigl's ``UpdateSchedule`` for :class:`cupynn.Trainer`.

    The trainer asks it, and keeps no schedule of its own. Epoch-wise
    (``unit="epoch"``) it answers :meth:`fraction` after each epoch;
    step-wise (``unit="step"``, RigL's ΔT) it counts global steps and answers,
    around each step, whether an interval of ``every`` steps begins
    (:meth:`interval_start`, for the redistributor's ``start_epoch``) and
    whether one ends in a redistribution, and of what fraction
    (:meth:`interval_end`). The fractions are :func:`fraction_at`'s, counting
    epochs or steps (E_end = ``end_fraction`` × all epochs or all steps).

    Parameters
    ----------
    epochs : int >= 1
        The run's length in epochs.
    alpha : float in [0, 1]
        The first fraction (cosine, linear) or every fraction (constant).
    every : int >= 1
        Redistribute after every ``every``-th epoch or step.
    end_fraction : float in [0, 1]
        Nothing moves at or after ``E_end = end_fraction`` × the run's length.
    kind : {"cosine", "constant", "linear"}
    unit : {"epoch", "step"}

    Its one piece of state, whether a step-wise interval is open, is
    deliberately not checkpointed: the redistributor's statistics of an
    interval (WoodFisher's Fisher) are not either, so a run resumed inside an
    interval opens it again from its first step (:meth:`interval_start`), and
    checkpoints keep the format they had before this object existed.
    """

    def __init__(self, epochs: int, *, alpha: float = 0.5, every: int = 1,
                 end_fraction: float = 0.75, kind: str = "cosine", unit: str = "epoch") -> None:
        owner = "Schedule"
        self.epochs = check_int(epochs, "epochs", owner, low=1)
        self.alpha = check_real(alpha, "alpha", owner, 0.0, 1.0)
        self.every = check_int(every, "every", owner, low=1)
        self.end_fraction = check_real(end_fraction, "end_fraction", owner, 0.0, 1.0)
        self.kind = check_choice(kind, "kind", owner, SCHEDULES)
        self.unit = check_choice(unit, "unit", owner, UNITS)
        self.interval_open = False  # step-wise: an interval's start has been announced

    def __repr__(self) -> str:
        return (f"Schedule({self.epochs}, alpha={self.alpha}, every={self.every}, "
                f"end_fraction={self.end_fraction}, kind={self.kind!r}, unit={self.unit!r})")

    @property
    def stepwise(self) -> bool:
        """Whether weights move between steps (``unit="step"``) rather than after epochs."""
        return self.unit == "step"

    # ---------------------------------------------------------------- epoch-wise
    def fraction(self, epoch: int) -> float:
        """Fraction of the active weights moved after (1-based) ``epoch``; 0: none (always 0
        for a step-wise schedule, which moves weights between steps instead)."""
        if self.stepwise:
            return 0.0
        return fraction_at(epoch, self.epochs, self.alpha, self.every, self.end_fraction,
                           self.kind)

    # ---------------------------------------------------------------- step-wise
    @staticmethod
    def step(epoch: int, batch: int, steps_per_epoch: int) -> int:
        """The global (1-based) step of 0-based ``batch`` of (1-based) ``epoch``."""
        return (epoch - 1) * steps_per_epoch + batch + 1

    def step_fraction(self, step: int, steps_per_epoch: int) -> float:
        """The fraction moved after global ``step`` when it ends an interval (0: none;
        0 after the run's last step as well)."""
        total = self.epochs * steps_per_epoch
        if step > total:
            return 0.0
        return fraction_at(step, total, self.alpha, self.every, self.end_fraction, self.kind)

    def interval_start(self, step: int, first_of_epoch: bool,
                       steps_per_epoch: int) -> tuple[int, bool] | None:
        """Before global ``step``: ``(steps, will_redistribute)`` when an interval begins
        there — ``steps`` of it left (``every`` at its first step), ending in a
        redistribution or not — else None.

        An interval begins at its first step, or on the first step of an epoch
        when none is open (a run resumed inside one starts it there).
        """
        into = (step - 1) % self.every
        if into and not (first_of_epoch and not self.interval_open):
            return None
        end = step - into + self.every - 1  # the interval's last step
        self.interval_open = True
        return self.every - into, self.step_fraction(end, steps_per_epoch) > 0

    def interval_end(self, step: int, steps_per_epoch: int) -> float | None:
        """After global ``step``: None when it ends no interval; else the interval closes
        and this is the fraction to move now (0: none, as at or after E_end)."""
        if step % self.every:
            return None
        self.interval_open = False
        return self.step_fraction(step, steps_per_epoch)
