"""The fake GPU of tests/fake_gpu.py (issue 19): cupynn's GPU paths on the CPU, kernels
emulated from their ``.cu`` sources, and CUDA-graph capture with its rules.

Sizes stay tiny: the emulation runs a kernel one thread (or one warp of OS threads)
at a time.
"""

from __future__ import annotations

import numpy
import pytest

import cupynn
import cupynn.backend
from cupynn import kernels
from cupynn.kernels import _launch
from fake_gpu import (KERNEL_DIR, CaptureError, DeviceArray, FakeGpu,  # noqa: F401 (fixture)
                      fake_gpu, warp_kernels)
from kernel_cases import adam_hyper, adam_reference, adam_state, assert_adam_step

try:
    from cuda_host import host_compiler

    host_compiler()
except Exception as exc:  # no C++ compiler: nothing can be emulated
    pytest.skip(f"the fake GPU emulates kernels with a C++ compiler ({exc})",
                allow_module_level=True)


def csr(n_rows: int = 7, n_cols: int = 5, batch: int = 3, seed: int = 0) -> dict:
    """A small CSR pattern (row 2 empty) with dense operands, float64."""
    rng = numpy.random.default_rng(seed)
    mask = rng.random((n_rows, n_cols)) < 0.5
    mask[2] = False
    mask[0, 0] = True
    indptr = numpy.concatenate([[0], numpy.cumsum(mask.sum(axis=1))]).astype(numpy.int32)
    return {"indptr": indptr, "indices": numpy.nonzero(mask)[1].astype(numpy.int32),
            "data": rng.standard_normal(int(mask.sum())),
            "x": rng.standard_normal((n_cols, batch)), "dy": rng.standard_normal((n_rows, batch)),
            "bias": rng.standard_normal(n_rows)}


def on(fake: FakeGpu, arrays: dict) -> dict:
    return {k: fake.asarray(v) for k, v in arrays.items()}


# ---------------------------------------------------------------- installation
def test_the_fake_answers_for_the_gpu_and_only_for_device_arrays(fake_gpu):
    assert cupynn.get_backend("gpu") is fake_gpu.backend
    assert cupynn.gpu_available()
    assert fake_gpu.backend.is_gpu
    a = fake_gpu.xp.arange(3.0)
    assert type(a) is DeviceArray and isinstance(a, fake_gpu.xp.ndarray)
    assert cupynn.backend.backend_of(a) is fake_gpu.backend
    assert cupynn.backend.backend_of(numpy.arange(3.0)) is cupynn.backend.CPU
    assert type(a + 1) is DeviceArray and type(a.sum()) is DeviceArray  # 0-d, as CuPy
    assert a.data.ptr == a.ctypes.data and a.device.id == 0
    host = numpy.arange(3.0)
    copy = fake_gpu.xp.asarray(host)
    host[0] = 9  # a device copy, not a view of the host array
    assert copy.get().tolist() == [0.0, 1.0, 2.0] and type(copy.get()) is numpy.ndarray
    assert fake_gpu.backend.device_name().startswith("cupynn fake GPU")
    with pytest.raises(TypeError, match="mixes a device array with a NumPy array"):
        a + host
    with pytest.raises(NotImplementedError, match="cuSPARSE"):
        fake_gpu.backend.sparse.csr_matrix


def test_uninstalling_restores_every_reference_even_after_a_failure():
    originals = {name: getattr(cupynn.backend, name) for name in
                 ("backend_of", "to_numpy", "_gpu_backend_or_reason")}
    cuda_function = _launch.cuda_function
    with pytest.raises(ZeroDivisionError):
        with FakeGpu() as fake:
            assert kernels.cuda_function is not cuda_function
            1 / 0
    assert not fake.capturing
    for name, original in originals.items():
        assert getattr(cupynn.backend, name) is original
    import importlib
    for module in ("cupynn.kernels.spmm", "cupynn.kernels.sddmm", "cupynn.kernels.adam",
                   "cupynn.kernels", "cupynn.kernels._launch"):
        assert importlib.import_module(module).cuda_function is cuda_function
    assert importlib.import_module("cupynn.kernels._checks").backend_of is originals["backend_of"]
    assert cupynn.gpu_available() == (originals["_gpu_backend_or_reason"]()[0] is not None)


