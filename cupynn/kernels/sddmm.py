"""SDDMM, the weight gradient at a sparse layer's active entries (``sddmm.cu`` on
the GPU, ``cpu.sddmm`` on the CPU), with the choice of GPU kernel
(:func:`set_sddmm`, ``$CUPYNN_SDDMM``); and :func:`relu_grad_rowsum`, the step of
the backward pass just before it (the gradient through the ReLU and the bias
gradient).
"""

from __future__ import annotations

import os
from typing import Any

import numpy

from ._checks import (_check_contiguous, _check_no_overlap, _check_out, _check_pattern,
                      _check_same_backend, _float_suffix)
from ._launch import MAX_BLOCKS, THREADS_PER_BLOCK, WARP_SIZE, _cpu, _grid, cuda_function
from ._settings import Choice
from .choice import choose, vector_width

SDDMM_METHODS = ("thread", "warp", "tiles", "vec", "auto")
# The methods that take a group of lanes per nonzero.
_GROUPED = ("warp", "tiles", "vec", "auto")
SDDMM_ENV = "CUPYNN_SDDMM"
SDDMM_MAX_GROUP = 16  # measured: 16 lanes beat 32 at batch 512 on an H100 and an H200
# sddmm_tiled_* and sddmm_vec_*: batch values of dy[r] staged in shared memory at a time
# (the kernel's SDDMM_TILE_MAX; a multiple of every group times every vector width, as
# sddmm_vec_* needs). Batch 512, the issue's, is one chunk.
SDDMM_TILE_CHUNK = 512


def sddmm_group(batch: int) -> int:
    """Lanes per nonzero of the warp SDDMM for a batch: the power of two in [8, 16]
    that gives each lane about 8 products (8 float32 lanes fill a 32-byte sector),
    16 for any larger batch. The GPU checks of docs/gpu/ timed groups of 4 to 32:
    at batch 512 the 4096x4096 layer's SDDMM took 649 us with 16 lanes and 886 us
    with 32 (H200; 680 and 902 us on an H100), and 16 was fastest overall."""
    group = 8
    while group < SDDMM_MAX_GROUP and group * 8 < batch:
        group *= 2
    return group


def _check_sddmm_choice(method: Any, group: Any, source: str) -> tuple[str, int | None]:
    if method not in SDDMM_METHODS:
        raise ValueError(f"The SDDMM method ({source}) must be one of {list(SDDMM_METHODS)}. "
                         f"Got {method!r} instead.")
    if group is not None:
        if method not in _GROUPED:
            raise ValueError(f"An SDDMM group ({source}) goes with method 'warp', 'tiles', "
                             f"'vec' or 'auto'. Got method {method!r} with group {group!r}.")
        if (isinstance(group, bool) or not isinstance(group, (int, numpy.integer))
                or group < 1 or group > WARP_SIZE or group & (group - 1)):
            raise ValueError(f"The SDDMM group ({source}) must be a power of two in "
                             f"[1, {WARP_SIZE}]. Got {group!r} instead.")
        group = int(group)
    return method, group


def _sddmm_from_env() -> tuple[str, int | None]:
    """``$CUPYNN_SDDMM``: ``thread``, ``warp``, ``tiles``, ``vec``, ``auto``, or one of the
    last four with ``:<group>`` (``warp:16``; default ``warp``)."""
    text = os.environ.get(SDDMM_ENV, "").strip() or "warp"
    method, _, group = text.partition(":")
    try:
        parsed = int(group) if group else None
    except ValueError:
        raise ValueError(f"${SDDMM_ENV} must be 'thread', 'warp', 'tiles', 'vec', 'auto' or "
                         f"one of the last four with ':<group>' ('warp:16'). "
                         f"Got {text!r} instead.") from None
    return _check_sddmm_choice(method, parsed, f"${SDDMM_ENV}")


_SDDMM_DEFAULT: list[Any] = []  # [method, group], read from the environment on first use


