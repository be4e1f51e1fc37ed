"""Losses computed from logits, numerically stable, each returning (loss, grad).

Both take batch-major logits (``(batch, classes)`` or ``(batch,)``), as
:meth:`cupynn.MLP.forward` returns them, and give the mean loss over the batch
as a 0-d array on the logits' device (``float(loss)`` reads it) together with
the gradient of that mean with respect to the logits.

``total`` makes them a rank's share of a larger batch's mean: the sum over
these rows divided by ``total`` (the global batch), and its gradient; summed
over the ranks of a data-parallel step, the shares give the global batch's
mean loss and gradient (:mod:`cupynn.distributed`).

``weight`` (one non-negative number per row) makes the mean a weighted one,
as scikit-learn's ``MLPClassifier``/``MLPRegressor`` weight their loss
(``numpy.average(..., weights=sample_weight)``): ``sum_i w_i l_i / sum_i w_i``,
whose gradient is row i's unweighted one times ``w_i / sum_i w_i``. A weight
of 2 counts a row twice; a batch whose weights are all 0 gives loss 0 and
gradient 0. With ``weight``, ``total`` is the weight sum of the whole batch
(a positive real) instead of its row count.

On the GPU, with ``$CUPYNN_LOSS=fused`` (:func:`cupynn.kernels.loss.set_loss`),
the unweighted losses of float32 and float64 logits run the kernels of
``kernels/loss.cu`` (two launches, :mod:`cupynn.kernels.loss`) instead of the
array expressions below (about ten); the default, ``arrays``, keeps the array
expressions. The CPU always computes the array expressions.
"""

from __future__ import annotations

from typing import Any

import numpy

from .backend import backend_of, to_numpy


def _check_batch(logits: Any, labels: Any, owner: str) -> None:
    if getattr(labels, "ndim", None) != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"The 'labels' argument of {owner} must have shape ({logits.shape[0]},). "
                         f"Got {getattr(labels, 'shape', type(labels).__name__)} instead.")
    if logits.dtype.kind != "f":
        raise TypeError(f"The 'logits' argument of {owner} must be a float array. "
                        f"Got {logits.dtype} instead.")


def _check_total(total: Any, n: int, owner: str, weighted: bool = False) -> Any:
    if total is None:
        return None
    if weighted:  # the whole batch's weight sum
        if (isinstance(total, bool) or not isinstance(total, (int, float, numpy.number))
                or not numpy.isfinite(total) or total < 0):
            raise ValueError(f"The 'total' parameter of {owner} must be the batch's weight sum, a "
                             f"finite real >= 0, with weight=. Got {total!r} instead.")
        return float(total)
    if isinstance(total, bool) or not isinstance(total, (int, numpy.integer)) or total < max(n, 1):
        raise ValueError(f"The 'total' parameter of {owner} must be an int >= the batch size "
                         f"{n} (and >= 1). Got {total!r} instead.")
    return int(total)


def _check_weight(weight: Any, n: int, dtype: Any, xp: Any, owner: str, check: bool) -> Any:
    """``weight`` as a (n,) array of the logits' dtype on their device; with ``check``,
    its values finite and >= 0 (one reduction; ``fit`` checks all weights once)."""
    if getattr(weight, "ndim", None) != 1 or weight.shape[0] != n:
        raise ValueError(f"The 'weight' argument of {owner} must have shape ({n},). "
                         f"Got {getattr(weight, 'shape', type(weight).__name__)} instead.")
    weight = xp.asarray(weight)
    if weight.dtype.kind not in "fiub":
        raise TypeError(f"The 'weight' argument of {owner} must be numbers. Got {weight.dtype}.")
    weight = weight.astype(dtype, copy=False)
    if check and n and not bool(to_numpy(((weight >= 0) & xp.isfinite(weight)).all())):
        raise ValueError(f"The 'weight' argument of {owner} must be finite and >= 0.")
    return weight


def _weighted_mean(per_row: Any, weight: Any, total: Any, xp: Any) -> tuple[Any, Any]:
    """sum(w * per_row) / W and the per-row factors w / W, W the weights' sum (or ``total``).

    W = 0 (every weight 0) gives 0 and zeros, without a division by 0 and without
    reading W on the host (no device sync per batch)."""
    den = weight.sum() if total is None else xp.asarray(total, dtype=weight.dtype)
    den = xp.where(den > 0, den, xp.ones_like(den))
    factors = weight / den
    return (factors * per_row).sum(), factors


def _fused(backend: Any, dtype: Any, weight: Any) -> Any:
    """:mod:`cupynn.kernels.loss` when this call takes the fused kernels: on the GPU,
    without ``weight``, for float32/float64 and with ``$CUPYNN_LOSS=fused``; else None
    (the CPU never reads the setting)."""
    if not backend.is_gpu or weight is not None or dtype not in (numpy.float32, numpy.float64):
        return None
    from .kernels import loss as fused  # imported on the GPU path only

    return fused if fused.loss_setting() == "fused" else None


