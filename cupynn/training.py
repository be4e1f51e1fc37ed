"""The training loop: seeded shuffles, mini-batches, the schedule's redistributions, epochs.

Each mini-batch is a :class:`cupynn.step.TrainStep` (or, with ``graph=True``, a
replay of a :class:`cupynn.graph.GraphStep`); the settings are declared in
:mod:`cupynn.settings`; the data checks and :func:`evaluate` are in
:mod:`cupynn.evaluation`.

Why this file is long (~600 lines): :func:`fit`'s docstring is the reference of
every setting (about 100 lines), and the trainer's epoch, its one-process,
data-parallel and graph batches and the redistributions it schedules share the
trainer's state (streams, schedule, checkpointable position).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy

from .backend import to_numpy
from .distributed import guarded
from .evaluation import check_dataset, check_sample_weight, evaluate
from .health import network_health
from .losses import LOSSES
from .redistribution.schedule import Schedule
from .settings import check_settings, takes_settings
from .step import TrainStep


class Trainer:
    """The training loop, with its state, so that it can stop and resume exactly.

    :func:`fit` is ``Trainer(...).run()``. The trainer owns the random streams
    (shuffle and sampling; augmentation), the epoch counter and the history,
    and asks its ``schedule`` (:class:`cupynn.redistribution.schedule.Schedule`)
    when and how much to redistribute;
    :meth:`state_dict` / :meth:`load_state_dict` with the model's and the
    optimizer's make a checkpoint (:mod:`cupynn.checkpoint`) from which
    :meth:`run` continues with exactly the result of an uninterrupted run on
    the same backend.

    Parameters are those of :func:`fit`; ``train`` may also be an object with
    ``sample_epoch(rng) -> (x, y)`` that draws each epoch's training rows (as
    the HIGGS loader does; with ``epoch_rows(rng)`` and ``take(rows)`` as well,
    each rank of a data-parallel run copies only the rows of its shards), and
    ``augment`` a callable ``(x_batch, rng) -> x_batch`` applied on the device
    to every training batch (with several ranks it must also take ``rows=``
    and ``total=``, as :class:`cupynn.data.RandomAffine` does).
    """

    # With several ranks, a check that fails on one rank ends them all (the others would wait
    # forever at the first collective); ranks that disagree raise RanksDisagree alike.
    @guarded
    @takes_settings
    def __init__(self, model: Any, optimizer: Any, train: Any, test: tuple[Any, Any] | None = None,
                 **settings: Any) -> None:
        from .distributed import as_communicator

        owner = "fit"
        s = check_settings(settings, owner)
        self.comm = as_communicator(s["comm"], owner)
        self.loss, self.epochs, self.batch_size = s["loss"], s["epochs"], s["batch_size"]
        self.seed, self.eval_batch_size = s["seed"], s["eval_batch_size"]
        self.growth_batches = s["growth_batches"]
        # When and how much to redistribute: the trainer asks, and schedules nothing itself.
        self.schedule = Schedule(self.epochs, alpha=s["alpha"], every=s["redistribute_every"],
                                 end_fraction=s["end_fraction"], kind=s["schedule"],
                                 unit=s["redistribute_unit"])
        augment, loss = s["augment"], self.loss
        distributed = self.comm.size > 1
        if distributed and augment is not None and not _takes_rows(augment):
            raise TypeError(f"With {self.comm.size} ranks the 'augment' callable of {owner} must "
                            f"take rows= and total= (a rank's share of a batch), as "
                            f"cupynn.data.RandomAffine does. Got {augment!r}.")
        self.redistributor = _redistributor(s["redistribution"], self.seed)
        if self.redistributor is not None:
            self.redistributor.comm = self.comm
        if getattr(optimizer, "model", model) is not model:
            raise ValueError("The optimizer of fit was built for another model.")
        self.model, self.optimizer = model, optimizer
        # Only the first rank shows progress.
        self.progress = s["progress"] and self.comm.is_root
        self.augment, self.on_epoch_end = augment, s["on_epoch_end"]
        track_memory = s["track_memory"]
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
        self.train = None if self.sampler is not None else check_dataset(model, train, loss, "train")
        self.test = None if test is None else check_dataset(model, test, loss, "test")
        self.sample_weight = check_sample_weight(s["sample_weight"], self.train, self.comm)
        self.rng = numpy.random.default_rng(self.seed)
        self.augment_rng = numpy.random.default_rng((self.seed, 2))
        # Every mini-batch's step; with several ranks its reducer sums the gradients.
        self.step = TrainStep(model, optimizer, loss, redistributor=self.redistributor,
                              comm=self.comm, augment=augment, augment_rng=self.augment_rng)
        self.reducer = self.step.reducer
        self.graph = _graph_step(s["graph"], model, optimizer, loss, self.batch_size,
                                 comm=self.comm, augment=augment,
                                 sample_weight=s["sample_weight"])
        # A fixed batch of training rows for the induced loss, from its own stream: of a
        # sampler's epoch (only those rows are copied, where it can take rows).
        stream = numpy.random.default_rng((self.seed, 1))
        if self.sampler is not None and _takes(self.sampler):
            sample_rows = self.sampler.epoch_rows(stream)
            rows = numpy.sort(numpy.random.default_rng((self.seed, 1)).choice(
                len(sample_rows), size=min(self.batch_size, len(sample_rows)), replace=False))
            self.probe = check_dataset(model, self.sampler.take(sample_rows[rows]), loss, "train")
        else:
            probe_source = self.train or check_dataset(
                model, self.sampler.sample_epoch(stream), loss, "train")
            rows = numpy.sort(numpy.random.default_rng((self.seed, 1)).choice(
                probe_source[0].shape[0], size=min(self.batch_size, probe_source[0].shape[0]),
                replace=False))
            self.probe = (probe_source[0][rows], probe_source[1][rows])
        self.epoch = 0  # epochs completed
        self.history: list[dict[str, Any]] = []
        if distributed:
            self.comm.check_same("configuration", self._settings())

    def _settings(self) -> dict[str, Any]:
        """What every rank of a data-parallel run must agree on (sizes, seeds, data)."""
        from .distributed import fingerprint

        model, r, schedule = self.model, self.redistributor, self.schedule
        data = (fingerprint(*self.train) if self.sampler is None else
                {"sampler": type(self.sampler).__name__,
                 "rows": fingerprint(*(getattr(self.sampler, name) for name in
                                       ("x_train", "y_train") if hasattr(self.sampler, name))),
                 "train_samples": getattr(self.sampler, "train_samples", None)})
        params = None if r is None else {
            "name": r.name, **{k: v for k, v in vars(r).items()
                               if isinstance(v, (bool, int, float, str)) and k != "comm"}}
        optimizer = {k: getattr(self.optimizer, k, None) for k in ("lr", "betas", "eps")}
        return {"model": model.config(), "backend": model.backend.name,
                "optimizer": {"type": type(self.optimizer).__name__, **optimizer},
                "loss": self.loss, "epochs": self.epochs, "batch_size": self.batch_size,
                "seed": self.seed, "alpha": schedule.alpha,
                "redistribute_every": schedule.every,
                "end_fraction": schedule.end_fraction, "growth_batches": self.growth_batches,
                "schedule": schedule.kind, "redistribute_unit": schedule.unit,
                "eval_batch_size": self.eval_batch_size, "redistribution": params,
                "augment": None if self.augment is None else repr(self.augment),
                "train data": data,
                "test data": None if self.test is None else fingerprint(*self.test),
                "probe rows": fingerprint(*self.probe)}

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
            # With several ranks, an error on one rank ends them all (none waits forever in
            # a collective); a NaN loss is seen by every rank alike and raised as usual.
            with self.comm.guard(alike=(FloatingPointError,)):
                for epoch in bar:
                    metrics = self.train_epoch(epoch)
                    self.epoch = epoch
                    self.history.append(metrics)
                    shown = {k: f"{metrics[k]:.4f}"
                             for k in ("train_loss", "test_accuracy") if k in metrics}
                    shown["zeros"] = f"{metrics['zero_weights'] / sum(metrics['nnz']):.1%}"
                    shown["dead"] = metrics["dead_neurons"]  # a collapse shows as it builds
                    bar.set_postfix(shown)
                    stop = self.on_epoch_end is not None and self.on_epoch_end(metrics) is False
                    if any(self.comm.allgather(stop) if self.reducer else (stop,)):
                        break
        finally:
            if self._owns_memory:
                self.memory.stop()
        return self.history

    def train_batch(self, x: numpy.ndarray, y: numpy.ndarray,
                    shard: tuple[int, int, int] | None = None, weight: Any = None, *,
                    check: bool = True) -> Any:
        """One training step on a host mini-batch, as every batch of an epoch takes it: the
        trainer's :class:`cupynn.step.TrainStep` (``self.step``; its :meth:`~cupynn.step.
        TrainStep.take` says what the arguments mean). Returns the batch's mean loss as a
        0-d array on the device: on the GPU the step queues its work and returns without
        waiting for the device (``scripts/gpu_check.py`` checks this)."""
        return self.step(x, y, shard, weight, check=check)

    def _epoch_data(self) -> tuple[Callable[[int], tuple[Any, ...]], int, Callable[[int], Any]]:
        """This epoch's batches: ``(batch(b), n_rows, rows_from(b0))``.

        ``batch(b)`` gives the host rows of batch ``b`` for :meth:`train_batch`
        (the global batch, or with several ranks this rank's share and its
        ``shard``); ``rows_from(b0)`` the rows of batches ``b0, ...`` this rank
        uses for growth, with their global count. Draws the epoch's rows and
        order from the trainer's stream, the same way on every rank.
        """
        model, comm, size = self.model, self.comm, self.batch_size
        local = self.reducer is not None and self.sampler is not None and _takes(self.sampler)
        if local:
            sample_rows = self.sampler.epoch_rows(self.rng)
            n = len(sample_rows)
        else:
            if self.sampler is not None:
                x_train, y_train = check_dataset(model, self.sampler.sample_epoch(self.rng),
                                                  self.loss, "train")
            else:
                x_train, y_train = self.train
            n = x_train.shape[0]
        order = self.rng.permutation(n)
        n_batches = -(-n // size)
        if self.reducer is None:
            if self.graph is not None:  # the graph step copies them to the device itself
                self._epoch_rows = (x_train, y_train, order)
            w_train = self.sample_weight  # with weights: (x, y, no shard, w)

            def batch(b):
                idx = order[b * size:(b + 1) * size]
                if w_train is None:
                    return x_train[idx], y_train[idx]
                return x_train[idx], y_train[idx], None, w_train[idx]

            def rows_from(b0):
                rows = order[b0 * size:]
                if w_train is None:
                    return x_train[rows], y_train[rows], None
                return x_train[rows], y_train[rows], None, w_train[rows]
            return batch, n, rows_from
        shards = [comm.shard(min(size, n - b * size)) for b in range(n_batches)]
        positions = [order[b * size + s:b * size + e] for b, (s, e) in enumerate(shards)]
        if local:  # copy only this rank's rows of the epoch
            mine = numpy.concatenate(positions) if positions else numpy.empty(0, dtype=int)
            x_train, y_train = self.sampler.take(sample_rows[mine])
            if len(mine):
                check_dataset(model, (x_train, y_train), self.loss, "train")
            offsets = numpy.concatenate([[0], numpy.cumsum([len(p) for p in positions])])
            positions = [numpy.arange(offsets[b], offsets[b + 1]) for b in range(n_batches)]

        def batch(b):
            s, e = shards[b]
            idx = positions[b]
            return x_train[idx], y_train[idx], (s, e, min(size, n - b * size))

        def rows_from(b0):
            idx = numpy.concatenate(positions[b0:])
            return x_train[idx], y_train[idx], n - b0 * size
        return batch, n, rows_from

    def _batches(self, epoch: int, batch_bar: Any, batch: Callable[[int], tuple[Any, ...]],
                 n_batches: int, moves: list[dict[str, Any]], n: int | None = None
                 ) -> numpy.ndarray:
        """The epoch's training steps (with ``n``, the number of rows: through the
        trainer's :class:`cupynn.graph.GraphStep`); returns the batch losses."""
        model, backend, schedule = self.model, self.model.backend, self.schedule
        redistributor, graph = self.redistributor, self.graph
        stepwise = redistributor is not None and schedule.stepwise
        if graph is None:
            batch_losses = backend.xp.empty(n_batches, dtype=numpy.float64)
        else:
            graph.begin_epoch(*self._epoch_rows, n_batches)
            self._epoch_rows = None  # not kept past the copy
        shown = None  # the loss on its way to the progress bar (never waited for)
        for b in batch_bar:
            step = schedule.step(epoch, b, n_batches)
            if stepwise:  # an interval of t steps begins: the redistributor's Fisher, say
                opening = schedule.interval_start(step, b == 0, n_batches)
                if opening is not None:
                    redistributor.start_epoch(model, *opening)
            if graph is None:
                rows = batch(b)
                value = self.train_batch(*rows, check=False)
                batch_losses[b] = value
            else:
                value = graph.step(min(self.batch_size, n - b * self.batch_size))
                if redistributor is not None:
                    redistributor.observe(model)
            if stepwise:
                step_fraction = schedule.interval_end(step, n_batches)
                if step_fraction is not None and step_fraction > 0:
                    self._redistribute_at_step(step, step_fraction,
                                               rows if graph is None else batch(b), moves)
            if self.progress and b % 50 == 0:
                shown = _show_loss(batch_bar, shown, backend, value)
        if graph is not None:
            return graph.epoch_losses()
        return to_numpy(batch_losses)  # one sync per epoch

    def _redistribute_at_step(self, step: int, fraction: float, rows: tuple[Any, ...],
                              moves: list[dict[str, Any]]) -> None:
        """After step ``step``, as the schedule says: move ``fraction``, growing from this
        step's batch (this rank's share of it)."""
        x, y, *shard = rows  # (x, y), (x, y, shard) or, weighted, (x, y, None, weight)
        record = _redistribute(self.model, self.optimizer, self.redistributor, fraction,
                               (x, y, shard[0][2] if shard and shard[0] else None, *shard[1:]),
                               self.probe, self.loss, self.comm)
        self.comm.check_identical_model(self.model, f"after the redistribution of step {step}")
        moves.append({"step": step, "fraction": fraction,
                      "seconds": record["redistribution_seconds"],
                      **{k: record[k] for k in ("induced_loss_before", "induced_loss_after",
                                                "redistribution")}})

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """Train (1-based) ``epoch``: its batches, its redistribution, its health and
        evaluation; returns its metrics. :meth:`run` calls it for each remaining epoch and
        keeps the history; a caller that steps epochs itself (the estimators) does too."""
        from tqdm.auto import tqdm

        model, backend, batch_size = self.model, self.model.backend, self.batch_size
        batch, n, rows_from = self._epoch_data()
        n_batches = -(-n // batch_size)
        redistributor, schedule = self.redistributor, self.schedule
        stepwise = redistributor is not None and schedule.stepwise
        fraction = 0.0
        if redistributor is not None and not stepwise:
            fraction = schedule.fraction(epoch)
            redistributor.start_epoch(model, n_batches, fraction > 0)
        if self.memory is not None:
            self.memory.reset_peak()
        backend.synchronize()
        start = time.perf_counter()
        batch_bar = tqdm(range(n_batches), desc=f"epoch {epoch}", leave=False,
                         disable=not self.progress, unit="batch")
        moves: list[dict[str, Any]] = []  # redistributions every t steps, within the epoch
        if self.graph is None:
            host_losses = self._batches(epoch, batch_bar, batch, n_batches, moves)
        else:
            with self.graph.on_stream():  # the replays and the eager work between them
                host_losses = self._batches(epoch, batch_bar, batch, n_batches, moves, n)
        model.clear_cache()
        backend.synchronize()
        train_seconds = time.perf_counter() - start - sum(m["seconds"] for m in moves)
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
        if moves:
            metrics["redistributions"] = moves
            metrics["redistribution_seconds"] = sum(m["seconds"] for m in moves)
        # The network as training left it, before this epoch's rewiring adds its zeros.
        metrics.update(network_health(model, self.probe[0]))
        if fraction > 0:
            growth = rows_from(max(0, n_batches - self.growth_batches))
            metrics.update(_redistribute(model, self.optimizer, redistributor, fraction, growth,
                                         self.probe, self.loss, self.comm))
            self.comm.check_identical_model(model, f"after the redistribution of epoch {epoch}")
        metrics["nnz"] = model.nnz
        if self.memory is not None:
            metrics["peak_memory_bytes"] = self.memory.peak()
        if self.test is not None:
            start = time.perf_counter()
            result = evaluate(model, *self.test, self.loss, self.eval_batch_size, self.comm)
            metrics["test_loss"] = result["loss"]
            for key in ("accuracy", "auc", "mse", "r2"):
                if key in result:
                    metrics[f"test_{key}"] = result[key]
            metrics["eval_seconds"] = time.perf_counter() - start
        if self.reducer is not None:  # the slowest rank's times and peak, the same everywhere
            keys = [k for k in ("train_seconds", "redistribution_seconds", "eval_seconds",
                                "peak_memory_bytes") if k in metrics]
            slowest = numpy.array([float(metrics[k]) for k in keys]
                                  + [m["seconds"] for m in moves])
            self.comm.allreduce(slowest, op="max")
            for k, v in zip(keys, slowest.tolist()):
                metrics[k] = int(v) if k == "peak_memory_bytes" else v
            for m, v in zip(moves, slowest[len(keys):].tolist()):
                m["seconds"] = v
        return metrics


@takes_settings
def fit(model: Any, optimizer: Any, train: Any, test: tuple[Any, Any] | None = None,
        **settings: Any) -> list[dict[str, Any]]:
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
        targets (binary_cross_entropy) or real targets, (n,) or (n, outputs)
        (mean_squared_error). Both are checked up front.
    epochs, batch_size : int >= 1
    loss : {"cross_entropy", "binary_cross_entropy", "mean_squared_error"}
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
    schedule : {"cosine", "constant", "linear"}
        How the fraction falls from ``alpha`` (:func:`cupynn.redistribution.fraction_at`).
        With ``redistribute_every``, ``end_fraction`` and ``redistribute_unit``
        it makes the trainer's :class:`cupynn.redistribution.schedule.Schedule`
        (``Trainer.schedule``), which alone decides when and how much.
    redistribute_unit : {"epoch", "step"}
        ``"step"``: redistribute after every ``redistribute_every`` training
        steps instead of epochs (RigL: every 100), the schedule counting steps
        (E_end = ``end_fraction`` × all steps), growth from the step's batch;
        each epoch's metrics then list its ``redistributions`` (step, fraction,
        seconds, induced loss, counts). WoodFisher's Fisher gathers the
        gradients of each interval; a run resumed in the middle of one starts
        it again from that point.
    growth_batches : int >= 1
    augment : callable ``(x_batch, rng) -> x_batch``, optional
        Applied on the device to every training batch, with a generator of
        its own seeded from ``seed``.
    track_memory : bool or cupynn.memory.MemoryTracker
        Record each epoch's ``peak_memory_bytes`` (see :mod:`cupynn.memory`).
        ``True`` counts only what is allocated from the start of training; pass
        a tracker started before building the model to include the model.
    on_epoch_end : callable, optional
        Called with each epoch's metrics dict; returning False stops training
        (on every rank, when any rank's call returns False).
    comm : cupynn.distributed.Communicator, optional
        Data-parallel training over its ranks (see :mod:`cupynn.distributed`):
        ``train`` and ``test`` given in full on every rank (or a sampler),
        ``batch_size`` the global batch, each rank computing its contiguous
        share; one all-reduce per step; redistribution identical on every rank
        (checked by hashing every layer after each one); evaluation sharded.
        Every rank returns the same history (times and peak memory are the
        slowest rank's), and the model equals a one-process run's with the same
        global batch up to the order of floating-point sums. Only the first
        rank shows progress.
    graph : {"auto", True, False}
        Train through a :class:`cupynn.graph.GraphStep`: each step one replay
        of a CUDA graph captured once per topology (the GPU, one process, the
        ReLU activation, cross_entropy or binary_cross_entropy, no
        augmentation, no sample weights). True asks for it (an error says why
        a run cannot have it); "auto" uses it where a GPU check has shown the
        graph equal to the eager step and faster, which none has yet: for now
        "auto" trains eagerly, as False does. A graph's results repeat bit for
        bit, but differ from the eager step's in rounding (its loss, bias
        gradient and dense layers run cupynn's own kernels).
    sample_weight : (n,) float >= 0, optional
        One weight per training row (``train`` a pair; one process): each
        batch's loss is the weighted mean ``sum w_i l_i / sum w_i``, as
        scikit-learn's ``MLPClassifier`` weights it (:mod:`cupynn.losses`), and
        so are the gradients that growth reads. The reported losses on the
        test data and the probe batch are unweighted. ``None``: every row 1,
        the same bits as without.

    Returns
    -------
    list of dict, one per epoch: ``epoch`` (1-based), ``train_loss`` (mean of
    the batch losses), ``train_seconds``, ``n_batches``, ``nnz`` (per layer),
    the network's health before the epoch's rewiring (``zero_weights``,
    ``dead_neurons`` and per layer ``health``: :func:`cupynn.health.network_health`
    on the fixed batch of training rows) and, with ``test``, ``test_loss``, ``test_accuracy``, ``eval_seconds``
    (and ``test_auc`` for binary_cross_entropy; ``test_mse`` and ``test_r2``
    instead of the accuracy for mean_squared_error), ``redistribution_seconds``
    and, after a redistribution, ``fraction``, ``induced_loss_before`` /
    ``induced_loss_after`` (training loss on a fixed batch of training rows
    just before and after it) and ``redistribution`` (per-layer counts).

    Raises
    ------
    FloatingPointError
        When a batch loss is NaN or infinite; names the epoch and batch.
    """
    return Trainer(model, optimizer, train, test, **settings).run()


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


def _graph_step(mode: Any, model: Any, optimizer: Any, loss: str, batch_size: int,
                **run: Any) -> Any:
    """The trainer's :class:`cupynn.graph.GraphStep` when ``graph`` asks for one (True,
    or "auto" where graphs are known to pay: nowhere yet), else None."""
    if mode is False:
        return None
    from .graph import AUTO_CAPTURES, GraphStep, graph_unsupported

    why = graph_unsupported(model, loss, optimizer=optimizer, **run)
    if mode is True and why is not None:
        raise ValueError(f"fit(graph=True) cannot capture this run: {why}. Use graph='auto' "
                         f"(captures where it can) or graph=False.")
    if mode is True or (mode == "auto" and AUTO_CAPTURES and why is None):
        return GraphStep(model, optimizer, loss, batch_size)
    return None


def _takes(sampler: Any) -> bool:
    """Whether a sampler can draw an epoch's rows and copy chosen ones (``epoch_rows``, ``take``)."""
    return callable(getattr(sampler, "epoch_rows", None)) and callable(getattr(sampler, "take", None))


def _takes_rows(augment: Any) -> bool:
    import inspect

    try:
        params = inspect.signature(augment).parameters
    except (TypeError, ValueError):
        return False
    return "rows" in params and "total" in params


def _probe_loss(model: Any, batch: tuple[numpy.ndarray, numpy.ndarray], loss: str,
                comm: Any) -> float:
    x, y = batch
    if comm.size == 1:
        value, _ = LOSSES[loss](model.forward(x), model.backend.asarray(y), check=False)
        return float(value)
    start, stop = comm.shard(len(x))
    share = numpy.zeros(1)
    if stop > start:
        value, _ = LOSSES[loss](model.forward(x[start:stop]), model.backend.asarray(y[start:stop]),
                                check=False, total=len(x))
        share[0] = float(value)
    return float(comm.allreduce(share)[0])


def _redistribute(model: Any, optimizer: Any, redistributor: Any, fraction: float,
                  growth: tuple[Any, Any, int | None],
                  probe: tuple[numpy.ndarray, numpy.ndarray], loss: str,
                  comm: Any) -> dict[str, Any]:
    """One scheduled redistribution, timed, with the induced loss around it.

    ``growth`` is ``(x, y, total)``: this rank's rows of the growth batch(es)
    and their count over all ranks (None: one process); or, with sample
    weights, ``(x, y, None, weight)``, the growth gradients then weighted. The
    induced loss is the probe batch's unweighted loss."""
    before = _probe_loss(model, probe, loss, comm)
    model.backend.synchronize()
    start = time.perf_counter()
    x, y, total, *weight = growth
    weighted = {"weight": weight[0]} if weight else {}  # a Redistributor of before takes none
    counts = redistributor.redistribute(model, optimizer, fraction, x, y, loss, total=total,
                                        **weighted)
    model.backend.synchronize()
    seconds = time.perf_counter() - start
    return {"fraction": fraction, "redistribution_seconds": seconds,
            "induced_loss_before": before, "induced_loss_after": _probe_loss(model, probe, loss, comm),
            "redistribution": counts}
