"""The training step as a CUDA graph (cupynn/graph.py), proven on the CPU and on a GPU.

The device fixture is the CuPy-shaped fake of ``tests/fake_gpu.py`` and, where
one answers, a real GPU (``-m gpu``). On the fake the kernels are the ``.cu``
files under the C++ emulation and a stream capture records launches instead of
running them, failing on an allocation, a host synchronisation or a
host-to-device copy as CUDA does: a replay that equals the eager launches bit
for bit then shows that nothing of the step was frozen at capture but the
buffers' addresses. On a GPU the same tests capture real graphs, for every
algorithm. Only the speed is left to the GPU check's ``graph`` part.
"""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn.backend import to_numpy
from cupynn.graph import GraphStep, graph_unsupported
from cupynn.redistribution import create
from cupynn.step import TrainStep
from conftest import needs_gpu
from cupynn.redistribution import NAMES
from fake_gpu import FakeGpu


class RealGpu:
    backend = property(lambda self: cupynn.get_backend("gpu"))


@pytest.fixture(params=["fake", pytest.param("gpu", marks=needs_gpu)])
def fake(request):
    """The device: the fake (anywhere) or a real GPU (``.backend`` either way)."""
    if request.param == "gpu":
        yield RealGpu()
        return
    with FakeGpu() as device:
        yield device


def data(rows=37, features=6, classes=3, binary=False, seed=0):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((rows, features))
    scores = x @ rng.standard_normal((features, classes))
    y = (scores[:, 0] > 0).astype(numpy.float64) if binary else scores.argmax(axis=1)
    return x, y


def build(device, sizes=(6, 8, 5, 3), dense=(), dtype="float64"):
    model = cupynn.MLP(list(sizes), density=0.5, dense_layers=dense, seed=4, dtype=dtype,
                       device=device)
    return model, cupynn.Adam(model, lr=1e-2)


def state(model, optimizer):
    arrays = [p for layer in model.layers for _, p, _ in layer.parameters()]
    arrays += [a for moments in optimizer.state for pair in moments.values() for a in pair]
    arrays += [layer.indices for layer in model.sparse_layers]
    return [to_numpy(a).copy() for a in arrays]


