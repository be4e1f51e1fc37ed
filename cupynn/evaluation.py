"""Data checks and evaluation: what :func:`cupynn.fit` and :func:`evaluate` accept, and the
scores of a model on a dataset (batched on its device, sharded over ranks)."""

from __future__ import annotations

from typing import Any

import numpy

from .backend import to_numpy
from .distributed import UnsupportedAcrossRanks
from .step import NO_WEIGHTS_ACROSS_RANKS
from .losses import LOSSES
from .validation import check_choice, check_finite

EVAL_BATCH = 8192


def check_dataset(model: Any, data: Any, loss: str, name: str) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Validate an (x, y) pair of host arrays against the model and loss."""
    owner = "fit"
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(f"The {name!r} argument of {owner} must be a pair (x, y). "
                         f"Got {type(data).__name__} instead.")
    x, y = (numpy.asarray(to_numpy(a)) for a in data)
    if x.ndim != 2 or x.shape[1] != model.sizes[0]:
        raise ValueError(f"The {name!r} inputs of {owner} must have shape (n, {model.sizes[0]}). "
                         f"Got {x.shape} instead.")
    outputs = model.sizes[-1]
    if loss == "mean_squared_error" and outputs > 1:
        if y.shape != (x.shape[0], outputs):
            raise ValueError(f"The {name!r} targets of {owner} must have shape ({x.shape[0]}, "
                             f"{outputs}) for a model with {outputs} outputs. Got {y.shape} "
                             f"instead.")
    elif y.shape != (x.shape[0],):
        raise ValueError(f"The {name!r} labels of {owner} must have shape ({x.shape[0]},). "
                         f"Got {y.shape} instead.")
    if x.shape[0] == 0:
        raise ValueError(f"The {name!r} data of {owner} is empty.")
    if x.dtype.kind not in "fiub":
        raise TypeError(f"The {name!r} inputs of {owner} must be numeric. Got {x.dtype} instead.")
    check_finite(x, f"{name} x", owner)
    if loss == "cross_entropy":
        classes = model.sizes[-1]
        if y.dtype.kind == "f" and numpy.all(numpy.isfinite(y)) and numpy.all(y == numpy.round(y)):
            y = y.astype(numpy.int64)
        if y.dtype.kind not in "iu":
            raise TypeError(f"The {name!r} labels of {owner} must be integer class indices for "
                            f"cross_entropy. Got {y.dtype} instead.")
        if y.min() < 0 or y.max() >= classes:
            raise ValueError(f"The {name!r} labels of {owner} must be in [0, {classes}) for a model "
                             f"with {classes} outputs. Got values in [{y.min()}, {y.max()}] instead.")
    elif loss == "mean_squared_error":
        if y.dtype.kind not in "fiub":
            raise TypeError(f"The {name!r} targets of {owner} must be numbers for "
                            f"mean_squared_error. Got {y.dtype} instead.")
        check_finite(y.astype(numpy.float64), f"{name} y", owner)
    else:
        if model.sizes[-1] != 1:
            raise ValueError(f"binary_cross_entropy needs a model with one output. "
                             f"Got {model.sizes[-1]} outputs instead.")
        check_finite(y.astype(numpy.float64), f"{name} y", owner)
        if y.min() < 0 or y.max() > 1:
            raise ValueError(f"The {name!r} labels of {owner} must be in [0, 1] for "
                             f"binary_cross_entropy. Got values in [{y.min()}, {y.max()}] instead.")
    return x, y


def evaluate(model: Any, x: Any, y: Any, loss: str = "cross_entropy",
             batch_size: int = EVAL_BATCH, comm: Any = None) -> dict[str, float]:
    """Mean loss, accuracy and (for binary tasks) ROC AUC on a dataset.

    Parameters
    ----------
    x : (n, sizes[0]) host array
    y : (n,) labels
    loss : {"cross_entropy", "binary_cross_entropy", "mean_squared_error"}
    comm : cupynn.distributed.Communicator, optional
        With several ranks (each given the whole dataset), each evaluates its
        contiguous share of the rows and the sums are reduced; the scores for
        the AUC are gathered in row order. Every rank returns the same result.

    Returns
    -------
    dict with ``loss``, ``accuracy`` and, for binary tasks, ``auc`` (NaN when
    ``y`` holds one class only); for ``mean_squared_error``, ``loss``, ``mse``
    and ``r2`` (the coefficient of determination, averaged over the outputs as
    scikit-learn's ``r2_score`` does; a constant target gives 1 for a perfect
    fit and 0 otherwise).
    """
    from .distributed import as_communicator

    check_choice(loss, "loss", "evaluate", tuple(LOSSES))
    x, y = check_dataset(model, (x, y), loss, "test")
    comm = as_communicator(comm, "evaluate")
    loss_fn = LOSSES[loss]
    backend = model.backend
    xp = backend.xp
    n = x.shape[0]
    first, stop = comm.shard(n)
    if loss == "mean_squared_error":
        return _evaluate_regression(model, x, y, batch_size, comm, first, stop)
    # Sums stay on the device (one read at the end, not one per batch).
    total = xp.zeros((), dtype=numpy.float64)
    correct = xp.zeros((), dtype=numpy.int64)
    scores = []
    for start in range(first, stop, batch_size):
        end = min(start + batch_size, stop)
        xb, yb = x[start:end], y[start:end]
        logits = model.forward(xb)
        yd = backend.asarray(yb)
        value, _ = loss_fn(logits, yd, check=False)
        total += value.astype(numpy.float64) * len(yb)
        if loss == "cross_entropy":
            correct += (logits.argmax(axis=1) == yd).sum()
        else:
            z = logits.reshape(-1)
            correct += ((z > 0) == (yd > 0.5)).sum()
            scores.append(z)
    model.clear_cache()
    sums = numpy.array([float(to_numpy(total)), float(to_numpy(correct))])
    comm.allreduce(sums)
    result = {"loss": float(sums[0]) / n, "accuracy": int(sums[1]) / n}
    if loss == "binary_cross_entropy":
        from sklearn.metrics import roc_auc_score

        local = (to_numpy(xp.concatenate(scores)) if scores
                 else numpy.empty(0, dtype=model.dtype))
        labels = y > 0.5
        result["auc"] = (float(roc_auc_score(labels, comm.allgather_array(local)))
                         if 0 < labels.sum() < n else float("nan"))
    return result


def _evaluate_regression(model: Any, x: numpy.ndarray, y: numpy.ndarray, batch_size: int,
                         comm: Any, first: int, stop: int) -> dict[str, float]:
    """MSE and R² from per-output sums of squared errors, targets and squared targets."""
    xp = model.backend.xp
    outputs = model.sizes[-1]
    sums = xp.zeros((3, outputs), dtype=numpy.float64)  # residual², y, y²
    for start in range(first, stop, batch_size):
        end = min(start + batch_size, stop)
        pred = model.forward(x[start:end]).astype(numpy.float64)
        target = model.backend.asarray(y[start:end], dtype=numpy.float64).reshape(pred.shape)
        sums[0] += ((pred - target) ** 2).sum(axis=0)
        sums[1] += target.sum(axis=0)
        sums[2] += (target ** 2).sum(axis=0)
    model.clear_cache()
    host = numpy.ascontiguousarray(to_numpy(sums))
    comm.allreduce(host)
    n = x.shape[0]
    residual, total, squares = host
    spread = squares - total * total / n
    r2 = numpy.where(spread > 0, 1 - residual / numpy.where(spread > 0, spread, 1),
                     numpy.where(residual == 0, 1.0, 0.0))
    mse = float(residual.sum()) / (n * outputs)
    return {"loss": mse, "mse": mse, "r2": float(r2.mean())}


def check_sample_weight(sample_weight: Any, train: Any, comm: Any) -> numpy.ndarray | None:
    """``fit``'s sample weights as a float64 (n,) host array, checked once (None: none)."""
    owner = "fit"
    if sample_weight is None:
        return None
    if comm.size > 1:  # before any collective, on every rank alike: the guard lets it through
        raise UnsupportedAcrossRanks(NO_WEIGHTS_ACROSS_RANKS.format(size=comm.size))
    if train is None:
        raise ValueError(f"The 'sample_weight' argument of {owner} needs train given as a pair "
                         f"(x, y); a sampler draws its own rows.")
    weight = numpy.asarray(to_numpy(sample_weight))
    n = train[0].shape[0]
    if weight.shape != (n,):
        raise ValueError(f"The 'sample_weight' argument of {owner} must have shape ({n},), one "
                         f"weight per training row. Got {weight.shape} instead.")
    if weight.dtype.kind not in "fiub":
        raise TypeError(f"The 'sample_weight' argument of {owner} must be numbers. Got "
                        f"{weight.dtype} instead.")
    weight = weight.astype(numpy.float64)
    if not numpy.isfinite(weight).all() or weight.min() < 0:
        raise ValueError(f"The 'sample_weight' argument of {owner} must be finite and >= 0.")
    if not weight.any():
        raise ValueError(f"The 'sample_weight' argument of {owner} is zero for every row; at "
                         f"least one weight must be non-zero.")
    return weight
