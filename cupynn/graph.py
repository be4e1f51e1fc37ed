"""The training step as a CUDA graph: captured once per topology, replayed for every batch.

:class:`GraphStep` is :class:`cupynn.step.TrainStep`'s work written for
capture: every buffer it touches is allocated when the topology is set (and
kept referenced), every operation is a launch of one of cupynn's own kernels
(CuPy refuses cuBLAS and cuSPARSE during capture, so a dense layer runs the
sparse kernels over a full pattern), and what changes from step to step lives
in device memory: the epoch's permutation of the training rows (on the
device, gathered there by :func:`cupynn.kernels.gather_batch`), the batch
counter that :func:`cupynn.kernels.end_step` advances, and Adam's scalars of
every step of the epoch, a table the multi-tensor update reads at the
counter's row. One step is then one ``graph.launch``. The graph is captured
again after every redistribution (the arrays of a layer change) and for the
epoch's short last batch (its own shapes).

The same sequence of launches runs without capture (``capture=False``), on
any backend: the GPU check compares the two bit for bit, and the tests run
both on the CPU through a CuPy-shaped fake device (``tests/fake_gpu.py``)
that records launches and allocations and fails a capture that allocates or
waits for the device.

What the step does not hold (the redistributor's ``observe``, which keeps
host-side counts) runs eagerly after each replay, on the same stream; the
gradients it reads are the step's own buffers, which Adam does not change.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy

from . import kernels
from .kernels import AdamPointers, adam_multi
from .layers import Linear, SparseLinear

GRAPH_MODES = ("auto", True, False)
GRAPH_LOSSES = ("cross_entropy", "binary_cross_entropy")
# "auto" captures where a GPU check has shown the graph equal to the eager step and
# faster; none has run yet (docs/gpu.md says what the next lent GPU runs), so "auto"
# stays eager.
AUTO_CAPTURES = False


def graph_unsupported(model: Any, loss: str, *, optimizer: Any = None, comm: Any = None,
                      augment: Any = None, sample_weight: Any = None) -> str | None:
    """Why this run cannot train through a :class:`GraphStep` (None: it can)."""
    from .optim import Adam

    if not model.backend.is_gpu:
        return "CUDA graphs need the GPU backend"
    if comm is not None and comm.size > 1:
        return f"data-parallel training ({comm.size} ranks) all-reduces on the host"
    if model.activation != "relu":
        return f"the {model.activation!r} activation has no fused kernel"
    if loss not in GRAPH_LOSSES:
        return f"the {loss!r} loss has no fused kernel"
    if augment is not None:
        return "augmentation draws from a host generator"
    if sample_weight is not None:
        return "weighted losses have no fused kernel"
    if optimizer is not None and not isinstance(optimizer, Adam):
        return f"the step's update is cupynn.Adam's kernel, not {type(optimizer).__name__}'s"
    for layer in model.layers:
        if not isinstance(layer, (SparseLinear, Linear)):
            return f"no kernels for a {type(layer).__name__} layer"
        if isinstance(layer, Linear) and layer.weight.size >= 2 ** 31:
            return (f"a dense layer of {layer.weight.size} weights overflows the int32 "
                    f"pattern its graph kernels read")
    return None


class _Layer:
    """One layer as the step's kernels see it: a CSR pattern over its values (a dense
    layer's full pattern over its weight matrix), its transposed pattern, and its
    gradients' buffers."""

    def __init__(self, layer: Any, xp: Any) -> None:
        self.layer = layer
        if isinstance(layer, SparseLinear):
            self.value_name, self.source = "data", layer.data
            self.values, self.indptr, self.indices = layer.data, layer.indptr, layer.indices
            self.transposed = layer.transposed_pattern()
        elif isinstance(layer, Linear):
            rows, cols = layer.weight.shape
            self.value_name, self.source = "weight", layer.weight
            self.values = layer.weight.reshape(-1)
            self.indptr = xp.arange(0, rows * cols + 1, cols, dtype=numpy.int32)
            self.indices = xp.tile(xp.arange(cols, dtype=numpy.int32), rows)
            self.transposed = kernels.transpose_pattern(self.indptr, self.indices, cols)
        else:
            raise TypeError(f"GraphStep: no kernels for a {type(layer).__name__} layer.")
        self.bias = layer.bias
        self.n_in, self.n_out = layer.in_features, layer.out_features
        self.grad_values = xp.zeros(self.values.size, dtype=self.values.dtype)
        self.grad_bias = xp.zeros(self.n_out, dtype=layer.bias.dtype)
        self.grad_view = self.grad_values.reshape(self.source.shape)  # the layer's shape
        self.bind()

    def bind(self) -> None:
        """Point the layer's gradients at this plan's buffers (what Adam and ``observe``
        read) where another backward pass, a redistribution's probe say, moved them; a
        step's host work, so nothing is made when they are in place."""
        layer = self.layer
        if getattr(layer, "grad_" + self.value_name) is not self.grad_view:
            layer.set_grad(self.value_name, self.grad_view)
        if layer.grad_bias is not self.grad_bias:
            layer.set_grad("bias", self.grad_bias)

    def current(self) -> bool:
        """Whether the layer still holds the arrays this plan was made for (a
        redistribution gives a sparse layer new ones; loading a state, every layer)."""
        layer = self.layer
        return (getattr(layer, self.value_name) is self.source and layer.bias is self.bias
                and (self.value_name != "data"
                     or (layer.indptr is self.indptr and layer.indices is self.indices)))