def cross_entropy(logits: Any, labels: Any, *, check: bool = True,
                  total: Any = None, weight: Any = None) -> tuple[Any, Any]:
    """Softmax cross-entropy.

    Parameters
    ----------
    logits : (batch, classes) float
    labels : (batch,) int, values in [0, classes)
    check : bool
        Check the labels' range (one reduction; ``fit`` checks all labels once
        up front and passes False).
    total : int, optional
        Divide by this instead of the batch size (see the module doc).
    weight : (batch,) float >= 0, optional
        Per-row weights: the weighted mean (see the module doc).

    Returns
    -------
    loss : 0-d array, mean over the batch of ``logsumexp(z) - z[label]``
        (with ``weight``, ``sum_i w_i l_i / sum_i w_i``)
    grad : (batch, classes), ``(softmax(z) - onehot(label)) / batch``
        (with ``weight``, row i times ``w_i / sum_i w_i`` instead of ``1 / batch``)
    """
    owner = "cross_entropy"
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"The 'logits' argument of {owner} must have shape (batch, classes). "
                         f"Got {getattr(logits, 'shape', type(logits).__name__)} instead.")
    _check_batch(logits, labels, owner)
    backend = backend_of(logits)
    xp = backend.xp
    labels = xp.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"The 'labels' argument of {owner} must be integers. Got {labels.dtype}.")
    n, classes = logits.shape
    total = _check_total(total, n, owner, weighted=weight is not None)
    if weight is not None:
        weight = _check_weight(weight, n, logits.dtype, xp, owner, check)
    if n == 0 and total is not None:  # a rank whose share of the batch is empty
        return xp.zeros((), dtype=logits.dtype), xp.zeros_like(logits)
    if check and n:
        lo, hi = to_numpy(xp.stack([labels.min(), labels.max()]).astype("int64"))
        if lo < 0 or hi >= classes:
            raise ValueError(f"The 'labels' argument of {owner} must be in [0, {classes}). "
                             f"Got values in [{lo}, {hi}] instead.")
    fused = _fused(backend, logits.dtype, weight)
    if fused is not None:
        return fused.softmax_cross_entropy(xp.ascontiguousarray(logits),
                                           labels.astype(numpy.int64, copy=False),
                                           total=total, check=False)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    norm = exp.sum(axis=1, keepdims=True)
    rows = xp.arange(n)
    per_row = xp.log(norm[:, 0]) - shifted[rows, labels]
    grad = exp / norm
    grad[rows, labels] -= 1
    if weight is not None:
        loss, factors = _weighted_mean(per_row, weight, total, xp)
        grad *= factors[:, None]
        return loss, grad
    loss = per_row.mean() if total is None else per_row.sum() / total
    grad /= n if total is None else total
    return loss, grad


def binary_cross_entropy(logits: Any, labels: Any, *, check: bool = True,
                         total: Any = None, weight: Any = None) -> tuple[Any, Any]:
    """Binary cross-entropy of ``sigmoid(z)`` computed from the logits ``z``.

    loss = mean(softplus(z) - y z) = mean(max(z, 0) - y z + log1p(exp(-|z|))),
    which never overflows; grad = (sigmoid(z) - y) / batch.

    Parameters
    ----------
    logits : (batch,) or (batch, 1) float
    labels : (batch,) with values in [0, 1] (0/1 targets, or soft targets)
    check : bool
        Check the labels' range (one reduction).
    total : int, optional
        Divide by this instead of the batch size (see the module doc).
    weight : (batch,) float >= 0, optional
        Per-row weights: the weighted mean (see the module doc).

    Returns
    -------
    loss : 0-d array
    grad : array of the logits' shape
    """
    owner = "binary_cross_entropy"
    if getattr(logits, "ndim", None) not in (1, 2) or (logits.ndim == 2 and logits.shape[1] != 1):
        raise ValueError(f"The 'logits' argument of {owner} must have shape (batch,) or (batch, 1). "
                         f"Got {getattr(logits, 'shape', type(logits).__name__)} instead.")
    _check_batch(logits, labels, owner)
    backend = backend_of(logits)
    xp = backend.xp
    z = logits.reshape(-1)
    total = _check_total(total, z.shape[0], owner, weighted=weight is not None)
    if weight is not None:
        weight = _check_weight(weight, z.shape[0], z.dtype, xp, owner, check)
    if z.shape[0] == 0 and total is not None:  # a rank whose share of the batch is empty
        return xp.zeros((), dtype=logits.dtype), xp.zeros_like(logits)
    y = xp.asarray(labels).astype(z.dtype, copy=False)
    if check and z.size:
        lo, hi = to_numpy(xp.stack([y.min(), y.max()]))
        if not (0 <= lo and hi <= 1):
            raise ValueError(f"The 'labels' argument of {owner} must be in [0, 1]. "
                             f"Got values in [{lo}, {hi}] instead.")
    fused = _fused(backend, z.dtype, weight)
    if fused is not None:
        return fused.binary_cross_entropy(xp.ascontiguousarray(logits), xp.ascontiguousarray(y),
                                          total=total, check=False)
    e = xp.exp(-xp.abs(z))  # in (0, 1]
    per_row = xp.maximum(z, 0) - y * z + xp.log1p(e)
    sigmoid = xp.where(z >= 0, 1 / (1 + e), e / (1 + e))
    if weight is not None:
        loss, factors = _weighted_mean(per_row, weight, total, xp)
        return loss, ((sigmoid - y) * factors).reshape(logits.shape)
    loss = per_row.mean() if total is None else per_row.sum() / total
    grad = (sigmoid - y) / (z.shape[0] if total is None else total)
    return loss, grad.reshape(logits.shape)


