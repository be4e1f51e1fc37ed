"""The fused Adam update (``adam.cu`` on the GPU, ``cpu.adam`` on the CPU).

One entry, :func:`adam`. Its eight scalars (:class:`AdamScalars`) are given as
the hyper-parameters, converted on every call, or made once by
:func:`adam_scalars` and passed along: the optimizer makes them once a step per
dtype and, having checked its arrays itself, calls ``adam(..., check=False)``
per parameter array, so that the per-call cost is the launch alone (the
paper's HIGGS step has eight arrays).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy

from ..backend import backend_of
from ._checks import _check_contiguous, _check_same_backend, _float_suffix
from ._launch import _SUFFIX, THREADS_PER_BLOCK, _cpu, _grid, cuda_function

_HYPER = ("lr", "b1", "b2", "eps", "bc1", "bc2")  # adam's keywords, instead of scalars
_NO_HYPER = (None,) * len(_HYPER)


class AdamScalars(NamedTuple):
    """The scalars of ``adam.cu`` (and its twins), in its argument order, all of
    one NumPy float type: make them with :func:`adam_scalars`."""

    lr: Any
    b1: Any
    b2: Any
    one_minus_b1: Any
    one_minus_b2: Any
    eps: Any
    bc1: Any
    bc2: Any


def adam_scalars(dtype: Any, *, lr: float, b1: float, b2: float, eps: float, bc1: float,
                 bc2: float) -> AdamScalars:
    """:class:`AdamScalars` in ``dtype``: lr, b1, b2, 1 - b1, 1 - b2, eps, bc1, bc2.

    ``bc1``/``bc2`` are the bias corrections 1 - b1**t and 1 - b2**t.
    """
    t = numpy.dtype(dtype).type
    # 1 - b computed in double, then rounded (as the twin does): in float32,
    # 1 - float32(0.999) is 0.00099998713, not 0.001.
    return AdamScalars(*(t(s) for s in (lr, b1, b2, 1.0 - b1, 1.0 - b2, eps, bc1, bc2)))


def adam(p: Any, g: Any, m: Any, v: Any, scalars: AdamScalars | None = None, *,
         lr: float | None = None, b1: float | None = None, b2: float | None = None,
         eps: float | None = None, bc1: float | None = None, bc2: float | None = None,
         check: bool = True, max_blocks: int | None = None) -> None:
    """Fused in-place Adam update of ``p``, ``m``, ``v`` from gradient ``g``.

    Parameters
    ----------
    p, g, m, v : (n,) float32 or float64, C-contiguous, one dtype and device
    scalars : AdamScalars, optional
        From :func:`adam_scalars` in the arrays' dtype. Without it, all of
        ``lr``, ``b1``, ``b2``, ``eps``, ``bc1``, ``bc2`` (the bias corrections
        1 - b1**t and 1 - b2**t) are given instead.
    check : bool
        False when the caller has checked the arrays as above and ``scalars``'
        type (the optimizer, for the arrays it owns): then nothing is checked.
    max_blocks : int, optional
        Cap on the CUDA grid (tests use it to exercise the grid-stride loop).
    """
    what = "adam"
    hyper = (lr, b1, b2, eps, bc1, bc2)
    if check:
        backend = _check_same_backend(what, p, g, m, v)
        _float_suffix(p, g, m, v, what=what)
        _check_contiguous(what, p=p, g=g, m=m, v=v)
        if not (p.shape == g.shape == m.shape == v.shape) or p.ndim != 1:
            raise ValueError(f"{what}: p, g, m, v must be flat and of one length. "
                             f"Got {p.shape}, {g.shape}, {m.shape}, {v.shape} instead.")
    else:
        backend = backend_of(p)
    if scalars is None or hyper != _NO_HYPER:
        scalars = _scalars_of(what, p.dtype, scalars, hyper)
    elif check and (not isinstance(scalars, AdamScalars)
                    or any(type(s) is not p.dtype.type for s in scalars)):
        raise TypeError(f"{what}: scalars must be AdamScalars in {p.dtype} "
                        f"(adam_scalars({p.dtype.name!r}, ...)). Got {scalars!r} instead.")
    n = int(p.shape[0])
    if n == 0:
        return
    if backend.is_gpu:
        kernel = cuda_function("adam.cu", f"adam_{_SUFFIX[p.dtype]}")
        kernel(_grid(n, max_blocks), (THREADS_PER_BLOCK,), (p, g, m, v, *scalars, numpy.int64(n)))
    else:
        _cpu().adam(p, g, m, v, *scalars)


def _scalars_of(what: str, dtype: Any, scalars: Any, hyper: tuple) -> AdamScalars:
    """:func:`adam`'s scalars from its hyper-parameters, which must all be given
    (and ``scalars`` not)."""
    given = [name for name, value in zip(_HYPER, hyper) if value is not None]
    if scalars is not None or len(given) != len(_HYPER):
        raise TypeError(f"{what}: give either scalars or all of {list(_HYPER)}. Got "
                        f"{'scalars and ' if scalars is not None else ''}{given} instead.")
    return adam_scalars(dtype, **dict(zip(_HYPER, hyper)))
