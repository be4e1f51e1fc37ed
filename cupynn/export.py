"""Export a trained model for inference elsewhere.

- :meth:`cupynn.SparseLinear.to_scipy`: one layer as a ``scipy.sparse.csr_array``;
- :meth:`cupynn.MLP.predict`: logits for many rows, in batches, on any backend;
- :func:`to_torch`: the whole model as a ``torch.nn.Module``
  (:class:`SparseMLP`) whose sparse layers multiply as ``torch.sparse_csr_tensor``
  weights (PyTorch is imported only when this is called, or when a pickled
  module is loaded).

The exported module is saved as PyTorch users save modules: its
``state_dict()`` with ``torch.save`` (and ``load_state_dict`` into a module
exported from a model of the same topology), the whole module with
``torch.save(module, path)`` and ``torch.load(path, weights_only=False)``,
``pickle`` and ``copy.deepcopy``. It is a module-level class with plain
tensors inside: a class local to a function cannot be pickled, and a sparse
CSR tensor cannot be deep-copied ("Cannot access storage of
SparseCsrTensorImpl"), so each sparse layer keeps its CSR arrays as three
dense buffers and assembles the sparse weight (no copy) when it multiplies.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import numpy

from .backend import to_numpy


def to_torch(model: Any, device: Any = "cpu") -> Any:
    """A ``torch.nn.Module`` (:class:`SparseMLP`) computing ``model``'s logits.

    Sparse layers keep their CSR pattern and values (buffers ``crow<i>``,
    ``col<i>`` int64 and ``values<i>``, ``bias<i>``; :meth:`SparseMLP.sparse_weight`
    gives the ``torch.sparse_csr_tensor`` (out, in)) and multiply with
    ``torch.sparse.mm``; dense layers become ``torch.nn.Linear`` (``linear<i>``);
    the hidden activation is the model's. The module takes ``(batch, in)``
    tensors of the model's dtype (another dtype is refused with a message that
    says how to cast) and returns ``(batch, out)`` logits, equal to
    :meth:`cupynn.MLP.forward`'s up to the order of floating-point sums. It is
    for inference: the sparse weights are buffers, not parameters.

    Parameters
    ----------
    model : cupynn.MLP
    device : torch device for the module (default "cpu")

    Raises
    ------
    ImportError
        When PyTorch is not installed.
    """
    torch = _import_torch()
    from .layers import SparseLinear

    dtype = getattr(torch, model.dtype.name)

    def tensor(array: Any, kind: Any = None) -> Any:
        return torch.as_tensor(numpy.array(to_numpy(array)), dtype=kind or dtype, device=device)

    layers = []
    state = {}
    for i, layer in enumerate(model.layers):
        if isinstance(layer, SparseLinear):
            layers.append({"kind": "sparse", "shape": list(layer.shape), "nnz": int(layer.nnz)})
            state.update({f"crow{i}": tensor(layer.indptr, torch.int64),
                          f"col{i}": tensor(layer.indices, torch.int64),
                          f"values{i}": tensor(layer.data), f"bias{i}": tensor(layer.bias)})
        else:
            layers.append({"kind": "dense", "shape": [layer.out_features, layer.in_features]})
            state.update({f"linear{i}.weight": tensor(layer.weight),
                          f"linear{i}.bias": tensor(layer.bias)})
    module = _sparse_mlp_class()(layers, activation=model.activation, dtype=model.dtype.name,
                                 device=device)
    module.load_state_dict(state)
    for i, spec in enumerate(layers):  # the pattern is checked once here, not at every forward
        if spec["kind"] == "sparse":
            with _quiet_beta():
                torch.sparse_csr_tensor(state[f"crow{i}"], state[f"col{i}"], state[f"values{i}"],
                                        size=tuple(spec["shape"]), check_invariants=True)
    module.eval()
    return module


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"cupynn.export needs PyTorch ({exc}); install it as "
                          f"https://pytorch.org says for your machine (on a CPU-only one, "
                          f"its CPU build: plain `pip install torch` brings a multi-GB CUDA "
                          f"build).") from None
    return torch


@contextlib.contextmanager
def _quiet_beta() -> Iterator[None]:
    """PyTorch's "Sparse CSR tensor support is in beta" warning not shown: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
        yield


