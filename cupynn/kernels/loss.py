"""The losses and their gradients in two launches (``loss.cu``, issue 19), and the
choice of the GPU path of :mod:`cupynn.losses` (:func:`set_loss`, ``$CUPYNN_LOSS``).

:func:`softmax_cross_entropy`, :func:`binary_cross_entropy` and
:func:`mean_squared_error` compute what the functions of :mod:`cupynn.losses`
compute without ``weight``: the mean loss over the batch (or the batch's share
of a global batch of ``total`` rows) and its gradient. On the GPU a per-row
kernel writes the gradient and each row's loss, then one warp sums the rows in
a fixed order (``mean_of_rows``): two launches in place of about ten array
expressions, no atomics (a run repeats bit for bit) and no allocation when the
caller passes ``grad_out``, ``value_out`` and ``scratch`` (a CUDA graph
captured around the step cannot allocate). On the CPU they run the NumPy twins
(:mod:`.numpy_twins`), which add in the kernels' order.

:mod:`cupynn.losses` calls them on the GPU only, and only with
``$CUPYNN_LOSS=fused`` (or ``set_loss("fused")``): the default ``arrays`` keeps
the array expressions until a GPU check has shown the kernels equal to them
within rounding and faster (docs/gpu.md). The CPU never takes this path.
"""

from __future__ import annotations

from typing import Any

import numpy

from ..backend import to_numpy
from . import numpy_twins as twins
from ._checks import _check_contiguous, _check_no_overlap, _check_same_backend, _float_suffix
from ._launch import _SUFFIX, THREADS_PER_BLOCK, WARP_SIZE, _grid, cuda_function
from ._settings import Choice

LOSS_METHODS = ("arrays", "fused")
LOSS_ENV = "CUPYNN_LOSS"


_LOSS = Choice("GPU loss", LOSS_ENV, LOSS_METHODS)


def set_loss(method: str = "arrays") -> None:
    """Choose how :mod:`cupynn.losses` computes its losses on the GPU.

    ``"arrays"`` (the default, or ``$CUPYNN_LOSS``): CuPy array expressions,
    about ten launches and as many temporaries a call. ``"fused"``: the kernels
    of ``loss.cu`` through this module, two launches. Weighted losses
    (``weight=``) and the CPU backend always take the array expressions.
    """
    _LOSS.set(method, "set_loss")


def loss_setting() -> str:
    """The GPU path :mod:`cupynn.losses` takes: ``"arrays"`` or ``"fused"``."""
    return _LOSS.get()


def _check_total(what: str, total: Any, n: int) -> int:
    """The divisor: the batch size, or ``total`` (an int >= the batch size and >= 1)."""
    if total is None:
        return n
    if isinstance(total, bool) or not isinstance(total, (int, numpy.integer)) or total < max(n, 1):
        raise ValueError(f"{what}: total must be an int >= the batch size {n} (and >= 1). "
                         f"Got {total!r} instead.")
    return int(total)


def _buffers(what: str, backend: Any, reads: dict[str, Any], like: Any, n: int,
             grad_out: Any, value_out: Any, scratch: Any) -> tuple[Any, Any, Any]:
    """Check the inputs ``reads`` and the given outputs, make the missing ones.

    grad_out has ``like``'s shape, value_out one element, scratch at least ``n``
    (its first n cells are used); all C-contiguous, of ``like``'s dtype and
    device, none overlapping another (the kernels' pointers are restrict).
    """
    xp = backend.xp
    if grad_out is None:
        grad_out = xp.empty(like.shape, dtype=like.dtype)
    elif grad_out.shape != like.shape:
        raise ValueError(f"{what}: grad_out must have shape {like.shape}. "
                         f"Got {grad_out.shape} instead.")
    if value_out is None:
        value_out = xp.empty((), dtype=like.dtype)
    elif value_out.size != 1:
        raise ValueError(f"{what}: value_out must have one element (shape () or (1,)). "
                         f"Got shape {value_out.shape} instead.")
    if scratch is None:
        scratch = xp.empty(n, dtype=like.dtype)
    elif scratch.ndim != 1 or scratch.shape[0] < n:
        raise ValueError(f"{what}: scratch must be flat with at least {n} cells (the batch). "
                         f"Got shape {scratch.shape} instead.")
    written = {"grad_out": grad_out, "value_out": value_out, "scratch": scratch}
    arrays = {**reads, **written}
    _check_same_backend(what, *arrays.values())
    _float_suffix(like, *(a for name, a in arrays.items() if name != "labels"), what=what)
    _check_contiguous(what, **arrays)
    for name in written:
        _check_no_overlap(what, xp, name, arrays)
    return grad_out, value_out, scratch[:n]


