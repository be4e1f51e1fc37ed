"""The redistribution template: drop by score, grow by score, rebuild, re-map.

Every algorithm is a :class:`Redistributor` that supplies only its scores:

1. **drop** — :meth:`Redistributor.drop` chooses, per sparse layer, which
   active entries stay (a boolean mask over ``data``), and may return updated
   values for the survivors (the OBS update of woodfisher/woodtaylor);
2. **grow** — :meth:`Redistributor.grow` chooses new positions per layer, as
   sorted linear keys ``row * in_features + col``, never at an entry that is
   active after the drop;
3. **rebuild** — the template merges survivors and new keys into canonical
   CSR (sorted, unique), new weights exactly 0;
4. **re-map** — the optimizer's moments follow: survivors keep theirs, new
   entries start at 0.

Layers marked dense (:class:`cupynn.Linear`) never take part. Everything runs
on the model's device; only small per-layer counts visit the host.

Memory: besides the per-layer keys of the survivors and of the new entries,
the template holds nothing of the size of a layer's weights that it can do
without. Selections are boolean masks (no index arrays), the linear keys and
the merged CSR are built in chunks of :data:`CHUNK` entries, the gradient
probe's per-layer output gradients are released as soon as growth is done
with them, and the stale weight gradients are dropped before the rebuild.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy

from ..layers import SparseLinear
from ..losses import LOSSES
from ..validation import check_int, check_real
from .selection import kth_smallest, round_half_up, smallest_mask

CHUNK = 1 << 18  # entries per chunk where the template builds keys or the merged CSR


_BLAS_CONTROLLER: Any = None


def one_blas_thread(xp: Any) -> Any:
    """A context in which NumPy's BLAS runs on one thread (CPU only; else a no-op).

    Growth by gradient multiplies dense blocks right after the gradient
    probe's parallel Numba kernels. With BLAS on a thread pool of its own, its
    threads and Numba's (which spin a while after each kernel) fight over the
    same cores: on a shared 2-core machine the 256 x 512 by 512 x 784 product
    of the paper's KMNIST network took 1.3 ms at best but 20 to 43 ms
    (median) right after a Numba kernel on two BLAS threads, and 4 to 11 ms
    on one. Uses ``threadpoolctl`` (a dependency of scikit-learn).
    """
    global _BLAS_CONTROLLER
    if xp is not numpy:
        return contextlib.nullcontext()
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:  # pragma: no cover - scikit-learn brings it
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()
    if _BLAS_CONTROLLER is False:  # pragma: no cover
        return contextlib.nullcontext()
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas")


def chunks(n: int, size: int | None = None):
    """``(start, stop)`` pairs covering ``range(n)`` in steps of ``size`` (:data:`CHUNK`)."""
    size = CHUNK if size is None else size
    for start in range(0, n, size):
        yield start, min(n, start + size)


@dataclass
class Drop:
    """The outcome of the drop phase for one sparse layer.

    keep : (nnz,) bool — entries that stay active
    values : (nnz,) float or None — new values for the entries (used where
        ``keep``); None keeps the current ones
    """

    keep: Any
    values: Any = None


class GradientProbe:
    """One forward/backward pass on a batch, keeping each sparse layer's
    input ``X`` (in, batch) and output gradient ``dY`` (out, batch): the
    layers' :attr:`~cupynn.layers.Layer.last_input` and, asked for with
    :meth:`~cupynn.layers.Layer.keeping_output_grad`, ``last_output_grad``.

    From these a layer's dense weight gradient is ``dY @ X.T``, which growth
    criteria compute a block of rows at a time and discard. The pass also
    leaves ``grad_data`` / ``grad_bias`` set, like any backward pass.

    With a communicator of several ranks, ``(x, y)`` is this rank's share of
    a batch of ``total`` rows: the loss is its share of the batch's mean, and
    every quantity growth reads (:attr:`loss`, :meth:`dense_gradient_rows`,
    :meth:`error_signal`) is summed over the ranks, a block at a time, so that
    every rank sees the whole batch's values and takes the same decisions.
    """

    def __init__(self, model: Any, x: Any, y: Any, loss: str, *, total: int | None = None,
                 comm: Any = None, keep_active_gradients: bool = False,
                 weight: Any = None) -> None:
        if loss not in LOSSES:
            raise ValueError(f"The 'loss' argument must be one of {list(LOSSES)}. Got {loss!r}.")
        xp = model.backend.xp
        self.comm = comm if comm is not None and comm.size > 1 else None
        layers = model.sparse_layers
        with contextlib.ExitStack() as keeping:
            for layer in layers:
                keeping.enter_context(layer.keeping_output_grad())
            logits = model.forward(x)
            value, grad = LOSSES[loss](logits, xp.asarray(y), check=False, total=total,
                                       weight=None if weight is None else xp.asarray(weight))
            model.backward(grad, need_input_grad=False)
            self.inputs = [layer.last_input for layer in layers]
            # Held here only: the layers let go of them as the block ends.
            self.output_grads = [layer.last_output_grad for layer in layers]
        self.loss = float(value) if self.comm is None else float(
            self.comm.allreduce(numpy.array([float(value)]))[0])
        # dL/dw at the active entries (MEST's removal reads them), summed over the ranks;
        # kept only when asked for: the template frees them at once otherwise.
        self.active_gradients = [layer.grad_data if keep_active_gradients else None
                                 for layer in layers]
        if self.comm is not None and keep_active_gradients:
            for grad in self.active_gradients:
                self.comm.allreduce(grad)

    def dense_gradient_rows(self, index: int, rows: Any, out: Any = None) -> Any:
        """Rows of sparse layer ``index``'s dense weight gradient: dY[rows] @ X.T.

        ``out``, when given, is a C-contiguous (len(rows), in_features)
        array of the gradient's dtype to write into (reused across blocks).
        """
        block = self.xp.matmul(self._output_grad(index)[rows], self.inputs[index].T, out=out)
        return block if self.comm is None else self.comm.allreduce(block)

    def error_signal(self, index: int) -> numpy.ndarray:
        """|sum over the batch of dY| per output neuron of sparse layer ``index`` (host)."""
        from ..backend import to_numpy

        signal = self._output_grad(index).sum(axis=1)
        if self.comm is not None:
            self.comm.allreduce(signal)
        return numpy.abs(to_numpy(signal))

    def _output_grad(self, index: int) -> Any:
        dy = self.output_grads[index]
        if dy is None:
            raise RuntimeError(f"GradientProbe: the output gradient of sparse layer {index} was "
                               f"released.")
        return dy

    @property
    def xp(self) -> Any:
        from ..backend import backend_of

        return backend_of(self.inputs[0]).xp

    def release(self, index: int | None = None) -> None:
        """Drop the output gradient of sparse layer ``index`` (all with None, and the
        active gradients too)."""
        if index is None:
            self.output_grads = [None] * len(self.output_grads)
            self.active_gradients = [None] * len(self.active_gradients)
        else:
            self.output_grads[index] = None


def layer_keys(layer: SparseLinear) -> Any:
    """Linear keys ``row * in_features + col`` of a layer's entries (sorted)."""
    from ..csr import linear_keys

    return linear_keys(layer.indptr, layer.indices, layer.in_features)


