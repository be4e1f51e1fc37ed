"""Redistribution: invariants of every algorithm, and each against a brute-force
NumPy reference on small layers (float64 wherever values are compared)."""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn import losses, to_numpy
from cupynn.layers import Linear, SparseLinear
from cupynn.redistribution import NAMES, compositions, create, fraction_at
from cupynn.redistribution.fisher import BlockFisherInverse
from cupynn.redistribution.selection import StreamingTopK, allocate, sample_inactive, top_k
from cupynn.validation import check_csr

LOCAL = ("static", "random", "gradient", "loss")
GLOBAL = ("gradient-global", "woodfisher", "woodtaylor")
SECOND_ORDER = ("woodfisher", "woodtaylor")
# The presets and every valid composition of a removal and a growth.
EVERY = (*NAMES, *compositions())


def _keeps_layer_nnz(name):
    """Per-layer nnz preserved: the local presets and compositions of scope "layer"."""
    return name in LOCAL or ("+" in name and "/" not in name
                             and name.split("+")[1] in ("random", "gradient", "loss"))


def _second_order(name):
    """OBS updates move the survivors' values."""
    return name in SECOND_ORDER or name.split("+")[0] in SECOND_ORDER


def _model(backend, seed=0, sizes=(30, 25, 20, 4), density=0.2):
    # Sigmoid hidden units: no dead neuron, so every trained weight has nonzero
    # moments and a restarted (regrown) entry is recognisable.
    return cupynn.MLP(list(sizes), density=density, dense_layers=(-1,), seed=seed,
                      dtype="float64", device=backend, activation="sigmoid")


def _batch(backend, model, rng, n=16):
    x = rng.standard_normal((n, model.sizes[0]))
    y = rng.integers(0, model.sizes[-1], size=n)
    return x, y


def _train_step(model, optimizer, redistributor, x, y):
    _, grad = losses.cross_entropy(model.forward(x), model.backend.asarray(y))
    model.backward(grad)
    if redistributor is not None:
        redistributor.observe(model)
    optimizer.step()


def _observe_epoch(model, optimizer, redistributor, rng, batches=3):
    """What fit does in the epoch before a redistribution."""
    redistributor.start_epoch(model, batches, True)
    for _ in range(batches):
        _train_step(model, optimizer, redistributor, *_batch(None, model, rng))


def _entries(layer):
    """{(row, col): value} of a sparse layer."""
    indptr, indices, data = (to_numpy(a) for a in (layer.indptr, layer.indices, layer.data))
    rows = numpy.repeat(numpy.arange(layer.out_features), numpy.diff(indptr))
    return {(int(r), int(c)): float(v) for r, c, v in zip(rows, indices, data)}


def _moments(optimizer, layer):
    m, v = (to_numpy(a) for a in optimizer.moments(layer, "data"))
    indptr, indices = to_numpy(layer.indptr), to_numpy(layer.indices)
    rows = numpy.repeat(numpy.arange(layer.out_features), numpy.diff(indptr))
    return {(int(r), int(c)): (float(a), float(b)) for r, c, a, b in zip(rows, indices, m, v)}


# ---------------------------------------------------------------- invariants
def _run_rounds(backend, name, seed, rounds=6):
    """Many random redistributions with training in between; yields per round."""
    rng = numpy.random.default_rng(seed)
    model = _model(backend, seed=1)
    optimizer = cupynn.Adam(model, lr=1e-2)
    redistributor = create(name, seed=seed)
    for _ in range(rounds):
        _observe_epoch(model, optimizer, redistributor, rng)
        before = [_entries(layer) for layer in model.sparse_layers]
        moments = [_moments(optimizer, layer) for layer in model.sparse_layers]
        dense_before = to_numpy(model.layers[-1].weight).copy()
        x, y = _batch(backend, model, rng)
        fraction = float(rng.uniform(0.05, 0.6))
        reports = redistributor.redistribute(model, optimizer, fraction, x, y, "cross_entropy")
        yield model, optimizer, before, moments, dense_before, reports, fraction


