"""Layers with hand-written forward and backward passes.

Layout: activations are **feature-major**, shape ``(features, batch)``: sample
``j`` is column ``j``. Each nonzero weight then works on a contiguous run of
``batch`` values (forward, input gradient and SDDMM alike), which is what makes
the sparse kernels fast. :class:`cupynn.MLP` converts from and to the usual
``(batch, features)`` at its boundary.

Each layer's ``forward`` keeps what its ``backward`` needs; ``backward(dy)``
fills the parameter gradients and returns the input gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy

from . import init as _init
from . import kernels
from .backend import Backend, get_backend, resolve_dtype, to_numpy
from .validation import check_choice, check_csr, check_int, check_real


def _as_generator(seed: int | numpy.random.Generator | numpy.random.SeedSequence,
                  owner: str) -> numpy.random.Generator:
    if isinstance(seed, numpy.random.Generator):
        return seed
    if isinstance(seed, numpy.random.SeedSequence):
        return numpy.random.default_rng(seed)
    check_int(seed, "seed", owner, low=0)
    return numpy.random.default_rng(seed)


def _check_input(x: Any, features: int, dtype: numpy.dtype, backend: Backend, owner: str) -> None:
    """Shape, dtype and device of a feature-major input (no sync)."""
    if getattr(x, "ndim", None) != 2 or x.shape[0] != features:
        raise ValueError(f"The input of {owner} must have shape ({features}, batch) "
                         f"(feature-major). Got {getattr(x, 'shape', type(x).__name__)} instead.")
    if x.dtype != dtype:
        raise TypeError(f"The input of {owner} must be {dtype}. Got {x.dtype} instead.")
    if not isinstance(x, backend.xp.ndarray):
        raise TypeError(f"The input of {owner} must live on the layer's device ({backend.name}).")


class Layer:
    """Base class: a layer with named parameters and their gradients.

    ``param_names`` lists the attributes the optimizer updates; the gradient of
    parameter ``name`` is the attribute ``grad_<name>``, an array of the same
    shape, filled by ``backward``.

    What other modules may use besides ``forward``/``backward`` and the
    parameters (the rest of the layer's state is its own):

    * :meth:`set_grad` / :meth:`clear_grads`: hand the layer its gradients (a
      gradient averaged over ranks, say) or drop them;
    * :attr:`last_input`: the input of the last ``forward``, which the layer
      keeps for its ``backward``;
    * :meth:`keeping_output_grad` and :attr:`last_output_grad`: inside the
      ``with`` block, ``backward`` also keeps the gradient of the layer's output
      (what redistribution's gradient probe reads to form dense weight
      gradients);
    * :meth:`clear_cache`: drop every array the passes keep.
    """

    param_names: tuple[str, ...] = ()
    in_features: int
    out_features: int
    # What forward keeps for backward: the input, and the output after a ReLU
    # applied by forward(relu=True); what backward keeps when asked: dy.
    _x: Any = None
    _y: Any = None
    _dy: Any = None
    _keep_dy = False

    def forward(self, x: Any) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, dy: Any, need_input_grad: bool = True) -> Any:  # pragma: no cover
        raise NotImplementedError

    def parameters(self) -> list[tuple[str, Any, Any]]:
        """``(name, value, gradient)`` for each parameter (gradient may be None)."""
        return [(n, getattr(self, n), getattr(self, "grad_" + n)) for n in self.param_names]

    def set_grad(self, name: str, value: Any) -> None:
        """Set the gradient of parameter ``name`` (one of ``param_names``) to
        ``value``: an array of the parameter's shape, or None to drop it. The
        value is taken as it is, not copied or checked (the optimizer checks
        what it reads)."""
        if name not in self.param_names:
            raise ValueError(f"{type(self).__name__}.set_grad: 'name' must be one of "
                             f"{list(self.param_names)}. Got {name!r} instead.")
        setattr(self, "grad_" + name, value)

    def clear_grads(self) -> None:
        """Drop every parameter's gradient (set them to None)."""
        for name in self.param_names:
            setattr(self, "grad_" + name, None)

    @property
    def last_input(self) -> Any:
        """The input (in_features, batch) of the last ``forward``, kept for
        ``backward``; None before the first one or after :meth:`clear_cache`.
        Read it, do not write into it."""
        return self._x

    @property
    def last_output_grad(self) -> Any:
        """The gradient (out_features, batch) of the layer's output (after its
        ReLU, when forward applied one) that the last ``backward`` inside
        :meth:`keeping_output_grad` kept; None otherwise."""
        return self._dy

    @contextlib.contextmanager
    def keeping_output_grad(self) -> Iterator[Layer]:
        """``with layer.keeping_output_grad():`` -- backward passes inside the
        block keep their output gradient as :attr:`last_output_grad`, which the
        layer lets go of when the block ends (hold on to it there to keep it).
        Off by default: it is an (out_features, batch) array more while it lives.
        """
        keep = self._keep_dy
        self._keep_dy = True
        try:
            yield self
        finally:
            self._keep_dy = keep
            if not keep:
                self._dy = None

    def clear_cache(self) -> None:
        """Drop what the passes keep (the input, the ReLU's output, a kept output
        gradient), so that it holds no memory until the next forward pass."""
        self._x = self._y = self._dy = None

    @property
    def n_parameters(self) -> int:
        return int(sum(getattr(self, n).size for n in self.param_names))


class SparseLinear(Layer):
    """Sparse fully connected layer ``y = W x + b`` with ``W`` stored as CSR.

    Parameters
    ----------
    in_features, out_features : int
    density : float in (0, 1]
        Each neuron gets ``max(1, round(density * in_features))`` inputs.
    seed : int or numpy.random.Generator
        Source of the topology and the initial values.
    dtype : {"float32", "float64"}
    device : {"auto", "cpu", "gpu"} or Backend
    init : {"paper", "fan_in"}
        See :mod:`cupynn.init`.

    Attributes
    ----------
    indptr : (out_features + 1,) int32
    indices : (nnz,) int32, sorted and unique within each row
    data : (nnz,) float — the active weights, in CSR order
    bias : (out_features,) float
    grad_data, grad_bias : gradients of the last ``backward`` (same shapes), or None
    topology_version : int
        Incremented each time :meth:`set_topology` changes the pattern.
    """

    param_names = ("data", "bias")
    # (indptr, indices, transposed pattern) for spmm_t on the GPU, rebuilt when
    # either array is replaced (set_topology, a checkpoint, a state dict).
    _transpose: Any = None
    # (indptr, indices, (row order, column order)) for the GPU's "vec" products, likewise.
    _swizzle: Any = None

    def __init__(self, in_features: int, out_features: int, density: float = 0.1, *,
                 seed: int | numpy.random.Generator = 0, dtype: str = "float32",
                 device: str | Backend | None = "auto", init: str = "paper") -> None:
        owner = type(self).__name__
        self.in_features = check_int(in_features, "in_features", owner, low=1)
        self.out_features = check_int(out_features, "out_features", owner, low=1)
        self.density = check_real(density, "density", owner, 0.0, 1.0, closed="right")
        self.init = check_choice(init, "init", owner, _init.INITS)
        self.dtype = resolve_dtype(dtype, owner)
        self.backend = get_backend(device)
        rng = _as_generator(seed, owner)

        n = _init.inputs_per_neuron(self.density, self.in_features)
        xp = self.backend.xp  # drawn on the host a piece at a time, kept on the device
        self.indptr, self.indices = _init.partition_topology(self.in_features, self.out_features,
                                                             n, rng, xp)
        self.data = _init.uniform(rng, self.nnz, _init.weight_bound(n, self.init), self.dtype, xp)
        self.bias = _init.uniform(rng, self.out_features, _init.bias_bound(n), self.dtype, xp)
        self.grad_data: Any = None
        self.grad_bias: Any = None
        self.topology_version = 0
        self._x: Any = None

    @classmethod
    def from_csr(cls, indptr: Any, indices: Any, data: Any, bias: Any, shape: tuple[int, int], *,
                 device: str | Backend | None = "auto") -> "SparseLinear":
        """A layer with the given CSR weights (out, in) and bias (checked)."""
        data_np = numpy.asarray(to_numpy(data))
        layer = cls.__new__(cls)
        owner = cls.__name__
        layer.out_features = check_int(shape[0], "shape[0]", owner, low=1)
        layer.in_features = check_int(shape[1], "shape[1]", owner, low=1)
        layer.dtype = resolve_dtype(data_np.dtype, owner)
        layer.backend = get_backend(device)
        layer.init = "paper"
        layer.grad_data = layer.grad_bias = None
        layer.topology_version = -1
        xp = layer.backend.xp
        bias = xp.asarray(bias, dtype=layer.dtype)
        if bias.shape != (layer.out_features,):
            raise ValueError(f"The 'bias' argument of {owner} must have shape "
                             f"({layer.out_features},). Got {bias.shape} instead.")
        layer.bias = bias
        layer.set_topology(xp.asarray(indptr), xp.asarray(indices), xp.asarray(data))
        layer.density = layer.nnz / (layer.in_features * layer.out_features)
        return layer

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    def set_topology(self, indptr: Any, indices: Any, data: Any) -> None:
        """Replace the CSR pattern and values (after checking they are canonical).

        Gradients are dropped: they belong to the old pattern. Optimizer
        moments must be re-mapped by the caller (``Adam.remap``).
        """
        check_csr(indptr, indices, self.shape, what=f"{type(self).__name__}.set_topology")
        if data.shape != indices.shape or data.dtype != self.dtype:
            raise ValueError(f"{type(self).__name__}.set_topology: data must be {self.dtype} with "
                             f"shape {indices.shape}. Got {data.dtype} {data.shape} instead.")
        self.indptr, self.indices, self.data = indptr, indices, data
        self.grad_data = None
        self.topology_version += 1

    def forward(self, x: Any, relu: bool = False) -> Any:
        """x (in_features, batch) -> y = W x + b (with ``relu``: max(W x + b, 0)),
        (out_features, batch).

        With ``relu`` the layer applies its activation itself (in the same pass
        on the CPU) and :meth:`backward` takes the gradient through it.
        """
        _check_input(x, self.in_features, self.dtype, self.backend, type(self).__name__)
        self._x = x
        orders = self.swizzle_orders()
        y = kernels.spmm(self.indptr, self.indices, self.data, x, check=False, bias=self.bias,
                         relu=relu, swizzle=None if orders is None else orders[0])
        self._y = y if relu else None
        return y

    def backward(self, dy: Any, need_input_grad: bool = True, *,
                 overwrite_dy: bool = False) -> Any:
        """dy (out_features, batch) -> dx (in_features, batch), or None.

        ``dy`` is the gradient of the layer's output (after its ReLU when
        forward applied one). Sets ``grad_data`` (the SDDMM ``dy x^T`` at the
        active entries only) and ``grad_bias`` (``dy`` summed over the batch).
        With ``need_input_grad=False`` (the first layer in training) the input
        gradient, a third sparse product, is skipped. ``overwrite_dy`` lets the
        gradient through the ReLU replace ``dy`` in place (the model passes the
        arrays its layers made, which it drops afterwards).
        """
        if self._x is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward.")
        contiguous = self.backend.xp.ascontiguousarray(dy)
        dy, self.grad_bias = kernels.relu_grad_rowsum(
            contiguous, self._y, in_place=overwrite_dy or contiguous is not dy)
        if self._keep_dy:
            self._dy = dy
        self.grad_data = kernels.sddmm(self.indptr, self.indices, dy, self._x, check=False)
        if not need_input_grad:
            return None
        orders = self.swizzle_orders()
        return kernels.spmm_t(self.indptr, self.indices, self.data, dy, self.in_features,
                              check=False, transpose=self.transposed_pattern(), sorted_rows=True,
                              swizzle=None if orders is None else orders[1])

    def transposed_pattern(self) -> Any:
        """The transposed pattern the GPU's ``spmm_t`` reads (None on the CPU, which
        needs none), kept while ``indptr`` and ``indices`` are the same arrays."""
        if not self.backend.is_gpu:
            return None
        cached = self._transpose
        if cached is None or cached[0] is not self.indptr or cached[1] is not self.indices:
            cached = (self.indptr, self.indices,
                      kernels.transpose_pattern(self.indptr, self.indices, self.in_features))
            self._transpose = cached
        return cached[2]

    def swizzle_orders(self) -> Any:
        """``(row order, column order)``: :func:`kernels.row_swizzle` of the pattern and of
        its transposed pattern, the orders the GPU's ``"vec"`` products take; None on the
        CPU and when the spmm setting is neither ``"vec"`` nor ``"auto"``. Kept while
        ``indptr`` and ``indices`` are the same arrays, like :meth:`transposed_pattern`."""
        if not self.backend.is_gpu or kernels.spmm_setting() not in ("vec", "auto"):
            return None
        cached = self._swizzle
        if cached is None or cached[0] is not self.indptr or cached[1] is not self.indices:
            t_indptr = self.transposed_pattern()[0]
            cached = (self.indptr, self.indices,
                      (kernels.row_swizzle(self.indptr), kernels.row_swizzle(t_indptr)))
            self._swizzle = cached
        return cached[2]

    def to_scipy(self) -> Any:
        """The weights as a ``scipy.sparse.csr_array`` (out, in), host copies, canonical:
        the same pattern and values, for inference or analysis with SciPy."""
        import scipy.sparse

        matrix = scipy.sparse.csr_array(
            (to_numpy(self.data).copy(), to_numpy(self.indices).copy(),
             to_numpy(self.indptr).copy()), shape=self.shape)
        matrix.has_canonical_format = True  # checked whenever the topology is set
        return matrix

    def to_dense(self) -> numpy.ndarray:
        """The weight matrix as a dense NumPy array (out, in). For tests and small layers."""
        dense = numpy.zeros(self.shape, dtype=self.dtype)
        indptr, indices = to_numpy(self.indptr), to_numpy(self.indices)
        rows = numpy.repeat(numpy.arange(self.out_features), numpy.diff(indptr))
        dense[rows, indices] = to_numpy(self.data)
        return dense

    def __repr__(self) -> str:
        return (f"SparseLinear({self.in_features}, {self.out_features}, nnz={self.nnz}, "
                f"dtype={self.dtype.name}, device={self.backend.name!r})")


class Linear(Layer):
    """Dense fully connected layer ``y = W x + b``, W of shape (out, in).

    Same parameters as :class:`SparseLinear` without ``density``.

    Attributes
    ----------
    weight : (out_features, in_features) float
    bias : (out_features,) float
    grad_weight, grad_bias : gradients of the last ``backward``, or None
    """

    param_names = ("weight", "bias")

    def __init__(self, in_features: int, out_features: int, *,
                 seed: int | numpy.random.Generator = 0, dtype: str = "float32",
                 device: str | Backend | None = "auto", init: str = "paper") -> None:
        owner = type(self).__name__
        self.in_features = check_int(in_features, "in_features", owner, low=1)
        self.out_features = check_int(out_features, "out_features", owner, low=1)
        self.init = check_choice(init, "init", owner, _init.INITS)
        self.dtype = resolve_dtype(dtype, owner)
        self.backend = get_backend(device)
        rng = _as_generator(seed, owner)
        k = self.in_features
        xp = self.backend.xp
        self.weight = _init.uniform(rng, (self.out_features, k), _init.weight_bound(k, self.init),
                                    self.dtype, xp)
        self.bias = _init.uniform(rng, self.out_features, _init.bias_bound(k), self.dtype, xp)
        self.grad_weight: Any = None
        self.grad_bias: Any = None
        self._x: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nnz(self) -> int:
        return int(self.weight.size)

    def forward(self, x: Any, relu: bool = False) -> Any:
        """x (in_features, batch) -> W x + b (with ``relu``: max(W x + b, 0)),
        (out_features, batch)."""
        _check_input(x, self.in_features, self.dtype, self.backend, type(self).__name__)
        self._x = x
        y = self.weight @ x
        y += self.bias[:, None]
        if relu:
            self.backend.xp.maximum(y, 0, out=y)
        self._y = y if relu else None
        return y

    def backward(self, dy: Any, need_input_grad: bool = True, *,
                 overwrite_dy: bool = False) -> Any:
        """dy (out_features, batch) -> dx (in_features, batch), or None without
        ``need_input_grad``; sets the gradients. ``dy`` is the gradient of the
        output after the ReLU when forward applied one; ``overwrite_dy`` lets
        the gradient through the ReLU replace it in place."""
        if self._x is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward.")
        if self._y is not None:
            if overwrite_dy:
                dy *= self._y > 0
            else:
                dy = dy * (self._y > 0)
        if self._keep_dy:
            self._dy = dy
        self.grad_weight = dy @ self._x.T
        self.grad_bias = dy.sum(axis=1)
        return self.weight.T @ dy if need_input_grad else None

    def to_dense(self) -> numpy.ndarray:
        return to_numpy(self.weight).copy()

    def __repr__(self) -> str:
        return (f"Linear({self.in_features}, {self.out_features}, dtype={self.dtype.name}, "
                f"device={self.backend.name!r})")


class ReLU:
    """max(x, 0); the derivative is taken from the forward output."""

    _y: Any = None

    def forward(self, x: Any) -> Any:
        xp = get_backend_of(x)
        self._y = xp.maximum(x, 0)
        return self._y

    def backward(self, dy: Any) -> Any:
        return dy * (self._y > 0)

    def clear_cache(self) -> None:
        """Drop the output kept for ``backward``."""
        self._y = None


class Sigmoid:
    """1 / (1 + exp(-x)), overflow-free; derivative y (1 - y) from the output."""

    _y: Any = None

    def forward(self, x: Any) -> Any:
        xp = get_backend_of(x)
        e = xp.exp(-xp.abs(x))  # in (0, 1]: never overflows
        self._y = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return self._y

    def backward(self, dy: Any) -> Any:
        return dy * self._y * (1 - self._y)

    def clear_cache(self) -> None:
        """Drop the output kept for ``backward``."""
        self._y = None


def get_backend_of(x: Any) -> Any:
    from .backend import backend_of

    return backend_of(x).xp


ACTIVATIONS = {"relu": ReLU, "sigmoid": Sigmoid}
