"""The dispatchers' argument checks: every bad input gets its documented error,
and ``check=False`` skips only the pass over the indices.
"""

from __future__ import annotations

import numpy
import pytest

from cupynn import kernels
from cupynn.kernels import numpy_twins as twins
from kernel_cases import (CASES, assert_close, call_adam, call_relu_grad_rowsum, call_sddmm,
                          call_spmm, call_spmm_t, dtype_params, sddmm_reference, small)


@dtype_params
def test_check_false_skips_the_index_pass(dtype):
    """check=False trusts the pattern: unsorted columns pass, and SDDMM needs no order."""
    a = next(c for c in CASES if c.name == "grid_stride").arrays(dtype)
    indptr, indices = a["indptr"], a["indices"].copy()
    for r in range(len(indptr) - 1):
        indices[indptr[r]:indptr[r + 1]] = indices[indptr[r]:indptr[r + 1]][::-1]
    with pytest.raises(ValueError, match="sorted and unique within each row"):
        kernels.sddmm(indptr, indices, a["dy"], a["x"])
    result = kernels.sddmm(indptr, indices, a["dy"], a["x"], check=False)
    expected, bound = sddmm_reference(dict(a, indices=indices))
    assert_close(result, expected, bound, dtype)
    # spmm_t takes its batch-slice scatter for unsorted rows (the band kernel
    # needs sorted columns): it must agree with the twin too.
    data = a["data"] if "data" in a else numpy.linspace(-1, 1, len(indices)).astype(dtype)
    got = kernels.spmm_t(indptr, indices, data, a["dy"], a["x"].shape[0], check=False)
    expected = twins.spmm_t(indptr, indices, data, a["dy"], a["x"].shape[0])
    bound = twins.spmm_t(indptr, indices, numpy.abs(data), numpy.abs(a["dy"]), a["x"].shape[0])
    assert_close(got, expected, bound, dtype)


def test_valid_inputs_pass(small):
    """The baseline every error case below breaks one thing of."""
    assert call_sddmm(small).shape == (3,)
    assert call_spmm(small).shape == (3, 5)
    assert call_spmm_t(small).shape == (4, 5)
    assert call_spmm(small, kw=dict(bias=numpy.ones(3), relu=True)).shape == (3, 5)
    assert [r.shape for r in call_relu_grad_rowsum(small)] == [(3, 5), (3,)]
    call_adam(small)


