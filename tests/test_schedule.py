"""The redistribution schedule alone (cupynn.redistribution.schedule.Schedule): the fractions
of docs/compose.md, every t, the end fraction, and step-wise intervals, as the trainer asks."""

from __future__ import annotations

import math

import pytest

from cupynn.redistribution.schedule import Schedule, fraction_at

FORMULAS = {  # docs/compose.md, "Schedules and steps", with e the epoch (or step)
    "cosine": lambda a, e, end: a * 0.5 * (1 + math.cos(math.pi * e / end)),
    "constant": lambda a, e, end: a,
    "linear": lambda a, e, end: a * (1 - e / end),
}


@pytest.mark.parametrize("kind", sorted(FORMULAS))
def test_each_kind_follows_its_formula_until_e_end(kind):
    schedule = Schedule(10, alpha=0.4, kind=kind)  # E_end = 7.5: epochs 1-7 move
    got = [schedule.fraction(e) for e in range(1, 11)]
    expected = [FORMULAS[kind](0.4, e, 7.5) for e in range(1, 8)] + [0.0] * 3
    assert got == pytest.approx(expected, rel=1e-14, abs=0)
    assert all(f > 0 for f in got[:7])
    # the same numbers as fraction_at, the function the trainer used before
    assert got == [fraction_at(e, 10, 0.4, 1, 0.75, kind) for e in range(1, 11)]


def test_cosine_starts_near_alpha_and_falls():
    got = [Schedule(80, alpha=0.5).fraction(e) for e in range(1, 60)]
    assert got[0] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 60)))
    assert all(a > b for a, b in zip(got, got[1:]))


def test_every_t_epochs_only():
    schedule = Schedule(12, every=3, kind="constant")  # E_end = 9
    assert [e for e in range(1, 13) if schedule.fraction(e) > 0] == [3, 6]


@pytest.mark.parametrize("end_fraction, moving", [(0.5, [1, 2, 3]), (1.0, [1, 2, 3, 4, 5, 6, 7]),
                                                  (0.0, []), (0.125, [])])
def test_nothing_at_or_after_e_end(end_fraction, moving):
    schedule = Schedule(8, end_fraction=end_fraction, kind="constant")
    assert [e for e in range(1, 9) if schedule.fraction(e) > 0] == moving


def test_alpha_zero_moves_nothing():
    assert all(Schedule(8, alpha=0.0, kind=k).fraction(e) == 0.0
               for k in FORMULAS for e in range(1, 9))


def test_a_step_wise_schedule_moves_nothing_after_epochs():
    assert all(Schedule(4, unit="step").fraction(e) == 0.0 for e in range(1, 5))


def test_steps_count_over_the_whole_run():
    schedule = Schedule(4, every=7, kind="linear", unit="step")
    assert schedule.step(1, 0, 10) == 1 and schedule.step(3, 4, 10) == 25
    total = 4 * 10
    for step in range(1, total + 1):
        assert schedule.step_fraction(step, 10) == fraction_at(step, total, 0.5, 7, 0.75, "linear")
    assert [s for s in range(1, total + 1) if schedule.step_fraction(s, 10) > 0] == [7, 14, 21, 28]
    assert schedule.step_fraction(42, 10) == 0.0  # past the run's last step


def _walk(schedule, epochs, steps_per_epoch, first_epoch=1):
    """The trainer's calls, step by step: what opens, what closes, and with what."""
    starts, ends = [], []
    for epoch in range(first_epoch, epochs + 1):
        for b in range(steps_per_epoch):
            step = schedule.step(epoch, b, steps_per_epoch)
            opening = schedule.interval_start(step, b == 0, steps_per_epoch)
            if opening is not None:
                starts.append((step, *opening))
            fraction = schedule.interval_end(step, steps_per_epoch)
            if fraction is not None:
                ends.append((step, fraction > 0))
    return starts, ends


def test_step_wise_intervals_run_across_epochs():
    schedule = Schedule(4, every=7, unit="step")  # 40 steps, E_end = 30
    starts, ends = _walk(schedule, 4, 10)
    # (first step, steps in it, ends in a redistribution): the last one ends after step 40
    assert starts == [(1, 7, True), (8, 7, True), (15, 7, True), (22, 7, True), (29, 7, False),
                      (36, 7, False)]
    assert ends == [(7, True), (14, True), (21, True), (28, True), (35, False)]
    assert schedule.interval_open  # the interval of steps 36-42 never closed


def test_a_resumed_run_opens_its_interval_where_it_starts():
    # A run resumed after epoch 2 (step 20, inside the interval 15-21) starts that
    # interval again with its 1 remaining step; an uninterrupted one does not.
    resumed = Schedule(4, every=7, unit="step")
    starts, ends = _walk(resumed, 4, 10, first_epoch=3)
    assert starts[:2] == [(21, 1, True), (22, 7, True)]
    assert ends[0] == (21, True)
    straight = Schedule(4, every=7, unit="step")
    assert _walk(straight, 2, 10)[0][-1] == (15, 7, True)
    assert straight.interval_start(21, True, 10) is None  # open since step 15


def test_no_interval_starts_mid_epoch_inside_one():
    schedule = Schedule(4, every=7, unit="step")
    assert schedule.interval_start(5, False, 10) is None
    assert schedule.interval_start(11, True, 10) == (4, True)  # first step of epoch 2


def test_an_interval_ending_at_e_end_announces_no_redistribution():
    schedule = Schedule(2, every=5, kind="constant", unit="step")  # 20 steps, E_end = 15
    assert schedule.interval_start(11, False, 10) == (5, False)
    assert schedule.interval_end(15, 10) == 0.0
    assert not schedule.interval_open
    assert schedule.interval_end(14, 10) is None


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, "The 'epochs' parameter of Schedule must be in [1, inf]. Got 0 instead."),
    ({"every": 0}, "The 'every' parameter of Schedule must be in [1, inf]. Got 0 instead."),
    ({"alpha": 1.5}, "The 'alpha' parameter of Schedule must be in [0, 1]. Got 1.5 instead."),
    ({"end_fraction": -1}, "The 'end_fraction' parameter of Schedule must be in [0, 1]."),
    ({"kind": "step"}, "The 'kind' parameter of Schedule must be one of ['cosine', 'constant', "
                       "'linear']. Got 'step' instead."),
    ({"unit": "batch"}, "The 'unit' parameter of Schedule must be one of ['epoch', 'step']."),
])
def test_bad_parameters_are_refused(kwargs, message):
    kwargs = {"epochs": 4, **kwargs}
    with pytest.raises(ValueError) as info:
        Schedule(kwargs.pop("epochs"), **kwargs)
    assert message in str(info.value)
