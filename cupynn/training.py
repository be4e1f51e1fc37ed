"""The training loop: seeded shuffles, mini-batches on the device, evaluation."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy

from .backend import to_numpy
from .losses import LOSSES
from .redistribution.schedule import fraction_at
from .validation import check_choice, check_finite, check_int, check_real

EVAL_BATCH = 8192


def _check_dataset(model: Any, data: Any, loss: str, name: str) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Validate an (x, y) pair of host arrays against the model and loss."""
    owner = "fit"
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"The {name!r} argument of {owner} must be a pair (x, y). "
                         f"Got {type(data).__name__} instead.")
    x, y = (numpy.asarray(to_numpy(a)) for a in data)
    if x.ndim != 2 or x.shape[1] != model.sizes[0]:
        raise ValueError(f"The {name!r} inputs of {owner} must have shape (n, {model.sizes[0]}). "
                         f"Got {x.shape} instead.")
    if y.shape != (x.shape[0],):
        raise ValueError(f"The {name!r} labels of {owner} must have shape ({x.shape[0]},). "
                         f"Got {y.shape} instead.")
    if x.shape[0] == 0:
        raise ValueError(f"The {name!r} data of {owner} is empty.")
    if x.dtype.kind not in "fiub":
        raise TypeError(f"The {name!r} inputs of {owner} must be numeric. Got {x.dtype} instead.")
    check_finite(x, f"{name} x", owner)
    if loss == "cross_entropy":
        classes = model.sizes[-1]
        if y.dtype.kind == "f" and numpy.all(numpy.isfinite(y)) and numpy.all(y == numpy.round(y)):
            y = y.astype(numpy.int64)
        if y.dtype.kind not in "iu":
            raise TypeError(f"The {name!r} labels of {owner} must be integer class indices for "
                            f"cross_entropy. Got {y.dtype} instead.")
        if y.min() < 0 or y.max() >= classes:
            raise ValueError(f"The {name!r} labels of {owner} must be in [0, {classes}) for a model "
                             f"with {classes} outputs. Got values in [{y.min()}, {y.max()}] instead.")
    else:
        if model.sizes[-1] != 1:
            raise ValueError(f"binary_cross_entropy needs a model with one output. "
                             f"Got {model.sizes[-1]} outputs instead.")
        check_finite(y.astype(numpy.float64), f"{name} y", owner)
        if y.min() < 0 or y.max() > 1:
            raise ValueError(f"The {name!r} labels of {owner} must be in [0, 1] for "
                             f"binary_cross_entropy. Got values in [{y.min()}, {y.max()}] instead.")
    return x, y


def evaluate(model: Any, x: Any, y: Any, loss: str = "cross_entropy",
             batch_size: int = EVAL_BATCH) -> dict[str, float]:
    """Mean loss, accuracy and (for binary tasks) ROC AUC on a dataset.

    Parameters
    ----------
    x : (n, sizes[0]) host array
    y : (n,) labels
    loss : {"cross_entropy", "binary_cross_entropy"}

    Returns
    -------
    dict with ``loss``, ``accuracy`` and, for binary tasks, ``auc`` (NaN when
    ``y`` holds one class only).
    """
    check_choice(loss, "loss", "evaluate", tuple(LOSSES))
    x, y = _check_dataset(model, (x, y), loss, "test")
    loss_fn = LOSSES[loss]
    backend = model.backend
    xp = backend.xp
    # Sums stay on the device (one read at the end, not one per batch).
    total = xp.zeros((), dtype=numpy.float64)
    correct = xp.zeros((), dtype=numpy.int64)
    scores = []
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        logits = model.forward(xb)
        yd = backend.asarray(yb)
        value, _ = loss_fn(logits, yd, check=False)
        total += value.astype(numpy.float64) * len(yb)
        if loss == "cross_entropy":
            correct += (logits.argmax(axis=1) == yd).sum()
        else:
            z = logits.reshape(-1)
            correct += ((z > 0) == (yd > 0.5)).sum()
            scores.append(z)
    model.clear_cache()
    n = x.shape[0]
    result = {"loss": float(to_numpy(total)) / n, "accuracy": int(to_numpy(correct)) / n}
    if loss == "binary_cross_entropy":
        from sklearn.metrics import roc_auc_score

        labels = y > 0.5
        result["auc"] = (float(roc_auc_score(labels, to_numpy(xp.concatenate(scores))))
                         if 0 < labels.sum() < n else float("nan"))
    return result