def test_device_arrays_keep_cupy_shapes_and_identities(fake_gpu):
    xp = fake_gpu.xp
    a = xp.arange(6.0)
    assert xp.asarray(a) is a and xp.ascontiguousarray(a) is a  # nothing to change
    zero_d = a.sum()
    assert xp.ascontiguousarray(zero_d).shape == ()  # NumPy's would be (1,)
    t = a.reshape(2, 3).T
    c = xp.ascontiguousarray(t)
    assert c is not t and c.flags.c_contiguous and type(c) is DeviceArray
    assert type(a[0]) is DeviceArray and a[0].shape == ()
    assert [type(e) for e in a[:2]] == [DeviceArray, DeviceArray]
    assert type(xp.concatenate([a, a])) is DeviceArray
    assert cupynn.to_numpy(a).tolist() == a.tolist()


# ---------------------------------------------------------------- kernels
def test_spmm_sddmm_and_spmm_t_run_emulated_and_equal_the_cpu(fake_gpu):
    a = csr()
    d = on(fake_gpu, a)
    n_cols = a["x"].shape[0]
    y = kernels.spmm(d["indptr"], d["indices"], d["data"], d["x"], bias=d["bias"], relu=True)
    dx = kernels.spmm_t(d["indptr"], d["indices"], d["data"], d["dy"], n_cols)
    g_warp = kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"], method="warp")
    g_thread = kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"], method="thread")
    assert fake_gpu.launches == ["spmm_f64", "spmm_t_f64", "sddmm_warp_f64", "sddmm_f64"]
    assert all(type(r) is DeviceArray for r in (y, dx, g_warp, g_thread))
    cpu_y = kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], bias=a["bias"], relu=True)
    cpu_dx = kernels.spmm_t(a["indptr"], a["indices"], a["data"], a["dy"], n_cols)
    cpu_g = kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"])
    numpy.testing.assert_allclose(y.get(), cpu_y, rtol=1e-12, atol=1e-14)
    numpy.testing.assert_allclose(dx.get(), cpu_dx, rtol=1e-12, atol=1e-14)
    numpy.testing.assert_allclose(g_warp.get(), cpu_g, rtol=1e-12, atol=1e-14)
    numpy.testing.assert_allclose(g_thread.get(), cpu_g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_adam_on_the_fake_gpu_equals_the_twin(fake_gpu, dtype):
    s = adam_state(40, dtype)
    ref = adam_reference(s, 3)
    p, g, m, v = (fake_gpu.asarray(s[k]) for k in "pgmv")
    kernels.adam(p, g, m, v, **adam_hyper(3))
    assert fake_gpu.launches == [f"adam_{'f32' if dtype == numpy.float32 else 'f64'}"]
    assert_adam_step(p, m, v, ref, dtype)


LOSSES = [("cross_entropy", "softmax_cross_entropy", "softmax_cross_entropy_rows"),
          ("binary_cross_entropy", "binary_cross_entropy", "binary_cross_entropy_rows"),
          ("mean_squared_error", "mean_squared_error", "squared_error_rows")]


@pytest.mark.parametrize("loss, kernel, family", LOSSES, ids=[c[0] for c in LOSSES])
def test_losses_on_the_fake_gpu_equal_the_cpu(fake_gpu, loss, kernel, family):
    """cupynn.losses on the device (NumPy work) and loss.cu's two launches, against the CPU."""
    from cupynn.kernels import loss as fused

    rng = numpy.random.default_rng(6)
    logits = 3 * rng.standard_normal((11, 1 if loss == "binary_cross_entropy" else 4))
    labels = {"cross_entropy": rng.integers(0, 4, 11),
              "binary_cross_entropy": (rng.random(11) < 0.5).astype(numpy.float64),
              "mean_squared_error": logits + rng.standard_normal(logits.shape)}[loss]
    value, grad = getattr(cupynn.losses, loss)(logits, labels)
    device = (fake_gpu.asarray(logits), fake_gpu.asarray(labels))
    for got in (getattr(cupynn.losses, loss)(*device), getattr(fused, kernel)(*device)):
        assert type(got[0]) is type(got[1]) is DeviceArray
        assert abs(float(got[0]) - float(value)) <= 1e-12
        numpy.testing.assert_allclose(got[1].get().reshape(grad.shape), grad, rtol=0, atol=1e-12)
    assert fake_gpu.launches[-2:] == [f"{family}_f64", "mean_of_rows_f64"]


def test_only_kernels_that_meet_their_lanes_run_warp_by_warp():
    sddmm, loss = warp_kernels(KERNEL_DIR / "sddmm.cu"), warp_kernels(KERNEL_DIR / "loss.cu")
    assert {"sddmm_warp_f64", "relu_grad_rowsum_f32"} <= sddmm and "sddmm_f64" not in sddmm
    assert loss == {"mean_of_rows_f32", "mean_of_rows_f64"}  # not the per-row kernels
    assert warp_kernels(KERNEL_DIR / "spmm.cu") == warp_kernels(KERNEL_DIR / "adam.cu") == set()


def test_kernel_arguments_are_checked_against_the_cu_signature(fake_gpu):
    kernel = _launch.cuda_function("adam.cu", "adam_f64")
    p = fake_gpu.xp.zeros(4)
    scalars = (numpy.float64(0.1),) * 8
    with pytest.raises(TypeError, match=r"argument 12 \(long long n\) must be numpy.int64"):
        kernel((1,), (32,), (p, p, p, p, *scalars, 4))  # a Python int: 64 bits, by luck
    with pytest.raises(TypeError, match="must be a device array"):
        kernel((1,), (32,), (numpy.zeros(4), p, p, p, *scalars, numpy.int64(4)))
    with pytest.raises(TypeError, match="points at float64. Got a float32"):
        kernel((1,), (32,), (p.astype(numpy.float32), p, p, p, *scalars, numpy.int64(4)))
    with pytest.raises(TypeError, match="takes 13 arguments"):
        kernel((1,), (32,), (p, p, p, p))
    with pytest.raises(ValueError, match="1-D launches only"):
        kernel((1, 2), (32,), (p, p, p, p, *scalars, numpy.int64(4)))
    assert fake_gpu.launches == []


def test_threads_run_last_to_first_give_the_same_bits():
    a = csr()
    results = []
    for reverse in (False, True):
        with FakeGpu(reverse=reverse) as fake:
            d = on(fake, a)
            results.append([kernels.spmm(d["indptr"], d["indices"], d["data"], d["x"]).get(),
                            kernels.sddmm(d["indptr"], d["indices"], d["dy"], d["x"]).get()])
    for forward, backward in zip(*results):
        numpy.testing.assert_array_equal(forward, backward)


def test_read_later_copies_through_the_fake_runtime(fake_gpu):
    value = fake_gpu.xp.arange(3.0).sum()
    pending = fake_gpu.backend.read_later(value)
    assert pending.ready() and float(pending.value()) == 3.0
    assert fake_gpu.launches == ["memcpyAsync"]


# ---------------------------------------------------------------- capture
def adam_args(fake: FakeGpu, n: int = 16, seed: int = 3) -> tuple:
    s = adam_state(n, numpy.float64, seed)
    scalars = kernels.adam_scalars(numpy.float64, **adam_hyper(1))
    return tuple(fake.asarray(s[k]) for k in "pgmv"), scalars


def test_a_capture_records_launches_and_a_replay_runs_them(fake_gpu):
    xp = fake_gpu.xp
    a = on(fake_gpu, csr())
    (p, _, m, v), scalars = adam_args(fake_gpu, n=a["indices"].shape[0])
    grad = xp.zeros_like(p)
    # Eager reference on copies: SDDMM into grad, then Adam from grad, twice.
    ref = [x.copy() for x in (p, m, v)]
    ref_grad = xp.zeros_like(p)
    for _ in range(2):
        kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"], out=ref_grad, check=False)
        kernels.adam(*ref[:1], ref_grad, *ref[1:], scalars, check=False)
    eager = list(fake_gpu.launches)
    assert eager == ["sddmm_warp_f64", "adam_f64"] * 2
    before = [x.get() for x in (p, m, v, grad)]

    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        assert xp.cuda.get_current_stream() is stream
        stream.begin_capture()
        assert stream.is_capturing()
        kernels.sddmm(a["indptr"], a["indices"], a["dy"], a["x"], out=grad, check=False)
        kernels.adam(p, grad, m, v, scalars, check=False)
        graph = stream.end_capture()
    assert graph.launches == ["sddmm_warp_f64", "adam_f64"]
    assert graph.host_ops == [] and graph.allocations.count == 0
    assert fake_gpu.launches == eager  # recorded, not run
    for array, old in zip((p, m, v, grad), before):
        numpy.testing.assert_array_equal(array.get(), old)
    graph.launch(stream)
    graph.launch(stream)
    assert graph.replays == 2 and fake_gpu.launches == eager
    for array, expected in zip((p, m, v), ref):
        numpy.testing.assert_array_equal(array.get(), expected.get())
    numpy.testing.assert_array_equal(grad.get(), ref_grad.get())


def test_numpy_work_inside_a_capture_runs_once_and_is_not_replayed(fake_gpu):
    (p, g, m, v), scalars = adam_args(fake_gpu)
    kernels.adam(p.copy(), g, m.copy(), v.copy(), scalars, check=False)  # loads adam.cu
    p0, m0, v0 = p.get(), m.get(), v.get()
    # Eagerly: Adam, then p doubled.
    eager = [x.copy() for x in (p, m, v)]
    kernels.adam(eager[0], g, eager[1], eager[2], scalars, check=False)
    eager[0] *= 2
    stream = fake_gpu.xp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        kernels.adam(p, g, m, v, scalars, check=False)
        p *= 2  # host work: runs now, on p as it is before the (recorded) kernel
        graph = stream.end_capture()
    assert graph.launches == ["adam_f64"] and graph.host_ops == ["multiply"]
    numpy.testing.assert_array_equal(p.get(), 2 * p0)
    graph.launch()
    # The replay is Adam alone, from the doubled p: not what the eager step did.
    expected = [fake_gpu.asarray(a) for a in (2 * p0, m0, v0)]
    kernels.adam(expected[0], g, expected[1], expected[2], scalars, check=False)
    numpy.testing.assert_array_equal(p.get(), expected[0].get())
    assert not numpy.allclose(p.get(), eager[0].get())


def test_an_allocation_inside_a_strict_capture_fails_it(fake_gpu):
    stream = fake_gpu.xp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        buffer = fake_gpu.xp.zeros(1000)
        with pytest.raises(CaptureError, match=r"8000 bytes x1 at .*test_fake_gpu.py"):
            stream.end_capture()
    assert not fake_gpu.capturing
    del buffer


def test_a_lax_capture_reports_allocations_even_freed_ones():
    with FakeGpu(strict=False) as fake:
        a = on(fake, csr(n_rows=9, batch=4))
        kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], check=False)  # loads spmm.cu
        stream = fake.xp.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            out = kernels.spmm(a["indptr"], a["indices"], a["data"], a["x"], check=False)
            del out  # freed before the end: seen at the launch that wrote it
            graph = stream.end_capture()
    assert graph.launches == ["spmm_f64"]
    assert graph.allocations.count == 1 and graph.allocations.bytes == 9 * 4 * 8
    assert "cupynn/kernels/spmm.py" in graph.allocations.sites[0][0]


