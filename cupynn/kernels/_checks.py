"""Argument checks shared by the operations' wrappers.

``RawKernel`` checks nothing and the Numba kernels check little: kernels see raw
pointers, so a strided, mis-sized or mistyped array would be read at the wrong
places without any error. The wrappers call these before every launch (cheap:
no device synchronisation), and the pattern's index ranges when asked
(``check=True``, a pass over the indices).
"""

from __future__ import annotations

from typing import Any

import numpy

from ..backend import backend_of
from ..validation import check_csr
from ._launch import _SUFFIX


def _float_suffix(*arrays: Any, what: str) -> str:
    dtype = arrays[0].dtype
    if dtype not in _SUFFIX:
        raise TypeError(f"{what}: float arrays must be float32 or float64. Got {dtype} instead.")
    for a in arrays[1:]:
        if a.dtype != dtype:
            raise TypeError(f"{what}: all float arrays must have one dtype. "
                            f"Got {dtype} and {a.dtype} instead.")
    return _SUFFIX[dtype]


def _check_contiguous(what: str, **arrays: Any) -> None:
    for name, a in arrays.items():
        if not a.flags.c_contiguous:
            raise ValueError(f"{what}: {name!r} must be C-contiguous.")


def _check_same_backend(what: str, *arrays: Any) -> Any:
    backend = backend_of(arrays[0])
    if any(backend_of(a) is not backend for a in arrays[1:]):
        raise TypeError(f"{what}: all arrays must live on one device ({backend.name}).")
    return backend


def _check_pattern(what: str, indptr: Any, indices: Any, n_rows: int, n_cols: int,
                   check: bool, data: Any = None) -> None:
    """dtypes, shapes and contiguity of a CSR pattern (and its values); with
    ``check`` also the canonical structure and index ranges (a pass over indices).

    Kernels see raw pointers only, so a strided or mis-sized array would be read
    at the wrong places without any error: these checks are what stands between.
    """
    if indptr.dtype != numpy.int32 or indices.dtype != numpy.int32:
        raise TypeError(f"{what}: indptr and indices must be int32. "
                        f"Got {indptr.dtype} and {indices.dtype} instead.")
    if indptr.shape != (n_rows + 1,):
        raise ValueError(f"{what}: indptr must have shape ({n_rows + 1},). Got {indptr.shape} instead.")
    if indices.ndim != 1:
        raise ValueError(f"{what}: indices must be flat. Got shape {indices.shape} instead.")
    arrays = {"indptr": indptr, "indices": indices}
    if data is not None:
        if data.shape != indices.shape:
            raise ValueError(f"{what}: data must have the shape of indices {indices.shape}. "
                             f"Got {data.shape} instead.")
        arrays["data"] = data
    _check_contiguous(what, **arrays)
    if check:
        check_csr(indptr, indices, (n_rows, n_cols), what=what)


def _rows_of(what: str, indptr: Any) -> int:
    """n_rows of a CSR indptr, which must be flat and non-empty."""
    if indptr.ndim != 1 or indptr.shape[0] < 1:
        raise ValueError(f"{what}: indptr must be flat with n_rows + 1 >= 1 entries. "
                         f"Got shape {indptr.shape} instead.")
    return int(indptr.shape[0]) - 1


def _check_no_overlap(what: str, xp: Any, written: str, arrays: dict[str, Any]) -> None:
    for name, a in arrays.items():
        if name != written and xp.may_share_memory(arrays[written], a):
            raise ValueError(f"{what}: {written} must not overlap {name} (it is written while "
                             f"{name} is read).")


def _check_out(what: str, out: Any, shape: tuple[int, ...]) -> None:
    """A given output: of the result's shape and C-contiguous (its dtype and
    device are checked with the operands'). Host-side only: no device work."""
    if tuple(out.shape) != tuple(shape) or not out.flags.c_contiguous:
        raise ValueError(f"{what}: out must be a C-contiguous array of shape {tuple(shape)}. "
                         f"Got shape {tuple(out.shape)}"
                         f"{'' if out.flags.c_contiguous else ', not C-contiguous,'} instead.")
