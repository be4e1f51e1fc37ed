"""The fused Adam update (``adam.cu`` on the GPU, ``cpu.adam`` on the CPU).

Two entries. :func:`adam` updates one array; its eight scalars
(:class:`AdamScalars`) are given as the hyper-parameters, converted on every
call, or made once by :func:`adam_scalars` and passed along: the optimizer
makes them once a step per dtype and, having checked its arrays itself, calls
``adam(..., check=False)`` per parameter array, so that the per-call cost is
the launch alone (the paper's HIGGS step has eight arrays).

:func:`adam_multi` updates every array of a list in one launch (issue 19),
reading the scalars from an array (a row of a table of steps) instead of
taking them by value, and the arrays' addresses from device tables that an
:class:`AdamPointers` keeps: a step is then one launch, and a captured CUDA
graph can run later steps without being captured again. On the CPU it calls
``cpu.adam`` per array with the row's scalars, the same bits as :func:`adam`.
Which one :class:`cupynn.Adam` uses on the GPU is :func:`adam_setting`
(``$CUPYNN_ADAM``, default ``per-array`` until a GPU check has timed both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy

from ..backend import backend_of
from ._checks import _check_contiguous, _check_same_backend, _float_suffix
from ._launch import _SUFFIX, THREADS_PER_BLOCK, _cpu, _grid, cuda_function
from ._settings import Choice

ADAM_METHODS = ("per-array", "multi")
ADAM_ENV = "CUPYNN_ADAM"
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


_ADAM = Choice("Adam update", ADAM_ENV, ADAM_METHODS)


def set_adam(method: str = "per-array") -> None:
    """Choose how :class:`cupynn.Adam` updates its arrays when not told (its
    ``multi_tensor=None``).

    ``"per-array"`` (the default, or ``$CUPYNN_ADAM``): :func:`adam` once per
    parameter array. ``"multi"``: :func:`adam_multi`, one launch for every array
    of a dtype. Both give the same bits; on the CPU both call ``cpu.adam`` per
    array. Optimizers made before the call keep their choice.
    """
    _ADAM.set(method, "set_adam")


def adam_setting() -> str:
    """The update :class:`cupynn.Adam` uses when not told: ``"per-array"`` or ``"multi"``."""
    return _ADAM.get()


def _data_pointer(array: Any) -> int:
    """The address of an array's first element (NumPy or CuPy)."""
    if isinstance(array, numpy.ndarray):
        return array.ctypes.data
    return array.data.ptr


class AdamPointers:
    """The tables :func:`adam_multi` reads for lists ``ps, gs, ms, vs`` of arrays.

    ``p_ptrs``, ``g_ptrs``, ``m_ptrs``, ``v_ptrs`` (n_arrays,) uint64 hold the
    arrays' data pointers and ``offsets`` (n_arrays + 1,) int64 their cumulative
    lengths, all views of one array on the arrays' device (one copy to make).
    :meth:`update` makes them again only for addresses or lengths it has not
    seen lately: a redistribution swaps a layer's ``data`` and moments, and a
    backward pass makes new gradients, whose addresses the memory pool hands
    out in turn, so the last few tables are kept (:attr:`KEEP`) and a step
    usually finds its own.

    A captured CUDA graph keeps the tables it was captured with: the arrays
    must then stay at those addresses (or be captured again).
    """

    KEEP = 4

    def __init__(self) -> None:
        self._tables: dict[tuple, tuple] = {}
        self.n_arrays = 0
        self.total = 0
        self.p_ptrs = self.g_ptrs = self.m_ptrs = self.v_ptrs = self.offsets = None

    def update(self, ps: Sequence[Any], gs: Sequence[Any], ms: Sequence[Any],
               vs: Sequence[Any], xp: Any) -> None:
        """Point the tables at these arrays (flat, one length per index), on ``xp``'s device."""
        sizes = tuple(int(p.shape[0]) for p in ps)
        key = (sizes, *(tuple(_data_pointer(a) for a in arrays) for arrays in (ps, gs, ms, vs)))
        tables = self._tables.pop(key, None)
        if tables is None:
            tables = self._build(key, xp)
            while len(self._tables) >= self.KEEP:
                del self._tables[next(iter(self._tables))]  # the oldest
        self._tables[key] = tables  # now the newest
        self.n_arrays, self.total = len(sizes), sum(sizes)
        self.p_ptrs, self.g_ptrs, self.m_ptrs, self.v_ptrs, self.offsets = tables

    @staticmethod
    def _build(key: tuple, xp: Any) -> tuple:
        sizes, *pointers = key
        n = len(sizes)
        host = numpy.zeros(5 * n + 1, dtype=numpy.uint64)
        for k, column in enumerate(pointers):
            host[k * n:(k + 1) * n] = column
        host[4 * n + 1:] = numpy.cumsum(sizes, dtype=numpy.int64)
        table = xp.asarray(host)  # one host-to-device copy (none on the CPU)
        return (*(table[k * n:(k + 1) * n] for k in range(4)), table[4 * n:].view(xp.int64))