def sync_by_get(xp, x, stream):
    x.get()


def sync_by_float(xp, x, stream):
    float(x.sum())


def sync_by_bool(xp, x, stream):
    bool((x > 0).all())


def sync_by_stream(xp, x, stream):
    stream.synchronize()


def sync_by_backend(xp, x, stream):
    cupynn.get_backend("gpu").synchronize()


def sync_by_nonzero(xp, x, stream):
    xp.flatnonzero(x)


def sync_by_upload(xp, x, stream):
    xp.asarray(numpy.ones(3))


SYNCS = [sync_by_get, sync_by_float, sync_by_bool, sync_by_stream, sync_by_backend,
         sync_by_nonzero, sync_by_upload]


@pytest.mark.parametrize("sync", SYNCS, ids=lambda f: f.__name__)
def test_a_host_synchronisation_inside_a_capture_fails_it(fake_gpu, sync):
    xp = fake_gpu.xp
    x = xp.arange(4.0)
    stream = xp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(CaptureError, match="during stream capture"):
            sync(xp, x, stream)
        with pytest.raises(CaptureError, match="invalidated"):
            stream.end_capture()
    assert not fake_gpu.capturing
    sync(xp, x, stream)  # outside a capture: fine


def test_a_module_cannot_be_loaded_inside_a_capture(fake_gpu):
    (p, g, m, v), scalars = adam_args(fake_gpu)
    stream = fake_gpu.xp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(CaptureError, match="loading the module adam.cu"):
            kernels.adam(p, g, m, v, scalars, check=False)
        with pytest.raises(CaptureError, match="invalidated"):
            stream.end_capture()
    with pytest.raises(CaptureError, match="null stream"):
        fake_gpu.xp.cuda.Stream.null.begin_capture()


