"""Input checks with messages in one style.

"The 'density' parameter of SparseLinear must be in (0, 1]. Got 1.5 instead."
Parameters are checked once, where they enter, before any work is done.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy

INT32_MAX = 2**31 - 1


def check_real(value: Any, name: str, owner: str, low: float | None = None,
               high: float | None = None, closed: str = "both") -> float:
    """Check a finite real number in an interval; return it as float.

    ``closed`` is one of "both", "left", "right", "neither".
    """
    lo_br = "[" if closed in ("both", "left") else "("
    hi_br = "]" if closed in ("both", "right") else ")"
    interval = f"{lo_br}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{hi_br}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not numpy.isfinite(value):
        raise ValueError(f"The {name!r} parameter of {owner} must be a real number in {interval}. "
                         f"Got {value!r} instead.")
    value = float(value)
    below = low is not None and (value < low if lo_br == "[" else value <= low)
    above = high is not None and (value > high if hi_br == "]" else value >= high)
    if below or above:
        raise ValueError(f"The {name!r} parameter of {owner} must be in {interval}. "
                         f"Got {value!r} instead.")
    return value


def check_int(value: Any, name: str, owner: str, low: int | None = None,
              high: int | None = None) -> int:
    """Check an integer in [low, high]; return it as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"The {name!r} parameter of {owner} must be an int. Got {value!r} instead.")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        interval = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"The {name!r} parameter of {owner} must be in {interval}. "
                         f"Got {value!r} instead.")
    return value


def check_choice(value: Any, name: str, owner: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"The {name!r} parameter of {owner} must be one of {list(choices)}. "
                         f"Got {value!r} instead.")
    return value


def check_finite(array: Any, name: str, owner: str) -> None:
    """Raise if a float array holds NaN or inf (one reduction, one sync)."""
    from .backend import backend_of

    xp = backend_of(array).xp
    if array.dtype.kind in "fc" and array.size and not bool(xp.isfinite(array).all()):
        bad = int((~xp.isfinite(array)).sum())
        raise ValueError(f"The {name!r} argument of {owner} must be finite. "
                         f"Got {bad} NaN or infinite values.")


def check_csr(indptr: Any, indices: Any, shape: tuple[int, int], what: str = "CSR matrix") -> None:
    """Check that (indptr, indices) is a canonical CSR pattern of ``shape``.

    Canonical: int32 arrays, indptr[0] == 0, indptr non-decreasing,
    indptr[-1] == nnz, column indices in [0, n_cols) and strictly increasing
    within each row (so sorted and unique).
    """
    from .backend import backend_of

    xp = backend_of(indptr).xp
    n_rows, n_cols = shape
    if indptr.dtype != numpy.int32 or indices.dtype != numpy.int32:
        raise TypeError(f"{what}: indptr and indices must be int32. "
                        f"Got {indptr.dtype} and {indices.dtype} instead.")
    if indptr.ndim != 1 or indptr.shape[0] != n_rows + 1 or indices.ndim != 1:
        raise ValueError(f"{what}: indptr must have shape ({n_rows + 1},) and indices be flat. "
                         f"Got {indptr.shape} and {indices.shape} instead.")
    nnz = int(indices.shape[0])
    if nnz > INT32_MAX:
        raise ValueError(f"{what}: {nnz} nonzeros do not fit int32 indices.")
    ends = numpy.asarray(_host(xp.stack([indptr[0], indptr[-1]])))
    if ends[0] != 0 or ends[1] != nnz:
        raise ValueError(f"{what}: indptr must start at 0 and end at nnz={nnz}. "
                         f"Got {int(ends[0])} and {int(ends[1])} instead.")
    if n_rows and bool(_host((xp.diff(indptr) < 0).any())):
        raise ValueError(f"{what}: indptr must be non-decreasing.")
    if nnz == 0:
        return
    lo_hi = numpy.asarray(_host(xp.stack([indices.min(), indices.max()])))
    if lo_hi[0] < 0 or lo_hi[1] >= n_cols:
        raise ValueError(f"{what}: column indices must be in [0, {n_cols}). "
                         f"Got values in [{int(lo_hi[0])}, {int(lo_hi[1])}] instead.")
    row_start = xp.zeros(nnz, dtype=bool)
    starts = indptr[:-1]
    row_start[starts[starts < nnz]] = True
    increasing = xp.diff(indices) > 0
    if not bool(_host((increasing | row_start[1:]).all())):
        raise ValueError(f"{what}: column indices must be sorted and unique within each row.")


def _host(value: Any) -> Any:
    from .backend import to_numpy

    return to_numpy(value)