@pytest.mark.parametrize("name", EVERY)
def test_invariants_after_every_redistribution(backend, name):
    for model, optimizer, before, moments, dense_before, reports, fraction in _run_rounds(
            backend, name, seed=3):
        layers = model.sparse_layers
        numpy.testing.assert_array_equal(to_numpy(model.layers[-1].weight), dense_before)
        total_before = sum(len(b) for b in before)
        assert sum(layer.nnz for layer in layers) == total_before
        for layer, old, old_moments, report in zip(layers, before, moments, reports):
            check_csr(layer.indptr, layer.indices, layer.shape)
            assert layer.data.dtype == numpy.float64 and layer.data.flags.c_contiguous
            assert report["nnz"] == layer.nnz
            assert report["removed"] == len(old) - (layer.nnz - report["added"])
            if _keeps_layer_nnz(name):
                assert layer.nnz == len(old)
            new = _entries(layer)
            new_moments = _moments(optimizer, layer)
            added = set(new) - set(old)
            removed = set(old) - set(new)
            # A position dropped and regrown at once stays in the pattern, restarted
            # (value and moments 0). An entry that already was all-zero (a weight of
            # a neuron with no path to the output) looks the same either way.
            both = set(new) & set(old)
            blank = {key for key in both if old[key] == 0.0 and old_moments[key] == (0.0, 0.0)}
            regrown = {key for key in both - blank
                       if new[key] == 0.0 and new_moments[key] == (0.0, 0.0)}
            for count, seen in ((report["added"], len(added)), (report["removed"], len(removed))):
                assert seen + len(regrown) <= count <= seen + len(regrown) + len(blank)
            for key in added:
                assert new[key] == 0.0 and new_moments[key] == (0.0, 0.0)
            for key in both - regrown:
                assert new_moments[key] == old_moments[key]
                if not _second_order(name):
                    assert new[key] == old[key]
        if name == "static":
            assert all(r["removed"] == r["added"] == 0 for r in reports)
        else:
            assert sum(r["removed"] for r in reports) > 0


@pytest.mark.parametrize("name", EVERY)
def test_same_seed_same_result(backend, name):
    def final(seed):
        *_, last = _run_rounds(backend, name, seed=seed, rounds=3)
        model = last[0]
        return [(to_numpy(l.indices).copy(), to_numpy(l.data).copy()) for l in model.sparse_layers]

    for (ia, da), (ib, db) in zip(final(5), final(5)):
        numpy.testing.assert_array_equal(ia, ib)
        numpy.testing.assert_array_equal(da, db)


@pytest.mark.parametrize("name", EVERY)
def test_fraction_zero_and_rounding_to_zero_move_nothing(backend, name, rng):
    model = _model(backend)
    optimizer = cupynn.Adam(model)
    redistributor = create(name)
    for fraction in (0.0, 1e-4):
        _observe_epoch(model, optimizer, redistributor, rng)
        before = [_entries(l) for l in model.sparse_layers]
        reports = redistributor.redistribute(model, optimizer, fraction, *_batch(backend, model, rng))
        assert all(r["removed"] == 0 and r["added"] == 0 for r in reports)
        if not _second_order(name):  # the OBS update moves values even when k = 0
            assert [_entries(l) for l in model.sparse_layers] == before


# ---------------------------------------------------------------- references
def _dense_twin_gradients(model, x, y):
    """Dense weight gradients and error signals from an all-dense copy (independent path)."""
    dense = cupynn.MLP(list(model.sizes), density=1.0, dense_layers=range(len(model.layers)),
                       dtype="float64", device="cpu")
    for src, dst in zip(model.layers, dense.layers):
        dst.weight = src.to_dense().astype(numpy.float64)
        dst.bias = to_numpy(src.bias).astype(numpy.float64).copy()
    _, grad = losses.cross_entropy(dense.forward(x), y)
    dense.backward(grad)
    return [l.grad_weight for l in dense.layers], [l.grad_bias for l in dense.layers]


def _smallest_abs(layer_entries, k):
    """Reference drop: the k smallest |w|, ties by CSR position."""
    keys = sorted(layer_entries)  # CSR order is (row, col) order
    order = sorted(range(len(keys)), key=lambda i: (abs(layer_entries[keys[i]]), i))
    return {keys[i] for i in order[:k]}


