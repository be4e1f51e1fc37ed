"""MLP and layer construction, counts, and rejection of bad input."""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn import to_numpy
from cupynn.layers import Linear, SparseLinear


def test_structure_and_counts(backend):
    model = cupynn.MLP([21, 256, 256, 256, 1], density=0.1, dense_layers=(-1,), device=backend)
    assert [type(layer) for layer in model.layers] == [SparseLinear] * 3 + [Linear]
    assert model.nnz == [256 * 2, 256 * 26, 256 * 26, 256]
    assert model.n_weights == sum(model.nnz)
    assert model.n_parameters == sum(model.nnz) + 3 * 256 + 1
    assert len(model.activations) == 3
    assert model.sparse_layers == model.layers[:3]


def test_forward_backward_shapes_and_device(backend, rng):
    model = cupynn.MLP([12, 9, 4], density=0.3, device=backend)
    x = rng.standard_normal((5, 12))
    logits = model.forward(x)  # NumPy input on any backend
    assert logits.shape == (5, 4) and logits.dtype == numpy.float32
    assert isinstance(logits, backend.xp.ndarray)
    grad_x = model.backward(backend.asarray(numpy.ones((5, 4), numpy.float32)))
    assert grad_x.shape == (5, 12)
    layer = model.layers[0]
    assert layer.grad_data.shape == layer.data.shape and layer.grad_bias.shape == layer.bias.shape
    numpy.testing.assert_allclose(model.predict(x, batch_size=2), to_numpy(logits), rtol=1e-6)


def test_forward_matches_dense_computation(backend, rng):
    model = cupynn.MLP([10, 8, 3], density=0.4, dense_layers=(1,), dtype="float64", device=backend)
    x = rng.standard_normal((6, 10))
    h = numpy.maximum(x @ model.layers[0].to_dense().T + to_numpy(model.layers[0].bias), 0)
    expected = h @ model.layers[1].to_dense().T + to_numpy(model.layers[1].bias)
    numpy.testing.assert_allclose(to_numpy(model.forward(x)), expected, rtol=1e-12)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(sizes=[10]), ValueError, "The 'sizes' parameter of MLP must be a sequence of at least two"),
    (dict(sizes=[10, 0]), ValueError, r"The 'sizes' parameter of MLP must be in \[1, inf\]"),
    (dict(density=1.5), ValueError,
     r"The 'density' parameter of MLP must be in \(0, 1\]. Got 1.5 instead."),
    (dict(density=0.0), ValueError, r"The 'density' parameter of MLP must be in \(0, 1\]"),
    (dict(density=float("nan")), ValueError, "The 'density' parameter of MLP must be a real number"),
    (dict(density=[0.1]), ValueError, r"one float or one per layer \(2\)"),
    (dict(dense_layers=(2,)), ValueError, r"The 'dense_layers' parameter of MLP must be in \[-2, 1\]"),
    (dict(dtype="float16"), TypeError, "The 'dtype' parameter of MLP must be one of"),
    (dict(device="tpu"), ValueError, "The device parameter must be one of"),
    (dict(init="xavier"), ValueError, "The 'init' parameter of MLP must be one of"),
    (dict(seed=-1), ValueError, r"The 'seed' parameter of MLP must be in \[0, inf\]"),
    (dict(activation="tanh"), ValueError, "The 'activation' parameter of MLP must be one of"),
])
def test_mlp_rejects_bad_parameters(kwargs, error, message):
    args = dict(sizes=[10, 5, 2], device="cpu")
    args.update(kwargs)
    with pytest.raises(error, match=message):
        cupynn.MLP(**args)


def test_sparse_linear_rejects_bad_density():
    with pytest.raises(ValueError, match=r"The 'density' parameter of SparseLinear must be in "
                                         r"\(0, 1\]. Got 1.5 instead."):
        SparseLinear(10, 5, 1.5, device="cpu")


