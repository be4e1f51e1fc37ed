"""One training step in one place: batch in, forward, loss, backward, all-reduce, observe, Adam.

:class:`TrainStep` is the step that :class:`cupynn.Trainer` takes for every
mini-batch, that ``benchmarks/bench_training.py`` times and that the GPU check
(``benchmarks/gpu_check``) probes phase by phase: each phase is a method, and
:meth:`TrainStep.phases` hands them out in order, so that a benchmark times
the step's own code rather than a copy of it. The step owns what it writes
between phases (the device batch, the logits, the loss and its gradient) and,
with several ranks, the flat all-reduce buffer of its :class:`GradientReducer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy

from .losses import LOSSES

NO_WEIGHTS_ACROSS_RANKS = ("sample_weight is not supported by data-parallel training ({size} "
                            "ranks) yet: train in one process, or repeat rows instead of "
                            "weighting them.")


class TrainStep:
    """The training step of ``model`` under ``optimizer``.

    Parameters
    ----------
    model : MLP
    optimizer : Adam (or anything with ``step()``)
    loss : a name of :data:`cupynn.losses.LOSSES`
    redistributor : Redistributor, optional
        Its ``observe(model)`` runs after the gradients are final (summed over
        the ranks), before the optimizer's step.
    comm : cupynn.distributed.Communicator, optional
        With several ranks the step takes this rank's share of each global
        batch and sums the gradients and the loss in one all-reduce.
    augment : callable, optional
        ``(x_batch, rng) -> x_batch`` on the device (with several ranks also
        ``rows=`` and ``total=``), drawing from ``augment_rng``.

    Calling the step runs :data:`PHASES` in order and returns the batch's
    mean loss as a 0-d device array, without waiting for the device.
    """

    PHASES = ("batch to device", "forward", "loss", "backward", "all-reduce", "observe", "adam")

    def __init__(self, model: Any, optimizer: Any, loss: str = "cross_entropy", *,
                 redistributor: Any = None, comm: Any = None,
                 augment: Callable[..., Any] | None = None,
                 augment_rng: numpy.random.Generator | None = None) -> None:
        from .distributed import as_communicator

        self.model, self.optimizer, self.redistributor = model, optimizer, redistributor
        self.loss_name, self.loss_fn = loss, LOSSES[loss]
        self.comm = as_communicator(comm, "TrainStep")
        self.reducer = GradientReducer(self.comm) if self.comm.size > 1 else None
        self.augment, self.augment_rng = augment, augment_rng
        # What one phase leaves for the next: the step's own buffers.
        self.x: Any = None
        self.y: Any = None
        self.weight: Any = None
        self.total: int | None = None  # the global batch's rows (several ranks)
        self.check = True
        self.logits: Any = None
        self.value: Any = None
        self.grad: Any = None

    def __call__(self, x: Any, y: Any, shard: tuple[int, int, int] | None = None,
                 weight: Any = None, *, check: bool = True) -> Any:
        """One step on a host (or device) mini-batch; see :meth:`take` for the arguments."""
        self.take(x, y, shard, weight, check=check)
        self.forward()
        self.compute_loss()
        self.backward()
        self.all_reduce()
        self.observe()
        self.adam()
        return self.value

    def phases(self, x: Any, y: Any, shard: tuple[int, int, int] | None = None,
               weight: Any = None, *, check: bool = True) -> list[tuple[str, Callable[[], Any]]]:
        """``(name, callable)`` for each phase of one step on this batch, in order; calling
        them one after another is calling the step. Phases that do nothing here (the
        all-reduce of one process, the observation without a redistributor) are left out."""
        def take() -> None:
            self.take(x, y, shard, weight, check=check)

        steps = [("batch to device", take), ("forward", self.forward),
                 ("loss", self.compute_loss), ("backward", self.backward)]
        if self.reducer is not None:
            steps.append(("all-reduce", self.all_reduce))
        if self.redistributor is not None:
            steps.append(("observe", self.observe))
        return steps + [("adam", self.adam)]

    def timed(self, x: Any, y: Any, shard: tuple[int, int, int] | None = None,
              weight: Any = None, *, check: bool = True) -> dict[str, float]:
        """One step run phase by phase, the device synchronized before and after each:
        seconds per phase name (:meth:`phases`) and ``"step"``, their sum."""
        import time

        sync = self.model.backend.synchronize
        times: dict[str, float] = {}
        sync()
        for name, phase in self.phases(x, y, shard, weight, check=check):
            start = time.perf_counter()
            phase()
            sync()
            times[name] = time.perf_counter() - start
        times["step"] = sum(times.values())
        return times

    # ---------------------------------------------------------------- phases
    def take(self, x: Any, y: Any, shard: tuple[int, int, int] | None = None,
             weight: Any = None, *, check: bool = True) -> None:
        """The batch to the device, through ``augment``.

        With several ranks, ``(x, y)`` is the global batch, of which this rank
        takes its contiguous share, or, with ``shard=(start, stop, total)``,
        already rows ``[start, stop)`` of a global batch of ``total`` rows; the
        loss and gradients are then this rank's share of the global batch's
        mean. ``weight`` (one process only): the rows' sample weights, the loss
        their weighted mean (:mod:`cupynn.losses`). ``check=False`` skips the
        scan of ``x`` for NaN and infinity (for data checked whole up front).
        """
        model, backend = self.model, self.model.backend
        self.check = check
        if self.reducer is None:
            self.total = None
            self.x = backend.asarray(x, dtype=model.dtype)
            if self.augment is not None:
                self.x = self.augment(self.x, self.augment_rng)
            self.y = backend.asarray(y)
            self.weight = None if weight is None else backend.asarray(weight)
            return
        if weight is not None:
            from .distributed import UnsupportedAcrossRanks

            raise UnsupportedAcrossRanks(NO_WEIGHTS_ACROSS_RANKS.format(size=self.comm.size))
        if shard is None:
            start, stop = self.comm.shard(len(x))
            shard, x, y = (start, stop, len(x)), x[start:stop], y[start:stop]
        start, stop, self.total = shard
        self.x = backend.asarray(x, dtype=model.dtype)
        if self.augment is not None:  # advances the stream as for the whole batch
            self.x = self.augment(self.x, self.augment_rng, rows=(start, stop), total=self.total)
        self.y, self.weight = backend.asarray(y), None

    def forward(self) -> None:
        """The logits (none for a rank whose share of the batch is empty)."""
        self.logits = (self.model.forward(self.x, check=self.check) if len(self.x) else None)

    def compute_loss(self) -> None:
        """The batch's mean loss and its gradient with respect to the logits."""
        if self.logits is None:  # no rows here: this rank adds zeros
            self.value = self.model.backend.xp.zeros((), dtype=self.model.dtype)
            self.grad = None
        elif self.reducer is None:
            self.value, self.grad = self.loss_fn(self.logits, self.y, check=False,
                                                 weight=self.weight)
        else:
            self.value, self.grad = self.loss_fn(self.logits, self.y, check=False,
                                                 total=self.total)

    def backward(self) -> None:
        """Every layer's gradients (zeros for a rank without rows)."""
        if self.grad is not None:
            self.model.backward(self.grad, need_input_grad=False)
            return
        zeros = self.model.backend.xp.zeros_like
        for layer in self.model.layers:
            for name, param, _ in layer.parameters():
                layer.set_grad(name, zeros(param))

    def all_reduce(self) -> None:
        """Sum the gradients and the loss over the ranks (nothing with one process)."""
        if self.reducer is not None:
            self.value = self.reducer.reduce(self.model, self.value)

    def observe(self) -> None:
        """The redistributor's look at the final gradients (WoodFisher's Fisher, say)."""
        if self.redistributor is not None:
            self.redistributor.observe(self.model)

    def adam(self) -> None:
        """The optimizer's step."""
        self.optimizer.step()