def kept_keys(layer: SparseLinear, keep: Any) -> Any:
    """Linear keys (int64, ascending) of the entries where ``keep`` is True.

    Built in chunks, so no temporary has the size of the layer's entries.
    """
    xp = layer.backend.xp
    n_cols = layer.in_features
    indptr = layer.indptr.astype(xp.int64)  # n_rows + 1 values
    out = xp.empty(int(xp.count_nonzero(keep)), dtype=xp.int64)
    done = 0
    for a, b in chunks(layer.nnz):
        positions = xp.flatnonzero(keep[a:b]).astype(xp.int64, copy=False)
        if positions.shape[0] == 0:
            continue
        positions += a
        keys = xp.searchsorted(indptr, positions, side="right").astype(xp.int64, copy=False)
        keys -= 1
        keys *= n_cols
        keys += layer.indices[positions]
        out[done:done + keys.shape[0]] = keys
        done += int(keys.shape[0])
    return out


def magnitude_drop(layer: SparseLinear, fraction: float) -> Drop:
    """Remove the round(fraction * nnz) entries of smallest |w| (ties: lower position)."""
    xp = layer.backend.xp
    k = round_half_up(fraction * layer.nnz)
    if k <= 0 or k >= layer.nnz:
        return Drop(xp.full(layer.nnz, k <= 0, dtype=bool))
    magnitude = xp.abs(layer.data)
    threshold = kth_smallest(magnitude, k, overwrite=True)  # reorders the scratch...
    xp.abs(layer.data, out=magnitude)  # ...so it is filled again
    keep = smallest_mask(magnitude, k, threshold)
    return Drop(xp.logical_not(keep, out=keep))


