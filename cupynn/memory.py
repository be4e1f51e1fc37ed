"""Peak memory in use, on either backend.

CPU: :mod:`tracemalloc`, which sees every NumPy buffer (NumPy reports its
allocations to it, and cupynn's Numba kernels write into NumPy-allocated
arrays). GPU: a CuPy memory hook that follows the blocks taken from and
returned to the memory pool while it is installed.

Only allocations made after :meth:`MemoryTracker.start` count: start it
before building the model to include the model itself.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

from .backend import Backend


def _gpu_hook(xp: Any) -> Any:
    class PeakBytesInUse(xp.cuda.MemoryHook):
        name = "cupynn_peak_bytes"

        def __init__(self) -> None:
            self.live: dict[int, int] = {}  # pointer -> bytes, for blocks taken while installed
            self.in_use = 0
            self.peak = 0

        def malloc_postprocess(self, **kw: Any) -> None:
            if kw["mem_ptr"]:
                self.live[kw["mem_ptr"]] = kw["mem_size"]
                self.in_use += kw["mem_size"]
                self.peak = max(self.peak, self.in_use)

        def free_postprocess(self, **kw: Any) -> None:
            # A block taken before the hook was installed is not ours to count.
            self.in_use -= self.live.pop(kw["mem_ptr"], 0)

    return PeakBytesInUse()


class MemoryTracker:
    """Bytes in use now and at the peak since :meth:`start` or :meth:`reset_peak`.

    Use as a context manager or with explicit ``start()`` / ``stop()``.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._hook: Any = None
        self._owns_tracemalloc = False
        self.running = False

    def start(self) -> "MemoryTracker":
        if self.running:
            return self
        if self.backend.is_gpu:
            self.backend.synchronize()
            self._hook = _gpu_hook(self.backend.xp)
            self._hook.__enter__()
        elif not tracemalloc.is_tracing():
            tracemalloc.start()
            self._owns_tracemalloc = True
        self.running = True
        self.reset_peak()
        return self

    def current(self) -> int:
        self._check()
        if self._hook is not None:
            return int(self._hook.in_use)
        return int(tracemalloc.get_traced_memory()[0])

    def peak(self) -> int:
        self._check()
        if self._hook is not None:
            self.backend.synchronize()
            return int(self._hook.peak)
        return int(tracemalloc.get_traced_memory()[1])

    def reset_peak(self) -> None:
        """Start a new peak from the bytes in use now."""
        self._check()
        if self._hook is not None:
            self._hook.peak = self._hook.in_use
        else:
            tracemalloc.reset_peak()

    def stop(self) -> None:
        if not self.running:
            return
        if self._hook is not None:
            self._hook.__exit__(None, None, None)
            self._hook = None
        elif self._owns_tracemalloc:
            tracemalloc.stop()
            self._owns_tracemalloc = False
        self.running = False

    def _check(self) -> None:
        if not self.running:
            raise RuntimeError("MemoryTracker is not running: call start() first.")

    def __enter__(self) -> "MemoryTracker":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ----------------------------------------------------------------- footprint
# Components of :func:`footprint` whose bytes grow with the stored weights (the rest grow
# with the neurons): their sum divided by the weights is the bytes per nonzero.
PER_WEIGHT = ("values", "indices", "grad_values", "adam_values", "transposed_pattern",
              "dense_weight", "dense_grad_weight", "dense_adam_weight")
PER_NEURON = ("indptr", "bias", "grad_bias", "adam_bias", "transposed_indptr", "swizzle_orders")


def _nbytes(*arrays: Any) -> int:
    return int(sum(a.nbytes for a in arrays if a is not None))


