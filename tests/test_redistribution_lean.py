"""The lean redistribution machinery against plain references.

The template and the selection primitives work in chunks, with masks instead
of index arrays, with a filtering running top-k and a merge instead of a
sort (see ``cupynn/redistribution/base.py``). Each piece is checked here
against the straightforward computation it replaces, on small chunk sizes so
that every chunk boundary is crossed, and with many ties.
"""

from __future__ import annotations

import tracemalloc

import numpy
import pytest

import cupynn
from cupynn import kernels, losses, to_numpy
from cupynn.layers import SparseLinear
from cupynn.redistribution import base, create
from cupynn.redistribution.base import Drop, Redistributor, kept_keys, layer_keys
from cupynn.redistribution.fisher import BlockFisherInverse
from cupynn.redistribution.loss import LossGrowth
from cupynn.redistribution.selection import (StreamingTopK, bottom_k, kth_largest, kth_smallest,
                                             merge_sorted, sample_inactive, smallest_mask, top_k)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(base, "CHUNK", 7)


def _reference_top(scores, keys, k):
    """The k best (score, key) pairs, score descending then key ascending; -inf never."""
    pairs = sorted((-s, int(key)) for s, key in zip(scores, keys) if s > -numpy.inf)[:k]
    return sorted(key for _, key in pairs)


# ---------------------------------------------------------------- selection
@pytest.mark.parametrize("seed", range(6))
def test_smallest_mask_is_bottom_k(seed):
    rng = numpy.random.default_rng(seed)
    scores = rng.integers(0, 6, size=200).astype(numpy.float32)  # many ties
    for k in (0, 1, 17, 100, 199, 200, 250):
        mask = smallest_mask(scores, k)
        numpy.testing.assert_array_equal(numpy.flatnonzero(mask), bottom_k(scores, k))
        if 0 < k < 200:
            threshold = kth_smallest(scores.copy(), k, overwrite=True)
            numpy.testing.assert_array_equal(smallest_mask(scores, k, threshold), mask)
            assert kth_largest(scores, k) == numpy.sort(scores)[200 - k]


@pytest.mark.parametrize("slack", [1, 5, None])
@pytest.mark.parametrize("key_dtype", [numpy.int32, numpy.int64])
def test_streaming_top_k_with_cuts_matches_full_sort(rng, slack, key_dtype):
    scores = rng.integers(0, 15, size=3000).astype(numpy.float32)
    scores[rng.random(3000) < 0.2] = -numpy.inf
    keys = numpy.arange(3000)
    for k in (0, 1, 40, 333, 2500, 4000):
        top = StreamingTopK(numpy, k, dtype=numpy.float32, key_dtype=key_dtype, slack=slack)
        start = 0
        for size in rng.integers(1, 500, size=100):  # pushes of every size, some larger than k
            top.push(scores[start:start + size], start)
            start += size
            if start >= 3000:
                break
        top.push(scores[start:], start) if start < 3000 else None
        result = top.result()
        assert result.dtype == numpy.int64
        numpy.testing.assert_array_equal(result, _reference_top(scores, keys, k))


@pytest.mark.parametrize("seed", range(4))
def test_streaming_top_k_with_large_pushes_matches_full_sort(seed):
    # Pushes of up to 5000 scores for k up to 333: the sampled bar filters most of them.
    rng = numpy.random.default_rng(seed)
    scores = rng.integers(0, 40, size=30_000).astype(numpy.float32)
    if seed % 2:
        scores = rng.standard_normal(30_000).astype(numpy.float32)
    scores[rng.random(30_000) < 0.3] = -numpy.inf
    scores[:2000] = -numpy.inf  # a first push with nothing eligible
    keys = numpy.arange(30_000)
    for k in (1, 7, 40, 333):
        top = StreamingTopK(numpy, k, dtype=numpy.float32)
        start = 0
        while start < 30_000:
            size = int(rng.integers(1, 5000))
            top.push(scores[start:start + size], start)
            start += size
        numpy.testing.assert_array_equal(top.result(), _reference_top(scores, keys, k))


def test_merge_sorted(rng):
    values = numpy.sort(rng.choice(10_000, size=600, replace=False))
    for split in (0, 1, 300, 600):
        part = rng.permutation(600)
        a, b = numpy.sort(values[part[:split]]), numpy.sort(values[part[split:]])
        numpy.testing.assert_array_equal(merge_sorted(a, b), values)
        numpy.testing.assert_array_equal(merge_sorted(b, a), values)