class Redistributor:
    """Base class of the redistribution algorithms (see the module doc).

    Parameters
    ----------
    seed : int >= 0
        Seeds every random choice (random growth); same seed, same result on
        the same backend.

    Attributes
    ----------
    name : str
        Registry name.
    is_global : bool
        True when nnz is preserved over the whole network rather than per
        layer (gradient-global, woodfisher, woodtaylor).
    uses_batch : bool
        True when :meth:`redistribute` needs the batch ``x, y`` (a gradient
        or error signal).
    """

    name = "base"
    is_global = False
    uses_batch = False
    keeps_active_gradients = False  # the probe keeps dL/dw at active entries for drop()
    comm: Any = None  # a cupynn.distributed.Communicator, set by the training loop
    optimizer: Any = None  # the optimizer, during redistribute() only

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = check_int(seed, "seed", type(self).__name__, low=0)
        self.rng = numpy.random.default_rng(self.seed)

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state between epochs (the random stream)."""
        return {"name": self.name, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"A {state.get('name')!r} state cannot be loaded into {self.name!r}.")
        self.rng.bit_generator.state = state["rng"]

    # -------------------------------------------------------------- hooks
    def start_epoch(self, model: Any, n_batches: int, will_redistribute: bool) -> None:
        """Called by the training loop before each epoch (no-op by default)."""

    def observe(self, model: Any) -> None:
        """Called by the training loop after every backward pass (no-op by default)."""

    def drop(self, model: Any, fraction: float, probe: GradientProbe | None) -> list[Drop]:
        """Per sparse layer, which entries stay. Default: smallest |w| per layer."""
        return [magnitude_drop(layer, fraction) for layer in model.sparse_layers]

    def grow(self, model: Any, drops: list[Drop], kept_keys: list[Any],
             probe: GradientProbe | None) -> list[Any]:  # pragma: no cover - interface
        """Per sparse layer, the sorted linear keys of the new entries."""
        raise NotImplementedError

    # -------------------------------------------------------------- template
    def redistribute(self, model: Any, optimizer: Any, fraction: float, x: Any = None,
                     y: Any = None, loss: str = "cross_entropy", *,
                     total: int | None = None, weight: Any = None) -> list[dict[str, int]]:
        """Apply one redistribution moving ``fraction`` of the active weights.

        Parameters
        ----------
        model : MLP
        optimizer : Adam or None
            Its moments are re-mapped to the new topology.
        fraction : float in [0, 1]
        x, y : batch used where gradients or error signals are needed
        loss : {"cross_entropy", "binary_cross_entropy"}
        total : int, optional
            With a communicator of several ranks (:attr:`comm`): ``x, y`` are this
            rank's rows of a batch of ``total`` rows (see :class:`GradientProbe`).
        weight : (batch,) float >= 0, optional
            Sample weights of ``x``'s rows: the batch's loss is their weighted
            mean (:mod:`cupynn.losses`), and so are the gradients growth reads.

        Returns
        -------
        One dict per sparse layer: ``layer`` (index in ``model.layers``),
        ``removed``, ``added``, ``nnz`` (after), ``empty_rows`` (neurons left
        without inputs — allowed, and counted).
        """
        fraction = check_real(fraction, "fraction", f"{type(self).__name__}.redistribute", 0.0, 1.0)
        layers = model.sparse_layers
        index_of = {id(layer): i for i, layer in enumerate(model.layers)}
        if fraction == 0.0 or not layers:
            return [self._report(index_of[id(l)], l, 0, 0) for l in layers]
        if self.uses_batch and (x is None or y is None):
            raise ValueError(f"The {self.name!r} redistribution needs a batch (x, y).")
        self.optimizer = optimizer  # for the scores that read its moments (momentum growth)
        with one_blas_thread(model.backend.xp):
            probe = (GradientProbe(model, x, y, loss, total=total, comm=self.comm,
                                   keep_active_gradients=self.keeps_active_gradients,
                                   weight=weight)
                     if self.uses_batch else None)
            for layer in layers:  # the weight gradients belong to the old topology
                layer.set_grad("data", None)
            drops = self.drop(model, fraction, probe)
            kept = [kept_keys(layer, d.keep) for layer, d in zip(layers, drops)]
            new_keys = self.grow(model, drops, kept, probe)
            if probe is not None:
                probe.release()
            del probe
            self.optimizer = None
        reports = []
        for i, layer in enumerate(layers):
            removed = layer.nnz - int(kept[i].shape[0])
            added = int(new_keys[i].shape[0])
            indptr, indices, data, mapping = self._merge(layer, drops[i], kept[i], new_keys[i])
            drops[i] = kept[i] = new_keys[i] = None  # free this layer's keys before the swap
            layer.set_topology(indptr, indices, data)
            del indptr, indices, data
            if optimizer is not None:
                optimizer.remap(layer, mapping)
            del mapping
            reports.append(self._report(index_of[id(layer)], layer, removed, added))
        return reports

    @staticmethod
    def _report(index: int, layer: SparseLinear, removed: int, added: int) -> dict[str, int]:
        xp = layer.backend.xp
        empty = int((xp.diff(layer.indptr) == 0).sum())
        return {"layer": index, "removed": removed, "added": added, "nnz": layer.nnz,
                "empty_rows": empty}

    @staticmethod
    def _merge(layer: SparseLinear, drop: Drop, kept: Any, new: Any) -> tuple[Any, Any, Any, Any]:
        """The new CSR ``(indptr, indices, data)`` of a layer and the moments'
        ``mapping`` (new entry -> old position, or -1).

        Both key lists are sorted and disjoint, so an entry's place in the
        merged pattern is its index in its own list plus the number of keys
        of the other list below it (one ``searchsorted``, no sort). Survivors
        keep their value (``drop.values`` where given); new entries are
        exactly 0. Everything is written in chunks.
        """
        xp = layer.backend.xp
        n_rows, n_cols = layer.out_features, layer.in_features
        n_kept, n_new = int(kept.shape[0]), int(new.shape[0])
        total = n_kept + n_new
        values = layer.data if drop.values is None else drop.values
        bounds = xp.arange(n_rows + 1, dtype=xp.int64) * n_cols
        indptr = (xp.searchsorted(kept, bounds) + xp.searchsorted(new, bounds)).astype(xp.int32)
        indices = xp.empty(total, dtype=xp.int32)
        data = xp.zeros(total, dtype=layer.dtype)
        mapping = xp.full(total, -1, dtype=xp.int32 if layer.nnz < 2**31 else xp.int64)
        for a, b in chunks(n_new):
            where = xp.searchsorted(kept, new[a:b])
            where += xp.arange(a, b, dtype=where.dtype)
            indices[where] = (new[a:b] % n_cols).astype(xp.int32)
        done = 0  # survivors placed so far
        for a, b in chunks(layer.nnz):
            old = xp.flatnonzero(drop.keep[a:b])
            if old.shape[0] == 0:
                continue
            old += a
            stop = done + int(old.shape[0])
            where = xp.searchsorted(new, kept[done:stop])
            where += xp.arange(done, stop, dtype=where.dtype)
            indices[where] = layer.indices[old]
            data[where] = values[old]
            mapping[where] = old.astype(mapping.dtype, copy=False)
            done = stop
        return indptr, indices, data, mapping
