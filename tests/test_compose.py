"""Composed redistribution: the paper's presets equal their compositions bit for bit, and
each new removal and growth against a brute-force NumPy reference (float64)."""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn import to_numpy
from cupynn.redistribution import NAMES, compositions, create, parts
from cupynn.redistribution.selection import allocate
from test_redistribution import (_batch, _dense_twin_gradients, _entries, _prepare,
                                 _top_inactive, _train_step)

PRESETS = {"random": "magnitude+random", "gradient": "magnitude+gradient",
           "gradient-global": "magnitude+gradient/global", "loss": "magnitude+loss",
           "woodfisher": "woodfisher+proportional-random",
           "woodtaylor": "woodtaylor+proportional-random"}


def _trained_state(backend, name, seed):
    """Four epochs of fit (three redistributions), float64: every array of model and Adam."""
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((200, 14))
    y = rng.integers(0, 3, 200)
    model = cupynn.MLP([14, 16, 12, 3], density=0.3, seed=seed, dtype="float64", device=backend)
    optimizer = cupynn.Adam(model, lr=1e-2)
    history = cupynn.fit(model, optimizer, (x, y), epochs=6, batch_size=32, seed=seed,
                         progress=False, redistribution=name,
                         on_epoch_end=lambda m: m["epoch"] < 4)
    arrays = {**model.state_dict(),
              **{k: v for k, v in optimizer.state_dict().items() if hasattr(v, "shape")}}
    return arrays, [h.get("redistribution") for h in history]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_preset_is_its_composition_bit_for_bit(backend, preset, seed):
    ours, moves = _trained_state(backend, preset, seed)
    theirs, their_moves = _trained_state(backend, PRESETS[preset], seed)
    assert moves == their_moves and sum(r["added"] for r in moves[0]) > 0
    assert sorted(ours) == sorted(theirs)
    for key in ours:  # same topology, values and moments, to the bit
        numpy.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_names_and_parts():
    assert NAMES == ("static", "random", "gradient", "gradient-global", "loss", "woodfisher",
                     "woodtaylor")
    listed = parts()
    assert listed["drop"] == ("magnitude", "set", "mest", "random", "woodfisher", "woodtaylor")
    assert listed["grow"] == ("random", "gradient", "momentum", "loss", "proportional-random")
    assert listed["scope"]["momentum"] == ("global",) and listed["scope"]["loss"] == ("layer",)
    names = compositions()
    assert len(names) == len(set(names)) == 6 * 7  # random and gradient take both scopes
    assert "set+momentum" in names and "mest+gradient/global" in names
    for name in names:
        assert create(name).name == name
    assert create(drop="mest", grow="gradient", scope="global").name == "mest+gradient/global"


@pytest.mark.parametrize("call, error, message", [
    (lambda: create(drop="prune", grow="random"), ValueError,
     "Unknown removal 'prune'. Valid removals: magnitude, set, mest, random, woodfisher"),
    (lambda: create("set+regrow"), ValueError,
     "Unknown growth 'regrow'. Valid growths: random, gradient, momentum, loss"),
    (lambda: create(drop="set", grow="momentum", scope="layer"), ValueError,
     "The 'momentum' growth takes scope 'global'. Got 'layer' instead."),
    (lambda: create("magnitude+loss/global"), ValueError,
     "The 'loss' growth takes scope 'layer'. Got 'global' instead."),
    (lambda: create("set+random", block_size=3), TypeError,
     r"The 'set\+random' redistribution does not take \['block_size'\]. It takes: no param"),
    (lambda: create("mest+loss", damp=1.0), TypeError,
     "It takes: block_elements, mest_lambda, neuron_share"),
    (lambda: create("random", drop="set"), ValueError, "a name, or drop= and grow="),
    (lambda: create(drop="set"), ValueError, "needs a name"),
    (lambda: create("woodfisher+random", fisher_batches=0), ValueError,
     "The 'fisher_batches' parameter of WoodFisher must be in"),
    (lambda: create("mest+random", mest_lambda=-1.0), ValueError,
     "The 'mest_lambda' parameter of Composed must be in"),
    (lambda: create("rigl"), ValueError, "Or compose one: '<drop>\\+<grow>"),
])
def test_bad_compositions_are_refused_with_what_is_valid(call, error, message):
    with pytest.raises(error, match=message):
        call()


