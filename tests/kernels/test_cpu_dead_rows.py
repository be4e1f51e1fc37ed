"""The CPU products skip the rows of ``dy`` that are all zeros (units the ReLU shut
for the whole batch) and must give the bits of adding their zero terms.

The reference adds every term, zeros included, in row order from +0, the order of
``cpu.spmm_t``'s kernels and of a dot product's lanes. Values are small integers,
so every product and partial sum is exact (a fused multiply-add rounds as the
reference does) and the only bits in question are those the skipped terms could
have changed: the sign of a zero.
"""

from __future__ import annotations

import numpy
import pytest

from cupynn import kernels
from cupynn.kernels import cpu


def _problem(n_rows, n_cols, batch, dtype, seed, dead):
    rng = numpy.random.default_rng(seed)
    indptr = [0]
    indices = []
    for _ in range(n_rows):
        cols = numpy.sort(rng.choice(n_cols, size=int(rng.integers(0, min(n_cols, 6) + 1)),
                                     replace=False))
        indices.extend(cols.tolist())
        indptr.append(len(indices))
    indptr = numpy.asarray(indptr, numpy.int32)
    indices = numpy.asarray(indices, numpy.int32)
    data = rng.integers(-3, 4, size=indices.size).astype(dtype)
    dy = rng.integers(-2, 3, size=(n_rows, batch)).astype(dtype)
    x = rng.integers(-2, 3, size=(n_cols, batch)).astype(dtype)
    for r in dead:  # all zeros, some of them negative zeros
        dy[r] = numpy.where(rng.random(batch) < 0.5, -0.0, 0.0).astype(dtype)
    return indptr, indices, data, dy, x


def _bits(a):
    return a.view(numpy.uint32 if a.dtype == numpy.float32 else numpy.uint64)


def _spmm_t_reference(indptr, indices, data, dy, n_cols):
    out = numpy.zeros((n_cols, dy.shape[1]), dy.dtype)  # +0
    for r in range(dy.shape[0]):
        for k in range(indptr[r], indptr[r + 1]):
            out[indices[k]] += data[k] * dy[r]
    return out


def _sddmm_reference(indptr, indices, dy, x):
    out = numpy.zeros(indices.size, dy.dtype)
    for r in range(dy.shape[0]):
        for k in range(indptr[r], indptr[r + 1]):
            acc = dy.dtype.type(0)
            for j in range(dy.shape[1]):
                acc += dy[r, j] * x[indices[k], j]
            out[k] = acc
    return out


CASES = [  # (n_rows, n_cols, batch): narrow outputs take the band scan, wide ones the slices
    (12, 9, 5), (40, 3, 8), (7, 200, 3), (30, 5000, 2)]


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("shape", CASES)
def test_spmm_t_skipping_zero_rows_keeps_every_bit(shape, dtype):
    n_rows, n_cols, batch = shape
    dead = list(range(0, n_rows, 3))
    indptr, indices, data, dy, _ = _problem(n_rows, n_cols, batch, dtype, 1, dead)
    expected = _spmm_t_reference(indptr, indices, data, dy, n_cols)
    for check, sorted_rows in ((True, False), (False, True), (False, False)):
        got = kernels.spmm_t(indptr, indices, data, dy, n_cols, check=check,
                             sorted_rows=sorted_rows)
        assert numpy.array_equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_spmm_t_unsorted_rows_skip_zero_rows_too(dtype):
    indptr, indices, data, dy, _ = _problem(20, 15, 6, dtype, 2, dead=[1, 4, 5, 19])
    for r in range(20):  # reverse each row's columns: the slice kernel's path
        indices[indptr[r]:indptr[r + 1]] = indices[indptr[r]:indptr[r + 1]][::-1].copy()
        data[indptr[r]:indptr[r + 1]] = data[indptr[r]:indptr[r + 1]][::-1].copy()
    expected = _spmm_t_reference(indptr, indices, data, dy, 15)
    got = kernels.spmm_t(indptr, indices, data, dy, 15, check=False)
    assert numpy.array_equal(_bits(got), _bits(expected))


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("shape", CASES)
def test_sddmm_gives_plus_zero_at_zero_rows(shape, dtype):
    n_rows, n_cols, batch = shape
    dead = list(range(1, n_rows, 4))
    indptr, indices, _, dy, x = _problem(n_rows, n_cols, batch, dtype, 3, dead)
    expected = _sddmm_reference(indptr, indices, dy, x)
    got = kernels.sddmm(indptr, indices, dy, x)
    assert numpy.array_equal(_bits(got), _bits(expected))
    for r in dead:
        assert not numpy.signbit(got[indptr[r]:indptr[r + 1]]).any()