def test_forward_rejects_bad_input(backend):
    model = cupynn.MLP([4, 3, 2], device=backend)
    with pytest.raises(ValueError, match=r"must have shape \(batch, 4\). Got \(2, 5\) instead"):
        model.forward(numpy.zeros((2, 5)))
    with pytest.raises(ValueError, match="must be finite. Got 1 NaN or infinite"):
        model.forward(numpy.array([[0.0, 1.0, numpy.inf, 2.0]]))
    with pytest.raises(ValueError, match="must have shape"):
        model.backward(numpy.zeros((2, 3)))


def test_set_topology_rejects_non_canonical_csr(backend):
    layer = SparseLinear(5, 2, 0.4, device=backend)
    xp = backend.xp
    data = xp.zeros(3, dtype=xp.float32)
    for indptr, indices, message in [
        ([0, 2, 3], [3, 1, 0], "sorted and unique"),
        ([0, 2, 3], [1, 1, 0], "sorted and unique"),
        ([0, 2, 3], [0, 5, 1], r"column indices must be in \[0, 5\)"),
        ([0, 2, 2], [0, 1, 2], "end at nnz=3"),
        ([0, 4, 3], [0, 1, 2], "non-decreasing"),
    ]:
        with pytest.raises(ValueError, match=message):
            layer.set_topology(xp.asarray(indptr, dtype=xp.int32),
                               xp.asarray(indices, dtype=xp.int32), data)
    with pytest.raises(TypeError, match="must be int32"):
        layer.set_topology(xp.asarray([0, 2, 3]), xp.asarray([0, 1, 2]), data)


def test_backward_without_input_gradient_gives_the_same_parameter_gradients(backend, rng):
    model = cupynn.MLP([12, 9, 4], density=0.3, dtype="float64", device=backend)
    x = rng.standard_normal((5, 12))
    g = backend.asarray(rng.standard_normal((5, 4)))
    model.forward(x)
    model.backward(g)
    full = [to_numpy(grad).copy() for layer in model.layers for _, _, grad in layer.parameters()]
    model.forward(x)
    assert model.backward(g, need_input_grad=False) is None
    for a, layer_grads in zip(full, [to_numpy(grad) for layer in model.layers
                                     for _, _, grad in layer.parameters()]):
        numpy.testing.assert_array_equal(a, layer_grads)


@pytest.mark.parametrize("dense_layers", [(), (0, 1), (1,)])
def test_layers_overwrite_only_the_gradients_the_model_gives_up(backend, rng, dense_layers):
    """MLP.backward lets a layer's ReLU gradient overwrite the array the layer above
    made (one array less at the peak), never the caller's: the gradients equal
    those of layers that copy, and grad_logits is untouched (one output too, whose
    transpose is a view)."""
    for sizes in ([12, 9, 7, 4], [12, 9, 7, 1]):
        model = cupynn.MLP(sizes, density=0.4, dense_layers=dense_layers, dtype="float64",
                           device=backend)
        x = rng.standard_normal((6, 12))
        g = backend.asarray(rng.standard_normal((6, sizes[-1])))
        before = to_numpy(g).copy()
        model.forward(x)
        model.backward(g)
        got = [to_numpy(grad).copy() for layer in model.layers for _, _, grad in layer.parameters()]
        numpy.testing.assert_array_equal(to_numpy(g), before)
        # The same pass with every layer copying its dy (overwrite_dy=False).
        model.forward(x)
        h = backend.xp.ascontiguousarray(backend.asarray(before).T)
        for i in range(len(model.layers) - 1, -1, -1):
            given = to_numpy(h).copy()
            below = model.layers[i].backward(h, need_input_grad=True)
            numpy.testing.assert_array_equal(to_numpy(h), given)  # a layer's dy is kept
            h = below
        want = [to_numpy(grad) for layer in model.layers for _, _, grad in layer.parameters()]
        for a, b in zip(got, want):
            numpy.testing.assert_array_equal(a, b)
