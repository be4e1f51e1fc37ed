"""Topology and initialisation (SPEC §2) and the CSR invariants."""

from __future__ import annotations

import numpy
import pytest

import cupynn
from cupynn import to_numpy
from cupynn.init import inputs_per_neuron
from cupynn.layers import Linear, SparseLinear
from cupynn.validation import check_csr


@pytest.mark.parametrize("density, fan_in, expected", [
    (0.1, 784, 78), (0.06, 784, 47), (0.03, 256, 8), (0.1, 21, 2), (0.001, 21, 1), (1.0, 5, 5),
    (0.25, 10, 3),  # 2.5 rounds half up
])
def test_inputs_per_neuron(density, fan_in, expected):
    assert inputs_per_neuron(density, fan_in) == expected


@pytest.mark.parametrize("fan_in, fan_out, density", [(784, 256, 0.1), (21, 256, 0.06),
                                                      (256, 10, 0.03), (13, 7, 1.0)])
def test_one_input_per_partition(backend, fan_in, fan_out, density):
    layer = SparseLinear(fan_in, fan_out, density, seed=7, device=backend)
    n = inputs_per_neuron(density, fan_in)
    indptr, indices = to_numpy(layer.indptr), to_numpy(layer.indices)
    assert indptr.dtype == numpy.int32 and indices.dtype == numpy.int32
    check_csr(layer.indptr, layer.indices, layer.shape)
    numpy.testing.assert_array_equal(numpy.diff(indptr), numpy.full(fan_out, n))
    edges = (numpy.arange(n + 1) * fan_in) // n
    cols = indices.reshape(fan_out, n)
    assert numpy.all(cols >= edges[:-1]) and numpy.all(cols < edges[1:])
    assert layer.nnz == fan_out * n


def test_draws_cover_each_partition():
    # With 2000 rows, every column of every 3-wide partition is drawn at least once.
    layer = SparseLinear(12, 2000, 1 / 3, seed=0, device="cpu")
    cols = to_numpy(layer.indices).reshape(2000, 4)
    for j in range(4):
        assert set(cols[:, j]) == {3 * j, 3 * j + 1, 3 * j + 2}


@pytest.mark.parametrize("init", ["paper", "fan_in"])
def test_value_bounds(backend, init):
    sparse = SparseLinear(400, 300, 0.05, seed=1, device=backend, init=init)
    dense = Linear(50, 40, seed=1, device=backend, init=init)
    k_sparse, k_dense = 20, 50
    w_bound = {"paper": lambda k: 1 / k, "fan_in": lambda k: (6 / k) ** 0.5}[init]
    for layer, values, k in ((sparse, sparse.data, k_sparse), (dense, dense.weight, k_dense)):
        values = to_numpy(values)
        bias = to_numpy(layer.bias)
        assert numpy.abs(values).max() <= w_bound(k)
        assert numpy.abs(bias).max() <= 1 / k ** 0.5
        # Uniform, not squeezed: the extremes come close to the bound.
        assert numpy.abs(values).max() > 0.9 * w_bound(k)
        assert numpy.abs(bias).max() > 0.5 / k ** 0.5
        assert values.dtype == numpy.float32


def test_same_seed_same_model_different_seed_different(backend):
    def snapshot(seed):
        model = cupynn.MLP([30, 20, 10, 3], density=0.3, dense_layers=(-1,), seed=seed,
                           device=backend)
        return [to_numpy(a) for layer in model.layers
                for a in ((layer.indptr, layer.indices, layer.data, layer.bias)
                          if isinstance(layer, SparseLinear) else (layer.weight, layer.bias))]

    first, again, other = snapshot(11), snapshot(11), snapshot(12)
    for a, b in zip(first, again):
        numpy.testing.assert_array_equal(a, b)
    assert any(not numpy.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.gpu
def test_same_seed_same_model_on_every_backend():
    """Topology and values are drawn on the host, so backends agree exactly."""
    models = [cupynn.MLP([20, 16, 4], density=0.25, seed=3, device=name)
              for name in ["cpu"] + (["gpu"] if cupynn.gpu_available() else [])]
    for model in models[1:]:
        for a, b in zip(models[0].layers, model.layers):
            numpy.testing.assert_array_equal(to_numpy(a.indices), to_numpy(b.indices))
            numpy.testing.assert_array_equal(to_numpy(a.data), to_numpy(b.data))
    assert models[0].nnz == [16 * 5, 4 * 4]


def test_float64_on_request(backend):
    model = cupynn.MLP([8, 4, 2], dtype="float64", device=backend)
    assert all(layer.data.dtype == numpy.float64 for layer in model.layers)
    assert model.forward(numpy.ones((3, 8))).dtype == numpy.float64
