"""The fused Adam update (``adam.cu`` on the GPU, ``cpu.adam`` on the CPU):
:func:`adam` checks and applies; the optimizer checks once and calls
:func:`adam_apply` with :func:`adam_scalars` per parameter array.
"""

from __future__ import annotations

from typing import Any

import numpy

from ._checks import _check_contiguous, _check_same_backend, _float_suffix
from ._launch import _SUFFIX, THREADS_PER_BLOCK, _cpu, _grid, cuda_function


def adam(p: Any, g: Any, m: Any, v: Any, *, lr: float, b1: float, b2: float, eps: float,
         bc1: float, bc2: float, max_blocks: int | None = None) -> None:
    """Fused in-place Adam update of ``p``, ``m``, ``v`` from gradient ``g``.

    All four arrays are flat, C-contiguous, of one float dtype and length.
    ``bc1``/``bc2`` are the bias corrections 1 - b1**t and 1 - b2**t.
    """
    what = "adam"
    backend = _check_same_backend(what, p, g, m, v)
    _float_suffix(p, g, m, v, what=what)
    _check_contiguous(what, p=p, g=g, m=m, v=v)
    if not (p.shape == g.shape == m.shape == v.shape) or p.ndim != 1:
        raise ValueError(f"{what}: p, g, m, v must be flat and of one length. "
                         f"Got {p.shape}, {g.shape}, {m.shape}, {v.shape} instead.")
    adam_apply(backend, p, g, m, v,
               adam_scalars(p.dtype, lr=lr, b1=b1, b2=b2, eps=eps, bc1=bc1, bc2=bc2),
               max_blocks=max_blocks)


def adam_scalars(dtype: Any, *, lr: float, b1: float, b2: float, eps: float, bc1: float,
                 bc2: float) -> tuple:
    """The eight scalars of ``adam.cu`` (and its twins) in ``dtype``:
    lr, b1, b2, 1 - b1, 1 - b2, eps, bc1, bc2."""
    t = numpy.dtype(dtype).type
    # 1 - b computed in double, then rounded (as the twin does): in float32,
    # 1 - float32(0.999) is 0.00099998713, not 0.001.
    return tuple(t(s) for s in (lr, b1, b2, 1.0 - b1, 1.0 - b2, eps, bc1, bc2))


def adam_apply(backend: Any, p: Any, g: Any, m: Any, v: Any, scalars: tuple, *,
               max_blocks: int | None = None) -> None:
    """:func:`adam` with its checks done by the caller and its scalars from
    :func:`adam_scalars`: ``p``, ``g``, ``m``, ``v`` flat, C-contiguous, of one
    float dtype and length on ``backend``. The optimizer checks what can change
    between steps and calls this once per parameter array, so the per-call cost
    is the launch alone (the paper's HIGGS step has eight arrays)."""
    n = int(p.shape[0])
    if n == 0:
        return
    if backend.is_gpu:
        kernel = cuda_function("adam.cu", f"adam_{_SUFFIX[p.dtype]}")
        kernel(_grid(n, max_blocks), (THREADS_PER_BLOCK,), (p, g, m, v, *scalars, numpy.int64(n)))
    else:
        _cpu().adam(p, g, m, v, *scalars)
