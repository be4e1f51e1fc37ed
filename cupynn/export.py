"""Export a trained model for inference elsewhere.

- :meth:`cupynn.SparseLinear.to_scipy`: one layer as a ``scipy.sparse.csr_array``;
- :meth:`cupynn.MLP.predict`: logits for many rows, in batches, on any backend;
- :func:`to_torch`: the whole model as a ``torch.nn.Module`` whose sparse layers
  are ``torch.sparse_csr_tensor`` weights (PyTorch is imported only here, and
  only when this is called).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy

from .backend import to_numpy


def to_torch(model: Any, device: Any = "cpu") -> Any:
    """A ``torch.nn.Module`` computing ``model``'s logits.

    Sparse layers keep their CSR pattern and values as a
    ``torch.sparse_csr_tensor`` (out, in) and multiply with ``torch.sparse.mm``;
    dense layers become ``torch.nn.Linear``; the hidden activation is the
    model's. The module takes ``(batch, in)`` float tensors of the model's dtype
    and returns ``(batch, out)`` logits, equal to :meth:`cupynn.MLP.forward`'s
    up to the order of floating-point sums. It is for inference: the sparse
    weights are buffers, not parameters.

    Parameters
    ----------
    model : cupynn.MLP
    device : torch device for the module (default "cpu")

    Raises
    ------
    ImportError
        When PyTorch is not installed.
    """
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"cupynn.export.to_torch needs PyTorch ({exc}); install it, e.g. "
                          f"pip install torch.") from None
    from .layers import SparseLinear

    dtype = getattr(torch, model.dtype.name)

    def tensor(array: Any, kind: Any = None) -> Any:
        return torch.as_tensor(numpy.array(to_numpy(array)), dtype=kind or dtype, device=device)

    class SparseMLP(torch.nn.Module):
        """cupynn's MLP in PyTorch: sparse CSR layers, dense Linear layers."""

        def __init__(self) -> None:
            super().__init__()
            self.kinds = []
            for i, layer in enumerate(model.layers):
                if isinstance(layer, SparseLinear):
                    with warnings.catch_warnings():  # "CSR support is in beta": we know
                        warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
                        weight = torch.sparse_csr_tensor(
                            tensor(layer.indptr, torch.int64), tensor(layer.indices, torch.int64),
                            tensor(layer.data), size=layer.shape, dtype=dtype, device=device,
                            check_invariants=True)
                    self.register_buffer(f"weight{i}", weight)
                    self.register_buffer(f"bias{i}", tensor(layer.bias))
                    self.kinds.append("sparse")
                else:
                    linear = torch.nn.Linear(layer.in_features, layer.out_features, dtype=dtype,
                                             device=device)
                    with torch.no_grad():
                        linear.weight.copy_(tensor(layer.weight))
                        linear.bias.copy_(tensor(layer.bias))
                    self.add_module(f"linear{i}", linear)
                    self.kinds.append("dense")
            self.activation = (torch.relu if model.activation == "relu" else torch.sigmoid)

        def forward(self, x: Any) -> Any:
            h = x
            last = len(self.kinds) - 1
            for i, kind in enumerate(self.kinds):
                if kind == "sparse":
                    weight, bias = getattr(self, f"weight{i}"), getattr(self, f"bias{i}")
                    h = torch.sparse.mm(weight, h.T).T + bias
                else:
                    h = getattr(self, f"linear{i}")(h)
                if i < last:
                    h = self.activation(h)
            return h

    module = SparseMLP()
    module.eval()
    return module
