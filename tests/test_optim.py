"""Adam against hand-computed steps; moment re-mapping after a topology change."""

from __future__ import annotations

import math

import numpy
import pytest

import cupynn
from cupynn import to_numpy
from cupynn import optim
from cupynn.csr import match_entries


def _set_grads(model, rng, backend):
    for layer in model.layers:
        for name, value, _ in layer.parameters():
            layer.set_grad(name, backend.asarray(rng.standard_normal(value.shape)))


def test_adam_matches_hand_computed_steps(backend, rng):
    model = cupynn.MLP([5, 4, 3], density=0.5, dense_layers=(1,), dtype="float64", device=backend)
    lr, (b1, b2), eps = 0.01, (0.8, 0.95), 1e-6
    opt = cupynn.Adam(model, lr=lr, betas=(b1, b2), eps=eps)
    values = [to_numpy(v).copy() for layer in model.layers for _, v, _ in layer.parameters()]
    m = [numpy.zeros_like(v) for v in values]
    s = [numpy.zeros_like(v) for v in values]
    for t in range(1, 4):
        _set_grads(model, rng, backend)
        grads = [to_numpy(g) for layer in model.layers for _, _, g in layer.parameters()]
        opt.step()
        for i, g in enumerate(grads):
            # Written out element by element, independently of the kernels.
            for j in numpy.ndindex(g.shape):
                m[i][j] = b1 * m[i][j] + (1 - b1) * g[j]
                s[i][j] = b2 * s[i][j] + (1 - b2) * g[j] ** 2
                m_hat = m[i][j] / (1 - b1 ** t)
                s_hat = s[i][j] / (1 - b2 ** t)
                values[i][j] -= lr * m_hat / (math.sqrt(s_hat) + eps)
        got = [to_numpy(v) for layer in model.layers for _, v, _ in layer.parameters()]
        for expected, actual in zip(values, got):
            numpy.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-15)
    assert opt.t == 3
    # The first step moves every parameter by about lr (Adam's normalised step).
    assert numpy.abs(values[0] - to_numpy(model.layers[0].data)).max() < 1e-12


def test_adam_first_step_size_is_lr(backend, rng):
    model = cupynn.MLP([6, 3], density=0.5, device=backend)
    before = to_numpy(model.layers[0].data).copy()
    opt = cupynn.Adam(model, lr=0.001, eps=1e-8)
    _set_grads(model, rng, backend)
    for name in ("data", "bias"):
        layer = model.layers[0]
        layer.set_grad(name, getattr(layer, "grad_" + name).astype(numpy.float32))
    opt.step()
    numpy.testing.assert_allclose(numpy.abs(to_numpy(model.layers[0].data) - before), 0.001,
                                  rtol=1e-3)


def test_adam_step_without_gradients_raises(backend):
    model = cupynn.MLP([4, 2], device=backend)
    with pytest.raises(RuntimeError, match="call model.backward first"):
        cupynn.Adam(model).step()


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=0.0), "The 'lr' parameter of Adam must be in \\(0, inf\\). Got 0.0 instead."),
    (dict(betas=(0.9, 1.0)), "The 'betas' parameter of Adam must be in \\[0, 1\\)"),
    (dict(betas=0.9), "The 'betas' parameter of Adam must be a pair"),
    (dict(eps=1e-50), "The 'eps' parameter of Adam underflows to 0 in float32"),
    (dict(eps=-1.0), "The 'eps' parameter of Adam must be in \\(0"),
])
def test_adam_rejects_bad_parameters(kwargs, message):
    model = cupynn.MLP([4, 2], device="cpu")
    with pytest.raises(ValueError, match=message):
        cupynn.Adam(model, **kwargs)


