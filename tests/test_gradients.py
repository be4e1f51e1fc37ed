"""float64 gradient checks: every layer, both losses, whole MLPs.

Central differences w.r.t. CSR ``data``, biases, dense weights and inputs on
tiny sizes; a directional check (one random direction, two extra forward
passes) on a medium MLP.
"""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn import losses
from cupynn.backend import to_numpy
from cupynn.layers import Linear, ReLU, Sigmoid, SparseLinear
from gradcheck import assert_close_gradient, numeric_gradient


def _probe(backend, shape, rng):
    """A fixed random cotangent: the scalar checked is sum(probe * output)."""
    return backend.asarray(rng.standard_normal(shape))


def _check_layer(layer, backend, rng, batch=5, relu=False):
    x = backend.asarray(rng.standard_normal((layer.in_features, batch)))
    probe = _probe(backend, (layer.out_features, batch), rng)

    def scalar():
        return float((layer.forward(x, relu=relu) * probe).sum())

    if relu:  # the checks below need pre-activations away from ReLU's kink, and on both sides
        pre = to_numpy(layer.forward(x))
        assert numpy.abs(pre).min() > 1e-4 and (pre > 0).any() and (pre < 0).any()
    layer.forward(x, relu=relu)
    dx = layer.backward(probe)
    for name, value, grad in layer.parameters():
        assert_close_gradient(grad, numeric_gradient(scalar, value), f"{name}")
    assert_close_gradient(dx, numeric_gradient(scalar, x), "input")


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_sparse_linear_gradients(backend, rng, density):
    layer = SparseLinear(9, 6, density, seed=3, dtype="float64", device=backend)
    _check_layer(layer, backend, rng)


def test_sparse_linear_with_empty_rows(backend, rng):
    # W (4 x 5), rows 0 and 2 empty:
    #   [. . . . .]
    #   [a . b . .]
    #   [. . . . .]
    #   [. c . . d]
    layer = SparseLinear.from_csr(numpy.array([0, 0, 2, 2, 4], numpy.int32),
                                  numpy.array([0, 2, 1, 4], numpy.int32),
                                  numpy.array([0.5, -1.0, 2.0, 0.25]), numpy.zeros(4), (4, 5),
                                  device=backend)
    _check_layer(layer, backend, rng)


def test_dense_linear_gradients(backend, rng):
    _check_layer(Linear(7, 4, seed=1, dtype="float64", device=backend), backend, rng)


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_sparse_linear_with_its_relu_gradients(backend, rng, density):
    """forward(relu=True) applies the activation in the product's pass; backward
    takes the gradient through it and the bias gradient in one pass."""
    layer = SparseLinear(9, 6, density, seed=3, dtype="float64", device=backend)
    layer.bias[...] = backend.asarray(numpy.linspace(-0.5, 0.5, 6))
    _check_layer(layer, backend, rng, relu=True)


def test_dense_linear_with_its_relu_gradients(backend, rng):
    layer = Linear(7, 4, seed=1, dtype="float64", device=backend)
    _check_layer(layer, backend, rng, relu=True)


@pytest.mark.parametrize("activation", [ReLU, Sigmoid])
def test_activation_gradients(backend, rng, activation):
    act = activation()
    # Keep ReLU inputs away from the kink at 0, where the derivative jumps.
    x_host = rng.standard_normal((6, 4))
    x_host[numpy.abs(x_host) < 0.05] = 0.3
    x = backend.asarray(x_host)
    probe = _probe(backend, x.shape, rng)

    def scalar():
        return float((act.forward(x) * probe).sum())

    act.forward(x)
    assert_close_gradient(act.backward(probe), numeric_gradient(scalar, x), activation.__name__)


def test_cross_entropy_gradient(backend, rng):
    logits = backend.asarray(rng.standard_normal((6, 4)) * 3)
    labels = backend.asarray(numpy.array([0, 3, 1, 1, 2, 3]))
    _, grad = losses.cross_entropy(logits, labels)
    numeric = numeric_gradient(lambda: float(losses.cross_entropy(logits, labels)[0]), logits)
    assert_close_gradient(grad, numeric, "cross_entropy")