def _loss(backend: Any, family: str, reads: tuple, sizes: tuple, scalar: float, den: float,
          buffers: tuple[Any, Any, Any], max_blocks: int | None, twin: Any) -> tuple[Any, Any]:
    """Run loss.cu's per-row kernel ``family`` (``reads``, then grad and per_row, then the
    int ``sizes``, n first, and ``scalar``), then value <- sum(per_row) / den in
    mean_of_rows' order (one warp). On the CPU ``twin()`` gives (grad, per_row)."""
    grad_out, value_out, per_row = buffers
    t, suffix = grad_out.dtype.type, _SUFFIX[grad_out.dtype]
    n = sizes[0]
    if backend.is_gpu:
        if n:
            kernel = cuda_function("loss.cu", f"{family}_{suffix}")
            kernel(_grid(n, max_blocks), (THREADS_PER_BLOCK,),
                   (*reads, grad_out, per_row, *(numpy.int32(s) for s in sizes), t(scalar)))
        kernel = cuda_function("loss.cu", f"mean_of_rows_{suffix}")
        kernel((1,), (WARP_SIZE,), (per_row, value_out, numpy.int32(n), t(den)))
    else:
        if n:  # (squared_error_rows' twin cannot take an empty batch: reshape(0, -1))
            grad, per_row[...] = twin()
            grad_out[...] = grad.reshape(grad_out.shape)
        value_out[...] = twins.mean_of_rows(per_row, den).reshape(value_out.shape)
    return value_out, grad_out


def _min_max(backend: Any, a: Any) -> tuple[Any, Any]:
    """a's smallest and largest values, read on the host (a device synchronisation)."""
    lo, hi = to_numpy(backend.xp.stack([a.min(), a.max()])).tolist()
    return lo, hi


def _n_fits(what: str, *sizes: int) -> None:
    """The kernels take int sizes (their offsets are 64-bit)."""
    if max(sizes, default=0) > numpy.iinfo(numpy.int32).max:
        raise ValueError(f"{what}: sizes {sizes} do not fit the kernels' int32 arguments.")


def softmax_cross_entropy(logits: Any, labels: Any, *, total: int | None = None,
                          grad_out: Any = None, value_out: Any = None, scratch: Any = None,
                          check: bool = True, max_blocks: int | None = None) -> tuple[Any, Any]:
    """Softmax cross-entropy and its gradient: ``cupynn.losses.cross_entropy`` in two launches.

    Parameters
    ----------
    logits : (batch, classes) float32 or float64, C-contiguous, classes >= 1
    labels : (batch,) int64, values in [0, classes)
    total : int, optional
        Divide by this (the global batch, >= batch) instead of the batch size.
    grad_out : array of logits' shape and dtype, optional
        Receives the gradient of the mean (allocated when not given).
    value_out : one-element array (shape () or (1,)) of logits' dtype, optional
        Receives the mean loss (allocated 0-d when not given).
    scratch : (>= batch,) of logits' dtype, optional
        Its first ``batch`` cells receive the per-row losses.
    check : bool
        Check the labels' range (a reduction and a device synchronisation).
        Without it, a row whose label is out of range gets NaN (loss and
        gradient): the kernel never reads out of bounds.
    max_blocks : int, optional
        Cap on the CUDA grid of the per-row kernel (tests use it).

    Returns
    -------
    (value_out, grad_out): the mean of ``logsumexp(z) - z[label]`` and
    ``(softmax(z) - onehot(label)) / batch`` (``/ total`` with a total).
    """
    what = "softmax_cross_entropy"
    if getattr(logits, "ndim", None) != 2 or getattr(labels, "shape", None) != logits.shape[:1]:
        raise ValueError(f"{what}: logits must be (batch, classes) and labels (batch,). Got "
                         f"{getattr(logits, 'shape', None)} and {getattr(labels, 'shape', None)}.")
    if labels.dtype != numpy.int64:
        raise TypeError(f"{what}: labels must be int64 (labels.astype('int64')). "
                        f"Got {labels.dtype} instead.")
    n, classes = (int(s) for s in logits.shape)
    if classes < 1:
        raise ValueError(f"{what}: logits must have at least one class. Got shape {logits.shape}.")
    _n_fits(what, n, classes)
    den = _check_total(what, total, n)
    backend = _check_same_backend(what, logits, labels)
    buffers = _buffers(what, backend, {"logits": logits, "labels": labels},
                       logits, n, grad_out, value_out, scratch)
    if check and n:
        lo, hi = _min_max(backend, labels)
        if lo < 0 or hi >= classes:
            raise ValueError(f"{what}: labels must be in [0, {classes}). "
                             f"Got values in [{lo}, {hi}] instead.")
    return _loss(backend, "softmax_cross_entropy_rows", (logits, labels), (n, classes), den, den,
                 buffers, max_blocks,
                 lambda: twins.softmax_cross_entropy_rows(logits, labels, den))