class _Adam:
    """Adam's multi-tensor update of every parameter, its scalars read on the device at
    the step counter's row of the epoch's table (one launch; nothing frozen at capture
    but the arrays' addresses, which stay while the topology does)."""

    def __init__(self, optimizer: Any, xp: Any) -> None:
        self.optimizer, self.xp = optimizer, xp
        self.table: Any = None
        self.pointers = AdamPointers()
        self.arrays: tuple[list[Any], ...] = ([], [], [], [])
        self.moments: list[Any] = []

    def begin(self, n_batches: int) -> bool:
        """The scalars of the epoch's steps ``t + 1 ... t + n_batches``, written in place
        when the table has that many rows already; True when it had to be made anew (the
        graphs that read the old one must be captured again); the rows are
        :meth:`cupynn.Adam.scalar_table`'s, the per-array update's bits."""
        opt = self.optimizer
        host = opt.scalar_table(opt.t + 1, n_batches, opt.model.dtype)
        if self.table is not None and self.table.shape == host.shape:
            self.table[...] = self.xp.asarray(host)
            return False
        self.table = self.xp.asarray(host)
        return True

    def current(self) -> bool:
        """Whether the optimizer still holds the moments the pointer tables were made for
        (``Adam.load_state_dict`` and ``remap`` make new ones)."""
        now = self._moments()
        return len(now) == len(self.moments) and all(a is b for a, b in zip(now, self.moments))

    def _moments(self) -> list[Any]:
        return [a for moments in self.optimizer.state for pair in moments.values() for a in pair]

    def rebuild(self) -> None:
        """The arrays to update, after the topology (and so the moments) changed."""
        ps, gs, ms, vs = self.arrays = ([], [], [], [])
        for p, g, m, v, _ in self.optimizer.arrays():
            for arrays, a in zip((ps, gs, ms, vs), (p, g, m, v)):
                arrays.append(a)
        self.pointers.update(ps, gs, ms, vs, self.xp)
        self.moments = self._moments()

    def launch(self, counter: Any) -> None:
        adam_multi(*self.arrays, self.table, counter, pointers=self.pointers, check=False)


class _Buffers:
    """What one step of ``rows`` rows writes: activations, their gradients, the batch."""

    def __init__(self, plans: list[_Layer], rows: int, loss: str, xp: Any, dtype: Any) -> None:
        self.rows = rows
        self.x = xp.zeros((plans[0].n_in, rows), dtype=dtype)
        self.h = [xp.zeros((p.n_out, rows), dtype=dtype) for p in plans]
        self.dh = [xp.zeros((p.n_out, rows), dtype=dtype) for p in plans]
        outputs = plans[-1].n_out
        self.y = xp.zeros(rows, dtype=numpy.int64 if loss == "cross_entropy" else dtype)
        self.logits = xp.zeros((rows, outputs), dtype=dtype)
        self.grad = xp.zeros((rows, outputs), dtype=dtype)
        self.value = xp.zeros((), dtype=dtype)
        self.scratch = xp.zeros(rows, dtype=dtype)  # the loss's per-row terms
        self.graph: Any = None