def test_a_nan_row_is_not_skipped():
    indptr, indices, data, dy, x = _problem(6, 5, 4, numpy.float64, 4, dead=[0, 2])
    dy[2, 1] = numpy.nan
    assert list(cpu._live_rows(dy)) == [0] + [1] * 5
    got = kernels.sddmm(indptr, indices, dy, x)
    assert numpy.isnan(got[indptr[2]:indptr[3]]).all()
    out = kernels.spmm_t(indptr, indices, data, dy, 5)
    assert numpy.isnan(out[indices[indptr[2]:indptr[3]], 1]).all()


def test_the_wide_layer_rule_takes_the_slices_with_the_same_bits():
    # 333 333 columns-like shape in miniature: many bands, few nonzeros per band.
    n_rows, n_cols, batch = 400, 4000, 2
    indptr, indices, data, dy, _ = _problem(n_rows, n_cols, batch, numpy.float32, 5,
                                            dead=[3, 7, 100])
    band = cpu._band_width(n_cols, batch, 4, 2)
    assert -(-n_cols // band) * n_rows > indices.size  # the rule picks the slices here
    expected = _spmm_t_reference(indptr, indices, data, dy, n_cols)
    got = kernels.spmm_t(indptr, indices, data, dy, n_cols, check=False, sorted_rows=True)
    assert numpy.array_equal(_bits(got), _bits(expected))
    scan = numpy.empty_like(expected)
    cpu._spmm_t_band_scan(indptr, indices, data, dy, scan, 2, cpu._live_rows(dy))
    assert numpy.array_equal(_bits(scan), _bits(expected))


def _spmm_reference(indptr, indices, data, x, bias, relu):
    """cpu.spmm's order: four terms a pass as (p0 + p1) + (p2 + p3), then one at a time."""
    out = numpy.zeros((indptr.size - 1, x.shape[1]), x.dtype)
    for r in range(out.shape[0]):
        k, end = indptr[r], indptr[r + 1]
        while k + 3 < end:
            p = [data[k + i] * x[indices[k + i]] for i in range(4)]
            out[r] += (p[0] + p[1]) + (p[2] + p[3])
            k += 4
        while k < end:
            out[r] += data[k] * x[indices[k]]
            k += 1
        out[r] += bias[r]
        if relu:
            out[r] = numpy.where(out[r] < 0, 0, out[r])
    return out


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_spmm_reading_zero_rows_of_x_as_plus_zeros_keeps_every_bit(dtype, relu):
    rng = numpy.random.default_rng(6)
    n_rows, n_cols, batch = 30, 12, 7
    indptr = numpy.arange(n_rows + 1, dtype=numpy.int32) * 9  # nine terms: 4 + 4 + 1
    indices = numpy.concatenate([numpy.sort(rng.choice(n_cols, 9, replace=False))
                                 for _ in range(n_rows)]).astype(numpy.int32)
    data = rng.integers(-3, 4, size=indices.size).astype(dtype)
    x = rng.integers(-2, 3, size=(n_cols, batch)).astype(dtype)
    for c in (0, 3, 4, 5, 11):  # dead inputs, negative zeros among them
        x[c] = numpy.where(rng.random(batch) < 0.5, -0.0, 0.0)
    bias = numpy.zeros(n_rows, dtype)
    bias[::2] = rng.integers(-2, 3, size=bias[::2].size)
    expected = _spmm_reference(indptr, indices, data, x, bias, relu)
    got = kernels.spmm(indptr, indices, data, x, bias=bias, relu=relu)
    assert numpy.array_equal(_bits(got), _bits(expected))
    assert list(cpu._live_rows(x)).count(0) == 5


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_sddmm_reading_zero_rows_of_x_as_plus_zeros_keeps_every_bit(dtype):
    indptr, indices, _, dy, x = _problem(25, 10, 6, dtype, 7, dead=[2])
    for c in (1, 6):
        x[c] = numpy.where(numpy.arange(6) % 2, -0.0, 0.0)
    expected = _sddmm_reference(indptr, indices, dy, x)
    got = kernels.sddmm(indptr, indices, dy, x)
    assert numpy.array_equal(_bits(got), _bits(expected))
