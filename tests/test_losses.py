"""Loss values against direct formulas, and stability at extreme logits."""

from __future__ import annotations

import numpy
import pytest

from cupynn import losses, to_numpy


def test_cross_entropy_value(backend):
    logits = numpy.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = numpy.array([2, 0])
    loss, grad = losses.cross_entropy(backend.asarray(logits), backend.asarray(labels))
    p = numpy.exp(logits) / numpy.exp(logits).sum(1, keepdims=True)
    assert float(loss) == pytest.approx(-(numpy.log(p[0, 2]) + numpy.log(p[1, 0])) / 2, rel=1e-12)
    expected = p.copy()
    expected[[0, 1], labels] -= 1
    numpy.testing.assert_allclose(to_numpy(grad), expected / 2, rtol=1e-12)


def test_binary_cross_entropy_value(backend):
    z = numpy.array([-2.0, 0.5, 3.0])
    y = numpy.array([0.0, 1.0, 1.0])
    loss, grad = losses.binary_cross_entropy(backend.asarray(z), backend.asarray(y))
    s = 1 / (1 + numpy.exp(-z))
    assert float(loss) == pytest.approx(-numpy.mean(y * numpy.log(s) + (1 - y) * numpy.log(1 - s)),
                                        rel=1e-12)
    numpy.testing.assert_allclose(to_numpy(grad), (s - y) / 3, rtol=1e-12)


def test_mean_squared_error_value(backend):
    pred = numpy.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]])
    target = numpy.array([[0.0, 2.0], [1.0, 1.0], [3.0, -2.0]])
    loss, grad = losses.mean_squared_error(backend.asarray(pred), backend.asarray(target))
    assert float(loss) == pytest.approx(numpy.mean((pred - target) ** 2), rel=1e-14)
    numpy.testing.assert_allclose(to_numpy(grad), 2 * (pred - target) / 6, rtol=1e-14)
    one, _ = losses.mean_squared_error(backend.asarray(pred[:, :1]), backend.asarray(target[:, 0]))
    assert float(one) == pytest.approx(numpy.mean((pred[:, 0] - target[:, 0]) ** 2), rel=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_losses_stable_at_huge_logits(backend, dtype):
    big = numpy.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]], dtype=dtype)
    loss, grad = losses.cross_entropy(backend.asarray(big), backend.asarray(numpy.array([1, 1])))
    # Row 0 is wrong by 2e4, row 1 is right: mean loss 1e4.
    assert float(loss) == pytest.approx(1e4, rel=1e-6)
    assert numpy.isfinite(to_numpy(grad)).all()
    z = numpy.array([1e4, -1e4, 1e4, -1e4], dtype=dtype)
    y = numpy.array([1, 0, 0, 1], dtype=dtype)
    loss, grad = losses.binary_cross_entropy(backend.asarray(z), backend.asarray(y))
    # Two right by 1e4 (loss 0), two wrong by 1e4 (loss 1e4 each).
    assert float(loss) == pytest.approx(5e3, rel=1e-6)
    numpy.testing.assert_allclose(to_numpy(grad), [0, 0, 0.25, -0.25], atol=1e-7)


@pytest.mark.parametrize("call, error, message", [
    (lambda: losses.cross_entropy(numpy.zeros((2, 3)), numpy.array([0, 3])), ValueError,
     r"The 'labels' argument of cross_entropy must be in \[0, 3\). Got values in \[0, 3\]"),
    (lambda: losses.cross_entropy(numpy.zeros((2, 3)), numpy.array([0])), ValueError,
     r"must have shape \(2,\)"),
    (lambda: losses.cross_entropy(numpy.zeros(3), numpy.array([0, 1, 2])), ValueError,
     r"must have shape \(batch, classes\)"),
    (lambda: losses.cross_entropy(numpy.zeros((2, 3)), numpy.array([0.0, 1.0])), TypeError,
     "must be integers"),
    (lambda: losses.binary_cross_entropy(numpy.zeros(2), numpy.array([0, 2])), ValueError,
     r"must be in \[0, 1\]"),
    (lambda: losses.binary_cross_entropy(numpy.zeros((2, 2)), numpy.array([0, 1])), ValueError,
     r"must have shape \(batch,\) or \(batch, 1\)"),
    (lambda: losses.mean_squared_error(numpy.zeros((2, 2)), numpy.zeros(2)), ValueError,
     r"'target' argument of mean_squared_error must have the shape of pred \(2, 2\)"),
    (lambda: losses.mean_squared_error(numpy.zeros(2), numpy.array([0, numpy.nan])), ValueError,
     "must be finite"),
    (lambda: losses.mean_squared_error(numpy.zeros((2, 2, 2)), numpy.zeros(2)), ValueError,
     r"must have shape \(batch, outputs\) or \(batch,\)"),
])
def test_losses_reject_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


