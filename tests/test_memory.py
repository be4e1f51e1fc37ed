"""cupynn.memory: footprint() from the arrays, the dense twin, the process's resident set."""

from __future__ import annotations

import numpy
import pytest
from fake_gpu import fake_gpu  # noqa: F401 (the fixture)

import cupynn
from cupynn import memory
from cupynn.step import TrainStep

# 784-40-10 is too big to draw; the model here is 6-4-3-2: a sparse 6->4 layer with 2 inputs
# per neuron (density 1/3), a sparse 4->3 layer with 2 (density 1/2), a dense 3->2 layer.
SIZES = (6, 4, 3, 2)


def model_and_adam(device: str = "cpu", dtype: str = "float32"):
    model = cupynn.MLP(SIZES, density=[1 / 3, 0.5, 1.0], dense_layers=(-1,), seed=0,
                       dtype=dtype, device=device)
    return model, cupynn.Adam(model)


def one_step(model, optimizer, batch: int = 5) -> None:
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((batch, SIZES[0])).astype(model.dtype)
    TrainStep(model, optimizer)(x, rng.integers(0, SIZES[-1], batch))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_footprint_is_the_hand_computed_sum(dtype):
    model, adam = model_and_adam(dtype=dtype)
    f = 4 if dtype == "float32" else 8  # a value's bytes; indices and indptr are int32
    nnz = [4 * 2, 3 * 2]  # rows x inputs per row of the two sparse layers
    assert model.nnz[:2] == nnz
    c = memory.footprint(model)["components"]
    assert c["values"] == f * sum(nnz) and c["indices"] == 4 * sum(nnz)
    assert c["indptr"] == 4 * (5 + 4)
    assert c["bias"] == f * (4 + 3 + 2)
    assert c["dense_weight"] == f * 3 * 2
    assert c["grad_values"] == c["grad_bias"] == c["dense_grad_weight"] == 0  # no step yet
    assert c["adam_values"] == c["adam_bias"] == c["dense_adam_weight"] == 0  # no optimizer
    assert c["transposed_pattern"] == c["transposed_indptr"] == 0  # the CPU keeps none

    with_adam = memory.footprint(model, adam)
    c = with_adam["components"]
    # Adam allocates m and v (zeros) when it is made.
    assert c["adam_values"] == 2 * f * sum(nnz) and c["adam_bias"] == 2 * f * 9
    assert c["dense_adam_weight"] == 2 * f * 6
    weights = sum(nnz) + 6
    assert with_adam["n_weights"] == weights and with_adam["n_neurons"] == sum(SIZES)
    per_weight = (f + 4 + 2 * f) * sum(nnz) + (f + 2 * f) * 6  # no gradients yet
    per_neuron = 4 * 9 + 3 * f * 9
    assert with_adam["per_weight_bytes"] == per_weight
    assert with_adam["per_neuron_bytes"] == per_neuron
    assert with_adam["total_bytes"] == per_weight + per_neuron
    assert with_adam["bytes_per_nonzero"] == pytest.approx(per_weight / weights)
    assert with_adam["bytes_per_neuron"] == pytest.approx(per_neuron / sum(SIZES))
    layers = with_adam["layers"]
    assert [l["kind"] for l in layers] == ["SparseLinear", "SparseLinear", "Linear"]
    assert [l["nnz"] for l in layers] == [8, 6, 6]
    for name, total in c.items():
        assert sum(l["components"][name] for l in layers) == total


def test_a_training_step_adds_the_gradients_and_the_kept_activations():
    model, adam = model_and_adam()
    before = memory.footprint(model, adam)
    assert before["kept_activations_bytes"] == 0
    one_step(model, adam, batch=5)
    after = memory.footprint(model, adam, batch=5)
    c = after["components"]
    assert c["grad_values"] == 4 * 14 and c["dense_grad_weight"] == 4 * 6
    assert c["grad_bias"] == 4 * 9
    assert after["per_weight_bytes"] - before["per_weight_bytes"] == 4 * 20
    # float32 on the CPU with Adam and gradients: 4 value + 4 index + 4 gradient + 8 Adam
    # per sparse weight, 16 per dense one.
    assert after["per_weight_bytes"] == 20 * 14 + 16 * 6
    # What forward keeps: each layer's input (6, 4 and 3 features x 5 rows); the formula
    # adds the logits and their batch-major copy.
    assert after["kept_activations_bytes"] == 4 * 5 * (6 + 4 + 3)
    assert after["activations_bytes"] == 4 * 5 * (6 + 4 + 3 + 2 * 2)
    assert after["backward_transient_bytes"] == 2 * 4 * 5 * 4  # the widest hidden layer: 4
    model.clear_cache()
    assert memory.footprint(model, adam)["kept_activations_bytes"] == 0


def test_adam_moments_counted_and_a_new_topology_drops_the_gradient():
    model, adam = model_and_adam()
    one_step(model, adam)
    layer = model.layers[0]
    m, v = adam.state[0]["data"]
    assert memory.footprint(model, adam)["layers"][0]["components"]["adam_values"] == (
        m.nbytes + v.nbytes)
    layer.set_topology(layer.indptr.copy(), layer.indices.copy(), layer.data.copy())
    assert memory.footprint(model, adam)["layers"][0]["components"]["grad_values"] == 0


def test_dense_twin_bytes():
    twin = memory.dense_twin_bytes(SIZES, "float32")
    weights = 4 * (6 * 4 + 4 * 3 + 3 * 2)
    biases = 4 * (4 + 3 + 2)
    assert twin["weights"] == twin["grad_weights"] == weights
    assert twin["adam_weights"] == 2 * weights and twin["adam_biases"] == 2 * biases
    assert twin["total_bytes"] == 4 * (weights + biases)
    plain = memory.dense_twin_bytes(SIZES, "float64", optimizer=False)
    assert plain["adam_weights"] == 0 and plain["total_bytes"] == 2 * 2 * (weights + biases)


def test_step_activation_bytes_has_no_hidden_layer_case():
    out = memory.step_activation_bytes((3, 2), "float32", 10)
    assert out["activations_bytes"] == 4 * 10 * (3 + 2 * 2)
    assert out["backward_transient_bytes"] == 2 * 4 * 10 * 2


def test_resident_set_helpers():
    rss = memory.rss_bytes()
    if rss is None:
        pytest.skip("no /proc/self/status here")
    memory.reset_peak_rss()
    block = numpy.ones(64 * 2**20 // 8)  # 64 MiB, written
    assert memory.peak_rss_bytes() >= rss + 60 * 2**20
    del block


def test_the_gpu_counts_its_transposed_pattern(fake_gpu):
    """On the (fake) GPU each sparse layer keeps W.T's pattern for spmm_t: a row index and
    a position per weight (int32: 8 B per weight) and an indptr over its inputs."""
    model, adam = model_and_adam(device=fake_gpu.backend)
    f = memory.footprint(model, adam)
    c = f["components"]
    assert c["transposed_pattern"] == 8 * 14
    assert c["transposed_indptr"] == 4 * ((6 + 1) + (4 + 1))
    orders = [layer.swizzle_orders() for layer in model.sparse_layers]
    assert c["swizzle_orders"] == sum(a.nbytes for o in orders if o for a in o)
    # float32 with Adam, no gradients yet: 4 value + 4 index + 8 Adam + 8 pattern per
    # sparse weight; with a step's gradient 4 more: 28, the GPU's figure.
    assert f["per_weight_bytes"] == 24 * 14 + 12 * 6
