"""TrainStep (cupynn/step.py): the step the trainer takes, and its phases as a benchmark runs them."""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn.distributed import Communicator, UnsupportedAcrossRanks
from cupynn.step import TrainStep


class TwoAlike(Communicator):
    """Two ranks holding the same values, simulated in one process: sums double."""

    size = 2

    def allreduce(self, array, op="sum"):
        if op == "sum":
            array *= 2
        return array


def data(rows=24, features=6, classes=3):
    rng = numpy.random.default_rng(4)
    x = rng.standard_normal((rows, features))
    return x, (x @ rng.standard_normal((features, classes))).argmax(axis=1)


def build(redistribution=None, comm=None):
    model = cupynn.MLP([6, 8, 3], density=0.5, seed=2, dtype="float64", device="cpu")
    optimizer = cupynn.Adam(model, lr=1e-2)
    redistributor = (None if redistribution is None
                     else cupynn.redistribution.create(redistribution, seed=0))
    if redistributor is not None:
        redistributor.start_epoch(model, 4, True)
    return model, TrainStep(model, optimizer, redistributor=redistributor, comm=comm)


def state(model):
    return [p.copy() for layer in model.layers for _, p, _ in layer.parameters()]


@pytest.mark.parametrize("redistribution", [None, "woodfisher"])
@pytest.mark.parametrize("comm", [None, TwoAlike()], ids=["one process", "two ranks"])
def test_the_phases_in_order_are_the_step(redistribution, comm):
    """A benchmark that times the phases one by one runs the step's own code: the same bits."""
    x, y = data()
    called, phased = build(redistribution, comm), build(redistribution, comm)
    for b in range(3):
        rows = slice(8 * b, 8 * b + 8)
        value = called[1](x[rows], y[rows])
        for _, phase in phased[1].phases(x[rows], y[rows]):
            phase()
        assert float(value) == float(phased[1].value)
    for a, b in zip(state(called[0]), state(phased[0])):
        assert numpy.array_equal(a, b)
    assert not numpy.array_equal(state(called[0])[0], state(build()[0])[0])  # it trained


def test_the_phases_name_what_runs():
    x, y = data()
    assert [n for n, _ in build()[1].phases(x, y)] == [
        "batch to device", "forward", "loss", "backward", "adam"]
    names = [n for n, _ in build("woodfisher", TwoAlike())[1].phases(x, y)]
    assert names == list(TrainStep.PHASES)


def test_the_step_is_a_mean_over_the_global_batch():
    """Two ranks' shares of a batch, each the share of the global mean: with the fake
    all-reduce doubling one share, the loss is twice that share's part of the mean."""
    x, y = data()
    model, step = build(comm=TwoAlike())
    step.take(x[:4], y[:4], shard=(0, 4, 8))  # rows 0-3 of a batch of 8
    assert step.total == 8 and step.x.shape == (4, 6)
    step.forward()
    step.compute_loss()
    share = float(step.value)
    whole = build()[1]
    whole.take(x[:4], y[:4])
    whole.forward()
    whole.compute_loss()
    assert share == pytest.approx(float(whole.value) / 2, rel=1e-12)
    step.backward()
    step.all_reduce()
    assert float(step.value) == pytest.approx(2 * share, rel=1e-12)


def test_a_rank_without_rows_adds_zeros():
    x, y = data()
    model, step = build(comm=TwoAlike())
    step.take(x[:0], y[:0], shard=(5, 5, 5))
    step.forward()
    step.compute_loss()
    step.backward()
    assert step.logits is None and float(step.value) == 0.0
    for layer in model.layers:
        for _, param, grad in layer.parameters():
            assert grad.shape == param.shape and not grad.any()


def test_sample_weights_across_ranks_are_refused():
    x, y = data()
    with pytest.raises(UnsupportedAcrossRanks, match="sample_weight is not supported"):
        build(comm=TwoAlike())[1](x[:8], y[:8], weight=numpy.ones(8))


def test_the_trainer_takes_its_steps_with_one_train_step():
    x, y = data()
    model = cupynn.MLP([6, 8, 3], density=0.5, seed=2, dtype="float64", device="cpu")
    trainer = cupynn.Trainer(model, cupynn.Adam(model), (x, y), epochs=1, batch_size=8,
                             progress=False, redistribution="random")
    assert isinstance(trainer.step, TrainStep)
    assert trainer.step.redistributor is trainer.redistributor
    assert trainer.step.model is model and trainer.step.optimizer is trainer.optimizer
    calls = []
    real = TrainStep.__call__
    TrainStep.__call__ = lambda self, *a, **k: calls.append(len(a[0])) or real(self, *a, **k)
    try:
        trainer.run()
    finally:
        TrainStep.__call__ = real
    assert calls == [8, 8, 8]