class Trainer:
    """The training loop, with its state, so that it can stop and resume exactly.

    :func:`fit` is ``Trainer(...).run()``. The trainer owns the random streams
    (shuffle and sampling; augmentation), the epoch counter and the history;
    :meth:`state_dict` / :meth:`load_state_dict` with the model's and the
    optimizer's make a checkpoint (:mod:`cupynn.checkpoint`) from which
    :meth:`run` continues with exactly the result of an uninterrupted run on
    the same backend.

    Parameters are those of :func:`fit`; ``train`` may also be an object with
    ``sample_epoch(rng) -> (x, y)`` that draws each epoch's training rows (as
    the HIGGS loader does), and ``augment`` a callable ``(x_batch, rng) ->
    x_batch`` applied on the device to every training batch.
    """

    def __init__(self, model: Any, optimizer: Any, train: Any, test: tuple[Any, Any] | None = None,
                 *, epochs: int, batch_size: int, loss: str = "cross_entropy", seed: int = 0,
                 progress: bool = True, eval_batch_size: int = EVAL_BATCH,
                 redistribution: Any = None, alpha: float = 0.5, redistribute_every: int = 1,
                 end_fraction: float = 0.75, growth_batches: int = 1,
                 augment: Callable[[Any, numpy.random.Generator], Any] | None = None,
                 track_memory: Any = False,
                 on_epoch_end: Callable[[dict[str, Any]], Any] | None = None) -> None:
        owner = "fit"
        self.loss = check_choice(loss, "loss", owner, tuple(LOSSES))
        self.epochs = check_int(epochs, "epochs", owner, low=1)
        self.batch_size = check_int(batch_size, "batch_size", owner, low=1)
        self.seed = check_int(seed, "seed", owner, low=0)
        self.eval_batch_size = check_int(eval_batch_size, "eval_batch_size", owner, low=1)
        self.alpha = check_real(alpha, "alpha", owner, 0.0, 1.0)
        self.redistribute_every = check_int(redistribute_every, "redistribute_every", owner, low=1)
        self.end_fraction = check_real(end_fraction, "end_fraction", owner, 0.0, 1.0)
        self.growth_batches = check_int(growth_batches, "growth_batches", owner, low=1)
        if augment is not None and not callable(augment):
            raise TypeError(f"The 'augment' parameter of {owner} must be callable. Got {augment!r}.")
        self.redistributor = _redistributor(redistribution, self.seed)
        if getattr(optimizer, "model", model) is not model:
            raise ValueError("The optimizer of fit was built for another model.")
        self.model, self.optimizer = model, optimizer
        self.progress, self.augment, self.on_epoch_end = progress, augment, on_epoch_end
        from .memory import MemoryTracker

        if isinstance(track_memory, MemoryTracker):
            self.memory, self._owns_memory = track_memory.start(), False
        else:
            self.memory = MemoryTracker(model.backend).start() if track_memory else None
            self._owns_memory = self.memory is not None
        self.sampler = None if isinstance(train, (tuple, list)) else train
        if self.sampler is not None and not callable(getattr(train, "sample_epoch", None)):
            raise TypeError(f"The 'train' argument of {owner} must be a pair (x, y) or have a "
                            f"sample_epoch(rng) method. Got {type(train).__name__} instead.")
        self.train = None if self.sampler is not None else _check_dataset(model, train, loss, "train")
        self.test = None if test is None else _check_dataset(model, test, loss, "test")
        self.rng = numpy.random.default_rng(self.seed)
        self.augment_rng = numpy.random.default_rng((self.seed, 2))
        # A fixed batch of training rows for the induced loss, from its own stream.
        probe_source = self.train or _check_dataset(
            model, self.sampler.sample_epoch(numpy.random.default_rng((self.seed, 1))), loss, "train")
        rows = numpy.sort(numpy.random.default_rng((self.seed, 1)).choice(
            probe_source[0].shape[0], size=min(self.batch_size, probe_source[0].shape[0]),
            replace=False))
        self.probe = (probe_source[0][rows], probe_source[1][rows])
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state of the loop (the model and optimizer keep their own)."""
        state = {"epoch": self.epoch, "rng": self.rng.bit_generator.state,
                 "augment_rng": self.augment_rng.bit_generator.state,
                 "history": self.history}
        if self.redistributor is not None:
            state["redistributor"] = self.redistributor.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.rng.bit_generator.state = state["rng"]
        self.augment_rng.bit_generator.state = state["augment_rng"]
        self.history = list(state["history"])
        if self.redistributor is not None:
            self.redistributor.load_state_dict(state["redistributor"])

    # ---------------------------------------------------------------- loop
    def run(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; return the whole history."""
        from tqdm.auto import tqdm

        bar = tqdm(range(self.epoch + 1, self.epochs + 1), desc="epochs", unit="epoch",
                   disable=not self.progress, initial=self.epoch, total=self.epochs)
        try:
            for epoch in bar:
                metrics = self._epoch(epoch)
                self.epoch = epoch
                self.history.append(metrics)
                bar.set_postfix({k: f"{metrics[k]:.4f}" for k in ("train_loss", "test_accuracy")
                                 if k in metrics})
                if self.on_epoch_end is not None and self.on_epoch_end(metrics) is False:
                    break
        finally:
            if self._owns_memory:
                self.memory.stop()
        return self.history

    def train_batch(self, x: numpy.ndarray, y: numpy.ndarray) -> Any:
        """One training step on a host mini-batch, as every batch of an epoch takes it.

        The batch goes to the device (and through ``augment``), then forward,
        loss, backward, the redistributor's ``observe`` and the optimizer's
        step. Returns the batch's mean loss as a 0-d array on the device: on
        the GPU the step queues its work and returns without waiting for the
        device (``scripts/gpu_check.py`` checks this).
        """
        model, backend = self.model, self.model.backend
        xb = backend.asarray(x, dtype=model.dtype)
        if self.augment is not None:
            xb = self.augment(xb, self.augment_rng)
        value, grad = LOSSES[self.loss](model.forward(xb), backend.asarray(y), check=False)
        model.backward(grad, need_input_grad=False)
        if self.redistributor is not None:
            self.redistributor.observe(model)
        self.optimizer.step()
        return value

    def _epoch(self, epoch: int) -> dict[str, Any]:
        from tqdm.auto import tqdm

        model, backend, batch_size = self.model, self.model.backend, self.batch_size
        if self.sampler is not None:
            x_train, y_train = _check_dataset(model, self.sampler.sample_epoch(self.rng), self.loss,
                                              "train")
        else:
            x_train, y_train = self.train
        n = x_train.shape[0]
        n_batches = -(-n // batch_size)
        order = self.rng.permutation(n)
        redistributor = self.redistributor
        fraction = (fraction_at(epoch, self.epochs, self.alpha, self.redistribute_every,
                                self.end_fraction) if redistributor is not None else 0.0)
        if redistributor is not None:
            redistributor.start_epoch(model, n_batches, fraction > 0)
        if self.memory is not None:
            self.memory.reset_peak()
        batch_losses = backend.xp.empty(n_batches, dtype=numpy.float64)
        backend.synchronize()
        start = time.perf_counter()
        batch_bar = tqdm(range(n_batches), desc=f"epoch {epoch}", leave=False,
                         disable=not self.progress, unit="batch")
        shown = None  # the loss on its way to the progress bar (never waited for)
        for b in batch_bar:
            idx = order[b * batch_size:(b + 1) * batch_size]
            value = self.train_batch(x_train[idx], y_train[idx])
            batch_losses[b] = value
            if self.progress and b % 50 == 0:
                shown = _show_loss(batch_bar, shown, backend, value)
        host_losses = to_numpy(batch_losses)  # one sync per epoch
        model.clear_cache()
        backend.synchronize()
        train_seconds = time.perf_counter() - start
        bad = numpy.flatnonzero(~numpy.isfinite(host_losses))
        if bad.size:
            raise FloatingPointError(
                f"The training loss became {host_losses[bad[0]]} at epoch {epoch}, batch "
                f"{int(bad[0]) + 1} of {n_batches}. Try a smaller learning rate.")
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(host_losses.mean()),
            "train_seconds": train_seconds,
            "n_batches": n_batches,
            "redistribution_seconds": 0.0,
        }
        if fraction > 0:
            rows = order[max(0, n_batches - self.growth_batches) * batch_size:]
            metrics.update(_redistribute(model, self.optimizer, redistributor, fraction,
                                         (x_train[rows], y_train[rows]), self.probe, self.loss))
        metrics["nnz"] = model.nnz
        if self.memory is not None:
            metrics["peak_memory_bytes"] = self.memory.peak()
        if self.test is not None:
            start = time.perf_counter()
            result = evaluate(model, *self.test, self.loss, self.eval_batch_size)
            metrics["test_loss"] = result["loss"]
            metrics["test_accuracy"] = result["accuracy"]
            if "auc" in result:
                metrics["test_auc"] = result["auc"]
            metrics["eval_seconds"] = time.perf_counter() - start
        return metrics