def _redistribute(model, optimizer, name, fraction, x, y, **params):
    return create(name, **params).redistribute(model, optimizer, fraction, x, y, "cross_entropy")


def test_set_removes_each_sign_nearest_zero_and_every_zero(backend, rng):
    """SET's reference keeps only w > smallestPositive or w < largestNegative: the round(ζ·n±)
    of each sign nearest 0 go, and so does every weight exactly 0."""
    model, optimizer = _prepare(backend, rng)
    xp = model.backend.xp
    for layer in model.sparse_layers:  # a few exact zeros, as dead inputs leave them
        layer.data[xp.asarray(rng.choice(layer.nnz, size=max(2, layer.nnz // 7),
                                         replace=False))] = 0
    before = [_entries(l) for l in model.sparse_layers]
    fraction = 0.3
    reports = _redistribute(model, optimizer, "set+random", fraction,
                            *_batch(backend, model, rng))
    for old, layer, report in zip(before, model.sparse_layers, reports):
        keys = sorted(old)  # CSR order
        zeros = {key for key in keys if old[key] == 0}
        assert zeros
        expected = set(zeros)
        for sign in (1, -1):
            side = [i for i, k in enumerate(keys) if sign * old[k] > 0]
            k = int(numpy.floor(fraction * len(side) + 0.5))
            expected |= {keys[i] for i in sorted(side, key=lambda i: (abs(old[keys[i]]), i))[:k]}
        new = _entries(layer)
        removed = set(old) - set(new)
        assert removed <= expected and all(new[key] == 0 for key in expected - removed)
        assert report["removed"] == report["added"] == len(expected)
        assert layer.nnz == len(old)  # the growth adds what the removal took


def test_mest_removes_the_smallest_magnitude_plus_gradient(backend, rng):
    model, optimizer = _prepare(backend, rng)
    x, y = _batch(backend, model, rng)
    grads, _ = _dense_twin_gradients(model, x, y)
    before = [_entries(l) for l in model.sparse_layers]
    fraction, lam = 0.4, 20.0  # a large lambda, so that the gradient decides some
    _redistribute(model, optimizer, "mest+random", fraction, x, y, mest_lambda=lam)
    decided_by_gradient = False
    for old, layer, grad in zip(before, model.sparse_layers, grads):
        keys = sorted(old)
        score = {key: abs(old[key]) + lam * abs(grad[key]) for key in keys}
        k = int(numpy.floor(fraction * len(keys) + 0.5))
        expected = {keys[i] for i in sorted(range(len(keys)),
                                            key=lambda i: (score[keys[i]], i))[:k]}
        by_magnitude = {keys[i] for i in sorted(range(len(keys)),
                                                key=lambda i: (abs(old[keys[i]]), i))[:k]}
        decided_by_gradient |= expected != by_magnitude
        new = _entries(layer)
        removed = set(old) - set(new)
        assert removed <= expected and all(new[key] == 0 for key in expected - removed)
    assert decided_by_gradient


def test_random_removal_takes_the_count_and_repeats_by_seed(backend, rng):
    model, optimizer = _prepare(backend, rng)
    x, y = _batch(backend, model, rng)
    before = [_entries(l) for l in model.sparse_layers]
    reports = _redistribute(model, optimizer, "random+gradient", 0.5, x, y)
    for old, report in zip(before, reports):
        assert report["removed"] == int(numpy.floor(0.5 * len(old) + 0.5))
    counts = numpy.zeros(40)
    for seed in range(400):  # each entry is equally likely to go
        layer = cupynn.SparseLinear.from_csr(numpy.array([0, 40], numpy.int32),
                                             numpy.arange(40, dtype=numpy.int32),
                                             numpy.linspace(1, 2, 40), numpy.zeros(1), (1, 80),
                                             device="cpu")
        from cupynn.redistribution.removal import random_drop

        counts += ~random_drop(numpy.random.default_rng(seed), layer, 0.25).keep
    assert counts.sum() == 400 * 10 and numpy.all(numpy.abs(counts - 100) < 40)


def test_momentum_shares_by_mean_moment_and_places_by_gradient(backend, rng):
    model, optimizer = _prepare(backend, rng, sizes=(14, 12, 9, 5))
    x, y = _batch(backend, model, rng)
    grads, _ = _dense_twin_gradients(model, x, y)
    before = [_entries(l) for l in model.sparse_layers]
    means = [float(numpy.abs(to_numpy(optimizer.moments(l, "data")[0])).mean())
             for l in model.sparse_layers]
    fraction = 0.35
    reports = _redistribute(model, optimizer, "magnitude+momentum", fraction, x, y)
    removed = [int(numpy.floor(fraction * len(old) + 0.5)) for old in before]
    capacity = [l.out_features * l.in_features - (len(old) - k)
                for l, old, k in zip(model.sparse_layers, before, removed)]
    shares = allocate(sum(removed), means, capacity)  # largest remainder, capped
    assert [r["added"] for r in reports] == list(shares) and shares.sum() == sum(removed)
    assert list(shares) != removed  # the shares moved weight between layers
    for old, layer, grad, k, share in zip(before, model.sparse_layers, grads, removed, shares):
        keys = sorted(old)
        gone = {keys[i] for i in sorted(range(len(keys)), key=lambda i: (abs(old[keys[i]]), i))[:k]}
        active = set(old) - gone
        assert set(_entries(layer)) - active == _top_inactive(grad, active, int(share))


def test_random_global_is_uniform_over_every_free_position():
    model = cupynn.MLP([6, 5, 4], density=0.5, seed=0, dtype="float64", device="cpu")
    sizes = [30, 20]
    hits = [numpy.zeros(s) for s in sizes]
    x = numpy.zeros((1, 6))
    for seed in range(600):
        m = cupynn.MLP([6, 5, 4], density=0.5, seed=0, dtype="float64", device="cpu")
        before = [set(_entries(l)) for l in m.sparse_layers]
        create("magnitude+random/global", seed=seed).redistribute(m, None, 0.4, x, [0])
        for h, layer, old in zip(hits, m.sparse_layers, before):
            for (r, c) in set(_entries(layer)) - old:
                h[r * layer.in_features + c] += 1
    free = [s - len(set(_entries(l))) for s, l in zip(sizes, model.sparse_layers)]
    # Totals in proportion to the free positions; within a layer, flat over free ones.
    share = hits[0].sum() / (hits[0].sum() + hits[1].sum())
    assert abs(share - free[0] / sum(free)) < 0.05
    for h in hits:
        used = h[h > 0]
        assert used.std() / used.mean() < 0.2


def test_second_order_per_layer_scope_removes_from_each_layer(backend, rng):
    model, optimizer = _prepare(backend, rng)
    redistributor = create("woodfisher+random", fisher_batches=2)
    redistributor.start_epoch(model, 3, True)
    for _ in range(3):
        _train_step(model, optimizer, redistributor, *_batch(backend, model, rng))
    assert redistributor.second.fisher.count == 2  # the last 2 of 3 batches
    before = [l.nnz for l in model.sparse_layers]
    reports = redistributor.redistribute(model, optimizer, 0.3, None, None)
    for nnz, report in zip(before, reports):
        assert report["removed"] == report["added"] == int(numpy.floor(0.3 * nnz + 0.5))


@pytest.mark.parametrize("m", [1, 2, 5])
def test_fisher_batches_use_exactly_the_last_m_gradients(backend, rng, m):
    from test_redistribution import _block_fisher

    model = cupynn.MLP([6, 5, 4], density=0.6, seed=3, dtype="float64", device=backend)
    redistributor = create("woodfisher", block_size=4, damp=0.5, fisher_batches=m)
    n_batches = 5
    redistributor.start_epoch(model, n_batches, True)
    n = sum(l.nnz for l in model.sparse_layers)
    grads = rng.standard_normal((n_batches, n))
    for g in grads:
        start = 0
        for layer in model.sparse_layers:
            layer.set_grad("data", backend.asarray(g[start:start + layer.nnz]))
            start += layer.nnz
        redistributor.observe(model)
    fisher = redistributor.fisher
    assert fisher.count == fisher.m == m
    dense = to_numpy(fisher.dense(backend.xp.arange(fisher.n_blocks)))
    expected = numpy.linalg.inv(_block_fisher(grads[-m:], n, 4, 0.5))
    for b in range(fisher.n_blocks):
        stop = min(n, (b + 1) * 4)
        numpy.testing.assert_allclose(dense[b][:stop - b * 4, :stop - b * 4],
                                      expected[b * 4:stop, b * 4:stop], rtol=1e-10, atol=1e-12)