def test_remap_keeps_kept_moments_and_zeroes_new(backend):
    # Old W (3 x 4):          New W:
    #   [a . b .]               [a . . c]   (b removed, c new)
    #   [. . . .]               [. d . .]   (d new in an empty row)
    #   [. e . f]               [. e . f]
    layer = cupynn.SparseLinear.from_csr(numpy.array([0, 2, 2, 4], numpy.int32),
                                         numpy.array([0, 2, 1, 3], numpy.int32),
                                         numpy.array([1.0, 2.0, 3.0, 4.0]), numpy.zeros(3), (3, 4),
                                         device=backend)

    class Holder:
        layers = [layer]

    opt = cupynn.Adam(Holder())
    m, v = opt.moments(layer, "data")
    m[...] = backend.asarray([10.0, 20.0, 30.0, 40.0])
    v[...] = backend.asarray([1.0, 2.0, 3.0, 4.0])
    old_indptr, old_indices = layer.indptr, layer.indices
    new_indptr = backend.asarray(numpy.array([0, 2, 3, 5], numpy.int32))
    new_indices = backend.asarray(numpy.array([0, 3, 1, 1, 3], numpy.int32))
    layer.set_topology(new_indptr, new_indices, backend.asarray([1.0, 0.0, 0.0, 3.0, 4.0]))
    mapping = opt.remap_from_pattern(layer, old_indptr, old_indices)
    numpy.testing.assert_array_equal(to_numpy(mapping), [0, -1, -1, 2, 3])
    m, v = opt.moments(layer, "data")
    numpy.testing.assert_array_equal(to_numpy(m), [10.0, 0.0, 0.0, 30.0, 40.0])
    numpy.testing.assert_array_equal(to_numpy(v), [1.0, 0.0, 0.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="mapping must have shape \\(5,\\)"):
        opt.remap(layer, backend.asarray(numpy.zeros(4, numpy.int64)))


def test_step_after_topology_change_without_remap_raises(backend):
    model = cupynn.MLP([4, 3], density=0.5, device=backend)
    opt = cupynn.Adam(model)
    layer = model.layers[0]
    layer.set_topology(backend.asarray(numpy.array([0, 1, 1, 1], numpy.int32)),
                       backend.asarray(numpy.array([2], numpy.int32)),
                       backend.asarray(numpy.zeros(1, numpy.float32)))
    layer.set_grad("data", backend.asarray(numpy.zeros(1, numpy.float32)))
    layer.set_grad("bias", backend.asarray(numpy.zeros(3, numpy.float32)))
    with pytest.raises(RuntimeError, match="without Adam.remap"):
        opt.step()


def test_match_entries_against_brute_force(backend, rng):
    shape = (40, 30)
    a = rng.random(shape) < 0.2
    b = a & (rng.random(shape) < 0.7) | (rng.random(shape) < 0.1)

    def pattern(mask):
        rows, cols = numpy.nonzero(mask)
        indptr = numpy.concatenate([[0], numpy.cumsum(mask.sum(1))]).astype(numpy.int32)
        return indptr, cols.astype(numpy.int32), list(zip(rows, cols))

    ia, ca, keys_a = pattern(a)
    ib, cb, keys_b = pattern(b)
    got = to_numpy(match_entries(*(backend.asarray(t) for t in (ia, ca, ib, cb)), shape[1]))
    where = {key: k for k, key in enumerate(keys_a)}
    expected = [where.get(key, -1) for key in keys_b]
    numpy.testing.assert_array_equal(got, expected)
    assert (got >= 0).any() and (got < 0).any()


# Adam(multi_tensor=True): one adam_multi launch a step (issue 19), the same bits.


def _twins(backend, dtype="float64", **kwargs):
    """(model, per-array Adam), (model, multi-tensor Adam): the same start."""
    pairs = []
    for multi_tensor in (False, True):
        model = cupynn.MLP([5, 7, 3], density=0.5, dense_layers=(1,), dtype=dtype, seed=2,
                           device=backend)
        pairs.append((model, cupynn.Adam(model, multi_tensor=multi_tensor, **kwargs)))
    return pairs


def _steps(pairs, backend, count, seed=0):
    for model, opt in pairs:
        rng = numpy.random.default_rng(seed)
        for _ in range(count):
            for layer in model.layers:
                for name, value, _ in layer.parameters():
                    layer.set_grad(name, backend.asarray(rng.standard_normal(value.shape),
                                                         dtype=value.dtype))
            opt.step()


def _assert_same(pairs):
    (model_a, opt_a), (model_b, opt_b) = pairs
    for key, value in model_a.state_dict().items():
        numpy.testing.assert_array_equal(model_b.state_dict()[key], value, err_msg=key)
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        numpy.testing.assert_array_equal(state_b[key], value, err_msg=key)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_multi_tensor_adam_takes_new_hyper_parameters_and_loaded_states(backend, dtype,
                                                                        monkeypatch):
    """Its table of coming steps is made again past its end (here every 3 steps),
    after a new lr, and after load_state_dict (another t, lr, betas, eps)."""
    monkeypatch.setattr(optim, "STEPS_PER_TABLE", 3)
    pairs = _twins(backend, dtype, lr=0.01, betas=(0.8, 0.95))
    _steps(pairs, backend, 7)
    _assert_same(pairs)
    for _, opt in pairs:
        opt.lr = 0.002
    _steps(pairs, backend, 2, seed=1)
    _assert_same(pairs)
    saved = dict(pairs[0][1].state_dict(), t=40, lr=0.03, betas=[0.7, 0.9], eps=1e-6)
    for _, opt in pairs:
        opt.load_state_dict(saved)
    _steps(pairs, backend, 4, seed=2)
    _assert_same(pairs)
    assert pairs[1][1].t == 44


def test_multi_tensor_adam_pickles_its_choice():
    import pickle

    model = cupynn.MLP([4, 2], device="cpu")
    for given in (True, False, None):
        opt = pickle.loads(pickle.dumps(cupynn.Adam(model, multi_tensor=given)))
        assert opt.multi_tensor is (given if given is not None else
                                    cupynn.Adam(model).multi_tensor)
    assert "multi_tensor" not in cupynn.Adam(model, multi_tensor=True).state_dict()


def test_multi_tensor_adam_leaves_odd_gradients_to_the_kernels_checks(backend):
    """A gradient of another dtype goes through adam's own checks, with their error."""
    (_, _), (model, opt) = _twins(backend)
    _set_grads(model, numpy.random.default_rng(0), backend)
    layer = model.layers[0]
    layer.set_grad("bias", layer.grad_bias.astype(numpy.float32))
    with pytest.raises(TypeError, match="adam: all float arrays must have one dtype"):
        opt.step()


def test_adam_rejects_a_bad_multi_tensor():
    with pytest.raises(ValueError, match="The 'multi_tensor' parameter of Adam must be True, "
                                         "False or None. Got 'yes' instead."):
        cupynn.Adam(cupynn.MLP([4, 2], device="cpu"), multi_tensor="yes")