def epoch(step, x, y, order, batch):
    n_batches = -(-len(x) // batch)
    step.begin_epoch(x, y, order, n_batches)
    for b in range(n_batches):
        step.step(min(batch, len(x) - b * batch))
    return step.epoch_losses()


CASES = [
    pytest.param((6, 8, 5, 3), (), "cross_entropy", id="sparse-ce"),
    pytest.param((6, 8, 5, 1), (-1,), "binary_cross_entropy", id="dense-output-bce"),
]


@pytest.mark.parametrize("sizes, dense, loss", CASES)
def test_a_replayed_graph_is_the_eager_launches_bit_for_bit(fake, sizes, dense, loss):
    """Two epochs with a redistribution between: the graphs are captured again for
    the new topology, and the short last batch has a graph of its own."""
    x, y = data(binary=loss == "binary_cross_entropy", classes=sizes[-1])
    runs = []
    for capture in (True, False):
        model, optimizer = build(fake.backend, sizes, dense)
        step = GraphStep(model, optimizer, loss, batch_size=8, capture=capture)
        rng = numpy.random.default_rng(1)
        losses = [epoch(step, x, y, rng.permutation(len(x)), 8)]
        create("random", seed=0).redistribute(model, optimizer, 0.3)
        losses.append(epoch(step, x, y, rng.permutation(len(x)), 8))
        runs.append((state(model, optimizer), losses, step, optimizer.t))
    (graph_state, graph_losses, graph, t), (eager_state, eager_losses, _, eager_t) = runs
    assert t == eager_t == 10
    for a, b in zip(graph_state, eager_state):
        assert numpy.array_equal(a, b)
    for a, b in zip(graph_losses, eager_losses):
        assert numpy.array_equal(a, b) and numpy.isfinite(a).all()
    assert graph.captures == 4  # (full batch, short batch) x (two topologies)


def test_a_capture_launches_only_kernels_and_allocates_nothing(fake):
    if isinstance(fake, RealGpu):
        pytest.skip("the fake device records what a capture holds")
    x, y = data()
    model, optimizer = build(fake.backend)
    step = GraphStep(model, optimizer, "cross_entropy", batch_size=8)
    step.begin_epoch(x, y, numpy.arange(len(x)), 5)
    step.step(8)
    captured = step._buffers[8].graph
    assert captured.host_ops == []
    assert captured.allocations.larger_than(256) == []
    names = [name.rsplit("_", 1)[0] for name in captured.launches]
    assert names == [
        "gather_batch", "gather_labels",
        "spmm", "spmm", "spmm", "transpose",
        "softmax_cross_entropy_rows", "mean_of_rows", "transpose",
        "relu_grad_rowsum", "sddmm_warp", "spmm_t",
        "relu_grad_rowsum", "sddmm_warp", "spmm_t",
        "relu_grad_rowsum", "sddmm_warp",
        "adam_multi", "end_step"]


def test_the_graph_step_trains_as_the_eager_step_does(fake):
    """Against cupynn's eager TrainStep on the CPU: the same training to rounding (the
    graph's loss, bias gradient and Adam run cupynn's own kernels)."""
    x, y = data(rows=32)
    order = numpy.random.default_rng(2).permutation(len(x))
    model, optimizer = build(fake.backend)
    graph = GraphStep(model, optimizer, "cross_entropy", batch_size=8)
    losses = epoch(graph, x, y, order, 8)
    cpu_model, cpu_optimizer = build("cpu")
    eager = TrainStep(cpu_model, cpu_optimizer)
    eager_losses = [float(eager(x[order[b:b + 8]], y[order[b:b + 8]])) for b in range(0, 32, 8)]
    numpy.testing.assert_allclose(losses, eager_losses, rtol=1e-12)
    for a, b in zip(state(model, optimizer), state(cpu_model, cpu_optimizer)):
        numpy.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("redistribution, unit", [("woodfisher", "epoch"),
                                                  ("set+momentum", "step")])
def test_fit_through_the_graph(fake, redistribution, unit):
    """fit(graph=True): observe after each replay, redistributions between epochs or
    steps; the history as the eager fit's to rounding."""
    x, y = data(rows=40)
    histories = []
    for graph in (True, False):
        model, optimizer = build(fake.backend)
        trainer = cupynn.Trainer(model, optimizer, (x, y), epochs=3, batch_size=8,
                                 progress=False, redistribution=redistribution,
                                 redistribute_unit=unit, redistribute_every=2, graph=graph)
        assert (trainer.graph is not None) == graph
        histories.append(trainer.run())
    for with_graph, eager in zip(*histories):
        assert with_graph["nnz"] == eager["nnz"]
        assert with_graph["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-9)


def test_graph_auto_trains_eagerly_until_a_gpu_check_says_otherwise(fake):
    x, y = data()
    model, optimizer = build(fake.backend)
    trainer = cupynn.Trainer(model, optimizer, (x, y), epochs=1, batch_size=8, progress=False)
    assert trainer.graph is None


def test_graph_true_says_why_a_run_cannot_be_captured(fake):
    x, y = data()
    cpu_model, cpu_optimizer = build("cpu")
    with pytest.raises(ValueError, match="cannot capture this run: CUDA graphs need the GPU"):
        cupynn.fit(cpu_model, cpu_optimizer, (x, y), epochs=1, batch_size=8, graph=True)
    model, optimizer = build(fake.backend)
    with pytest.raises(ValueError, match="weighted losses have no fused kernel"):
        cupynn.fit(model, optimizer, (x, y), epochs=1, batch_size=8, graph=True,
                   sample_weight=numpy.ones(len(y)))
    sigmoid = cupynn.MLP([6, 8, 3], density=0.5, activation="sigmoid", device=fake.backend)
    assert "sigmoid" in graph_unsupported(sigmoid, "cross_entropy")
    assert "mean_squared_error" in graph_unsupported(model, "mean_squared_error")
    with pytest.raises(ValueError, match="'graph' parameter of fit must be 'auto', True or False"):
        cupynn.fit(model, optimizer, (x, y), epochs=1, batch_size=8, graph=1)


@pytest.mark.parametrize("name", NAMES)
def test_fit_with_a_graph_repeats_the_eager_launches_for_every_algorithm(fake, name):
    """fit(graph=True) against the same run whose GraphStep launches eagerly: the same
    bits, every algorithm (step-wise for the last two, so that graphs are captured again
    inside an epoch)."""
    x, y = data(rows=40)
    step_wise = {"redistribute_unit": "step", "redistribute_every": 3} \
        if name in ("woodfisher", "woodtaylor") else {}
    runs = []
    for capture in (True, False):
        model, optimizer = build(fake.backend)
        trainer = cupynn.Trainer(model, optimizer, (x, y), epochs=3, batch_size=8,
                                 progress=False, redistribution=name, graph=True, **step_wise)
        if not capture:
            trainer.graph = GraphStep(model, optimizer, "cross_entropy", 8, capture=False)
        history = trainer.run()
        runs.append((state(model, optimizer), [h["train_loss"] for h in history]))
    (graph_state, graph_losses), (eager_state, eager_losses) = runs
    assert graph_losses == eager_losses
    for a, b in zip(graph_state, eager_state):
        assert numpy.array_equal(a, b)


ALLOCATIONS = ("empty", "empty_like")  # array ops that launch nothing


def eager_launches(fake, fused):
    """Kernels (cupynn's and CuPy's) of one eager TrainStep of a 3-layer net."""
    from cupynn import kernels
    from cupynn.kernels import loss

    settings = (kernels.adam_setting(), loss.loss_setting(), kernels.relu_grad_setting())
    kernels.set_adam("multi" if fused else "per-array")
    loss.set_loss("fused" if fused else "arrays")
    kernels.set_relu_grad("kernel" if fused else "arrays")
    try:
        x, y = data(rows=16)
        model, optimizer = build(fake.backend)
        step = TrainStep(model, optimizer)
        step(x[:8], y[:8], check=False)
        fake.launches.clear()
        fake.array_ops.clear()
        step(x[8:], y[8:], check=False)
        return fake.launches + [op for op in fake.array_ops if op not in ALLOCATIONS]
    finally:
        kernels.set_adam(settings[0])
        loss.set_loss(settings[1])
        kernels.set_relu_grad(settings[2])


def test_the_fused_eager_step_launches_at_most_twenty_kernels(fake):
    """CUPYNN_ADAM=multi, CUPYNN_LOSS=fused and CUPYNN_RELU_GRAD=kernel: one Adam launch
    instead of one per array, two for the loss instead of a dozen, one per layer for the
    ReLU gradient and bias sum instead of three (issue 19's target: <= 20 per KMNIST step,
    45 with the defaults on an H200)."""
    if isinstance(fake, RealGpu):
        pytest.skip("the fake device counts launches; the GPU check's graph part profiles them")
    default, fused = eager_launches(fake, False), eager_launches(fake, True)
    assert len(fused) <= 20 < len(default)
    assert fused.count("adam_multi_f64") == 1 and "adam_f64" not in fused
    assert [k for k in fused if k.startswith(("softmax", "mean_of"))] == [
        "softmax_cross_entropy_rows_f64", "mean_of_rows_f64"]
    assert fused.count("relu_grad_rowsum_f64") == 3


class RefilledSampler:
    """Draws each epoch's rows into the same two host buffers (a memory-saving sampler)."""

    def __init__(self, x, y):
        self.x, self.y = x, y
        self.x_out, self.y_out = x[:32].copy(), y[:32].copy()

    def sample_epoch(self, rng):
        rows = rng.choice(len(self.x), size=32, replace=False)
        self.x_out[...], self.y_out[...] = self.x[rows], self.y[rows]
        return self.x_out, self.y_out


def test_the_graph_trains_on_each_epochs_rows_and_shows_its_progress(fake, capsys):
    """A sampler refilling its buffers in place: the graph copies every epoch's rows (it
    once kept epoch 1's); with progress shown (the bar reads the step's 0-d loss)."""
    x, y = data(rows=80)
    losses = []
    for graph in (True, False):
        model, optimizer = build(fake.backend)
        history = cupynn.fit(model, optimizer, RefilledSampler(x, y), epochs=3, batch_size=8,
                             graph=graph, progress=graph)
        losses.append([h["train_loss"] for h in history])
    numpy.testing.assert_allclose(losses[0], losses[1], rtol=1e-10)


def test_the_graph_follows_the_optimizers_moments_and_a_checkpoint(fake, tmp_path):
    """Adam.load_state_dict makes new moments: the graph updates those, not the old ones;
    a run checkpointed and resumed through the graph ends as the uninterrupted one."""
    from cupynn.checkpoint import load_checkpoint, save_checkpoint

    x, y = data(rows=32)
    model, optimizer = build(fake.backend)
    step = GraphStep(model, optimizer, "cross_entropy", batch_size=8)
    epoch(step, x, y, numpy.arange(32), 8)
    optimizer.load_state_dict(optimizer.state_dict())
    loaded = to_numpy(optimizer.state[0]["data"][0]).copy()
    epoch(step, x, y, numpy.arange(32), 8)
    assert not numpy.array_equal(to_numpy(optimizer.state[0]["data"][0]), loaded)

    def trainer(epochs):
        model, optimizer = build(fake.backend)
        return cupynn.Trainer(model, optimizer, (x, y), epochs=epochs, batch_size=8,
                              progress=False, redistribution="gradient", graph=True)

    whole = trainer(4)
    whole.run()
    first = trainer(4)
    first.on_epoch_end = lambda metrics: metrics["epoch"] < 2
    first.run()
    path = save_checkpoint(tmp_path, first)
    resumed = trainer(4)
    load_checkpoint(path, resumed)
    resumed.run()
    for a, b in zip(state(whole.model, whole.optimizer), state(resumed.model, resumed.optimizer)):
        assert numpy.array_equal(a, b)


def test_the_graph_runs_its_own_products_whatever_the_spmm_setting(fake):
    """CUPYNN_SPMM=cusparse would put cuSPARSE (refused in a capture) in the step; the
    graph asks for spmm.cu's kernels by name (the fake has no cuSPARSE: it would raise)."""
    from cupynn import kernels

    if isinstance(fake, RealGpu):
        pytest.skip("the fake proves it: it has no cuSPARSE")
    method = kernels.spmm_setting()
    kernels.set_spmm("cusparse")
    try:
        x, y = data()
        model, optimizer = build(fake.backend)
        losses = epoch(GraphStep(model, optimizer, "cross_entropy", 8), x, y,
                       numpy.arange(len(x)), 8)
    finally:
        kernels.set_spmm(method)
    assert numpy.isfinite(losses).all()


def test_a_graph_step_refuses_steps_its_epoch_does_not_have(fake):
    x, y = data()
    model, optimizer = build(fake.backend)
    step = GraphStep(model, optimizer, "cross_entropy", batch_size=8, capture=False)
    with pytest.raises(ValueError, match="make at most 5 batches. Got n_batches=6"):
        step.begin_epoch(x, y, numpy.arange(len(x)), 6)
    step.begin_epoch(x, y, numpy.arange(len(x)), 5)
    with pytest.raises(ValueError, match="batch 1 of 5 takes 8 rows"):
        step.step(5)
    for _ in range(4):
        step.step(8)
    step.step(5)
    with pytest.raises(RuntimeError, match="the epoch has 5 batches, all taken"):
        step.step(8)