@pytest.mark.parametrize("shape", [(7,), (7, 1)])
def test_binary_cross_entropy_gradient(backend, rng, shape):
    logits = backend.asarray(rng.standard_normal(shape) * 3)
    labels = backend.asarray(numpy.array([0, 1, 1, 0, 1, 0, 0.3]))
    _, grad = losses.binary_cross_entropy(logits, labels)
    assert grad.shape == logits.shape
    numeric = numeric_gradient(lambda: float(losses.binary_cross_entropy(logits, labels)[0]),
                               logits)
    assert_close_gradient(grad, numeric, "binary_cross_entropy")


@pytest.mark.parametrize("shape, target_shape", [((6, 3), (6, 3)), ((6, 1), (6,)), ((6,), (6,))])
def test_mean_squared_error_gradient(backend, rng, shape, target_shape):
    pred = backend.asarray(rng.standard_normal(shape))
    target = backend.asarray(rng.standard_normal(target_shape))
    _, grad = losses.mean_squared_error(pred, target)
    assert grad.shape == pred.shape
    numeric = numeric_gradient(lambda: float(losses.mean_squared_error(pred, target)[0]), pred)
    assert_close_gradient(grad, numeric, "mean_squared_error")


def _model_loss(model, x, y, loss):
    return float(loss(model.forward(x), y)[0])


@pytest.mark.parametrize("case", ["classes", "binary", "regression"])
def test_mlp_gradients_mixing_sparse_and_dense(backend, rng, case):
    if case == "regression":
        model = cupynn.MLP([6, 8, 2], density=0.4, dense_layers=(0,), seed=5, dtype="float64",
                           device=backend)
        y = backend.asarray(rng.standard_normal((4, 2)))
        loss = losses.mean_squared_error
    elif case == "classes":
        model = cupynn.MLP([6, 8, 7, 3], density=0.4, dense_layers=(1,), seed=5, dtype="float64",
                           device=backend)
        y = backend.asarray(rng.integers(0, 3, size=4))
        loss = losses.cross_entropy
    else:
        model = cupynn.MLP([5, 9, 1], density=0.5, dense_layers=(-1,), seed=5, dtype="float64",
                           device=backend, activation="sigmoid")
        y = backend.asarray(rng.integers(0, 2, size=4).astype(float))
        loss = losses.binary_cross_entropy
    assert {type(layer) for layer in model.layers} == {SparseLinear, Linear}
    x = backend.asarray(rng.standard_normal((4, model.sizes[0])))
    _, grad_logits = loss(model.forward(x), y)
    grad_x = model.backward(grad_logits)

    def scalar():
        return _model_loss(model, x, y, loss)

    for i, layer in enumerate(model.layers):
        for name, value, grad in layer.parameters():
            assert_close_gradient(grad, numeric_gradient(scalar, value), f"layer {i} {name}")
    assert_close_gradient(grad_x, numeric_gradient(scalar, x), "input")


def test_mlp_directional_gradient_medium(backend, rng):
    """One random direction through every parameter of a 64-128-128-10 MLP."""
    model = cupynn.MLP([64, 128, 128, 10], density=0.1, seed=2, dtype="float64", device=backend,
                       init="fan_in")
    x = backend.asarray(rng.standard_normal((32, 64)))
    y = backend.asarray(rng.integers(0, 10, size=32))
    _, grad_logits = losses.cross_entropy(model.forward(x), y)
    model.backward(grad_logits)
    params = [(value, grad) for layer in model.layers for _, value, grad in layer.parameters()]
    directions = [backend.asarray(rng.standard_normal(value.shape)) for value, _ in params]
    analytic = sum(float((grad * d).sum()) for (_, grad), d in zip(params, directions))

    h = 1e-6

    def shifted(sign):
        for (value, _), d in zip(params, directions):
            value += sign * h * d
        out = _model_loss(model, x, y, losses.cross_entropy)
        for (value, _), d in zip(params, directions):
            value -= sign * h * d
        return out

    numeric = (shifted(+1) - shifted(-1)) / (2 * h)
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=1e-6), (
        f"directional derivative: analytic {analytic!r}, numeric {numeric!r}")