class GradientReducer:
    """Packs a model's gradients (and the batch loss) into one flat buffer, all-reduces it
    in one call, and points every gradient at its part of the result.

    The buffer is kept while the layout (the parameters' sizes) stays the same.
    """

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self._buffer: Any = None
        self._layout: tuple[int, ...] = ()

    def reduce(self, model: Any, loss: Any) -> Any:
        """Sum every ``grad_*`` of ``model`` and the 0-d ``loss`` over the ranks; returns the
        summed loss (0-d, on the device). Each gradient becomes a view of the buffer."""
        xp = model.backend.xp
        grads = [(layer, name, grad) for layer in model.layers
                 for name, _, grad in layer.parameters()]
        layout = tuple(int(g.size) for _, _, g in grads)
        total = sum(layout) + 1
        if self._buffer is None or layout != self._layout or self._buffer.dtype != model.dtype:
            self._buffer = xp.empty(total, dtype=model.dtype)
            self._layout = layout
        buffer = self._buffer
        offset = 0
        for _, _, grad in grads:
            buffer[offset:offset + grad.size] = grad.reshape(-1)
            offset += grad.size
        buffer[offset] = loss
        self.comm.allreduce(buffer)
        offset = 0
        for layer, name, grad in grads:
            layer.set_grad(name, buffer[offset:offset + grad.size].reshape(grad.shape))
            offset += grad.size
        return buffer[offset].astype(numpy.float64)
