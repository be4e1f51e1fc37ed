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
    return [numpy.array(a) for a in arrays]


def epoch(step, x, y, order, batch):
    n_batches = -(-len(x) // batch)
    step.begin_epoch(x, y, order, n_batches)
    with step.on_stream():
        for b in range(n_batches):
            step.step(min(batch, len(x) - b * batch))
    step.stream_done()
    return numpy.array(step.losses)


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
    with step.on_stream():
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