def set_sddmm(method: str = "warp", group: int | None = None) -> None:
    """Choose the GPU SDDMM kernel that :func:`sddmm` uses when not told.

    Parameters
    ----------
    method : {"thread", "warp", "tiles", "vec", "auto"}
        ``"thread"``: one thread per nonzero (``sddmm_*``); ``"warp"``: groups
        of lanes per nonzero, reading along the batch (``sddmm_warp_*``);
        ``"tiles"`` (issue 20, not yet timed on a GPU): a block per row of the
        pattern, its ``dy`` row staged in shared memory and read by every
        nonzero of the row, the warp kernel's sums and bits at the same group
        (``sddmm_tiled_*``); ``"vec"`` (issue 20, not yet timed): the tiled
        kernel reading 4 float32 (2 float64) batch values per 16-byte load when
        the batch and the operands' addresses allow, in its own fixed order
        (``sddmm_vec_*``; twin ``numpy_twins.sddmm_vec``); ``"auto"``: per
        call, what :func:`cupynn.kernels.choice.choose` picks for the shape
        (``"vec"`` or ``"warp"``). See ``sddmm.cu``. The default is ``"warp"``
        or ``$CUPYNN_SDDMM``.
    group : int, optional
        Lanes per nonzero for ``"warp"``, ``"tiles"``, ``"vec"`` and ``"auto"``
        (a power of two up to 32); by default :func:`sddmm_group` of each
        call's batch.

    The CPU backend has one kernel and ignores the choice.
    """
    _SDDMM_DEFAULT[:] = _check_sddmm_choice(method, group, "set_sddmm")


def sddmm_setting() -> tuple[str, int | None]:
    """The (method, group) :func:`sddmm` uses when not told (group None: per batch)."""
    if not _SDDMM_DEFAULT:
        _SDDMM_DEFAULT[:] = _sddmm_from_env()
    return _SDDMM_DEFAULT[0], _SDDMM_DEFAULT[1]