# ---------------------------------------------------------------- the model
def test_mlp_forward_backward_loss_and_adam_equal_the_cpu(fake_gpu):
    rng = numpy.random.default_rng(5)
    x = rng.standard_normal((10, 6))
    labels = rng.integers(0, 3, 10)
    models = {}
    for name, device in (("cpu", "cpu"), ("fake", fake_gpu.backend)):
        model = cupynn.MLP([6, 8, 3], density=0.5, device=device, dtype="float64", seed=2)
        optimizer = cupynn.Adam(model, lr=1e-2)
        logits = model.forward(x)
        y = labels if name == "cpu" else fake_gpu.xp.asarray(labels)
        loss, grad = cupynn.losses.cross_entropy(logits, y)
        model.backward(grad, need_input_grad=False)
        optimizer.step()
        models[name] = (model, logits, loss)
    (cpu, cpu_logits, cpu_loss), (fake, fake_logits, fake_loss) = models["cpu"], models["fake"]
    assert type(fake_logits) is DeviceArray
    numpy.testing.assert_allclose(fake_logits.get(), cpu_logits, rtol=0, atol=1e-12)
    assert abs(float(fake_loss) - float(cpu_loss)) <= 1e-12
    for a, b in zip(cpu.layers, fake.layers):
        numpy.testing.assert_allclose(b.data.get(), a.data, rtol=0, atol=1e-12)
        numpy.testing.assert_allclose(b.grad_data.get(), a.grad_data, rtol=0, atol=1e-12)
        numpy.testing.assert_allclose(b.bias.get(), a.bias, rtol=0, atol=1e-12)
    assert {"spmm_f64", "sddmm_warp_f64", "adam_f64"} <= set(fake_gpu.launches)