def adam_multi(ps: Sequence[Any], gs: Sequence[Any], ms: Sequence[Any], vs: Sequence[Any],
               table: Any, row: Any, *, pointers: AdamPointers | None = None,
               check: bool = True, max_blocks: int | None = None) -> None:
    """:func:`adam` of every ``(ps[a], gs[a], ms[a], vs[a])``, in one launch on the GPU.

    Parameters
    ----------
    ps, gs, ms, vs : sequences of n_arrays arrays
        Array ``a`` of each: (n_a,) float32 or float64, C-contiguous; all of one
        dtype and device; n_a may be 0.
    table : (n_rows, 8) array of that dtype, C-contiguous, on that device
        Rows of :class:`AdamScalars` (``numpy.array([adam_scalars(...), ...])``).
    row : (1,) int64 array on that device
        The row of ``table`` to use, read on the device (a view into an
        ``arange``, or a counter that a captured graph advances).
    pointers : AdamPointers, optional
        Kept by the caller across calls (the optimizer keeps one per dtype): its
        tables are made again only when the arrays move. Without it, made here.
    check : bool
        False when the caller has checked everything above: then nothing is
        checked. ``row``'s value is checked on the CPU only (reading it on
        the GPU would wait for the device).
    max_blocks : int, optional
        Cap on the CUDA grid (tests use it to exercise the grid-stride loop).
    """
    what = "adam_multi"
    if check:
        backend = _check_multi(what, ps, gs, ms, vs, table, row)
    else:
        backend = backend_of(table)
    if not ps:
        return
    if backend.is_gpu:
        pointers = AdamPointers() if pointers is None else pointers
        pointers.update(ps, gs, ms, vs, backend.xp)
        if pointers.total == 0:
            return
        kernel = cuda_function("adam.cu", f"adam_multi_{_SUFFIX[table.dtype]}")
        kernel(_grid(pointers.total, max_blocks), (THREADS_PER_BLOCK,),
               (pointers.p_ptrs, pointers.g_ptrs, pointers.m_ptrs, pointers.v_ptrs,
                pointers.offsets, numpy.int32(pointers.n_arrays), table, row))
    else:
        scalars = tuple(table[int(row[0])])  # NumPy scalars of the dtype, as adam_scalars'
        for p, g, m, v in zip(ps, gs, ms, vs):
            if p.shape[0]:
                _cpu().adam(p, g, m, v, *scalars)


def _check_multi(what: str, ps: Sequence[Any], gs: Sequence[Any], ms: Sequence[Any],
                 vs: Sequence[Any], table: Any, row: Any) -> Any:
    """:func:`adam_multi`'s checks; returns the arrays' backend."""
    lists = [list(ps), list(gs), list(ms), list(vs)]
    if len({len(arrays) for arrays in lists}) != 1:
        raise ValueError(f"{what}: ps, gs, ms, vs must be lists of one length. "
                         f"Got {[len(arrays) for arrays in lists]} instead.")
    arrays = [a for group in zip(*lists) for a in group]
    backend = _check_same_backend(what, table, row, *arrays)
    _float_suffix(table, *arrays, what=what)
    _check_contiguous(what, table=table, row=row)
    for index, (p, g, m, v) in enumerate(zip(*lists)):
        _check_contiguous(what, **{f"ps[{index}]": p, f"gs[{index}]": g, f"ms[{index}]": m,
                                   f"vs[{index}]": v})
        if not (p.shape == g.shape == m.shape == v.shape) or p.ndim != 1:
            raise ValueError(f"{what}: ps[{index}], gs[{index}], ms[{index}], vs[{index}] must be "
                             f"flat and of one length. Got {p.shape}, {g.shape}, {m.shape}, "
                             f"{v.shape} instead.")
    if table.ndim != 2 or table.shape[1] != len(AdamScalars._fields) or table.shape[0] < 1:
        raise ValueError(f"{what}: table must have shape (n_rows >= 1, 8). "
                         f"Got {table.shape} instead.")
    if row.dtype != numpy.int64 or row.shape != (1,):
        raise TypeError(f"{what}: row must be a (1,) int64 array. "
                        f"Got {row.dtype} {row.shape} instead.")
    if not backend.is_gpu and not 0 <= int(row[0]) < table.shape[0]:
        raise ValueError(f"{what}: row must hold a row of table, in [0, {table.shape[0]}). "
                         f"Got {int(row[0])} instead.")
    return backend