def mean_squared_error(pred: Any, target: Any, *, check: bool = True,
                       total: Any = None, weight: Any = None) -> tuple[Any, Any]:
    """Mean squared error, for regression.

    loss = mean over the batch and the outputs of ``(pred - target)**2``;
    grad = ``2 (pred - target) / (batch * outputs)``.

    Parameters
    ----------
    pred : (batch, outputs) or (batch,) float
    target : the same shape, or (batch,) when there is one output
    check : bool
        Check that the targets are finite (one reduction).
    total : int, optional
        Divide by ``total * outputs`` instead (see the module doc).
    weight : (batch,) float >= 0, optional
        Per-row weights: ``sum_i w_i sum_j (pred_ij - target_ij)**2 / (sum_i w_i *
        outputs)``, the weighted mean over the rows of each row's mean over the
        outputs (scikit-learn's ``squared_loss`` without its factor 1/2).

    Returns
    -------
    loss : 0-d array
    grad : array of ``pred``'s shape
    """
    owner = "mean_squared_error"
    if getattr(pred, "ndim", None) not in (1, 2):
        raise ValueError(f"The 'pred' argument of {owner} must have shape (batch, outputs) or "
                         f"(batch,). Got {getattr(pred, 'shape', type(pred).__name__)} instead.")
    if pred.dtype.kind != "f":
        raise TypeError(f"The 'pred' argument of {owner} must be a float array. "
                        f"Got {pred.dtype} instead.")
    backend = backend_of(pred)
    xp = backend.xp
    target = xp.asarray(target)
    if target.shape != pred.shape:
        if pred.ndim == 2 and pred.shape[1] == 1 and target.shape == (pred.shape[0],):
            target = target.reshape(pred.shape)
        else:
            raise ValueError(f"The 'target' argument of {owner} must have the shape of pred "
                             f"{pred.shape}. Got {target.shape} instead.")
    n = pred.shape[0]
    outputs = 1 if pred.ndim == 1 else pred.shape[1]
    total = _check_total(total, n, owner, weighted=weight is not None)
    if weight is not None:
        weight = _check_weight(weight, n, pred.dtype, xp, owner, check)
    if n == 0 and total is not None:  # a rank whose share of the batch is empty
        return xp.zeros((), dtype=pred.dtype), xp.zeros_like(pred)
    target = target.astype(pred.dtype, copy=False)
    if check and n and not bool(to_numpy(xp.isfinite(target).all())):
        raise ValueError(f"The 'target' argument of {owner} must be finite.")
    fused = _fused(backend, pred.dtype, weight)
    if fused is not None:
        return fused.mean_squared_error(xp.ascontiguousarray(pred), xp.ascontiguousarray(target),
                                        total=total, check=False)
    diff = pred - target
    squares = diff * diff
    if weight is not None:
        per_row = squares if pred.ndim == 1 else squares.sum(axis=1)
        loss, factors = _weighted_mean(per_row, weight, total, xp)
        factors = factors * (2.0 / outputs)
        grad = diff * (factors if pred.ndim == 1 else factors[:, None])
        return loss / outputs, grad.astype(pred.dtype, copy=False)
    loss = squares.mean() if total is None else squares.sum() / (total * outputs)
    grad = diff * (2.0 / ((n if total is None else total) * outputs))
    return loss, grad.astype(pred.dtype, copy=False)


LOSSES = {"cross_entropy": cross_entropy, "binary_cross_entropy": binary_cross_entropy,
          "mean_squared_error": mean_squared_error}
