"""The layers' declared hooks for other modules: ``set_grad`` / ``clear_grads``,
``last_input``, ``keeping_output_grad`` / ``last_output_grad`` and ``clear_cache``."""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn import to_numpy
from cupynn.layers import Linear, SparseLinear


def _layers(backend):
    return [SparseLinear(5, 3, 0.6, seed=1, dtype="float64", device=backend),
            Linear(5, 3, seed=1, dtype="float64", device=backend)]


layer_kinds = pytest.mark.parametrize("kind", [0, 1], ids=["SparseLinear", "Linear"])


@layer_kinds
def test_set_grad_sets_the_named_gradient_and_clear_grads_drops_all(backend, kind):
    layer = _layers(backend)[kind]
    for name, value, _ in layer.parameters():
        layer.set_grad(name, backend.xp.ones_like(value))
    assert all(grad is not None and grad.shape == value.shape
               for _, value, grad in layer.parameters())
    layer.set_grad("bias", None)
    assert layer.grad_bias is None
    layer.clear_grads()
    assert all(grad is None for _, _, grad in layer.parameters())


@layer_kinds
def test_set_grad_rejects_a_name_that_is_not_a_parameter(backend, kind):
    layer = _layers(backend)[kind]
    names = list(layer.param_names)
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}.set_grad: 'name' must be one "
                                         rf"of \{names}\. Got 'weights' instead"):
        layer.set_grad("weights", None)


@layer_kinds
@pytest.mark.parametrize("relu", [False, True])
def test_the_output_gradient_is_kept_inside_the_block_only(backend, kind, relu):
    layer = _layers(backend)[kind]
    xp = backend.xp
    x = xp.asarray(numpy.random.default_rng(0).standard_normal((5, 4)))
    dy = xp.asarray(numpy.random.default_rng(1).standard_normal((3, 4)))
    assert layer.last_input is None and layer.last_output_grad is None
    layer.forward(x, relu=relu)
    assert layer.last_input is x
    layer.backward(dy.copy(), need_input_grad=False)
    assert layer.last_output_grad is None  # not asked: not kept
    with layer.keeping_output_grad() as same:
        assert same is layer
        y = layer.forward(x, relu=relu)
        layer.backward(dy.copy(), need_input_grad=False)
        kept = layer.last_output_grad
        # The gradient of the output after the ReLU, as backward took it.
        expected = to_numpy(dy) * (to_numpy(y) > 0) if relu else to_numpy(dy)
        numpy.testing.assert_array_equal(to_numpy(kept), expected)
    assert layer.last_output_grad is None
    layer.backward(dy.copy(), need_input_grad=False)
    assert layer.last_output_grad is None  # the request ended with the block


def test_the_flag_is_restored_when_the_block_raises(backend):
    layer = _layers(backend)[0]
    with pytest.raises(ZeroDivisionError):
        with layer.keeping_output_grad():
            1 / 0
    layer.forward(backend.xp.ones((5, 2)))
    layer.backward(backend.xp.ones((3, 2)))
    assert layer.last_output_grad is None


def test_clear_cache_drops_what_the_passes_keep(backend):
    model = cupynn.MLP([5, 4, 3], density=0.6, dense_layers=(-1,), dtype="float64",
                       device=backend, activation="sigmoid")
    x = numpy.random.default_rng(0).standard_normal((6, 5))
    with model.layers[0].keeping_output_grad():
        model.backward(model.forward(x))
        assert model.layers[0].last_output_grad is not None
        model.clear_cache()
        assert model.layers[0].last_output_grad is None
    assert all(layer.last_input is None for layer in model.layers)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        model.backward(numpy.ones((6, 3)))