def _sparse_mlp_class() -> type:
    """The :class:`SparseMLP` class, defined on first use (it subclasses ``torch.nn.Module``)
    and kept as this module's ``SparseMLP``, where pickle looks for it."""
    if "SparseMLP" in globals():
        return globals()["SparseMLP"]
    torch = _import_torch()

    class SparseMLP(torch.nn.Module):
        """cupynn's MLP in PyTorch: sparse CSR layers, dense Linear layers (see :func:`to_torch`).

        Parameters
        ----------
        layers : list of dict
            Per layer ``{"kind": "sparse", "shape": [out, in], "nnz": n}`` or
            ``{"kind": "dense", "shape": [out, in]}``.
        activation : "relu" or "sigmoid"
            The hidden layers' activation.
        dtype : "float32" or "float64"
        device : torch device

        A module built this way holds zeros (and an empty pattern) until
        ``load_state_dict`` fills it; :func:`to_torch` does both.
        """

        def __init__(self, layers: list[dict[str, Any]], activation: str = "relu",
                     dtype: str = "float32", device: Any = "cpu") -> None:
            super().__init__()
            if activation not in ("relu", "sigmoid"):
                raise ValueError(f"The 'activation' parameter of SparseMLP must be 'relu' or "
                                 f"'sigmoid'. Got {activation!r} instead.")
            self.layer_specs = [dict(spec) for spec in layers]
            self.activation = activation
            kind = getattr(torch, dtype)
            for i, spec in enumerate(self.layer_specs):
                n_out, n_in = spec["shape"]
                if spec["kind"] == "sparse":
                    nnz = spec["nnz"]
                    self.register_buffer(f"crow{i}", torch.zeros(n_out + 1, dtype=torch.int64,
                                                                 device=device))
                    self.register_buffer(f"col{i}", torch.zeros(nnz, dtype=torch.int64,
                                                                device=device))
                    self.register_buffer(f"values{i}", torch.zeros(nnz, dtype=kind, device=device))
                    self.register_buffer(f"bias{i}", torch.zeros(n_out, dtype=kind, device=device))
                else:
                    self.add_module(f"linear{i}", torch.nn.Linear(n_in, n_out, dtype=kind,
                                                                  device=device))

        def sparse_weight(self, i: int) -> Any:
            """Layer ``i``'s weight as a ``torch.sparse_csr_tensor`` (out, in), sharing the
            module's buffers (no copy)."""
            if self.layer_specs[i]["kind"] != "sparse":
                raise ValueError(f"Layer {i} is dense: its weight is linear{i}.weight.")
            with _quiet_beta():
                return torch.sparse_csr_tensor(
                    getattr(self, f"crow{i}"), getattr(self, f"col{i}"),
                    getattr(self, f"values{i}"), size=tuple(self.layer_specs[i]["shape"]),
                    check_invariants=False)

        def _weight_dtype(self) -> Any:
            first = self.layer_specs[0]
            return (getattr(self, "bias0") if first["kind"] == "sparse"
                    else getattr(self, "linear0").weight).dtype

        def forward(self, x: Any) -> Any:
            """``(batch, in)`` float tensor of the module's dtype -> ``(batch, out)`` logits."""
            dtype = self._weight_dtype()
            n_in = self.layer_specs[0]["shape"][1]
            if not isinstance(x, torch.Tensor) or x.dtype != dtype:
                got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
                raise TypeError(f"SparseMLP holds {dtype} weights, so its input must be a "
                                f"{dtype} tensor. Got {got}: cast the input (module(x.to("
                                f"{dtype}))), or convert the module to the input's dtype "
                                f"(module.to(x.dtype)).")
            if x.ndim != 2 or x.shape[1] != n_in:
                raise ValueError(f"SparseMLP takes inputs of shape (batch, {n_in}). Got "
                                 f"{tuple(x.shape)} instead.")
            activation = torch.relu if self.activation == "relu" else torch.sigmoid
            h = x
            last = len(self.layer_specs) - 1
            for i, spec in enumerate(self.layer_specs):
                if spec["kind"] == "sparse":
                    h = torch.sparse.mm(self.sparse_weight(i), h.T).T + getattr(self, f"bias{i}")
                else:
                    h = getattr(self, f"linear{i}")(h)
                if i < last:
                    h = activation(h)
            return h

        def extra_repr(self) -> str:
            shapes = ", ".join(f"{s['kind']} {s['shape'][1]}->{s['shape'][0]}"
                               + (f" nnz {s['nnz']}" if s["kind"] == "sparse" else "")
                               for s in self.layer_specs)
            return f"{shapes}, activation={self.activation}"

    SparseMLP.__module__ = __name__
    SparseMLP.__qualname__ = "SparseMLP"
    globals()["SparseMLP"] = SparseMLP
    return SparseMLP


def __getattr__(name: str) -> Any:
    # ``cupynn.export.SparseMLP`` is defined on first access, so that importing cupynn never
    # imports torch, while pickle and torch.load (which look the class up by this name) find it.
    if name == "SparseMLP":
        return _sparse_mlp_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