def _sample_inactive_reference(rng, active_keys, n_positions, k):
    """The sampler as first written: unique() of the draws in draw order, every round."""
    n_active = len(active_keys)
    free = n_positions - n_active
    if free < 4 * k or n_positions <= 1 << 16:
        mask = numpy.ones(n_positions, dtype=bool)
        mask[active_keys] = False
        return numpy.sort(numpy.flatnonzero(mask)[rng.choice(free, size=k, replace=False)])
    picked = numpy.empty(0, dtype=numpy.int64)
    while len(picked) < k:
        need = k - len(picked)
        draw = rng.integers(0, n_positions, size=int(need * n_positions / free) + 16)
        pos = numpy.minimum(numpy.searchsorted(active_keys, draw), max(n_active - 1, 0))
        if n_active:
            draw = draw[active_keys[pos] != draw]
        merged = numpy.concatenate([picked, draw])
        _, first = numpy.unique(merged, return_index=True)
        picked = merged[numpy.sort(first)][:k]
    return numpy.sort(picked)


@pytest.mark.parametrize("seed", range(40))
def test_sample_inactive_draws_exactly_what_the_reference_draws(seed):
    rng = numpy.random.default_rng(seed)
    # Just above the enumeration limit, so that duplicate draws are common and
    # rounds often bring more new positions than still needed.
    n = 65_537 + int(rng.integers(0, 3000)) if seed % 2 else int(rng.integers(70_000, 400_000))
    active = numpy.sort(rng.choice(n, size=int(rng.uniform(0, 0.6) * n), replace=False))
    free = n - len(active)
    k = max(1, free // 4 - int(rng.integers(0, 60))) if seed % 3 else int(rng.integers(1, free // 4))
    expected = _sample_inactive_reference(numpy.random.default_rng(seed), active, n, k)
    got = sample_inactive(numpy.random.default_rng(seed), numpy, active.astype(numpy.int64), n, k)
    assert got.dtype == numpy.int64
    numpy.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- template
def _layer(rng, shape=(13, 11), density=0.4, dtype=numpy.float64):
    dense = rng.random(shape) < density
    dense[3] = False  # an empty row
    indptr = numpy.concatenate([[0], numpy.cumsum(dense.sum(axis=1))]).astype(numpy.int32)
    indices = numpy.nonzero(dense)[1].astype(numpy.int32)
    data = rng.standard_normal(len(indices)).astype(dtype)
    return SparseLinear.from_csr(indptr, indices, data, numpy.zeros(shape[0]), shape, device="cpu")


def test_kept_keys_in_chunks(rng, small_chunks):
    for _ in range(10):
        layer = _layer(rng)
        keep = rng.random(layer.nnz) < 0.6
        numpy.testing.assert_array_equal(kept_keys(layer, keep), layer_keys(layer)[keep])


def test_merge_places_survivors_and_new_entries_like_a_sort(rng, small_chunks):
    for _ in range(20):
        layer = _layer(rng)
        n_cols = layer.in_features
        keys = layer_keys(layer)
        keep = rng.random(layer.nnz) < 0.5
        values = rng.standard_normal(layer.nnz) if rng.random() < 0.5 else None
        kept = keys[keep]
        free = numpy.setdiff1d(numpy.arange(layer.out_features * n_cols), kept)
        new = numpy.sort(rng.choice(free, size=int(rng.integers(0, 15)), replace=False))
        indptr, indices, data, mapping = Redistributor._merge(layer, Drop(keep, values), kept, new)
        # Reference: concatenate, sort by key.
        all_keys = numpy.concatenate([kept, new])
        order = numpy.argsort(all_keys)
        source = numpy.concatenate([numpy.flatnonzero(keep), numpy.full(len(new), -1)])[order]
        old_values = layer.data if values is None else values
        numpy.testing.assert_array_equal(indices, (all_keys % n_cols)[order])
        numpy.testing.assert_array_equal(mapping, source)
        numpy.testing.assert_array_equal(data, numpy.where(source >= 0, old_values[source], 0.0))
        rows = all_keys[order] // n_cols
        numpy.testing.assert_array_equal(
            indptr, numpy.searchsorted(rows, numpy.arange(layer.out_features + 1)))
        assert indices.dtype == indptr.dtype == numpy.int32 and data.dtype == layer.dtype


@pytest.mark.parametrize("name", ["random", "gradient", "gradient-global", "loss", "woodfisher"])
def test_same_result_with_any_chunk_size(monkeypatch, name):
    def final():
        rng = numpy.random.default_rng(4)
        model = cupynn.MLP([30, 25, 20, 4], density=0.3, seed=1, dtype="float64", device="cpu")
        optimizer = cupynn.Adam(model, lr=1e-2)
        redistributor = create(name, seed=3)
        for _ in range(3):
            redistributor.start_epoch(model, 2, True)
            for _ in range(2):
                x = rng.standard_normal((16, 30))
                y = rng.integers(0, 4, size=16)
                _, grad = losses.cross_entropy(model.forward(x), y)
                model.backward(grad)
                redistributor.observe(model)
                optimizer.step()
            redistributor.redistribute(model, optimizer, 0.4, x, y)
        return [(to_numpy(l.indices).copy(), to_numpy(l.data).copy(),
                 *(to_numpy(a).copy() for a in optimizer.moments(l, "data")))
                for l in model.sparse_layers]

    big = final()
    monkeypatch.setattr(base, "CHUNK", 5)
    for a, b in zip(big, final()):
        for x, y in zip(a, b):
            numpy.testing.assert_array_equal(x, y)


def test_static_touches_nothing(rng):
    model = cupynn.MLP([10, 8, 3], density=0.5, device="cpu")
    arrays = [(l.indptr, l.indices, l.data) for l in model.sparse_layers]
    reports = create("static").redistribute(model, None, 0.5)
    assert all(r["removed"] == r["added"] == 0 for r in reports)
    for (indptr, indices, data), layer in zip(arrays, model.sparse_layers):
        assert layer.indptr is indptr and layer.indices is indices and layer.data is data
    with pytest.raises(ValueError, match="fraction"):
        create("static").redistribute(model, None, 1.5)


# ---------------------------------------------------------------- loss growth
class _Probe:
    def __init__(self, gradient):
        self.gradient = gradient

    def dense_gradient_rows(self, index, rows, out=None):
        return self.gradient[rows].copy()


def _grow_rows_reference(gradient, kept, rows, counts, n_cols):
    """Per row, a stable sort of -|g| with active columns last: the first count columns."""
    out = []
    active = set(kept.tolist())
    for r, c in sorted(zip(rows.tolist(), counts.tolist())):
        g = numpy.abs(gradient[r])
        cand = sorted((-g[col], col) for col in range(n_cols) if r * n_cols + col not in active)
        out += sorted(r * n_cols + col for _, col in cand[:c])
    return numpy.array(out, dtype=numpy.int64)


@pytest.mark.parametrize("seed", range(30))
def test_loss_rows_pick_the_largest_inactive_entries(seed):
    rng = numpy.random.default_rng(seed)
    n_rows, n_cols = int(rng.integers(1, 30)), int(rng.integers(1, 40))
    gradient = rng.integers(-3, 4, size=(n_rows, n_cols)).astype(numpy.float64)  # ties
    active = rng.random((n_rows, n_cols)) < rng.uniform(0, 0.9)
    kept = numpy.flatnonzero(active.ravel()).astype(numpy.int64)
    free = n_cols - active.sum(axis=1)
    candidates = numpy.flatnonzero(free > 0)
    if len(candidates) == 0:
        return
    rows = rng.choice(candidates, size=int(rng.integers(1, len(candidates) + 1)), replace=False)
    counts = numpy.array([int(rng.integers(1, free[r] + 1)) for r in rows])
    layer = SparseLinear(n_cols, n_rows, 1.0, device="cpu")
    expected = _grow_rows_reference(gradient, kept, rows, counts, n_cols)
    for block in (1, 5, 64, 1 << 18):
        got = LossGrowth._grow_rows(_Probe(gradient), 0, layer, kept, rows.copy(), counts.copy(),
                                    block)
        numpy.testing.assert_array_equal(got, expected)


# ---------------------------------------------------------------- Fisher
@pytest.mark.parametrize("n, B, chunk, cuts", [
    (23, 5, 2, (3, 11)), (40, 4, 2, (3, 20)), (7, 34, 2, (3, 3)), (700, 3, 2, (3, 350)),
    (2300, 34, 2, (3, 1150)),
    # 334 blocks in 6 tiles, chunks of 2 tiles; one part; five parts (padded to 8)
    (1000, 3, 128, ()), (1000, 3, 128, (1, 192, 193, 640)), (1000, 3, 128, (3, 500))])
def test_block_fisher_in_chunks_equals_one_chunk(rng, n, B, chunk, cuts):
    """The CPU path (one call reading the parts in place) against the GPU path's chunking
    (parts copied into a buffer a chunk of whole tiles at a time, the dispatcher per chunk)."""
    grads = rng.standard_normal((5, n))
    one = BlockFisherInverse(numpy, n, B, 0.3, numpy.float64, 5)
    many = BlockFisherInverse(numpy, n, B, 0.3, numpy.float64, 5, chunk_blocks=chunk)
    assert many.chunk_blocks == max(1, chunk // kernels.FISHER_TILE) * kernels.FISHER_TILE
    sums = [numpy.zeros(n), numpy.zeros(n)]
    edges = [0, *cuts, n]
    for g in grads:
        parts = [g[a:b] for a, b in zip(edges, edges[1:])]
        one.update(parts, sums[0])
        many._update_chunks(parts, tuple(len(part) for part in parts), sums[1])
    numpy.testing.assert_array_equal(one.finv, many.finv)
    numpy.testing.assert_allclose(sums[0], grads.sum(axis=0))
    numpy.testing.assert_array_equal(sums[0], sums[1])
    v = rng.standard_normal(n)
    expected = one.matvec(v)
    dense = one.dense(numpy.arange(one.n_blocks))
    padded = numpy.zeros(one.n_blocks * B)
    padded[:n] = v
    numpy.testing.assert_allclose(expected, numpy.einsum("bij,bj->bi", dense,
                                                         padded.reshape(-1, B)).ravel()[:n])
    in_place = v.copy()
    assert many.matvec(in_place, out=in_place) is in_place
    numpy.testing.assert_array_equal(in_place, expected)
    numpy.testing.assert_array_equal(many.diagonal(), numpy.diagonal(dense, axis1=1, axis2=2)
                                     .ravel()[:n])


# ---------------------------------------------------------------- memory
@pytest.mark.parametrize("name", ["random", "gradient", "gradient-global", "loss"])
def test_redistribution_temporaries_stay_small(name):
    """A redistribution of a 1000-1000-10 network at density 0.2 (202 000
    entries) allocates at most 45 bytes per entry at any time, counting the
    new CSR arrays and moments it builds before the old ones go (33 to 41
    measured; the first version took 77 to 81)."""
    model = cupynn.MLP([1000, 1000, 10], density=0.2, seed=0, device="cpu")
    optimizer = cupynn.Adam(model)
    rng = numpy.random.default_rng(0)
    x = rng.random((64, 1000)).astype(numpy.float32)
    y = rng.integers(0, 10, size=64)
    redistributor = create(name)
    _, grad = losses.cross_entropy(model.forward(x), y)
    model.backward(grad)
    optimizer.step()
    redistributor.redistribute(model, optimizer, 0.5, x, y)  # imports, first calls
    nnz = model.n_weights
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        redistributor.redistribute(model, optimizer, 0.5, x, y)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        if started:
            tracemalloc.stop()
    assert peak <= 45 * nnz, f"{name}: {peak / nnz:.1f} bytes per entry"


def test_block_fisher_rejects_a_bad_grad_sum():
    """The CPU kernel writes grad_sum without bounds checks: update() checks it first."""
    fisher = BlockFisherInverse(numpy, 10, 3, 0.3, numpy.float64, 2)
    parts = [numpy.ones(4), numpy.ones(6)]
    buffer = numpy.zeros(20)
    for bad in (buffer[:5], numpy.zeros(10, dtype=numpy.float32), buffer[::2]):
        with pytest.raises(ValueError, match=r"grad_sum must be a C-contiguous \(10,\) float64"):
            fisher.update(parts, bad)
    assert not buffer.any() and fisher.count == 0
    fisher.update(parts, buffer[:10])
    numpy.testing.assert_array_equal(buffer, [1] * 10 + [0] * 10)
