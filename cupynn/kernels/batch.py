"""The data movement of a training step captured as a CUDA graph (issue 19):
:func:`gather_batch` and :func:`gather_labels` take the step's batch out of the
data set through the epoch's order, :func:`transpose` turns (classes, batch)
logits into (batch, classes) and back, and :func:`end_step` records the step's
loss and advances the step counter.

A graph replays fixed launches on fixed buffers, so which batch a step takes
is not an argument: it is ``counter[0]``, an int64 in device memory that the
GPU kernels (``batch.cu``) read and :func:`end_step` advances, with no host
synchronisation and no allocation. The CPU runs plain NumPy (it reads
``counter[0]`` on the host) into the same given buffers.

Bounds: a wrapper cannot read ``counter`` or ``order`` without synchronising,
so the kernels check them: a batch position outside ``order`` or an ``order``
value outside the data set gives NaN (``-1`` for int64 labels, which the
losses answer with NaN), and a counter outside ``losses`` skips the record
but still advances; the CPU does the same.
"""

from __future__ import annotations

from typing import Any

import numpy

from ..backend import backend_of
from ._checks import (_check_contiguous, _check_no_overlap, _check_out, _check_same_backend,
                      _float_suffix)
from ._launch import THREADS_PER_BLOCK, _grid, cuda_function

_LABEL_SUFFIX = {numpy.dtype(numpy.float32): "f32", numpy.dtype(numpy.float64): "f64",
                 numpy.dtype(numpy.int64): "i64"}


def _check_schedule(what: str, order: Any, counter: Any) -> None:
    if order.dtype != numpy.int64 or order.ndim != 1:
        raise TypeError(f"{what}: order must be a flat int64 array. Got {order.dtype} with "
                        f"shape {order.shape} instead.")
    if counter.dtype != numpy.int64 or counter.shape != (1,):
        raise TypeError(f"{what}: counter must be an int64 array of shape (1,). Got "
                        f"{counter.dtype} with shape {counter.shape} instead.")
    _check_contiguous(what, order=order, counter=counter)