def footprint(model: Any, optimizer: Any = None, *, batch: int | None = None) -> dict[str, Any]:
    """The bytes ``model`` (and ``optimizer``) really hold, per component, summed over
    the layers from the arrays' own ``nbytes`` (not from a formula).

    Per stored weight (their sum over the model ÷ ``n_weights`` is ``bytes_per_nonzero``;
    float32 and int32 give the figures in brackets):

    * ``values``: the sparse layers' CSR ``data`` [4];
    * ``indices``: their column indices [4];
    * ``grad_values``: their ``grad_data`` [4] -- present after a training step (its
      backward allocates it; 0 before, and after a redistribution drops it);
    * ``adam_values``: the optimizer's two moments m and v of ``data`` [8] -- Adam
      allocates them when it is made, zeros;
    * ``transposed_pattern``: the GPU's pattern of ``W.T`` for ``spmm_t``, its row of
      each entry and its position in ``data`` [8] (built by this call when the layer had
      not built it yet; the CPU keeps none: 0);
    * ``dense_weight``, ``dense_grad_weight``, ``dense_adam_weight``: the same for the
      dense (:class:`~cupynn.Linear`) layers, which store no indices [4, 4, 8].

    So a float32 sparse weight costs 20 bytes on the CPU with Adam and a gradient, and
    28 on the GPU with the transposed pattern.

    Per neuron (``PER_NEURON``): ``indptr`` (int32, out + 1 per sparse layer),
    ``bias``, ``grad_bias``, ``adam_bias`` (m and v), ``transposed_indptr`` (in + 1 per
    sparse layer, GPU), ``swizzle_orders`` (the GPU's row orders of the ``"vec"``
    products, when that setting makes them).

    Parameters
    ----------
    model : MLP
    optimizer : Adam, optional
        Its moments (``optimizer.state``) are counted; without one, 0.
    batch : int, optional
        Also give the activations of a training step at this batch (a formula: the
        arrays do not exist between steps): ``activations_bytes``, what forward keeps
        for backward -- each layer's input (in × batch; a hidden layer's output is the
        next layer's input, the same array) and the logits (out × batch, and their
        batch-major copy the model returns) -- and ``backward_transient_bytes``, the
        two (width × batch) arrays of the widest hidden layer alive at once in
        backward (its output gradient and its input gradient).

    Returns
    -------
    dict with ``components`` (name -> bytes over the model), ``layers`` (per layer:
    ``index``, ``kind``, ``nnz``, ``components``), ``n_weights``, ``n_neurons`` (the
    sum of ``model.sizes``, inputs included), ``per_weight_bytes`` and
    ``per_neuron_bytes`` (sums of the two groups), ``bytes_per_nonzero``,
    ``bytes_per_neuron``, ``total_bytes``, ``kept_activations_bytes`` (the activations
    the model holds now, measured: the distinct arrays of the layers'
    ``last_input``; 0 after ``clear_cache``), and with ``batch`` the two above.
    """
    from .layers import SparseLinear

    totals = dict.fromkeys(PER_WEIGHT + PER_NEURON, 0)
    layers = []
    for index, layer in enumerate(model.layers):
        parts = dict.fromkeys(PER_WEIGHT + PER_NEURON, 0)
        moments = optimizer.state[index] if optimizer is not None else {}
        if isinstance(layer, SparseLinear):
            parts["values"] = _nbytes(layer.data)
            parts["indices"] = _nbytes(layer.indices)
            parts["indptr"] = _nbytes(layer.indptr)
            parts["grad_values"] = _nbytes(layer.grad_data)
            parts["adam_values"] = _nbytes(*moments.get("data", ()))
            transpose = layer.transposed_pattern()
            if transpose is not None:
                t_indptr, *per_entry = transpose
                parts["transposed_indptr"] = _nbytes(t_indptr)
                parts["transposed_pattern"] = _nbytes(*per_entry)
            orders = layer.swizzle_orders()
            if orders is not None:
                parts["swizzle_orders"] = _nbytes(*orders)
        else:
            parts["dense_weight"] = _nbytes(layer.weight)
            parts["dense_grad_weight"] = _nbytes(layer.grad_weight)
            parts["dense_adam_weight"] = _nbytes(*moments.get("weight", ()))
        parts["bias"] = _nbytes(layer.bias)
        parts["grad_bias"] = _nbytes(layer.grad_bias)
        parts["adam_bias"] = _nbytes(*moments.get("bias", ()))
        for name, value in parts.items():
            totals[name] += value
        layers.append({"index": index, "kind": type(layer).__name__, "nnz": int(layer.nnz),
                       "components": parts})
    n_weights, n_neurons = int(model.n_weights), int(sum(model.sizes))
    per_weight = sum(totals[k] for k in PER_WEIGHT)
    per_neuron = sum(totals[k] for k in PER_NEURON)
    kept: dict[int, int] = {}
    for layer in model.layers:
        x = layer.last_input
        if x is not None:
            kept[id(x)] = _nbytes(x)
    out: dict[str, Any] = {
        "components": totals, "layers": layers, "n_weights": n_weights,
        "n_neurons": n_neurons, "per_weight_bytes": per_weight,
        "per_neuron_bytes": per_neuron, "bytes_per_nonzero": per_weight / max(n_weights, 1),
        "bytes_per_neuron": per_neuron / n_neurons, "total_bytes": per_weight + per_neuron,
        "kept_activations_bytes": int(sum(kept.values())),
    }
    if batch is not None:
        out.update(step_activation_bytes(model.sizes, model.dtype, batch))
    return out


def step_activation_bytes(sizes: Any, dtype: Any, batch: int) -> dict[str, int]:
    """The activations of one training step of an MLP of ``sizes`` at ``batch`` rows
    (see :func:`footprint`): ``activations_bytes`` (every layer's input, kept for
    backward, and the logits with their batch-major copy) and
    ``backward_transient_bytes`` (two arrays of the widest hidden layer)."""
    import numpy

    item = numpy.dtype(dtype).itemsize
    sizes = [int(s) for s in sizes]
    hidden = sizes[1:-1]
    kept = (sum(sizes[:-1]) + 2 * sizes[-1]) * batch * item
    transient = 2 * max(hidden, default=sizes[-1]) * batch * item
    return {"activations_bytes": kept, "backward_transient_bytes": transient}


def dense_twin_bytes(sizes: Any, dtype: Any = "float32", optimizer: bool = True
                     ) -> dict[str, int]:
    """What the dense network of the same ``sizes`` would hold: weights (in × out per
    layer), their gradients, with ``optimizer`` Adam's two moments, and the same for the
    biases; ``total_bytes`` their sum. Activations are not counted (the same as the
    sparse network's at the same batch)."""
    import numpy

    item = numpy.dtype(dtype).itemsize
    sizes = [int(s) for s in sizes]
    weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) * item
    biases = sum(sizes[1:]) * item
    copies = 4 if optimizer else 2  # value, gradient (, m, v)
    out = {"weights": weights, "grad_weights": weights,
           "adam_weights": 2 * weights if optimizer else 0, "biases": biases,
           "grad_biases": biases, "adam_biases": 2 * biases if optimizer else 0}
    out["total_bytes"] = (weights + biases) * copies
    return out


# ----------------------------------------------------------------- process memory
def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` field such as ``VmRSS`` or ``VmHWM``, in bytes (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident set size now (``VmRSS``; None where /proc is missing)."""
    return _status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's resident set to what is
    resident now (writing 5 to ``/proc/self/clear_refs``, Linux >= 4.0); False where
    that cannot be done (then :func:`peak_rss_bytes` counts from the process's start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak resident set size: ``VmHWM`` (since :func:`reset_peak_rss`) where /proc
    has it, else ``ru_maxrss`` since the process started."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB else