def fit(model: Any, optimizer: Any, train: Any, test: tuple[Any, Any] | None = None,
        *, epochs: int, batch_size: int, loss: str = "cross_entropy", seed: int = 0,
        progress: bool = True, eval_batch_size: int = EVAL_BATCH,
        redistribution: Any = None, alpha: float = 0.5, redistribute_every: int = 1,
        end_fraction: float = 0.75, growth_batches: int = 1,
        augment: Callable[[Any, numpy.random.Generator], Any] | None = None,
        track_memory: Any = False,
        on_epoch_end: Callable[[dict[str, Any]], Any] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` with ``optimizer`` and return one metrics dict per epoch.

    Each epoch visits the training rows in a fresh permutation drawn from a
    generator seeded by ``seed`` (so runs repeat exactly), in mini-batches of
    ``batch_size`` (the last may be smaller) moved to the model's device.

    Parameters
    ----------
    model : MLP
    optimizer : Adam
    train : (x, y) pair of host (NumPy) or device arrays, or an object with
        ``sample_epoch(rng) -> (x, y)`` drawing each epoch's rows
    test : (x, y) pair, optional
        x is (n, sizes[0]); y holds class indices (cross_entropy) or 0/1
        targets (binary_cross_entropy). Both are checked up front.
    epochs, batch_size : int >= 1
    loss : {"cross_entropy", "binary_cross_entropy"}
    seed : int >= 0
    progress : bool
        tqdm bars for epochs and batches.
    redistribution : str, Redistributor or None
        A name of :data:`cupynn.redistribution.NAMES` (built with ``seed``) or
        a redistributor. After epoch e it moves the fraction
        ``fraction_at(e, epochs, alpha, redistribute_every, end_fraction)`` of
        the active weights, using the last ``growth_batches`` mini-batches of
        the epoch for gradients; its ``observe`` runs after every backward pass.
    alpha, redistribute_every, end_fraction : the schedule (SPEC §3)
    growth_batches : int >= 1
    augment : callable ``(x_batch, rng) -> x_batch``, optional
        Applied on the device to every training batch, with a generator of
        its own seeded from ``seed``.
    track_memory : bool or cupynn.memory.MemoryTracker
        Record each epoch's ``peak_memory_bytes`` (see :mod:`cupynn.memory`).
        ``True`` counts only what is allocated from the start of training; pass
        a tracker started before building the model to include the model.
    on_epoch_end : callable, optional
        Called with each epoch's metrics dict; returning False stops training.

    Returns
    -------
    list of dict, one per epoch: ``epoch`` (1-based), ``train_loss`` (mean of
    the batch losses), ``train_seconds``, ``n_batches``, ``nnz`` (per layer)
    and, with ``test``, ``test_loss``, ``test_accuracy``, ``eval_seconds``
    (and ``test_auc`` for binary_cross_entropy), ``redistribution_seconds``
    and, after a redistribution, ``fraction``, ``induced_loss_before`` /
    ``induced_loss_after`` (training loss on a fixed batch of training rows
    just before and after it) and ``redistribution`` (per-layer counts).

    Raises
    ------
    FloatingPointError
        When a batch loss is NaN or infinite; names the epoch and batch.
    """
    return Trainer(model, optimizer, train, test, epochs=epochs, batch_size=batch_size, loss=loss,
                   seed=seed, progress=progress, eval_batch_size=eval_batch_size,
                   redistribution=redistribution, alpha=alpha,
                   redistribute_every=redistribute_every, end_fraction=end_fraction,
                   growth_batches=growth_batches, augment=augment, track_memory=track_memory,
                   on_epoch_end=on_epoch_end).run()


def _show_loss(bar: Any, shown: Any, backend: Any, value: Any) -> Any:
    """Put the last loss whose copy has landed on the bar; start copying ``value``
    unless a copy is still on its way. Returns what is still on its way."""
    if shown is not None and shown.ready():
        bar.set_postfix(loss=f"{float(shown.value()):.4f}")
        shown = None
    if shown is None:
        shown = backend.read_later(value)
        if shown.ready():  # the CPU: at once
            bar.set_postfix(loss=f"{float(shown.value()):.4f}")
            shown = None
    return shown


def _redistributor(redistribution: Any, seed: int) -> Any:
    from .redistribution import Redistributor, create

    if redistribution is None or isinstance(redistribution, Redistributor):
        return redistribution
    if isinstance(redistribution, str):
        return create(redistribution, seed=seed)
    raise TypeError(f"The 'redistribution' parameter of fit must be a name, a Redistributor or "
                    f"None. Got {type(redistribution).__name__} instead.")


def _probe_loss(model: Any, batch: tuple[numpy.ndarray, numpy.ndarray], loss: str) -> float:
    value, _ = LOSSES[loss](model.forward(batch[0]), model.backend.asarray(batch[1]), check=False)
    return float(value)


def _redistribute(model: Any, optimizer: Any, redistributor: Any, fraction: float,
                  growth: tuple[numpy.ndarray, numpy.ndarray],
                  probe: tuple[numpy.ndarray, numpy.ndarray], loss: str) -> dict[str, Any]:
    """One scheduled redistribution, timed, with the induced loss around it."""
    before = _probe_loss(model, probe, loss)
    model.backend.synchronize()
    start = time.perf_counter()
    counts = redistributor.redistribute(model, optimizer, fraction, growth[0], growth[1], loss)
    model.backend.synchronize()
    seconds = time.perf_counter() - start
    return {"fraction": fraction, "redistribution_seconds": seconds,
            "induced_loss_before": before, "induced_loss_after": _probe_loss(model, probe, loss),
            "redistribution": counts}
