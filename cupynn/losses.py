"""Losses computed from logits, numerically stable, each returning (loss, grad).

Both take batch-major logits (``(batch, classes)`` or ``(batch,)``), as
:meth:`cupynn.MLP.forward` returns them, and give the mean loss over the batch
as a 0-d array on the logits' device (``float(loss)`` reads it) together with
the gradient of that mean with respect to the logits.

``total`` makes them a rank's share of a larger batch's mean: the sum over
these rows divided by ``total`` (the global batch), and its gradient; summed
over the ranks of a data-parallel step, the shares give the global batch's
mean loss and gradient (:mod:`cupynn.distributed`).
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


def _check_total(total: Any, n: int, owner: str) -> int | None:
    if total is None:
        return None
    if isinstance(total, bool) or not isinstance(total, (int, numpy.integer)) or total < max(n, 1):
        raise ValueError(f"The 'total' parameter of {owner} must be an int >= the batch size "
                         f"{n} (and >= 1). Got {total!r} instead.")
    return int(total)


def cross_entropy(logits: Any, labels: Any, *, check: bool = True,
                  total: int | None = None) -> tuple[Any, Any]:
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

    Returns
    -------
    loss : 0-d array, mean over the batch of ``logsumexp(z) - z[label]``
    grad : (batch, classes), ``(softmax(z) - onehot(label)) / batch``
    """
    owner = "cross_entropy"
    if getattr(logits, "ndim", None) != 2:
        raise ValueError(f"The 'logits' argument of {owner} must have shape (batch, classes). "
                         f"Got {getattr(logits, 'shape', type(logits).__name__)} instead.")
    _check_batch(logits, labels, owner)
    xp = backend_of(logits).xp
    labels = xp.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"The 'labels' argument of {owner} must be integers. Got {labels.dtype}.")
    n, classes = logits.shape
    total = _check_total(total, n, owner)
    if n == 0 and total is not None:  # a rank whose share of the batch is empty
        return xp.zeros((), dtype=logits.dtype), xp.zeros_like(logits)
    if check and n:
        lo, hi = to_numpy(xp.stack([labels.min(), labels.max()]).astype("int64"))
        if lo < 0 or hi >= classes:
            raise ValueError(f"The 'labels' argument of {owner} must be in [0, {classes}). "
                             f"Got values in [{lo}, {hi}] instead.")
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    norm = exp.sum(axis=1, keepdims=True)
    rows = xp.arange(n)
    per_row = xp.log(norm[:, 0]) - shifted[rows, labels]
    loss = per_row.mean() if total is None else per_row.sum() / total
    grad = exp / norm
    grad[rows, labels] -= 1
    grad /= n if total is None else total
    return loss, grad


def binary_cross_entropy(logits: Any, labels: Any, *, check: bool = True,
                         total: int | None = None) -> tuple[Any, Any]:
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
    xp = backend_of(logits).xp
    z = logits.reshape(-1)
    total = _check_total(total, z.shape[0], owner)
    if z.shape[0] == 0 and total is not None:  # a rank whose share of the batch is empty
        return xp.zeros((), dtype=logits.dtype), xp.zeros_like(logits)
    y = xp.asarray(labels).astype(z.dtype, copy=False)
    if check and z.size:
        lo, hi = to_numpy(xp.stack([y.min(), y.max()]))
        if not (0 <= lo and hi <= 1):
            raise ValueError(f"The 'labels' argument of {owner} must be in [0, 1]. "
                             f"Got values in [{lo}, {hi}] instead.")
    e = xp.exp(-xp.abs(z))  # in (0, 1]
    per_row = xp.maximum(z, 0) - y * z + xp.log1p(e)
    loss = per_row.mean() if total is None else per_row.sum() / total
    sigmoid = xp.where(z >= 0, 1 / (1 + e), e / (1 + e))
    grad = (sigmoid - y) / (z.shape[0] if total is None else total)
    return loss, grad.reshape(logits.shape)


def mean_squared_error(pred: Any, target: Any, *, check: bool = True,
                       total: int | None = None) -> tuple[Any, Any]:
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
    xp = backend_of(pred).xp
    target = xp.asarray(target)
    if target.shape != pred.shape:
        if pred.ndim == 2 and pred.shape[1] == 1 and target.shape == (pred.shape[0],):
            target = target.reshape(pred.shape)
        else:
            raise ValueError(f"The 'target' argument of {owner} must have the shape of pred "
                             f"{pred.shape}. Got {target.shape} instead.")
    n = pred.shape[0]
    outputs = 1 if pred.ndim == 1 else pred.shape[1]
    total = _check_total(total, n, owner)
    if n == 0 and total is not None:  # a rank whose share of the batch is empty
        return xp.zeros((), dtype=pred.dtype), xp.zeros_like(pred)
    target = target.astype(pred.dtype, copy=False)
    if check and n and not bool(to_numpy(xp.isfinite(target).all())):
        raise ValueError(f"The 'target' argument of {owner} must be finite.")
    diff = pred - target
    squares = diff * diff
    loss = squares.mean() if total is None else squares.sum() / (total * outputs)
    grad = diff * (2.0 / ((n if total is None else total) * outputs))
    return loss, grad.astype(pred.dtype, copy=False)


LOSSES = {"cross_entropy": cross_entropy, "binary_cross_entropy": binary_cross_entropy,
          "mean_squared_error": mean_squared_error}
