"""The multi-layer perceptron: a stack of sparse and dense linear layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy

from .backend import Backend, backend_of, get_backend, resolve_dtype
from .init import ALLOCATIONS, INITS, erdos_renyi_densities
from .layers import ACTIVATIONS, Layer, Linear, SparseLinear
from .validation import check_choice, check_finite, check_int, check_real


class MLP:
    """Feed-forward network of linear layers with a hidden activation.

    Parameters
    ----------
    sizes : sequence of int, length >= 2
        Feature counts, input first: ``(784, 256, 256, 10)`` makes three
        linear layers.
    density : float in (0, 1], or one per linear layer
        Density of the sparse layers: one float, shared out by ``allocation``, or
        one per linear layer (then used as given).
    dense_layers : sequence of int
        Indices (negative allowed) of linear layers kept dense, e.g. ``(-1,)``
        for a dense output layer.
    seed : int
        Seeds the topology and the initial values of every layer.
    dtype : {"float32", "float64"}
    device : {"auto", "cpu", "gpu"}, Backend or None
        ``None`` reads ``$CUPYNN_DEVICE``.
    init : {"paper", "fan_in"}
    activation : {"relu", "sigmoid"}
        Applied after every layer but the last; the model returns logits.
    allocation : {"uniform", "erdos-renyi"}
        How one ``density`` is shared among the sparse layers: every layer at
        ``density`` (the paper's), or Erdős–Rényi (SET, RigL's ERK):
        d_l ∝ (in + out) / (in × out), scaled so that the sparse layers hold
        ``density`` × their weights in all, a layer capped at dense giving its
        surplus to the others (:func:`cupynn.init.erdos_renyi_densities`). Each
        layer then gets ``max(1, round(d_l × in))`` inputs per neuron (SPEC §2).

    Attributes
    ----------
    layers : list of SparseLinear or Linear
        The linear layers, input first.
    activations : list
        The hidden activations (one fewer than layers).
    """

    def __init__(self, sizes: Sequence[int], density: float | Sequence[float] = 0.1,
                 dense_layers: Sequence[int] = (), seed: int = 0, dtype: str = "float32",
                 device: str | Backend | None = "auto", *, init: str = "paper",
                 activation: str = "relu", allocation: str = "uniform") -> None:
        owner = "MLP"
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) < 2:
            raise ValueError(f"The 'sizes' parameter of {owner} must be a sequence of at least two "
                             f"ints. Got {sizes!r} instead.")
        self.sizes = tuple(check_int(s, "sizes", owner, low=1) for s in sizes)
        n_layers = len(self.sizes) - 1
        self.allocation = check_choice(allocation, "allocation", owner, ALLOCATIONS)
        per_layer = isinstance(density, Sequence) and not isinstance(density, str)
        densities = list(density) if per_layer else [density] * n_layers
        if len(densities) != n_layers:
            raise ValueError(f"The 'density' parameter of {owner} must be one float or one per "
                             f"layer ({n_layers}). Got {len(densities)} values instead.")
        densities = [check_real(d, "density", owner, 0.0, 1.0, closed="right")
                     for d in densities]
        dense = set()
        for i in dense_layers:
            check_int(i, "dense_layers", owner, low=-n_layers, high=n_layers - 1)
            dense.add(i % n_layers)
        self.dense_layers = tuple(sorted(dense))
        if not per_layer and self.allocation == "erdos-renyi":
            sparse = [i for i in range(n_layers) if i not in dense]
            shapes = [(self.sizes[i], self.sizes[i + 1]) for i in sparse]
            for i, d in zip(sparse, erdos_renyi_densities(shapes, densities[0])):
                densities[i] = d
        self.densities = tuple(densities)
        self.seed = check_int(seed, "seed", owner, low=0)
        self.dtype = resolve_dtype(dtype, owner)
        self.init = check_choice(init, "init", owner, INITS)
        self.activation = check_choice(activation, "activation", owner, tuple(ACTIVATIONS))
        self.backend = get_backend(device)

        # One independent stream per layer: adding a layer does not change the others.
        streams = numpy.random.SeedSequence(self.seed).spawn(n_layers)
        self.layers: list[Layer] = []
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            rng = numpy.random.default_rng(streams[i])
            common = dict(seed=rng, dtype=self.dtype.name, device=self.backend, init=self.init)
            if i in dense:
                self.layers.append(Linear(fan_in, fan_out, **common))
            else:
                self.layers.append(SparseLinear(fan_in, fan_out, self.densities[i], **common))
        self.activations = [ACTIVATIONS[self.activation]() for _ in range(n_layers - 1)]

    # ---------------------------------------------------------------- structure
    @property
    def sparse_layers(self) -> list[SparseLinear]:
        return [layer for layer in self.layers if isinstance(layer, SparseLinear)]

    @property
    def nnz(self) -> list[int]:
        """Stored weights per layer (out x in for dense layers)."""
        return [layer.nnz for layer in self.layers]

    @property
    def n_weights(self) -> int:
        """Total stored weights (biases excluded)."""
        return int(sum(self.nnz))

    @property
    def n_parameters(self) -> int:
        """Total trainable values: stored weights plus biases."""
        return int(sum(layer.n_parameters for layer in self.layers))

    # ---------------------------------------------------------------- state
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able), enough to rebuild the architecture."""
        return {"sizes": list(self.sizes), "density": list(self.densities),
                "dense_layers": list(self.dense_layers), "seed": self.seed,
                "dtype": self.dtype.name, "init": self.init, "activation": self.activation,
                "allocation": self.allocation}

    def state_dict(self) -> dict[str, numpy.ndarray]:
        """Every array of the model as host copies, keyed ``"<layer>.<name>"``.

        Sparse layers give ``indptr``, ``indices``, ``data``, ``bias``; dense
        ones ``weight``, ``bias``.
        """
        from .backend import to_numpy

        state = {}
        for i, layer in enumerate(self.layers):
            names = (("indptr", "indices", "data", "bias") if isinstance(layer, SparseLinear)
                     else ("weight", "bias"))
            for name in names:
                state[f"{i}.{name}"] = numpy.array(to_numpy(getattr(layer, name)))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore arrays from :meth:`state_dict` (topologies are checked)."""
        xp = self.backend.xp
        for i, layer in enumerate(self.layers):
            try:
                bias = numpy.asarray(state[f"{i}.bias"])
                if isinstance(layer, SparseLinear):
                    indptr, indices, data = (numpy.asarray(state[f"{i}.{n}"])
                                             for n in ("indptr", "indices", "data"))
                else:
                    weight = numpy.asarray(state[f"{i}.weight"])
            except KeyError as exc:
                raise ValueError(f"MLP.load_state_dict: the state has no {exc.args[0]!r}.") from None
            if bias.shape != layer.bias.shape or bias.dtype != self.dtype:
                raise ValueError(f"MLP.load_state_dict: layer {i} bias must be {self.dtype} "
                                 f"{layer.bias.shape}. Got {bias.dtype} {bias.shape} instead.")
            if isinstance(layer, SparseLinear):
                layer.set_topology(xp.asarray(indptr), xp.asarray(indices),
                                   xp.asarray(data, dtype=self.dtype))
            else:
                if weight.shape != layer.weight.shape:
                    raise ValueError(f"MLP.load_state_dict: layer {i} weight must have shape "
                                     f"{layer.weight.shape}. Got {weight.shape} instead.")
                layer.weight = xp.asarray(weight, dtype=self.dtype)
            layer.bias = xp.asarray(bias)

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        """Host copies of every array and the configuration: a pickle from the GPU
        unpickles where there is none (on the CPU), and the reverse."""
        return {"config": self.config(), "state": self.state_dict(), "device": self.backend.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from .backend import gpu_available

        config = state["config"]
        device = "gpu" if state.get("device") == "gpu" and gpu_available() else "cpu"
        self.__init__(config["sizes"], density=config["density"],
                      dense_layers=config["dense_layers"], seed=config["seed"],
                      dtype=config["dtype"], device=device, init=config["init"],
                      activation=config["activation"],
                      allocation=config.get("allocation", "uniform"))
        self.load_state_dict(state["state"])

    # ---------------------------------------------------------------- passes
    def _input(self, x: Any, check: bool = True) -> Any:
        """Check a (batch, in) input; return it feature-major on the device."""
        owner = "MLP.forward"
        if getattr(x, "ndim", None) != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"The 'x' argument of {owner} must have shape (batch, {self.sizes[0]}). "
                             f"Got {getattr(x, 'shape', type(x).__name__)} instead.")
        if isinstance(x, numpy.ndarray):
            if x.dtype.kind not in "fiub":
                raise TypeError(f"The 'x' argument of {owner} must be numeric. Got {x.dtype}.")
            if check:
                check_finite(x, "x", owner)  # host check: no device sync
        elif backend_of(x) is not self.backend:
            raise TypeError(f"The 'x' argument of {owner} lives on another device than the model "
                            f"({self.backend.name}).")
        xp = self.backend.xp
        return xp.ascontiguousarray(xp.asarray(x, dtype=self.dtype).T)

    def forward(self, x: Any, *, check: bool = True) -> Any:
        """Logits for a batch.

        Parameters
        ----------
        x : (batch, sizes[0]) array, NumPy or on the model's device
        check : scan a NumPy ``x`` for NaN and infinity (an error names it).
            The trainer passes False for batches of data it checked whole.

        Returns
        -------
        (batch, sizes[-1]) array of the model's dtype, on its device.
        """
        h = self._input(x, check)
        fused = self.activation == "relu"  # the layers apply their ReLU themselves
        for i, layer in enumerate(self.layers):
            hidden = i < len(self.activations)
            h = layer.forward(h, relu=hidden and fused)
            if hidden and not fused:
                h = self.activations[i].forward(h)
        return self.backend.xp.ascontiguousarray(h.T)

    __call__ = forward

    def backward(self, grad_logits: Any, need_input_grad: bool = True) -> Any:
        """Back-propagate the loss gradient of the last ``forward``.

        Parameters
        ----------
        grad_logits : (batch, sizes[-1]) array (``(batch,)`` for one output)
        need_input_grad : bool
            False skips the input gradient (training never uses it).

        Returns
        -------
        (batch, sizes[0]) gradient with respect to the input, or None. Every
        layer's ``grad_*`` attributes are set.
        """
        xp = self.backend.xp
        g = xp.asarray(grad_logits, dtype=self.dtype)
        if g.ndim == 1 and self.sizes[-1] == 1:
            g = g[:, None]
        if g.ndim != 2 or g.shape[1] != self.sizes[-1]:
            raise ValueError(f"The 'grad_logits' argument of MLP.backward must have shape "
                             f"(batch, {self.sizes[-1]}). Got {g.shape} instead.")
        g = xp.ascontiguousarray(g.T)
        fused = self.activation == "relu"  # the layers took the ReLU's gradient themselves
        for i in range(len(self.layers) - 1, -1, -1):
            if i < len(self.activations) and not fused:
                g = self.activations[i].backward(g)
            # Below the last layer, g is the array the layer above made and nothing
            # else holds: the ReLU's gradient may overwrite it (one array less at
            # the backward pass's peak).
            g = self.layers[i].backward(g, need_input_grad=i > 0 or need_input_grad,
                                        overwrite_dy=fused and i < len(self.layers) - 1)
        return xp.ascontiguousarray(g.T) if need_input_grad else None

    def clear_cache(self) -> None:
        """Drop the activations kept for ``backward`` (after evaluation, say),
        so they do not hold memory until the next forward pass."""
        for layer in self.layers:
            layer.clear_cache()
        for activation in self.activations:
            activation.clear_cache()

    def predict(self, x: Any, batch_size: int = 4096) -> Any:
        """Logits for many rows, computed in batches; a NumPy array."""
        from .backend import to_numpy

        check_int(batch_size, "batch_size", "MLP.predict", low=1)
        outs = [to_numpy(self.forward(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
        self.clear_cache()
        if not outs:
            return numpy.empty((0, self.sizes[-1]), dtype=self.dtype)
        return numpy.concatenate(outs)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"MLP(\n  {inner}\n)"