def _top_inactive(grad, active, k):
    """Reference growth: the k largest |g| at inactive positions, ties by key."""
    n_cols = grad.shape[1]
    cand = [(-abs(grad[r, c]), r * n_cols + c) for r in range(grad.shape[0])
            for c in range(n_cols) if (r, c) not in active]
    return {divmod(key, n_cols) for _, key in sorted(cand)[:k]}


def _prepare(backend, rng, sizes=(12, 10, 8, 3)):
    model = cupynn.MLP(list(sizes), density=0.3, seed=2, dtype="float64", device=backend,
                       init="fan_in")
    optimizer = cupynn.Adam(model, lr=0.05)
    for _ in range(3):  # spread the weights so |w| has no ties
        _train_step(model, optimizer, None, *_batch(backend, model, rng))
    return model, optimizer


@pytest.mark.parametrize("name", ["random", "gradient", "gradient-global", "loss"])
def test_removed_set_is_smallest_magnitude_per_layer(backend, rng, name):
    model, optimizer = _prepare(backend, rng)
    before = [_entries(l) for l in model.sparse_layers]
    fraction = 0.35
    create(name).redistribute(model, optimizer, fraction, *_batch(backend, model, rng))
    for old, layer in zip(before, model.sparse_layers):
        k = int(numpy.floor(fraction * len(old) + 0.5))
        expected = _smallest_abs(old, k)
        removed = set(old) - set(_entries(layer))
        # A dropped entry may be regrown at once (it is inactive after the drop).
        assert removed <= expected
        regrown = expected - removed
        assert all(_entries(layer)[key] == 0.0 for key in regrown)


def test_gradient_grows_top_k_of_masked_dense_gradient(backend, rng):
    model, optimizer = _prepare(backend, rng)
    x, y = _batch(backend, model, rng)
    grads, _ = _dense_twin_gradients(model, x, y)
    before = [_entries(l) for l in model.sparse_layers]
    fraction = 0.3
    create("gradient").redistribute(model, optimizer, fraction, x, y, "cross_entropy")
    for old, layer, grad in zip(before, model.sparse_layers, grads):
        k = int(numpy.floor(fraction * len(old) + 0.5))
        active_after_drop = set(old) - _smallest_abs(old, k)
        expected = _top_inactive(grad, active_after_drop, k)
        assert set(_entries(layer)) - active_after_drop == expected


def test_gradient_global_equals_full_sort_over_all_layers(backend, rng):
    model, optimizer = _prepare(backend, rng, sizes=(14, 12, 9, 5))
    x, y = _batch(backend, model, rng)
    grads, _ = _dense_twin_gradients(model, x, y)
    before = [_entries(l) for l in model.sparse_layers]
    fraction = 0.4
    redistributor = create("gradient-global", block_elements=7)  # many blocks per layer
    redistributor.redistribute(model, optimizer, fraction, x, y, "cross_entropy")
    candidates, active_after = [], []
    total = 0
    for li, (old, grad) in enumerate(zip(before, grads)):
        k = int(numpy.floor(fraction * len(old) + 0.5))
        total += k
        active = set(old) - _smallest_abs(old, k)
        active_after.append(active)
        offset = sum(g.size for g in grads[:li])
        candidates += [(-abs(grad[r, c]), offset + r * grad.shape[1] + c, li, (r, c))
                       for r in range(grad.shape[0]) for c in range(grad.shape[1])
                       if (r, c) not in active]
    chosen = sorted(candidates)[:total]
    for li, layer in enumerate(model.sparse_layers):
        expected = {pos for *_, l, pos in chosen if l == li}
        assert set(_entries(layer)) - active_after[li] == expected
    assert sum(l.nnz for l in model.sparse_layers) == sum(len(b) for b in before)


