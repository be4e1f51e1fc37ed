"""The training loop: real-data learning, reproducibility, metrics, bad input."""

from __future__ import annotations

import numpy
import pytest

import cupynn
from conftest import shared_data


def _kmnist_split():
    """Stratified, seeded 8000/2000 split of the official KMNIST test images."""
    from sklearn.model_selection import train_test_split

    folder = shared_data("kmnist")
    x = numpy.load(folder / "kmnist-test-imgs.npz")["arr_0"].reshape(-1, 784)
    y = numpy.load(folder / "kmnist-test-labels.npz")["arr_0"].astype(numpy.int64)
    x = x.astype(numpy.float32) / 255.0
    return train_test_split(x, y, test_size=2000, stratify=y, random_state=0)


def test_short_kmnist_run_learns(backend):
    """784-256-256-10 at density 0.1, 4 epochs, batch 128, lr 2e-3.

    Measured on the 2-core CPU: test accuracy 0.755 (seed 0) and 0.753
    (seed 1) after 4 epochs (0.47 after the first). Chance is 0.10; the
    threshold 0.65 leaves a margin of 0.10 below the measured runs.
    """
    x_train, x_test, y_train, y_test = _kmnist_split()
    model = cupynn.MLP([784, 256, 256, 10], density=0.1, seed=0, device=backend)
    history = cupynn.fit(model, cupynn.Adam(model, lr=2e-3), (x_train, y_train), (x_test, y_test),
                         epochs=4, batch_size=128, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["test_accuracy"] > 0.65
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(h["nnz"] == model.nnz for h in history)
    assert all(h["train_seconds"] > 0 for h in history)


def _blobs(rng, n=600, features=8):
    """Two Gaussian classes that a small MLP separates well."""
    y = rng.integers(0, 2, size=n)
    x = rng.standard_normal((n, features)) + (2 * y[:, None] - 1) * 0.8
    return x.astype(numpy.float32), y


def test_binary_task_reports_auc(backend, rng):
    x, y = _blobs(rng)
    model = cupynn.MLP([8, 32, 1], density=0.5, dense_layers=(-1,), seed=0, device=backend)
    history = cupynn.fit(model, cupynn.Adam(model, lr=1e-2), (x[:500], y[:500]), (x[500:], y[500:]),
                         epochs=3, batch_size=32, loss="binary_cross_entropy", progress=False)
    last = history[-1]
    assert last["test_auc"] > 0.9 and last["test_accuracy"] > 0.8
    # The AUC is the rank statistic of the logits: check it independently.
    from sklearn.metrics import roc_auc_score

    scores = model.predict(x[500:])[:, 0]
    assert last["test_auc"] == pytest.approx(roc_auc_score(y[500:], scores), abs=1e-12)


def test_same_seed_same_history(backend, rng):
    x, y = _blobs(rng)
    runs = []
    for _ in range(2):
        model = cupynn.MLP([8, 16, 2], density=0.5, seed=4, device=backend)
        history = cupynn.fit(model, cupynn.Adam(model), (x, y), (x, y), epochs=2, batch_size=50,
                             seed=9, progress=False)
        runs.append([(h["train_loss"], h["test_loss"]) for h in history])
    assert runs[0] == runs[1]
    model = cupynn.MLP([8, 16, 2], density=0.5, seed=4, device=backend)
    other = cupynn.fit(model, cupynn.Adam(model), (x, y), (x, y), epochs=2, batch_size=50, seed=10,
                       progress=False)
    assert [(h["train_loss"], h["test_loss"]) for h in other] != runs[0]


def test_non_finite_loss_stops_with_epoch_and_batch(backend, rng):
    x, y = _blobs(rng, n=100)
    model = cupynn.MLP([8, 4, 2], density=0.5, seed=0, device=backend)
    model.layers[0].data[0] = numpy.inf
    with pytest.raises(FloatingPointError, match="at epoch 1, batch 1 of 4"):
        cupynn.fit(model, cupynn.Adam(model), (x, y), epochs=1, batch_size=25, progress=False)


def test_on_epoch_end_can_stop(backend, rng):
    x, y = _blobs(rng, n=100)
    model = cupynn.MLP([8, 4, 2], density=0.5, device=backend)
    seen = []
    history = cupynn.fit(model, cupynn.Adam(model), (x, y), epochs=5, batch_size=50,
                         progress=False, on_epoch_end=lambda m: seen.append(m) or len(seen) < 2)
    assert len(history) == 2 and seen == history


@pytest.mark.parametrize("change, error, message", [
    (dict(epochs=0), ValueError, r"The 'epochs' parameter of fit must be in \[1, inf\]"),
    (dict(batch_size=1.5), TypeError, "The 'batch_size' parameter of fit must be an int"),
    (dict(loss="mse"), ValueError, "The 'loss' parameter of fit must be one of"),
    (dict(train_y=numpy.array([0, 1, 2, 5] * 25)), ValueError,
     r"The 'train' labels of fit must be in \[0, 3\) for a model with 3 outputs. "
     r"Got values in \[0, 5\]"),
    (dict(train_x=numpy.full((100, 8), numpy.nan)), ValueError,
     "The 'train x' argument of fit must be finite. Got 800 NaN"),
    (dict(train_x=numpy.zeros((100, 7))), ValueError,
     r"The 'train' inputs of fit must have shape \(n, 8\). Got \(100, 7\)"),
    (dict(train_y=numpy.zeros(99, int)), ValueError, r"labels of fit must have shape \(100,\)"),
    (dict(loss="binary_cross_entropy"), ValueError, "binary_cross_entropy needs a model with one"),
])
def test_fit_rejects_bad_input_before_training(change, error, message):
    model = cupynn.MLP([8, 4, 3], device="cpu")
    before = model.layers[0].data.copy()
    args = dict(train_x=numpy.zeros((100, 8)), train_y=numpy.zeros(100, int), epochs=1,
                batch_size=10, loss="cross_entropy")
    args.update(change)
    with pytest.raises(error, match=message):
        cupynn.fit(model, cupynn.Adam(model), (args.pop("train_x"), args.pop("train_y")),
                   progress=False, **args)
    numpy.testing.assert_array_equal(model.layers[0].data, before)  # no work was done


class _FakeBar:
    def __init__(self):
        self.shown = []

    def set_postfix(self, **kw):
        self.shown.append(kw["loss"])


class _Pending:
    """A copy that lands only when told: what the GPU's read_later returns."""

    def __init__(self, value):
        self._value, self.landed = value, False

    def ready(self):
        return self.landed

    def value(self):
        assert self.landed, "value() before the copy landed would make the host wait"
        return numpy.array(self._value)


class _SlowBackend:
    def __init__(self):
        self.started = []

    def read_later(self, value):
        self.started.append(_Pending(value))
        return self.started[-1]


def test_progress_loss_never_waits_for_the_device():
    """On the GPU the bar shows the last loss whose copy has landed and starts no second
    copy while one is on its way; on the CPU the loss is shown at once."""
    from cupynn.training import _show_loss

    bar, backend = _FakeBar(), _SlowBackend()
    shown = _show_loss(bar, None, backend, 0.5)  # batch 0: copy started, nothing shown
    assert bar.shown == [] and len(backend.started) == 1
    shown = _show_loss(bar, shown, backend, 0.4)  # batch 50: still on its way
    assert bar.shown == [] and len(backend.started) == 1
    backend.started[0].landed = True
    shown = _show_loss(bar, shown, backend, 0.3)  # batch 100: show 0.5, copy 0.3
    assert bar.shown == ["0.5000"] and len(backend.started) == 2 and shown is backend.started[1]

    cpu = cupynn.get_backend("cpu")
    assert _show_loss(bar, None, cpu, numpy.float64(0.25)) is None
    assert bar.shown[-1] == "0.2500"
    pending = cpu.read_later(numpy.array([1.5, 2.5]))
    assert pending.ready() and list(pending.value()) == [1.5, 2.5]


def test_regression_fit_reports_mse_and_r2_as_scikit_learn_computes_them(backend, rng):
    from sklearn.metrics import mean_squared_error, r2_score

    x = rng.standard_normal((400, 5)).astype(numpy.float32)
    y = (x @ rng.standard_normal((5, 2)) + 0.1 * rng.standard_normal((400, 2))).astype(numpy.float32)
    model = cupynn.MLP([5, 32, 2], density=0.5, seed=1, device=backend)
    history = cupynn.fit(model, cupynn.Adam(model, lr=1e-2), (x[:300], y[:300]),
                         (x[300:], y[300:]), epochs=20, batch_size=32, loss="mean_squared_error",
                         redistribution="gradient", progress=False)
    last = history[-1]
    assert "test_accuracy" not in last and last["test_r2"] > 0.9 > history[0]["test_r2"]
    pred = model.predict(x[300:])
    assert last["test_r2"] == pytest.approx(r2_score(y[300:], pred), rel=1e-5)
    assert last["test_mse"] == pytest.approx(mean_squared_error(y[300:], pred), rel=1e-5)
    one = cupynn.evaluate(cupynn.MLP([5, 4, 1], density=0.5, device=backend), x, y[:, 0],
                          "mean_squared_error")
    assert set(one) == {"loss", "mse", "r2"}
    with pytest.raises(ValueError, match=r"targets of fit must have shape \(400, 2\)"):
        cupynn.fit(model, cupynn.Adam(model), (x, y[:, 0]), epochs=1, batch_size=8,
                   loss="mean_squared_error", progress=False)


def test_train_batch_checks_its_input_unless_told_the_data_was_checked(rng):
    """The epochs pass check=False (the trainer checked the data whole); a
    direct call scans the batch, and a NaN fails before any parameter moves."""
    x, y = _blobs(rng, n=64)
    model = cupynn.MLP([8, 16, 2], density=0.5, seed=0, device="cpu")
    trainer = cupynn.Trainer(model, cupynn.Adam(model), (x, y), epochs=1, batch_size=32,
                             progress=False)
    before = [p.copy() for layer in model.layers for _, p, _ in layer.parameters()]
    bad = x[:32].copy()
    bad[3, 2] = numpy.nan
    with pytest.raises(ValueError, match="must be finite. Got 1 NaN or infinite"):
        trainer.train_batch(bad, y[:32])
    after = [p for layer in model.layers for _, p, _ in layer.parameters()]
    assert all(numpy.array_equal(a, b) for a, b in zip(before, after))
    assert numpy.isfinite(float(trainer.train_batch(x[:32], y[:32])))
    value = trainer.train_batch(bad, y[:32], check=False)  # unchecked: the NaN goes through
    assert numpy.isnan(float(value))
