"""Gradient growth skips the blocks of rows whose |dL/dW| is bounded by the running
top-k's bar (Cauchy-Schwarz: ||dy_r|| * max_c ||x_c||), and must choose exactly what
forming and pushing every block chooses."""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn.csr import linear_keys
from cupynn.redistribution import gradient
from cupynn.redistribution.base import GradientProbe
from cupynn.redistribution.selection import StreamingTopK


def _probe(seed: int, width: int = 300, batch: int = 16):
    model = cupynn.MLP([20, width, width, 5], density=[0.3, 0.02, 1.0], seed=seed, device="cpu",
                       dtype="float64")
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((batch, 20))
    y = rng.integers(0, 5, batch)
    return model, GradientProbe(model, x, y, "cross_entropy")


def _grow(model, probe, index, k, block_elements, counter=None, rows=None):
    layer = model.sparse_layers[index]
    kept = linear_keys(layer.indptr, layer.indices, layer.in_features)
    top = StreamingTopK(numpy, k, dtype=numpy.float64, slack=4)
    if counter is not None:
        form = probe.dense_gradient_rows

        def counted(index, which, out=None):
            counter.append(1)
            if rows is not None:
                rows.append(len(range(300)[which]) if isinstance(which, slice) else len(which))
            return form(index, which, out=out)
        probe.dense_gradient_rows = counted
    gradient.push_layer_gradient(top, probe, index, layer, kept, 0, block_elements)
    return top.result()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_rows", [1, 7])
def test_skipping_bounded_blocks_chooses_the_same_keys(monkeypatch, seed, block_rows):
    monkeypatch.setattr(gradient, "MIN_BLOCK_ROWS", 1)
    model, probe = _probe(seed)
    layer = model.sparse_layers[1]
    dead = int((numpy.abs(probe.output_grads[1]).sum(axis=1) == 0).sum())
    assert dead > 30  # units the ReLU shut for the whole batch: their rows bound to 0
    with_bounds: list[int] = []
    chosen = _grow(model, probe, 1, 40, block_rows * layer.in_features, [], with_bounds)
    monkeypatch.setattr(gradient.Bounds, "of", classmethod(lambda cls, probe, index: None))
    model, probe = _probe(seed)
    without: list[int] = []
    blocks: list[int] = []
    expected = _grow(model, probe, 1, 40, block_rows * layer.in_features, blocks, without)
    assert numpy.array_equal(chosen, expected)
    assert len(blocks) == -(-layer.out_features // block_rows)
    assert sum(without) == layer.out_features
    assert sum(with_bounds) < sum(without)  # rows left out


def test_row_bounds_bound_every_score_and_vanish_at_shut_units():
    model, probe = _probe(3)
    bounds = gradient.Bounds.of(probe, 1).row_bounds() / gradient.BOUND_MARGIN
    dense = numpy.abs(probe.dense_gradient_rows(1, slice(None)))
    assert (dense.max(axis=1) <= bounds * (1 + 1e-12)).all()
    shut = numpy.abs(probe.output_grads[1]).sum(axis=1) == 0
    assert shut.any() and (bounds[shut] == 0).all() and (bounds[~shut] > 0).all()


def test_the_bar_is_the_kth_best_held_at_the_last_cut():
    top = StreamingTopK(numpy, 3, slack=1)
    assert top.bar == -numpy.inf
    top.push(numpy.array([5.0, 1.0, 4.0, 2.0]), 0)
    top.push(numpy.array([3.0, 0.5]), 4)
    top.push(numpy.array([6.0, 7.0]), 6)
    assert top.bar == 3.0  # the 3rd best of 5, 4, 2, 3 at the cut
    assert top.bar <= sorted(top.scores, reverse=True)[2]
    assert list(top.result()) == [0, 6, 7]


@pytest.mark.parametrize("min_rows", [1, 32])
def test_blocks_form_only_the_rows_that_can_beat_the_bar(monkeypatch, min_rows):
    monkeypatch.setattr(gradient, "MIN_BLOCK_ROWS", min_rows)
    model, probe = _probe(4)
    layer = model.sparse_layers[1]
    formed: list[int] = []
    chosen = _grow(model, probe, 1, 40, 8 * layer.in_features, [], formed)
    monkeypatch.setattr(gradient.Bounds, "of", classmethod(lambda cls, probe, index: None))
    model, probe = _probe(4)
    every: list[int] = []
    assert numpy.array_equal(chosen, _grow(model, probe, 1, 40, 8 * layer.in_features, [], every))
    assert sum(every) == layer.out_features
    assert sum(formed) < sum(every)
    assert max(every) == max(8, min_rows)  # a block holds MIN_BLOCK_ROWS rows at least


@pytest.mark.parametrize("seed", [0, 5])
@pytest.mark.parametrize("how", ["layer", "global"])
def test_growth_with_floor_and_column_bounds_chooses_what_forming_everything_does(
        monkeypatch, seed, how):
    # Whole growths, per layer and global, against the same growths with no bounds.
    def grow():
        model, probe = _probe(seed, width=400, batch=24)
        kept = [linear_keys(l.indptr, l.indices, l.in_features)[::2] for l in model.sparse_layers]
        counts = [l.nnz - int(k.shape[0]) for l, k in zip(model.sparse_layers, kept)]
        if how == "layer":
            return gradient.grow_by_gradient(model, kept, probe, 64 * 400, counts)
        return gradient.grow_by_gradient_globally(model, kept, probe, 64 * 400)
    formed: list[int] = []
    matmul = numpy.matmul

    def counting(a, b, *args, **kwargs):
        formed.append(a.shape[0] * b.shape[-1])
        return matmul(a, b, *args, **kwargs)
    monkeypatch.setattr(numpy, "matmul", counting)
    chosen = grow()
    with_bounds = sum(formed)
    formed.clear()
    monkeypatch.setattr(gradient.Bounds, "of", classmethod(lambda cls, probe, index: None))
    expected = grow()
    assert [numpy.array_equal(a, b) for a, b in zip(chosen, expected)] == [True] * len(expected)
    assert with_bounds < sum(formed)


def test_the_sampled_floor_is_at_most_the_kth_best_score():
    model, probe = _probe(6)
    layers = model.sparse_layers
    kept = [linear_keys(l.indptr, l.indices, l.in_features) for l in layers]
    every = []
    for i, layer in enumerate(layers):
        g = numpy.abs(probe.dense_gradient_rows(i, slice(None))).ravel()
        g[kept[i]] = -numpy.inf
        every.append(g)
    every = numpy.sort(numpy.concatenate(every))[::-1]
    for k in (1, 50, 2000):
        floor = gradient.sampled_floor(probe, layers, [0, 1], kept, k)
        assert numpy.isfinite(floor) and floor <= every[k - 1] * (1 + 1e-6)
    assert gradient.sampled_floor(probe, layers, [0, 1], kept, every.size + 1) == -numpy.inf