I32 = numpy.int32
BAD_INPUTS = [
    # the fused layer epilogue
    ("spmm_bias_shape", call_spmm, dict(kw=dict(bias=numpy.ones(4))),
     ValueError, r"bias must be a \(3,\) array on the operands' device. Got \(4,\)"),
    ("spmm_bias_dtype", call_spmm, dict(kw=dict(bias=numpy.ones(3, dtype=numpy.float32))),
     TypeError, "one dtype. Got float64 and float32"),
    ("spmm_relu_without_bias", call_spmm, dict(kw=dict(relu=True)),
     ValueError, "relu=True goes with a bias"),
    ("relu_grad_shapes", call_relu_grad_rowsum, dict(y=numpy.ones((3, 4))),
     ValueError, r"dy must be 2-D and y of its shape. Got \(3, 5\) and \(3, 4\)"),
    ("relu_grad_dtype", call_relu_grad_rowsum, dict(y=numpy.ones((3, 5), dtype=numpy.float32)),
     TypeError, "one dtype"),
    ("relu_grad_strided", call_relu_grad_rowsum, dict(dy=numpy.ones((5, 3)).T),
     ValueError, "C-contiguous"),
    # wrong dtypes
    ("sddmm_int_operands", call_sddmm, dict(dy=numpy.ones((3, 5), dtype=numpy.int64)),
     TypeError, "float arrays must be float32 or float64. Got int64"),
    ("sddmm_mixed_floats", call_sddmm, dict(x=numpy.ones((4, 5), dtype=numpy.float32)),
     TypeError, "one dtype. Got float64 and float32"),
    ("sddmm_int64_indptr", call_sddmm, dict(indptr=numpy.array([0, 2, 2, 3])),
     TypeError, "indptr and indices must be int32. Got int64 and int32"),
    ("sddmm_out_dtype", call_sddmm, dict(kw=dict(out=numpy.empty(3, dtype=numpy.float32))),
     TypeError, "one dtype"),
    ("spmm_float16_data", call_spmm, dict(data=numpy.ones(3, dtype=numpy.float16)),
     TypeError, "float arrays must be float32 or float64. Got float16"),
    ("spmm_t_int64_indices", call_spmm_t, dict(indices=numpy.array([0, 3, 1])),
     TypeError, "must be int32"),
    ("spmm_short_data", call_spmm, dict(data=numpy.ones(2)),
     ValueError, r"data must have the shape of indices \(3,\). Got \(2,\)"),
    ("spmm_t_2d_data", call_spmm_t, dict(data=numpy.ones((3, 1))),
     ValueError, "data must have the shape of indices"),
    ("spmm_empty_indptr", call_spmm, dict(indptr=numpy.array([], dtype=numpy.int32)),
     ValueError, r"indptr must be flat with n_rows \+ 1 >= 1 entries"),
    ("spmm_strided_data", call_spmm, dict(data=numpy.ones(6)[::2]),
     ValueError, "'data' must be C-contiguous"),
    ("spmm_t_strided_indptr", call_spmm_t,
     dict(indptr=numpy.array([0, 0, 2, 2, 3, 3, 3, 3], dtype=numpy.int32)[::2]),
     ValueError, "'indptr' must be C-contiguous"),
    ("sddmm_strided_out", call_sddmm, dict(kw=dict(out=numpy.empty(6)[::2])),
     ValueError, "'out' must be C-contiguous"),
    ("adam_int", call_adam, dict(g=numpy.ones(6, dtype=numpy.int32)),
     TypeError, "one dtype"),
    ("adam_all_float16", call_adam, {k: numpy.ones(6, dtype=numpy.float16) for k in "pgmv"},
     TypeError, "must be float32 or float64"),
    # non-contiguous operands
    ("sddmm_strided_dy", call_sddmm, dict(dy=numpy.ones((3, 10))[:, ::2]),
     ValueError, "'dy' must be C-contiguous"),
    ("sddmm_fortran_x", call_sddmm, dict(x=numpy.asfortranarray(numpy.ones((4, 5)))),
     ValueError, "'x' must be C-contiguous"),
    ("spmm_strided_x", call_spmm, dict(x=numpy.ones((4, 10))[:, ::2]),
     ValueError, "'x' must be C-contiguous"),
    ("spmm_t_strided_dy", call_spmm_t, dict(dy=numpy.ones((3, 10))[:, ::2]),
     ValueError, "'dy' must be C-contiguous"),
    ("adam_strided_g", call_adam, dict(g=numpy.ones(12)[::2]),
     ValueError, "'g' must be C-contiguous"),
    # mismatched shapes
    ("sddmm_batch_mismatch", call_sddmm, dict(x=numpy.ones((4, 6))),
     ValueError, r"must share the batch axis. Got \(3, 5\) and \(4, 6\)"),
    ("sddmm_flat_dy", call_sddmm, dict(dy=numpy.ones(15)),
     ValueError, "must share the batch axis"),
    ("sddmm_out_shape", call_sddmm, dict(kw=dict(out=numpy.empty(4))),
     ValueError, r"out must have shape \(3,\). Got \(4,\)"),
    ("spmm_flat_x", call_spmm, dict(x=numpy.ones(4)),
     ValueError, r"x must be \(n_cols, batch\)"),
    ("adam_lengths", call_adam, dict(m=numpy.ones(5)),
     ValueError, "flat and of one length"),
    ("adam_2d", call_adam, {k: numpy.ones((2, 3)) for k in "pgmv"},
     ValueError, "flat and of one length"),
    # indptr of the wrong length
    ("sddmm_short_indptr", call_sddmm, dict(indptr=numpy.array([0, 2, 3], dtype=I32)),
     ValueError, r"indptr must have shape \(4,\). Got \(3,\)"),
    ("sddmm_long_indptr", call_sddmm, dict(indptr=numpy.array([0, 2, 2, 3, 3], dtype=I32)),
     ValueError, r"indptr must have shape \(4,\). Got \(5,\)"),
    ("spmm_t_short_indptr", call_spmm_t, dict(indptr=numpy.array([0, 2, 3], dtype=I32)),
     ValueError, "n_rows = len\\(indptr\\) - 1"),
    ("spmm_indptr_too_long_for_nnz", call_spmm, dict(indptr=numpy.array([0, 2, 2], dtype=I32)),
     ValueError, "indptr must start at 0 and end at nnz=3. Got 0 and 2"),
    # malformed patterns (check=True)
    ("sddmm_index_too_large", call_sddmm, dict(indices=numpy.array([0, 4, 1], dtype=I32)),
     ValueError, r"column indices must be in \[0, 4\). Got values in \[0, 4\]"),
    ("spmm_negative_index", call_spmm, dict(indices=numpy.array([0, 3, -1], dtype=I32)),
     ValueError, r"column indices must be in \[0, 4\). Got values in \[-1, 3\]"),
    ("spmm_t_index_too_large", call_spmm_t, dict(indices=numpy.array([0, 9, 1], dtype=I32)),
     ValueError, r"column indices must be in \[0, 4\)"),
    ("sddmm_unsorted_row", call_sddmm, dict(indices=numpy.array([3, 0, 1], dtype=I32)),
     ValueError, "sorted and unique within each row"),
    ("spmm_duplicate_in_row", call_spmm, dict(indices=numpy.array([3, 3, 1], dtype=I32)),
     ValueError, "sorted and unique within each row"),
    ("spmm_t_decreasing_indptr", call_spmm_t, dict(indptr=numpy.array([0, 2, 1, 3], dtype=I32)),
     ValueError, "indptr must be non-decreasing"),
    ("sddmm_indptr_not_at_zero", call_sddmm, dict(indptr=numpy.array([1, 2, 2, 3], dtype=I32)),
     ValueError, "indptr must start at 0 and end at nnz=3. Got 1 and 3"),
]


@pytest.mark.parametrize("call, change, error, message",
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_dispatcher_rejects_bad_input(small, call, change, error, message):
    with pytest.raises(error, match=message):
        call(small, **change)
