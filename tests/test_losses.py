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