def binary_cross_entropy(logits: Any, labels: Any, *, total: int | None = None,
                         grad_out: Any = None, value_out: Any = None, scratch: Any = None,
                         check: bool = True, max_blocks: int | None = None) -> tuple[Any, Any]:
    """Binary cross-entropy of ``sigmoid(z)`` from the logits ``z`` and its gradient:
    ``cupynn.losses.binary_cross_entropy`` in two launches.

    Parameters
    ----------
    logits : (batch,) or (batch, 1) float32 or float64, C-contiguous
    labels : (batch,) of logits' dtype, values in [0, 1]
    total, grad_out, value_out, scratch, max_blocks
        As :func:`softmax_cross_entropy` (grad_out has logits' shape).
    check : bool
        Check that the labels are in [0, 1] (a reduction and a synchronisation).

    Returns
    -------
    (value_out, grad_out): the mean of ``max(z, 0) - y z + log1p(exp(-|z|))``
    and ``(sigmoid(z) - y) / batch`` (``/ total`` with a total).
    """
    what = "binary_cross_entropy"
    ndim = getattr(logits, "ndim", None)
    if ndim not in (1, 2) or (ndim == 2 and logits.shape[1] != 1):
        raise ValueError(f"{what}: logits must be (batch,) or (batch, 1). "
                         f"Got {getattr(logits, 'shape', None)} instead.")
    n = int(logits.shape[0])
    if getattr(labels, "shape", None) != (n,):
        raise ValueError(f"{what}: labels must have shape ({n},). "
                         f"Got {getattr(labels, 'shape', None)} instead.")
    _n_fits(what, n)
    den = _check_total(what, total, n)
    backend = _check_same_backend(what, logits, labels)
    buffers = _buffers(what, backend, {"logits": logits, "labels": labels},
                       logits, n, grad_out, value_out, scratch)
    _float_suffix(logits, labels, what=what)
    if check and n:
        lo, hi = _min_max(backend, labels)
        if not (0 <= lo and hi <= 1):
            raise ValueError(f"{what}: labels must be in [0, 1]. "
                             f"Got values in [{lo}, {hi}] instead.")
    return _loss(backend, "binary_cross_entropy_rows", (logits, labels), (n,), den, den, buffers,
                 max_blocks, lambda: twins.binary_cross_entropy_rows(logits.reshape(n), labels, den))


def mean_squared_error(pred: Any, target: Any, *, total: int | None = None,
                       grad_out: Any = None, value_out: Any = None, scratch: Any = None,
                       check: bool = True, max_blocks: int | None = None) -> tuple[Any, Any]:
    """Mean squared error and its gradient: ``cupynn.losses.mean_squared_error`` in
    two launches.

    Parameters
    ----------
    pred : (batch, outputs) or (batch,) float32 or float64, C-contiguous
    target : pred's shape and dtype, C-contiguous
    total, grad_out, value_out, scratch, max_blocks
        As :func:`softmax_cross_entropy` (grad_out has pred's shape; the loss is
        divided by ``total * outputs``).
    check : bool
        Check that the targets are finite (a reduction and a synchronisation).

    Returns
    -------
    (value_out, grad_out): the mean over the batch and the outputs of
    ``(pred - target)**2`` and ``2 (pred - target) / (batch * outputs)``.
    """
    what = "mean_squared_error"
    if getattr(pred, "ndim", None) not in (1, 2) or getattr(target, "shape", None) != pred.shape:
        raise ValueError(f"{what}: pred must be (batch, outputs) or (batch,) and target of its "
                         f"shape. Got {getattr(pred, 'shape', None)} and "
                         f"{getattr(target, 'shape', None)} instead.")
    n = int(pred.shape[0])
    outputs = 1 if pred.ndim == 1 else int(pred.shape[1])
    _n_fits(what, n, outputs)
    rows = _check_total(what, total, n)
    backend = _check_same_backend(what, pred, target)
    buffers = _buffers(what, backend, {"pred": pred, "target": target},
                       pred, n, grad_out, value_out, scratch)
    if check and n and not bool(to_numpy(backend.xp.isfinite(target).all())):
        raise ValueError(f"{what}: target must be finite.")
    # As cupynn.losses: the Python float 2 / (rows * outputs), rounded to the dtype once
    # (no rows or no outputs: no gradient to scale, and the mean of nothing is NaN).
    scale = 2.0 / (rows * outputs) if rows * outputs else 0.0
    return _loss(backend, "squared_error_rows", (pred, target), (n, outputs), scale,
                 rows * outputs, buffers, max_blocks,
                 lambda: twins.squared_error_rows(pred, target, scale))