def sddmm(indptr: Any, indices: Any, dy: Any, x: Any, out: Any = None, *,
          check: bool = True, max_blocks: int | None = None, method: str | None = None,
          group: int | None = None) -> Any:
    """Weight gradient at the active entries: ``out[k] = dy[row(k)] . x[indices[k]]``.

    Parameters
    ----------
    indptr : (n_rows + 1,) int32
    indices : (nnz,) int32
    dy : (n_rows, batch) float32 or float64, C-contiguous
    x : (n_cols, batch) same dtype, C-contiguous
    out : (nnz,) same dtype, optional
    check : bool
        Also check the CSR structure and index ranges (a pass over indices).
    max_blocks : int, optional
        Cap on the CUDA grid (tests use it to exercise the grid-stride loop).
    method : {"thread", "warp", "tiles", "vec", "auto"}, optional
        The GPU kernel (see :func:`set_sddmm`; default :func:`sddmm_setting`).
    group : int, optional
        Lanes per nonzero of the ``"warp"``, ``"tiles"`` and ``"vec"`` kernels
        (default: the set one, else :func:`sddmm_group` of the batch).

    Returns
    -------
    (nnz,) array on the operands' device.
    """
    what = "sddmm"
    if method is None:
        method, default_group = sddmm_setting()
        group = default_group if group is None else group
    method, group = _check_sddmm_choice(method, group, what)
    backend = _check_same_backend(what, indptr, indices, dy, x)
    suffix = _float_suffix(dy, x, *(() if out is None else (out,)), what=what)
    if dy.ndim != 2 or x.ndim != 2 or dy.shape[1] != x.shape[1]:
        raise ValueError(f"{what}: dy (n_rows, batch) and x (n_cols, batch) must share the batch "
                         f"axis. Got {dy.shape} and {x.shape} instead.")
    _check_contiguous(what, dy=dy, x=x)
    _check_pattern(what, indptr, indices, dy.shape[0], x.shape[0], check)
    nnz = int(indices.shape[0])
    xp = backend.xp
    if out is None:
        out = xp.empty(nnz, dtype=dy.dtype)
    elif out.shape != (nnz,):
        raise ValueError(f"{what}: out must have shape ({nnz},). Got {out.shape} instead.")
    else:
        _check_contiguous(what, out=out)
    if nnz == 0:
        return out
    batch = int(dy.shape[1])
    if batch == 0:
        out[...] = 0
        return out
    if backend.is_gpu:
        sizes = (numpy.int32(dy.shape[0]), numpy.int32(nnz), numpy.int32(batch))
        if method == "auto":
            method = choose("sddmm", int(dy.shape[0]), int(x.shape[0]), nnz, batch,
                            dy.dtype)[0]
        if method == "thread":
            kernel = cuda_function("sddmm.cu", f"sddmm_{suffix}")
            kernel(_grid(nnz, max_blocks), (THREADS_PER_BLOCK,),
                   (indptr, indices, dy, x, out) + sizes)
        elif method == "tiles":
            group = sddmm_group(batch) if group is None else group
            kernel = cuda_function("sddmm.cu", f"sddmm_tiled_{suffix}")
            kernel(*_sddmm_tiles_launch(int(dy.shape[0]), max_blocks),
                   (indptr, indices, dy, x, out, sizes[0], sizes[2], numpy.int32(group),
                    numpy.int32(SDDMM_TILE_CHUNK)))
        elif method == "vec":
            group = sddmm_group(batch) if group is None else group
            kernel = cuda_function("sddmm.cu", f"sddmm_vec_{suffix}")
            kernel(*_sddmm_tiles_launch(int(dy.shape[0]), max_blocks),
                   (indptr, indices, dy, x, out, sizes[0], sizes[2], numpy.int32(group),
                    numpy.int32(SDDMM_TILE_CHUNK),
                    numpy.int32(vector_width(dy.dtype, batch, dy, x))))
        else:
            group = sddmm_group(batch) if group is None else group
            warps = -(-nnz // (WARP_SIZE // group))
            kernel = cuda_function("sddmm.cu", f"sddmm_warp_{suffix}")
            kernel(_grid(warps * WARP_SIZE, max_blocks), (THREADS_PER_BLOCK,),
                   (indptr, indices, dy, x, out) + sizes + (numpy.int32(group),))
    else:
        _cpu().sddmm(indptr, indices, dy, x, out)
    return out


def _sddmm_tiles_launch(n_rows: int, max_blocks: int | None) -> tuple[tuple[int], tuple[int]]:
    """(grid, block) of ``sddmm_tiled_*`` and ``sddmm_vec_*``: a block of THREADS_PER_BLOCK
    threads (whole warps, as their shuffles need) per row of the pattern, at most
    ``max_blocks`` (else MAX_BLOCKS) blocks striding over the rows."""
    return (max(1, min(n_rows, max_blocks or MAX_BLOCKS)),), (THREADS_PER_BLOCK,)


RELU_GRAD_ENV = "CUPYNN_RELU_GRAD"
RELU_GRAD_METHODS = ("arrays", "kernel")
_RELU_GRAD = Choice("GPU ReLU gradient and bias sum", RELU_GRAD_ENV, RELU_GRAD_METHODS)


def set_relu_grad(method: str = "arrays") -> None:
    """Choose how :func:`relu_grad_rowsum` runs on the GPU when no ``sums`` is given.

    ``"arrays"`` (the default, or ``$CUPYNN_RELU_GRAD``): CuPy's element-wise
    product and row sum, three launches and two temporaries a layer.
    ``"kernel"``: the ``relu_grad_rowsum`` kernel of ``sddmm.cu``, one launch
    (what a call with ``sums`` always runs). Their sums differ by rounding.
    The CPU backend ignores the choice.
    """
    _RELU_GRAD.set(method, "set_relu_grad")


def relu_grad_setting() -> str:
    """The GPU path :func:`relu_grad_rowsum` takes without ``sums``."""
    return _RELU_GRAD.get()


def relu_grad_rowsum(dy: Any, y: Any = None, *, in_place: bool = False, out: Any = None,
                     sums: Any = None, max_blocks: int | None = None) -> tuple[Any, Any]:
    """``(dy * (y > 0), its row sums)``, or ``(dy, row sums)`` without ``y``.

    A sparse layer's backward pass before its SDDMM: the gradient through its
    ReLU (``y`` is the layer's output after the ReLU) and its bias gradient.
    One Numba pass on the CPU. ``dy`` and ``y`` are (n_rows, batch)
    C-contiguous of one float dtype; ``dy`` is not modified, unless
    ``in_place`` lets the result overwrite it (a caller that gives ``dy`` up
    saves an array of its size at the peak of the backward pass).

    Parameters
    ----------
    dy, y : (n_rows, batch) float32 or float64, C-contiguous
    in_place : bool
        Write the result over ``dy`` (``out`` is then ``dy`` or not given).
    out : (n_rows, batch), optional
        Receives the result; may be ``dy`` itself, must not overlap it otherwise.
        Without ``y`` the GPU returns ``dy`` itself when no ``out`` is given.
    sums : (n_rows,), optional
        Receives the row sums. On the GPU, given ``sums`` (or the setting
        ``"kernel"``, :func:`set_relu_grad`) runs the
        ``relu_grad_rowsum`` kernel of ``sddmm.cu`` (one warp per row, a fixed
        summation order, no temporary array: what a captured CUDA graph needs,
        issue 19); without it, CuPy's element-wise product and reduction as
        before (they allocate a mask and the sums; their order differs from the
        kernel's by rounding).
    max_blocks : int, optional
        Cap on the kernel's CUDA grid (tests use it to exercise its grid-stride loop).

    Returns
    -------
    (out, sums): ``out`` and ``sums`` themselves when given.
    """
    what = "relu_grad_rowsum"
    arrays = (dy,) if y is None else (dy, y)
    given = tuple(a for a in (out, sums) if a is not None)
    backend = _check_same_backend(what, *arrays, *given)
    suffix = _float_suffix(*arrays, *given, what=what)
    if dy.ndim != 2 or (y is not None and y.shape != dy.shape):
        raise ValueError(f"{what}: dy must be 2-D and y of its shape. Got {dy.shape} and "
                         f"{None if y is None else y.shape} instead.")
    _check_contiguous(what, **({"dy": dy} if y is None else {"dy": dy, "y": y}))
    xp = backend.xp
    read = {} if y is None else {"y": y}
    if out is not None:
        if in_place and out is not dy:
            raise ValueError(f"{what}: in_place=True writes over dy; out must be dy or not "
                             f"given.")
        _check_out(what, out, dy.shape)
        _check_no_overlap(what, xp, "out", {"out": out, **read,
                                            **({} if out is dy else {"dy": dy})})
    if sums is not None:
        _check_out(what, sums, dy.shape[:1])
        _check_no_overlap(what, xp, "sums", {"sums": sums, "dy": dy, **read,
                                             **({} if out is None else {"out": out})})
    if backend.is_gpu and sums is None and relu_grad_setting() == "arrays":
        # CuPy's operations (the default, as before)
        if y is None:
            if out is None:
                out = dy
            elif out is not dy:
                xp.copyto(out, dy)
        elif in_place or out is dy:
            out = xp.multiply(dy, y > 0, out=dy)
        elif out is not None:
            xp.multiply(dy, y > 0, out=out)
        else:
            out = dy * (y > 0)
        return out, out.sum(axis=1)
    if out is None:
        out = dy if in_place or (y is None and backend.is_gpu) else xp.empty_like(dy)
    if sums is None:
        sums = xp.empty(dy.shape[0], dtype=dy.dtype)
    if backend.is_gpu:
        n_rows, batch = dy.shape
        if n_rows:
            cuda_function("sddmm.cu", f"relu_grad_rowsum_{suffix}")(
                _grid(n_rows * WARP_SIZE, max_blocks), (THREADS_PER_BLOCK,),
                (dy, dy if y is None else y, out, sums, numpy.int32(n_rows),
                 numpy.int32(batch), numpy.int32(y is not None)))
        return out, sums
    _cpu().relu_grad_rowsum(dy, dy if y is None else y, y is not None, out, sums)
    return out, sums