class GraphStep:
    """The training step of ``model`` under ``optimizer`` on device-resident data.

    Parameters
    ----------
    model : MLP on the GPU (or a fake device), ReLU activation
    optimizer : cupynn.Adam
    loss : "cross_entropy" or "binary_cross_entropy"
    batch_size : int
        The full batches' rows; :meth:`step` takes a last, shorter batch too.
    capture : bool
        Capture each step shape as a CUDA graph (True) or launch its kernels
        one by one (False): the same launches, the same bits.

    Use: :meth:`begin_epoch` with the epoch's training data and permutation,
    then :meth:`step` once per batch; :meth:`epoch_losses` gives the batch
    losses. Both run on the step's own stream, ordered after the caller's; eager
    work between steps that must see the step's results (``observe``, a
    redistribution) goes inside :meth:`on_stream`, as the trainer does.
    """

    def __init__(self, model: Any, optimizer: Any, loss: str, batch_size: int, *,
                 capture: bool = True) -> None:
        why = graph_unsupported(model, loss, optimizer=optimizer) if capture else None
        if why is None and loss not in GRAPH_LOSSES:  # capture=False checks the loss only
            why = f"the {loss!r} loss has no fused kernel"
        if why is not None:
            raise ValueError(f"GraphStep: {why}.")
        self.model, self.optimizer, self.loss = model, optimizer, loss
        self.batch_size, self.capture = int(batch_size), bool(capture)
        self.backend = model.backend
        xp = self.backend.xp
        self.counter = xp.zeros(1, dtype=numpy.int64)
        self.losses = xp.zeros(0, dtype=numpy.float64)
        self.order = xp.zeros(0, dtype=numpy.int64)
        self.x_train: Any = None
        self.y_train: Any = None
        self._plans: list[_Layer] = []
        self._buffers: dict[int, _Buffers] = {}
        self.stream = xp.cuda.Stream(non_blocking=True) if self.capture else None
        self.adam = _Adam(optimizer, xp)
        self.captures = 0  # graphs captured so far (a redistribution costs one more)
        self._warm = False  # the kernels' modules loaded (a capture cannot load one)
        self._steps = self._n_batches = 0

    # ---------------------------------------------------------------- epoch
    @contextlib.contextmanager
    def on_stream(self) -> Any:
        """Run the enclosed work on the step's stream (eager work between replays).

        The step's stream is non-blocking, so it is ordered by hand: on entry it
        waits for the work queued so far on the current stream (the model's
        making, the data's upload), and on exit the current stream waits for it."""
        if self.stream is None:
            yield
            return
        outer = self.backend.xp.cuda.get_current_stream()
        if outer.ptr == self.stream.ptr:  # already on it
            yield
            return
        self.stream.wait_event(outer.record())
        try:
            with self.stream:
                yield
        finally:
            outer.wait_event(self.stream.record())

    def stream_done(self) -> None:
        """Wait for the step's stream."""
        if self.stream is not None:
            self.stream.synchronize()

    def epoch_losses(self) -> numpy.ndarray:
        """The batch losses of the epoch so far (one per batch; a host copy, after the
        step's stream is done)."""
        from .backend import to_numpy

        self.stream_done()
        return to_numpy(self.losses)

    def begin_epoch(self, x: Any, y: Any, order: numpy.ndarray, n_batches: int) -> None:
        """The epoch's training rows, its permutation and its number of batches; the
        counter back to 0. Copied into the step's own device arrays, which keep their
        addresses while the shapes stay (the captured graphs read them there)."""
        order = numpy.asarray(order)
        most = -(-len(order) // self.batch_size)
        if not 1 <= n_batches <= most:
            raise ValueError(f"GraphStep.begin_epoch: {len(order)} rows in batches of "
                             f"{self.batch_size} make at most {most} batches. Got "
                             f"n_batches={n_batches}.")
        model = self.model
        label = numpy.int64 if self.loss == "cross_entropy" else model.dtype
        with self.on_stream():
            self.x_train, new_x = self._into(self.x_train, x, model.dtype)
            self.y_train, new_y = self._into(self.y_train, y, label)
            self.order, new_order = self._into(self.order, order, numpy.int64)
            self.losses, new_losses = self._into(self.losses, numpy.zeros(n_batches),
                                                 numpy.float64)
            self.counter[...] = 0
            if self.adam.begin(n_batches) or new_x or new_y or new_order or new_losses:
                self._drop_graphs()
        self._steps, self._n_batches = 0, n_batches

    def _into(self, device: Any, host: Any, dtype: Any) -> tuple[Any, bool]:
        """``host`` copied into ``device`` when the shapes agree; else a new device array
        (never the caller's own). Returns it and whether it is new."""
        xp = self.backend.xp
        values = xp.asarray(host, dtype=dtype)
        if device is not None and device.shape == values.shape:
            device[...] = values
            return device, False
        return xp.array(values, dtype=dtype, order="C", copy=True), True

    def _drop_graphs(self) -> None:
        for buffers in self._buffers.values():
            buffers.graph = None

    # ---------------------------------------------------------------- step
    def step(self, rows: int) -> Any:
        """One training step on the next ``rows`` rows of the epoch's permutation.

        Returns the batch loss as a 0-d device array, never read here: the step's
        own buffer, which the next step overwrites (read it, or copy it, on the
        step's stream before then)."""
        if self._steps >= self._n_batches:
            raise RuntimeError(f"GraphStep.step: the epoch has {self._n_batches} batches, all "
                               f"taken; call begin_epoch for the next one.")
        last = self._steps == self._n_batches - 1
        if rows > self.batch_size or (rows != self.batch_size and not last) or rows < 1:
            raise ValueError(f"GraphStep.step: batch {self._steps + 1} of {self._n_batches} "
                             f"takes {self.batch_size} rows (the last at most that many). "
                             f"Got {rows}.")
        with self.on_stream():
            plans = self._current_plans()
            buffers = self._buffers.get(rows)
            if buffers is None:
                buffers = self._buffers[rows] = _Buffers(plans, rows, self.loss,
                                                         self.backend.xp, self.model.dtype)
            if not self.capture:
                self._launches(plans, buffers)
            else:
                if buffers.graph is None:
                    buffers.graph = self._capture(plans, buffers)
                buffers.graph.launch(self.stream)
        self._steps += 1
        self.optimizer.t += 1  # the host's count, as an eager step keeps it
        return buffers.value

    def _current_plans(self) -> list[_Layer]:
        """The layers' plans: made again for a layer whose arrays changed (every graph
        dropped then), the Adam tables for moments that changed."""
        xp, changed = self.backend.xp, False
        plans = []
        for i, layer in enumerate(self.model.layers):
            plan = self._plans[i] if i < len(self._plans) else None
            if plan is None or plan.layer is not layer or not plan.current():
                plan, changed = _Layer(layer, xp), True
            plans.append(plan)
        if changed or len(plans) != len(self._plans):
            self._plans, self._buffers = plans, {}
        for plan in plans:  # a probe's backward pass may have moved the layers' gradients
            plan.bind()
        if changed or not self.adam.current():
            self.adam.rebuild()
            self._drop_graphs()
        return plans

    def _capture(self, plans: list[_Layer], buffers: _Buffers) -> Any:
        """Capture one step of this shape. The first capture is preceded by one eager
        step whose effects are undone: it loads the kernels' modules, which a capture
        cannot."""
        if not self._warm:
            saved = [a.copy() for a in self._state()]
            self._launches(plans, buffers)
            for array, copy in zip(self._state(), saved):
                array[...] = copy
            self._warm = True
        self.stream.begin_capture()
        try:
            self._launches(plans, buffers)
        finally:
            graph = self.stream.end_capture()
        self.captures += 1
        return graph

    def _state(self) -> list[Any]:
        """Every array a step changes besides its own scratch: values, moments, counts."""
        arrays = [a for layer in self.model.layers for _, a, _ in layer.parameters()]
        arrays += [a for moments in self.optimizer.state for m, v in moments.values()
                   for a in (m, v)]
        return arrays + [self.counter, self.losses]

    def _launches(self, plans: list[_Layer], b: _Buffers) -> None:
        """The step: gather, forward, loss, backward, Adam, end_step — launches only."""
        stride = self.batch_size
        kernels.gather_batch(self.x_train, self.order, self.counter, stride, b.x, check=False)
        kernels.gather_labels(self.y_train, self.order, self.counter, stride, b.y, check=False)
        last = len(plans) - 1
        for i, p in enumerate(plans):
            kernels.spmm(p.indptr, p.indices, p.values, b.x if i == 0 else b.h[i - 1],
                         check=False, bias=p.bias, relu=i < last, out=b.h[i], method="rows")
        kernels.transpose(b.h[last], b.logits, check=False)
        self._loss(b)
        kernels.transpose(b.grad, b.dh[last], check=False)
        for i in range(last, -1, -1):
            p = plans[i]
            kernels.relu_grad_rowsum(b.dh[i], b.h[i] if i < last else None, in_place=True,
                                     out=b.dh[i], sums=p.grad_bias)
            kernels.sddmm(p.indptr, p.indices, b.dh[i], b.x if i == 0 else b.h[i - 1],
                          out=p.grad_values, check=False)
            if i > 0:
                kernels.spmm_t(p.indptr, p.indices, p.values, b.dh[i], p.n_in, check=False,
                               transpose=p.transposed, sorted_rows=True, out=b.dh[i - 1],
                               method="rows")
        self.adam.launch(self.counter)
        kernels.end_step(b.value, self.losses, self.counter, check=False)

    def _loss(self, b: _Buffers) -> None:
        from .kernels import loss as fused

        if self.loss == "cross_entropy":
            fused.softmax_cross_entropy(b.logits, b.y, grad_out=b.grad, value_out=b.value,
                                        scratch=b.scratch, check=False)
        else:
            fused.binary_cross_entropy(b.logits, b.y, grad_out=b.grad, value_out=b.value,
                                       scratch=b.scratch, check=False)

