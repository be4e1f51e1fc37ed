"""Sample weights in cupynn.fit: scikit-learn's definition, through training and growth.

A sample weight of k counts a row k times (0 removes it): with the whole data in
one batch, training on weighted rows is training on the rows repeated, up to the
order of floating-point sums, redistribution by gradients included (its growth
gradients are weighted too).
"""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn.distributed import Communicator


def _data(rng, n=24, features=10, classes=3):
    x = rng.standard_normal((n, features))
    y = rng.integers(0, classes, n)
    return x, y


def _train(x, y, weight=None, *, loss="cross_entropy", outputs=3, redistribution="gradient-global",
           epochs=3, redistribute_unit="epoch"):
    model = cupynn.MLP([x.shape[1], 16, outputs], density=0.4, seed=1, dtype="float64",
                       device="cpu")
    history = cupynn.fit(model, cupynn.Adam(model, lr=1e-2), (x, y), epochs=epochs,
                         batch_size=1000, loss=loss, seed=3, progress=False,
                         redistribution=redistribution, redistribute_unit=redistribute_unit,
                         sample_weight=weight)
    return model, history


def _assert_same_model(a, b, rtol):
    for la, lb in zip(a.layers, b.layers):
        numpy.testing.assert_array_equal(la.indptr, lb.indptr)
        numpy.testing.assert_array_equal(la.indices, lb.indices)
        numpy.testing.assert_allclose(la.data, lb.data, rtol=rtol, atol=1e-12)
        numpy.testing.assert_allclose(la.bias, lb.bias, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("loss, outputs", [("cross_entropy", 3), ("mean_squared_error", 2),
                                           ("binary_cross_entropy", 1)])
@pytest.mark.parametrize("redistribution", ["gradient-global", "magnitude+random"])
def test_integer_weights_train_as_repeated_rows(loss, outputs, redistribution):
    """Full-batch training (growth reads the batch's gradients) on rows weighted 0..3 ends
    with the model trained on the rows repeated that many times: the same topology after
    every redistribution, the same values up to rounding."""
    rng = numpy.random.default_rng(0)
    x, labels = _data(rng)
    y = {"cross_entropy": labels, "mean_squared_error": rng.standard_normal((24, 2)),
         "binary_cross_entropy": (labels > 0).astype(float)}[loss]
    w = rng.integers(0, 4, len(x))
    weighted, history = _train(x, y, w.astype(float), loss=loss, outputs=outputs,
                               redistribution=redistribution)
    repeated, _ = _train(x.repeat(w, axis=0), y.repeat(w, axis=0), loss=loss, outputs=outputs,
                         redistribution=redistribution)
    moves = [h["redistribution"] for h in history if "redistribution" in h]
    assert moves and all(sum(r["removed"] for r in m) > 0 for m in moves)
    _assert_same_model(weighted, repeated, rtol=1e-9)


def test_step_wise_redistribution_grows_from_the_weighted_batch():
    rng = numpy.random.default_rng(1)
    x, y = _data(rng)
    w = rng.integers(0, 4, len(x))
    weighted, history = _train(x, y, w.astype(float), redistribute_unit="step")
    repeated, _ = _train(x.repeat(w, axis=0), y.repeat(w, axis=0), redistribute_unit="step")
    assert any("redistributions" in h for h in history)
    _assert_same_model(weighted, repeated, rtol=1e-9)


def test_weights_change_what_is_learned_and_none_is_no_weights():
    rng = numpy.random.default_rng(2)
    x, y = _data(rng)
    plain, _ = _train(x, y)
    none, _ = _train(x, y, None)
    for a, b in zip(plain.layers, none.layers):  # the same bits
        numpy.testing.assert_array_equal(a.data, b.data)
    ones, _ = _train(x, y, numpy.ones(len(x)))  # unit weights: the same up to rounding
    _assert_same_model(plain, ones, rtol=1e-9)
    skewed, _ = _train(x, y, numpy.where(y == 0, 10.0, 0.1))
    assert not numpy.allclose(plain.layers[-1].bias, skewed.layers[-1].bias)


class _TwoRanks(Communicator):
    size, rank = 2, 0

    def allreduce(self, array, op="sum"):
        return array

    def allgather(self, obj):
        return [obj, obj]


@pytest.mark.parametrize("weight, kwargs, error, message", [
    (numpy.ones(5), {}, ValueError,
     r"The 'sample_weight' argument of fit must have shape \(24,\), one weight per training "
     r"row. Got \(5,\) instead."),
    (-numpy.ones(24), {}, ValueError, "must be finite and >= 0"),
    (numpy.full(24, numpy.nan), {}, ValueError, "must be finite and >= 0"),
    (numpy.zeros(24), {}, ValueError, "is zero for every row; at least one weight must be "
                                      "non-zero"),
    (numpy.array(["1"] * 24), {}, TypeError, "must be numbers"),
    (numpy.ones(24), {"comm": _TwoRanks()}, ValueError,
     r"sample_weight is not supported by data-parallel training \(2 ranks\) yet"),
])
def test_bad_sample_weights_are_refused_with_their_name(weight, kwargs, error, message):
    x, y = _data(numpy.random.default_rng(3))
    model = cupynn.MLP([10, 8, 3], density=0.5, device="cpu")
    with pytest.raises(error, match=message):
        cupynn.fit(model, cupynn.Adam(model), (x, y), epochs=1, batch_size=8, progress=False,
                   sample_weight=weight, **kwargs)


def test_a_sampler_with_sample_weights_is_refused():
    x, y = _data(numpy.random.default_rng(4))

    class Sampler:
        def sample_epoch(self, rng):
            return x, y

    model = cupynn.MLP([10, 8, 3], density=0.5, device="cpu")
    with pytest.raises(ValueError, match="needs train given as a pair"):
        cupynn.fit(model, cupynn.Adam(model), Sampler(), epochs=1, batch_size=8, progress=False,
                   sample_weight=numpy.ones(24))