# ---------------------------------------------------------------- sample weights
# scikit-learn's MLP weights its loss as numpy.average(per_row, weights=sample_weight): the sum
# of w_i l_i over the batch divided by the sum of w_i (sklearn/neural_network/_base.py), and
# its gradient scales row i's by w_i / sum(w) (_multilayer_perceptron.py: deltas *= w, then
# / sw_sum). cupynn's squared error has no factor 1/2 and averages over the outputs.

def _weighted_cases(rng):
    logits = rng.standard_normal((6, 4))
    weight = numpy.array([0.5, 2.0, 0.0, 1.0, 3.0, 0.25])
    labels = numpy.array([3, 0, 1, 1, 2, 0])
    binary = numpy.array([1.0, 0.0, 1.0, 0.0, 0.3, 1.0])
    target = rng.standard_normal((6, 4))
    return [
        ("cross_entropy", logits, labels, weight,
         lambda z, y: numpy.log(numpy.exp(z).sum(1)) - z[numpy.arange(len(y)), y]),
        ("binary_cross_entropy", logits[:, 0], binary, weight,
         lambda z, y: numpy.logaddexp(0, z) - y * z),
        ("mean_squared_error", logits, target, weight,
         lambda p, t: ((p - t) ** 2).mean(axis=1)),
        ("mean_squared_error", logits[:, 0], target[:, 0], weight, lambda p, t: (p - t) ** 2),
    ]


@pytest.mark.parametrize("case", range(4))
def test_weighted_losses_are_numpy_average_and_their_gradient(backend, case):
    """Value: numpy.average(per_row, weights=w), scikit-learn's; gradient: central
    differences of that value in float64."""
    from gradcheck import assert_close_gradient, numeric_gradient

    name, z, y, w, per_row = _weighted_cases(numpy.random.default_rng(5))[case]
    loss_fn = getattr(losses, name)
    value, grad = loss_fn(backend.asarray(z), backend.asarray(y), weight=backend.asarray(w))
    assert float(value) == pytest.approx(numpy.average(per_row(z, y), weights=w), rel=1e-12)
    zd = backend.asarray(z.copy())
    numeric = numeric_gradient(
        lambda: float(loss_fn(zd, backend.asarray(y), weight=backend.asarray(w))[0]), zd)
    assert_close_gradient(grad, numeric, f"{name} weighted", rtol=1e-6, atol=1e-9)
    assert not numpy.any(to_numpy(grad).reshape(len(w), -1)[w == 0])  # weight 0: no gradient