@pytest.mark.parametrize("multi_tensor", [False, True], ids=["per_array", "multi_tensor"])
def test_fit_on_the_fake_gpu_equals_fit_on_the_cpu(fake_gpu, multi_tensor):
    rng = numpy.random.default_rng(0)
    x, y = rng.standard_normal((40, 6)), rng.integers(0, 3, 40)
    runs = {}
    for name, device in (("cpu", "cpu"), ("fake", fake_gpu.backend)):
        model = cupynn.MLP([6, 8, 3], density=0.5, device=device, dtype="float64", seed=2)
        optimizer = cupynn.Adam(model, lr=1e-2, multi_tensor=multi_tensor)
        history = cupynn.fit(model, optimizer, (x, y), (x, y), epochs=2, batch_size=16,
                             redistribution="gradient", seed=1, progress=False)
        runs[name] = history, model
    (cpu_history, cpu), (fake_history, fake) = runs["cpu"], runs["fake"]
    for a, b in zip(cpu_history, fake_history):
        assert abs(a["train_loss"] - b["train_loss"]) <= 1e-12
        assert a["test_accuracy"] == b["test_accuracy"]
    for a, b in zip(cpu.layers, fake.layers):
        numpy.testing.assert_array_equal(b.indices.get(), a.indices)  # the same rewiring
        numpy.testing.assert_allclose(b.data.get(), a.data, rtol=0, atol=1e-12)
    # 2 epochs of 3 batches; Adam once per array (2 layers' data and bias), or once.
    if multi_tensor:
        assert fake_gpu.launches.count("adam_multi_f64") == 2 * 3
    else:
        assert fake_gpu.launches.count("adam_f64") == 2 * 3 * 4
    assert fake_gpu.launches.count("spmm_f64") >= 2 * 3 * 2  # two layers forward per batch