def test_loss_picks_top_neurons_and_spreads_growth_equally(backend, rng):
    model, optimizer = _prepare(backend, rng, sizes=(20, 16, 10, 3))
    x, y = _batch(backend, model, rng)
    grads, signals = _dense_twin_gradients(model, x, y)
    before = [_entries(l) for l in model.sparse_layers]
    fraction = 0.3
    create("loss").redistribute(model, optimizer, fraction, x, y, "cross_entropy")
    for old, layer, grad, signal in zip(before, model.sparse_layers, grads, signals):
        k = int(numpy.floor(fraction * len(old) + 0.5))
        n_rows = layer.out_features
        m = max(1, int(numpy.floor(0.3 * n_rows + 0.5)))
        ranking = sorted(range(n_rows), key=lambda r: (-abs(signal[r]), r))
        active = set(old) - _smallest_abs(old, k)
        shares = {r: k // m + (i < k % m) for i, r in enumerate(ranking[:m])}
        expected = set()
        for r, share in shares.items():
            row = numpy.full((1, grad.shape[1]), 0.0)
            row[0] = grad[r]
            expected |= {(r, c) for _, c in _top_inactive(row, {(0, c) for (rr, c) in active
                                                                 if rr == r}, share)}
        assert set(_entries(layer)) - active == expected


def test_loss_surplus_moves_to_other_neurons_when_a_row_is_full(backend, rng):
    # A 4 x 3 layer whose most active neuron has only one free column.
    layer = SparseLinear.from_csr(numpy.array([0, 2, 3, 4, 5], numpy.int32),
                                  numpy.array([0, 1, 0, 1, 2], numpy.int32),
                                  numpy.array([5.0, 6.0, 0.1, 0.2, 0.3]), numpy.zeros(4), (4, 3),
                                  device=backend)
    model = cupynn.MLP([3, 4, 2], density=1.0, dense_layers=(1,), dtype="float64", device=backend)
    model.layers[0] = layer
    x, y = _batch(backend, model, rng)
    reports = create("loss", neuron_share=0.25).redistribute(model, None, 0.6, x, y)
    assert reports[0]["removed"] == reports[0]["added"] == 3
    check_csr(layer.indptr, layer.indices, layer.shape)
    assert layer.nnz == 5


def test_random_growth_is_uniform_over_inactive_positions():
    xp = numpy
    active = numpy.array([0, 3, 4, 9], dtype=numpy.int64)
    counts = numpy.zeros(12)
    rng = numpy.random.default_rng(0)
    for _ in range(3000):
        keys = sample_inactive(rng, xp, active, 12, 3)
        assert len(set(keys.tolist())) == 3 and not set(keys.tolist()) & set(active.tolist())
        counts[keys] += 1
    free = numpy.setdiff1d(numpy.arange(12), active)
    expected = 3000 * 3 / len(free)
    assert numpy.all(numpy.abs(counts[free] - expected) < 0.08 * expected)
    # The rejection path (many free positions) is uniform too.
    big_active = numpy.arange(0, 200_000, 7, dtype=numpy.int64)
    keys = sample_inactive(rng, xp, big_active, 200_000, 20_000)
    assert len(numpy.unique(keys)) == 20_000 and not numpy.isin(keys, big_active).any()
    hist = numpy.histogram(keys, bins=10, range=(0, 200_000))[0]
    assert numpy.all(numpy.abs(hist - 2000) < 200)


def test_top_k_and_streaming_top_k_match_full_sort(rng):
    scores = rng.integers(0, 20, size=500).astype(float)  # many ties
    scores[rng.random(500) < 0.2] = -numpy.inf
    k = 70
    reference = sorted(range(500), key=lambda i: (-scores[i], i))[:k]
    numpy.testing.assert_array_equal(top_k(scores, k), sorted(reference))
    top = StreamingTopK(numpy, k)
    for start in range(0, 500, 37):
        top.push(scores[start:start + 37], start)
    numpy.testing.assert_array_equal(top.result(), sorted(reference))
    with pytest.raises(ValueError, match="increasing order"):
        top.push(scores[:5], 3)


def test_allocate_is_proportional_and_gives_surplus_to_others():
    numpy.testing.assert_array_equal(allocate(10, [1, 1, 2], [100, 100, 100]), [3, 2, 5])
    numpy.testing.assert_array_equal(allocate(10, [1, 1, 2], [100, 100, 1]), [5, 4, 1])
    with pytest.raises(ValueError, match="Cannot place 10 entries in a capacity of 6"):
        allocate(10, [1, 1], [3, 3])


# ---------------------------------------------------------------- second order
@pytest.mark.parametrize("n, B", [(23, 5), (700, 3)])  # one tile; 234 blocks in 4 tiles
def test_sherman_morrison_blocks_equal_direct_inverse(backend, rng, n, B):
    damp, m = 0.3, 6
    fisher = BlockFisherInverse(backend.xp, n, B, damp, numpy.float64, m)
    grads = rng.standard_normal((m, n))
    grads[:, 3 * B:4 * B] = 0  # a dead block stays λ⁻¹I
    for g in grads:
        fisher.update([backend.asarray(g[:10]), backend.asarray(g[10:n - 1]),
                       backend.asarray(g[n - 1:])])
    padded = numpy.zeros((m, fisher.n_blocks * B))
    padded[:, :n] = grads
    dense = to_numpy(fisher.dense(backend.xp.arange(fisher.n_blocks)))
    for b in range(fisher.n_blocks):
        G = padded[:, b * B:(b + 1) * B]
        expected = numpy.linalg.inv(damp * numpy.eye(B) + G.T @ G / m)
        numpy.testing.assert_allclose(dense[b], expected, rtol=1e-10, atol=1e-12)
    numpy.testing.assert_array_equal(dense[3], numpy.eye(B) / damp)  # the dead block, exactly
    assert fisher.count == m


def _block_fisher(fisher_grads, n, B, damp):
    """Dense block-diagonal F (n x n) from the gradients, independently."""
    m = len(fisher_grads)
    F = numpy.zeros((n, n))
    for start in range(0, n, B):
        stop = min(n, start + B)
        G = fisher_grads[:, start:stop]
        F[start:stop, start:stop] = damp * numpy.eye(stop - start) + G.T @ G / m
    return F


def _second_order_setup(backend, rng, name, joint=False, m=4, B=6, damp=0.5):
    """A model, its concatenated weights w0, the gradients fed to the Fisher and F."""
    model = cupynn.MLP([6, 5, 4], density=0.6, seed=3, dtype="float64", device=backend,
                       init="fan_in")
    redistributor = create(name, block_size=B, damp=damp, joint=joint)
    redistributor.start_epoch(model, m, True)
    n = sum(l.nnz for l in model.sparse_layers)
    grads = rng.standard_normal((m, n)) * 0.7
    for g in grads:
        start = 0
        for layer in model.sparse_layers:
            layer.set_grad("data", backend.asarray(g[start:start + layer.nnz]))
            start += layer.nnz
        redistributor.observe(model)
    w0 = numpy.concatenate([to_numpy(l.data) for l in model.sparse_layers])
    return model, redistributor, w0, grads, _block_fisher(grads, n, B, damp)


def test_woodfisher_removal_changes_quadratic_loss_by_rho(backend, rng):
    """At a minimum (ḡ = 0) of L(w) = ½ (w − w0)ᵀ F (w − w0), removing q by OBS
    raises L by exactly ρ_q = w_q² / (2 [F⁻¹]_qq), the smallest ρ."""
    model, redistributor, w0, _, F = _second_order_setup(backend, rng, "woodfisher")
    Finv = numpy.linalg.inv(F)
    rho = w0 ** 2 / (2 * numpy.diag(Finv))
    drops = redistributor.drop(model, 1.0 / len(w0), None)  # exactly one weight
    keep = numpy.concatenate([to_numpy(d.keep) for d in drops])
    w1 = numpy.concatenate([to_numpy(d.values) for d in drops])
    (q,) = numpy.flatnonzero(~keep)
    assert q == numpy.argmin(rho)
    assert w1[q] == 0.0
    delta = w1 - w0
    assert 0.5 * delta @ F @ delta == pytest.approx(rho[q], rel=1e-10)


@pytest.mark.parametrize("joint", [False, True])
def test_woodtaylor_update_is_the_constrained_minimiser(backend, rng, joint):
    """L(w) = ḡᵀ(w − w0) + ½ (w − w0)ᵀ F (w − w0): the new weights minimise L
    subject to the removed ones being 0 (exact for one removal per block, and
    for several with joint=True)."""
    model, redistributor, w0, grads, F = _second_order_setup(backend, rng, "woodtaylor",
                                                             joint=joint)
    g_bar = grads.mean(axis=0)
    n = len(w0)
    fraction = (1 if not joint else 4) / n
    drops = redistributor.drop(model, fraction, None)
    keep = numpy.concatenate([to_numpy(d.keep) for d in drops])
    w1 = numpy.concatenate([to_numpy(d.values) for d in drops])
    removed = numpy.flatnonzero(~keep)
    if joint:  # the test needs several removals inside one block
        assert len(set(removed // 6)) < len(removed)
    # KKT: [F  E; Eᵀ 0] [δ; μ] = [−ḡ; −w0_Q]
    E = numpy.zeros((n, len(removed)))
    E[removed, numpy.arange(len(removed))] = 1
    kkt = numpy.block([[F, E], [E.T, numpy.zeros((len(removed),) * 2)]])
    rhs = numpy.concatenate([-g_bar, -w0[removed]])
    delta = numpy.linalg.solve(kkt, rhs)[:n]
    numpy.testing.assert_allclose(w1, w0 + delta, rtol=1e-9, atol=1e-12)
    assert numpy.all(w1[removed] == 0.0)
    # And the removed set has the smallest ρ of the Taylor statistic.
    Finv = numpy.linalg.inv(F)
    r = w0 - Finv @ g_bar
    rho = r ** 2 / (2 * numpy.diag(Finv))
    numpy.testing.assert_array_equal(numpy.sort(removed), numpy.sort(numpy.argsort(rho)[:len(removed)]))


def test_woodfisher_joint_removal_of_a_block_pair(backend, rng):
    """Joint OBS inside each block: L rises by ½ w_Qᵀ (F⁻¹_QQ)⁻¹ w_Q summed over blocks,
    the exact optimum of removing Q."""
    model, redistributor, w0, _, F = _second_order_setup(backend, rng, "woodfisher", joint=True,
                                                         B=20)
    drops = redistributor.drop(model, 3 / len(w0), None)
    keep = numpy.concatenate([to_numpy(d.keep) for d in drops])
    w1 = numpy.concatenate([to_numpy(d.values) for d in drops])
    Q = numpy.flatnonzero(~keep)
    Finv = numpy.linalg.inv(F)
    delta = w1 - w0
    expected = 0.0
    for block in set(Q // 20):  # blocks are independent: their optima add up
        Qb = Q[Q // 20 == block]
        expected += 0.5 * w0[Qb] @ numpy.linalg.solve(Finv[numpy.ix_(Qb, Qb)], w0[Qb])
    assert 0.5 * delta @ F @ delta == pytest.approx(expected, rel=1e-9)
    assert len(Q) == 3
    assert numpy.all(w1[Q] == 0)


def test_woodfisher_adds_in_proportion_to_layer_size(backend, rng):
    model = cupynn.MLP([40, 30, 10, 3], density=0.2, dense_layers=(-1,), dtype="float64",
                       device=backend)
    optimizer = cupynn.Adam(model)
    redistributor = create("woodfisher", seed=1)
    _observe_epoch(model, optimizer, redistributor, rng)
    reports = redistributor.redistribute(model, optimizer, 0.3)
    total = sum(r["removed"] for r in reports)
    sizes = numpy.array([40 * 30, 30 * 10])
    expected = allocate(total, sizes, sizes - numpy.array(
        [r["nnz"] - r["added"] for r in reports]))
    assert [r["added"] for r in reports] == expected.tolist()
    assert sum(r["added"] for r in reports) == total


def test_woodfisher_without_fisher_says_how(backend, rng):
    model = _model(backend)
    with pytest.raises(RuntimeError, match=r"call start_epoch\(model, n_batches, True\)"):
        create("woodfisher").redistribute(model, None, 0.2)


# ---------------------------------------------------------------- edges
def test_gradient_global_gives_full_layer_share_to_others(backend, rng):
    """A layer at density 1 has no free position: growth goes elsewhere."""
    model = cupynn.MLP([6, 8, 5, 3], density=[1.0, 0.3, 0.5], dtype="float64", device=backend)
    x, y = _batch(backend, model, rng)
    nnz = sum(model.nnz)
    reports = create("gradient-global").redistribute(model, None, 0.5, x, y)
    assert sum(model.nnz) == nnz
    assert reports[0]["added"] <= reports[0]["removed"]


def test_neuron_without_inputs_is_allowed_and_counted(backend, rng):
    model = cupynn.MLP([6, 4, 2], density=1 / 6, dense_layers=(1,), dtype="float64",
                       device=backend)
    layer = model.layers[0]
    layer.data[...] = backend.asarray([1e-9, 1.0, 1.0, 1.0])  # row 0's only weight is smallest
    # Take the only input of neuron 0 and give it elsewhere (woodfisher-style global growth).
    redistributor = create("random", seed=0)
    reports = redistributor.redistribute(model, None, 0.25)
    assert reports[0]["removed"] == 1 and reports[0]["added"] == 1
    assert reports[0]["empty_rows"] == int((numpy.diff(to_numpy(layer.indptr)) == 0).sum())


@pytest.mark.parametrize("name, params, error, message", [
    ("rigl", {}, ValueError, "Unknown redistribution 'rigl'. Valid names: static, random, gradient, "
                             "gradient-global, loss, woodfisher, woodtaylor."),
    ("woodfisher", {"block_size": 0}, ValueError,
     r"The 'block_size' parameter of WoodFisher must be in \[1, inf\]. Got 0 instead."),
    ("woodtaylor", {"damp": 0.0}, ValueError,
     r"The 'damp' parameter of WoodTaylor must be in \(0, inf\). Got 0.0 instead."),
    ("loss", {"neuron_share": 0.0}, ValueError,
     r"The 'neuron_share' parameter of LossGrowth must be in \(0, 1\]. Got 0.0 instead."),
    ("loss", {"neuron_share": 1.5}, ValueError, r"must be in \(0, 1\]. Got 1.5 instead."),
    ("random", {"seed": -1}, ValueError, r"The 'seed' parameter of RandomGrowth must be in \[0"),
    ("random", {"block_size": 3}, TypeError, "The 'random' redistribution does not take"),
])
def test_create_rejects_bad_parameters(name, params, error, message):
    with pytest.raises(error, match=message):
        create(name, **params)


def test_fraction_outside_unit_interval_is_rejected(backend):
    with pytest.raises(ValueError, match=r"The 'fraction' parameter of RandomGrowth.redistribute "
                                         r"must be in \[0, 1\]. Got 1.5 instead."):
        create("random").redistribute(_model(backend), None, 1.5)


# ---------------------------------------------------------------- schedule and fit
def test_schedule_fractions():
    # 8 epochs: E_end = 6; after epochs 1..5, α₀ ½ (1 + cos(π e / 6)); none from 6 on.
    got = [fraction_at(e, 8, alpha=0.5) for e in range(1, 9)]
    expected = [0.5 * 0.5 * (1 + numpy.cos(numpy.pi * e / 6)) for e in range(1, 6)] + [0, 0, 0]
    numpy.testing.assert_allclose(got, expected, rtol=1e-15)
    assert got[0] == pytest.approx(0.4665063509461097)
    assert [fraction_at(e, 8, every=2) > 0 for e in range(1, 9)] == [False, True, False, True,
                                                                     False, False, False, False]
    assert fraction_at(1, 10, alpha=0.0) == 0.0
    with pytest.raises(ValueError, match="The 'every' parameter of fraction_at"):
        fraction_at(1, 8, every=0)


@pytest.mark.parametrize("name", ["gradient-global", "woodtaylor"])
def test_fit_redistributes_on_schedule_and_records_induced_loss(backend, rng, name):
    x = rng.standard_normal((200, 30)).astype(numpy.float32)
    y = (x[:, :4].argmax(axis=1)).astype(numpy.int64)
    model = cupynn.MLP([30, 25, 20, 4], density=0.3, dense_layers=(-1,), seed=0, device=backend)
    history = cupynn.fit(model, cupynn.Adam(model, lr=1e-2), (x, y), (x, y), epochs=4,
                         batch_size=40, progress=False, redistribution=name, alpha=0.4)
    # E_end = 3: redistributions after epochs 1 and 2 only.
    assert [h.get("fraction", 0.0) for h in history] == pytest.approx(
        [fraction_at(e, 4, alpha=0.4) for e in range(1, 5)])
    for h in history[:2]:
        assert numpy.isfinite(h["induced_loss_before"]) and numpy.isfinite(h["induced_loss_after"])
        assert h["redistribution_seconds"] > 0
        assert sum(r["removed"] for r in h["redistribution"]) > 0
        assert sum(h["nnz"][:3]) == sum(history[0]["nnz"][:3])
    for h in history[2:]:
        assert "induced_loss_before" not in h and h["redistribution_seconds"] == 0.0
    assert history[-1]["train_loss"] < history[0]["train_loss"]