@pytest.mark.parametrize("case", range(4))
def test_integer_weights_count_rows_that_many_times(case):
    """Weights 0, 1, 2, ... are the same as removing or repeating rows (scikit-learn's
    definition of sample weights)."""
    name, z, y, _, _ = _weighted_cases(numpy.random.default_rng(6))[case]
    w = numpy.array([2, 0, 1, 3, 1, 1])
    loss_fn = getattr(losses, name)
    value, grad = loss_fn(z, y, weight=w.astype(float))
    repeated, repeated_grad = loss_fn(z.repeat(w, axis=0), y.repeat(w, axis=0))
    assert float(value) == pytest.approx(float(repeated), rel=1e-13)
    # Row i's gradient is the sum of its copies' gradients.
    summed = numpy.add.reduceat(repeated_grad, numpy.concatenate([[0], numpy.cumsum(w)[:-1]]))
    summed[w == 0] = 0
    numpy.testing.assert_allclose(grad, summed, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", range(4))
def test_unit_weights_give_the_unweighted_loss(case):
    name, z, y, _, _ = _weighted_cases(numpy.random.default_rng(7))[case]
    loss_fn = getattr(losses, name)
    value, grad = loss_fn(z, y, weight=numpy.full(len(y), 3.0))  # any constant
    plain, plain_grad = loss_fn(z, y)
    assert float(value) == pytest.approx(float(plain), rel=1e-14)
    numpy.testing.assert_allclose(grad, plain_grad, rtol=1e-13)


@pytest.mark.parametrize("case", range(4))
def test_weighted_shares_add_up_to_the_weighted_mean(case):
    """Data-parallel shares: each rank's rows with total = the whole batch's weight sum;
    the shares' losses and gradients are the one-process weighted loss's."""
    name, z, y, w, _ = _weighted_cases(numpy.random.default_rng(8))[case]
    loss_fn = getattr(losses, name)
    whole, whole_grad = loss_fn(z, y, weight=w)
    parts = [loss_fn(z[a:b], y[a:b], weight=w[a:b], total=w.sum())
             for a, b in [(0, 2), (2, 5), (5, 6), (6, 6)]]
    assert sum(float(v) for v, _ in parts) == pytest.approx(float(whole), rel=1e-14)
    numpy.testing.assert_allclose(numpy.concatenate([g for _, g in parts]), whole_grad,
                                  rtol=1e-14)


def test_a_batch_of_zero_weight_gives_zero_loss_and_gradient():
    z = numpy.array([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]])
    value, grad = losses.cross_entropy(z, numpy.array([0, 2]), weight=numpy.zeros(2))
    assert float(value) == 0.0 and not grad.any() and numpy.isfinite(grad).all()


def test_unweighted_losses_are_unchanged_bit_for_bit():
    """weight=None takes the code path of before (the same bits for every unweighted run)."""
    rng = numpy.random.default_rng(9)
    z = rng.standard_normal((7, 5)).astype(numpy.float32)
    y = rng.integers(0, 5, 7)
    value, grad = losses.cross_entropy(z, y)
    shifted = z - z.max(axis=1, keepdims=True)
    exp = numpy.exp(shifted)
    norm = exp.sum(axis=1, keepdims=True)
    expected = exp / norm
    expected[numpy.arange(7), y] -= 1
    expected /= 7
    assert numpy.array_equal(grad, expected)
    assert value == (numpy.log(norm[:, 0]) - shifted[numpy.arange(7), y]).mean()


@pytest.mark.parametrize("call, error, message", [
    (lambda: losses.cross_entropy(numpy.zeros((2, 3)), numpy.array([0, 1]),
                                  weight=numpy.ones(3)), ValueError,
     r"The 'weight' argument of cross_entropy must have shape \(2,\). Got \(3,\)"),
    (lambda: losses.binary_cross_entropy(numpy.zeros(2), numpy.array([0, 1]),
                                         weight=numpy.array([1.0, -1.0])), ValueError,
     "The 'weight' argument of binary_cross_entropy must be finite and >= 0"),
    (lambda: losses.mean_squared_error(numpy.zeros(2), numpy.zeros(2),
                                       weight=numpy.array([1.0, numpy.nan])), ValueError,
     "must be finite and >= 0"),
    (lambda: losses.cross_entropy(numpy.zeros((2, 3)), numpy.array([0, 1]),
                                  weight=numpy.array(["a", "b"])), TypeError, "must be numbers"),
    (lambda: losses.cross_entropy(numpy.zeros((2, 3)), numpy.array([0, 1]),
                                  weight=numpy.ones(2), total=-1.0), ValueError,
     r"'total' parameter of cross_entropy must be the batch's weight sum"),
])
def test_weighted_losses_reject_bad_weights(call, error, message):
    with pytest.raises(error, match=message):
        call()