def _sources(order: numpy.ndarray, counter: numpy.ndarray, stride: int, rows: int,
             n: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """CPU: the data set's rows that batch positions 0 .. rows-1 read, and which of them
    are within bounds (the others are written as missing, as the kernels do)."""
    positions = int(counter[0]) * int(stride) + numpy.arange(rows)
    inside = (positions >= 0) & (positions < order.shape[0])
    sources = numpy.full(rows, -1, dtype=numpy.int64)
    sources[inside] = order[positions[inside]]
    valid = (sources >= 0) & (sources < n)
    return sources, valid


def gather_batch(x: Any, order: Any, counter: Any, stride: int, out: Any, *,
                 check: bool = True, max_blocks: int | None = None) -> Any:
    """``out[f, j] = x[order[counter[0] * stride + j], f]`` for j < rows = out.shape[1].

    The batch of step ``counter[0]``, feature-major as the model takes it.

    Parameters
    ----------
    x : (n, features) float32 or float64, C-contiguous
        The data set, sample-major.
    order : (n_order,) int64
        The epoch's order of the samples (usually a permutation of range(n)).
    counter : (1,) int64
        The step within the epoch; read on the device by the GPU kernel.
    stride : int
        Samples per step (the batch size); a last, short batch has
        ``rows < stride``.
    out : (features, rows) of x's dtype, C-contiguous
        Receives the batch. Positions past ``order`` or ``order`` values outside
        [0, n) give NaN columns.
    check : bool
        Check dtypes, shapes, contiguity, devices and overlaps (host-side
        only); ``False`` checks nothing (a caller that checked its buffers once).
    max_blocks : int, optional
        Cap on the CUDA grid (tests use it to exercise the grid-stride loop).

    Returns
    -------
    ``out``.
    """
    what = "gather_batch"
    backend = _check_same_backend(what, x, order, counter, out) if check else backend_of(out)
    if check:
        _float_suffix(x, out, what=what)
        _check_schedule(what, order, counter)
        if x.ndim != 2 or out.ndim != 2:
            raise ValueError(f"{what}: x must be (n, features) and out (features, rows). Got "
                             f"{x.shape} and {out.shape} instead.")
        _check_contiguous(what, x=x)
        _check_out(what, out, (x.shape[1], out.shape[1]))
        _check_no_overlap(what, backend.xp, "out",
                          {"out": out, "x": x, "order": order, "counter": counter})
    n, features = int(x.shape[0]), int(x.shape[1])
    rows = int(out.shape[1])
    if backend.is_gpu:
        if features and rows:
            cuda_function("batch.cu", f"gather_batch_{_float_suffix(x, what=what)}")(
                _grid(features * rows, max_blocks), (THREADS_PER_BLOCK,),
                (x, order, counter, numpy.int64(stride), out, numpy.int64(n),
                 numpy.int64(order.shape[0]), numpy.int32(features), numpy.int32(rows)))
        return out
    sources, valid = _sources(order, counter, stride, rows, n)
    out[:, valid] = x[sources[valid]].T
    out[:, ~valid] = numpy.nan
    return out


def gather_labels(y: Any, order: Any, counter: Any, stride: int, out: Any, *,
                  check: bool = True, max_blocks: int | None = None) -> Any:
    """``out[j] = y[order[counter[0] * stride + j]]`` for j < rows = out.shape[0].

    The labels (or targets) of step ``counter[0]``'s batch; see :func:`gather_batch`.

    Parameters
    ----------
    y : (n,) int64, float32 or float64, C-contiguous
    order, counter, stride : as for :func:`gather_batch`
    out : (rows,) of y's dtype, C-contiguous
        Out-of-bounds positions give NaN, or -1 for int64 labels.
    check, max_blocks : as for :func:`gather_batch`

    Returns
    -------
    ``out``.
    """
    what = "gather_labels"
    backend = _check_same_backend(what, y, order, counter, out) if check else backend_of(out)
    if check:
        if y.dtype not in _LABEL_SUFFIX or out.dtype != y.dtype:
            raise TypeError(f"{what}: y must be int64, float32 or float64 and out of its dtype. "
                            f"Got {y.dtype} and {out.dtype} instead.")
        _check_schedule(what, order, counter)
        if y.ndim != 1 or out.ndim != 1:
            raise ValueError(f"{what}: y must be (n,) and out (rows,). Got {y.shape} and "
                             f"{out.shape} instead.")
        _check_contiguous(what, y=y, out=out)
        _check_no_overlap(what, backend.xp, "out",
                          {"out": out, "y": y, "order": order, "counter": counter})
    n, rows = int(y.shape[0]), int(out.shape[0])
    if backend.is_gpu:
        if rows:
            cuda_function("batch.cu", f"gather_labels_{_LABEL_SUFFIX[y.dtype]}")(
                _grid(rows, max_blocks), (THREADS_PER_BLOCK,),
                (y, order, counter, numpy.int64(stride), out, numpy.int64(n),
                 numpy.int64(order.shape[0]), numpy.int32(rows)))
        return out
    sources, valid = _sources(order, counter, stride, rows, n)
    out[valid] = y[sources[valid]]
    out[~valid] = -1 if y.dtype == numpy.int64 else numpy.nan
    return out


def transpose(src: Any, out: Any, *, check: bool = True, max_blocks: int | None = None) -> Any:
    """``out[c, r] = src[r, c]``: src (a, b) into out (b, a), both C-contiguous and
    of one float dtype, without allocating (CuPy's ``.T.copy()`` allocates).

    ``check`` and ``max_blocks`` as for :func:`gather_batch`. Returns ``out``.
    """
    what = "transpose"
    backend = _check_same_backend(what, src, out) if check else backend_of(out)
    if check:
        _float_suffix(src, out, what=what)
        if src.ndim != 2:
            raise ValueError(f"{what}: src must be 2-D. Got shape {src.shape} instead.")
        _check_contiguous(what, src=src)
        _check_out(what, out, src.shape[::-1])
        _check_no_overlap(what, backend.xp, "out", {"out": out, "src": src})
    a, b = int(src.shape[0]), int(src.shape[1])
    if backend.is_gpu:
        if a and b:
            cuda_function("batch.cu", f"transpose_{_float_suffix(src, what=what)}")(
                _grid(a * b, max_blocks), (THREADS_PER_BLOCK,),
                (src, out, numpy.int32(a), numpy.int32(b)))
        return out
    out[...] = src.T
    return out


def end_step(value: Any, losses: Any, counter: Any, *, check: bool = True) -> None:
    """``losses[counter[0]] = value; counter[0] += 1``, on the device: the last launch
    of a captured step, which records its loss and moves the next replay to the
    next batch.

    Parameters
    ----------
    value : 0-d or (1,) float32 or float64
        The step's loss.
    losses : (n_losses,) float64, C-contiguous
        The epoch's losses; a counter outside [0, n_losses) records nothing
        (but still advances).
    counter : (1,) int64
    check : bool
        As for :func:`gather_batch`.
    """
    what = "end_step"
    backend = _check_same_backend(what, value, losses, counter) if check else backend_of(counter)
    if check:
        _float_suffix(value, what=what)
        if value.size != 1 or value.ndim > 1:
            raise ValueError(f"{what}: value must be a 0-d or (1,) array. Got shape "
                             f"{value.shape} instead.")
        if losses.dtype != numpy.float64 or losses.ndim != 1:
            raise TypeError(f"{what}: losses must be a flat float64 array. Got {losses.dtype} "
                            f"with shape {losses.shape} instead.")
        if counter.dtype != numpy.int64 or counter.shape != (1,):
            raise TypeError(f"{what}: counter must be an int64 array of shape (1,). Got "
                            f"{counter.dtype} with shape {counter.shape} instead.")
        _check_contiguous(what, value=value, losses=losses, counter=counter)
    if backend.is_gpu:
        cuda_function("batch.cu", f"end_step_{_float_suffix(value, what=what)}")(
            (1,), (1,), (value, losses, counter, numpy.int64(losses.shape[0])))
        return
    step = int(counter[0])
    if 0 <= step < losses.shape[0]:
        losses[step] = float(value.reshape(()))
    counter[0] = step + 1
