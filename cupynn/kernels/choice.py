"""What picks a GPU kernel by shape: the rule behind the method ``"auto"`` (:func:`choose`)
and the vector width of the ``"vec"`` kernels (:func:`vector_width`).

The defaults stay ``"rows"`` (spmm, spmm_t) and ``"warp"`` (SDDMM): a new GPU path is
off until a GPU check shows it equal and faster. ``"auto"`` is there to be selected
(``set_spmm("auto")``, ``set_sddmm("auto")``, ``$CUPYNN_SPMM=auto``) and measured: the
GPU check prints what :func:`choose` picks per shape next to the timings of every
method.
"""

from __future__ import annotations

from typing import Any

import numpy

# The rule's thresholds: design guesses, not measurements (no GPU has timed the "vec"
# kernels yet). A batch of 64 or more fills the 32-column float32 tile (16 float64) of the
# vectorised kernels twice over, and nnz * batch >= 2**24 (16 M products: the 4096 x 4096
# layer at d = 0.1 has 1.68 M nonzeros, 860 M products at batch 512) keeps small layers,
# where launches and the default kernels' simplicity win, on the defaults.
VEC_MIN_BATCH = 64
VEC_MIN_PRODUCTS = 2 ** 24
OPERATIONS = ("spmm", "spmm_t", "sddmm")
_DEFAULTS = {"spmm": "rows", "spmm_t": "rows", "sddmm": "warp"}
# Bytes of one vector load of the "vec" kernels (4 float32, 2 float64; spmm.cu's and
# sddmm.cu's __align__(16) structs).
VEC_BYTES = 16


def choose(op: str, n_out: int, n_in: int, nnz: int, batch: int,
           dtype: Any) -> tuple[str, int | None]:
    """The GPU method the setting ``"auto"`` runs for one product: ``(method, group)``.

    Parameters
    ----------
    op : {"spmm", "spmm_t", "sddmm"}
    n_out, n_in : int
        The layer's weight shape (out_features, in_features), whichever the product
        (``spmm_t``'s output has ``n_in`` rows).
    nnz : int
        Nonzeros of the pattern.
    batch : int
        Columns of the dense operands.
    dtype : float32 or float64

    Returns
    -------
    ``("vec", None)`` when ``batch >= VEC_MIN_BATCH`` and ``nnz * batch >=
    VEC_MIN_PRODUCTS``, else the default: ``("rows", None)`` for spmm and spmm_t,
    ``("warp", None)`` for SDDMM. The group is None: the SDDMM kernels then take
    ``sddmm_group(batch)`` lanes per nonzero.

    One written rule, the same for the three products and both dtypes. Its
    thresholds are design guesses (the vectorised kernels read a narrow batch tile
    of the dense operand from cache and pay for their staging and barriers; that
    pays off on wide batches and large layers) until a GPU check measures every
    method per shape and this rule is set from what it saw.
    """
    if op not in OPERATIONS:
        raise ValueError(f"choose: op must be one of {list(OPERATIONS)}. Got {op!r} instead.")
    if numpy.dtype(dtype) not in (numpy.float32, numpy.float64):
        raise TypeError(f"choose: dtype must be float32 or float64. Got {dtype!r} instead.")
    if batch >= VEC_MIN_BATCH and int(nnz) * int(batch) >= VEC_MIN_PRODUCTS:
        return "vec", None
    return _DEFAULTS[op], None


def vector_width(dtype: Any, batch: int, *arrays: Any) -> int:
    """V of the ``"vec"`` kernels: the values of one 16-byte load (4 float32, 2 float64)
    when ``batch`` is a multiple of it and every array of ``arrays`` (the dense operands
    read with vector loads, and ``out`` where it is written so) starts on a 16-byte
    boundary; else 1 (scalar loads, the same bits). Reads the arrays' addresses only."""
    vec = VEC_BYTES // numpy.dtype(dtype).itemsize
    if batch % vec or any(_address(a) % VEC_BYTES for a in arrays):
        return 1
    return vec


def _address(array: Any) -> int:
    """The address of ``array``'s first element: CuPy's ``array.data.ptr``, or a NumPy
    array's own where tests run the GPU path with its kernels emulated on the CPU."""
    pointer = getattr(array.data, "ptr", None)
    return int(array.ctypes.data) if pointer is None else int(pointer)
