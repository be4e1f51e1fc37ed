"""Model files (cupynn.save / cupynn.load), pickling, and export for inference."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zipfile

import numpy
import pytest

import cupynn
from cupynn import ModelFileError, to_numpy
from cupynn.serialization import FORMAT_VERSION


def trained(backend, dtype="float32"):
    """A small model with a redistributed (non-initial) topology and a dense layer."""
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((120, 10)).astype(dtype)
    y = rng.integers(0, 3, 120)
    model = cupynn.MLP([10, 12, 8, 3], density=0.3, dense_layers=(1,), seed=2, dtype=dtype,
                       device=backend, activation="sigmoid")
    cupynn.fit(model, cupynn.Adam(model), (x, y), epochs=4, batch_size=30, progress=False,
               redistribution="gradient-global")
    return model, x


def test_save_load_gives_identical_predictions(backend, tmp_path):
    """The weights come back bit for bit on either device; the predictions too on the
    model's own device, and within float32 rounding on the other (a GPU's products
    fuse multiply-adds and sum in another order than the CPU's)."""
    model, x = trained(backend)
    path = cupynn.save(model, tmp_path / "sub" / "model.npz")
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    for device in ("cpu", backend):
        again = cupynn.load(path, device=device)
        assert again.config() == model.config() and again.nnz == model.nnz
        if again.backend is model.backend:
            numpy.testing.assert_array_equal(again.predict(x), model.predict(x))
        else:
            numpy.testing.assert_allclose(again.predict(x), model.predict(x), rtol=1e-5,
                                          atol=1e-6)
        for a, b in zip(model.layers, again.layers):
            numpy.testing.assert_array_equal(a.to_dense(), b.to_dense())


def test_the_file_is_plain_numpy(tmp_path):
    model, _ = trained("cpu", "float64")
    cupynn.save(model, tmp_path / "m.npz")
    with numpy.load(tmp_path / "m.npz", allow_pickle=False) as archive:
        header = json.loads(str(archive["header"]))
        assert header["format"] == "cupynn-model" and header["version"] == FORMAT_VERSION
        assert header["config"]["sizes"] == [10, 12, 8, 3]
        assert [l["kind"] for l in header["layers"]] == ["sparse", "dense", "sparse"]
        assert archive["0.data"].dtype == numpy.float64 and archive["1.weight"].shape == (8, 12)


def rewrite(path, change):
    """The model file at ``path`` with its arrays changed by ``change(arrays)``."""
    with numpy.load(path) as archive:
        arrays = {k: archive[k] for k in archive.files}
    change(arrays)
    with open(path, "wb") as f:
        numpy.savez(f, **arrays)


def header_change(**fields):
    def change(arrays):
        header = json.loads(str(arrays["header"]))
        header.update(fields)
        arrays["header"] = numpy.array(json.dumps(header))
    return change


BAD_FILES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:300]), "corrupt or truncated"),
    "garbage": (lambda p: p.write_bytes(b"not a zip at all" * 20), "corrupt or truncated"),
    "foreign npz": (lambda p: numpy.savez(p, weights=numpy.ones(3)),
                    r"not a cupynn model file \(no cupynn header; it holds \['weights'\]\)"),
    "checkpoint": (lambda p: rewrite(p, lambda a: a.update(header=numpy.array('{"format": 1}'))),
                   "not a cupynn model file"),
    "bad json": (lambda p: rewrite(p, lambda a: a.update(header=numpy.array("{oops"))),
                 "its header is not JSON"),
    "newer": (lambda p: rewrite(p, header_change(version=FORMAT_VERSION + 1, cupynn="9.0")),
              rf"written in model-file format {FORMAT_VERSION + 1} by cupynn 9.0; this cupynn "
              rf"\(0.1.0\) reads format {FORMAT_VERSION} and older. Upgrade cupynn"),
    "missing array": (lambda p: rewrite(p, lambda a: a.pop("2.indices")),
                      "layer 2 has no array 'indices'"),
    "unsorted": (lambda p: rewrite(p, lambda a: a.update({"0.indices": a["0.indices"][::-1]})),
                 "layer 0: column indices must be sorted and unique within each row"),
    "wrong dtype": (lambda p: rewrite(p, lambda a: a.update({"1.weight": a["1.weight"].astype(numpy.float64)})),
                    r"layer 1's weight must be float32 of shape \(8, 12\)"),
    "bad bias": (lambda p: rewrite(p, lambda a: a.update({"0.bias": a["0.bias"][:3]})),
                 r"layer 0's bias must be float32 of shape \(12,\)"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_rejected_with_their_problem(tmp_path, case):
    model, _ = trained("cpu")
    path = cupynn.save(model, tmp_path / "m.npz")
    damage, message = BAD_FILES[case]
    damage(path)
    with pytest.raises(ModelFileError, match=message) as info:
        cupynn.load(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_named(tmp_path):
    """A ModelFileError, and a FileNotFoundError for code that catches that."""
    for error in (FileNotFoundError, ModelFileError):
        with pytest.raises(error, match="No cupynn model file at .*nothing.npz"):
            cupynn.load(tmp_path / "nothing.npz")


def _npy(path):
    numpy.save(path, numpy.ones(3))
    return path


def _pickled(path):
    model, _ = trained("cpu")
    path.write_bytes(pickle.dumps(model))
    return path


def _directory(path):
    path.mkdir()
    cupynn.save(trained("cpu")[0], path / "model.npz")  # as a run's directory holds it
    return path


def _checkpoint(path):
    from cupynn.checkpoint import save_checkpoint
    from cupynn.training import Trainer

    model, x = trained("cpu")
    trainer = Trainer(model, cupynn.Adam(model), (x, numpy.arange(len(x)) % 3), epochs=1,
                      batch_size=40, progress=False)
    return save_checkpoint(path, trainer)


def _text(path):
    path.write_text("label,feature\n1,0.5\n")
    return path


NOT_MODEL_FILES = {
    "npy": (lambda d: _npy(d / "a.npy"), r"a single NumPy array \(.npy, numpy.save\)"),
    "npy named npz": (lambda d: _npy(d / "a.npy").rename(d / "a.npz") or d / "a.npz",
                      r"a single NumPy array \(.npy"),
    "pickle": (lambda d: _pickled(d / "m.pkl"), r"it is a pickle, not a .npz archive"),
    "directory": (lambda d: _directory(d / "run"), r"it is a directory. The run's model is "
                                                   r".*run/model.npz"),
    "empty": (lambda d: (d / "e.npz").write_bytes(b"") or d / "e.npz", "the file is empty"),
    "text": (lambda d: _text(d / "t.npz"), r"not a .npz \(zip\) archive: corrupt or truncated, or "
                                           r"another kind of file \(it starts with b'label,'\)"),
    "other zip": (lambda d: zipfile.ZipFile(d / "z.npz", "w").writestr("data.pkl", b"x")
                  or d / "z.npz", "a zip archive but not a .npz: it holds data.pkl"),
    "checkpoint": (lambda d: _checkpoint(d / "run"),
                   r"not a cupynn model file but a training checkpoint"),
}


@pytest.mark.parametrize("case", list(NOT_MODEL_FILES))
def test_what_is_not_a_model_file_is_named(tmp_path, case):
    """cupynn.load of a file that is not a model file says what it is instead, as a
    ModelFileError naming the file (before: TypeError for a .npy, a pickle error...)."""
    make, message = NOT_MODEL_FILES[case]
    path = make(tmp_path)
    with pytest.raises(ModelFileError, match=message) as info:
        cupynn.load(path)
    assert str(path) in str(info.value)


def test_pickle_round_trips_and_training_continues_alike(backend):
    model, x = trained(backend, "float64")
    optimizer = cupynn.Adam(model, lr=3e-3)
    y = numpy.arange(len(x)) % 3
    cupynn.fit(model, optimizer, (x, y), epochs=1, batch_size=40, progress=False)
    model2, optimizer2 = pickle.loads(pickle.dumps((model, optimizer)))
    assert optimizer2.model is model2 and optimizer2.t == optimizer.t
    numpy.testing.assert_array_equal(model2.predict(x), model.predict(x))
    for m, o in ((model, optimizer), (model2, optimizer2)):
        cupynn.fit(m, o, (x, y), epochs=2, batch_size=40, progress=False, seed=4,
                   redistribution="random")
    numpy.testing.assert_array_equal(model2.predict(x), model.predict(x))


def test_to_scipy_is_the_layer(backend):
    model, x = trained(backend, "float64")
    for layer in model.sparse_layers:
        matrix = layer.to_scipy()
        assert matrix.shape == layer.shape and matrix.has_canonical_format
        numpy.testing.assert_array_equal(matrix.toarray(), layer.to_dense())
        numpy.testing.assert_array_equal(matrix.indptr, to_numpy(layer.indptr))


def test_to_torch_computes_the_same_logits(backend):
    torch = pytest.importorskip("torch", reason="PyTorch is an optional extra (peer)")
    from cupynn.export import to_torch

    for dtype in ("float32", "float64"):
        model, x = trained(backend, dtype)
        module = to_torch(model)
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        numpy.testing.assert_allclose(got, model.predict(x), rtol=1e-5 if dtype == "float32"
                                      else 1e-12, atol=1e-6 if dtype == "float32" else 1e-13)
        assert isinstance(module.linear1, torch.nn.Linear)  # the dense layer
        assert [module.sparse_weight(i).layout for i in (0, 2)] == [torch.sparse_csr] * 2
        numpy.testing.assert_array_equal(module.sparse_weight(0).to_dense().numpy(),
                                         model.layers[0].to_dense())


def _exported(torch):
    from cupynn.export import to_torch

    model, x = trained("cpu")
    module = to_torch(model)
    with torch.no_grad():
        logits = module(torch.from_numpy(x))
    return model, x, module, logits


def test_to_torch_module_saves_as_torch_modules(tmp_path):
    """state_dict and whole-module torch.save / torch.load, pickle and deepcopy all give a
    module with the same predictions (before: a class local to to_torch could not be
    pickled, and a sparse CSR buffer could not be deep-copied)."""
    torch = pytest.importorskip("torch", reason="PyTorch is an optional extra (peer)")
    import copy

    from cupynn.export import SparseMLP, to_torch

    model, x, module, logits = _exported(torch)
    assert type(module) is SparseMLP and SparseMLP.__module__ == "cupynn.export"

    torch.save(module.state_dict(), tmp_path / "state.pt")
    fresh = SparseMLP(module.layer_specs, activation="sigmoid")  # the architecture, zeros
    fresh.load_state_dict(torch.load(tmp_path / "state.pt"))  # weights_only: plain tensors
    other_topology = to_torch(cupynn.MLP([10, 12, 8, 3], density=0.3, dense_layers=(1,)))
    with pytest.raises(RuntimeError, match="size mismatch for col0"):
        other_topology.load_state_dict(torch.load(tmp_path / "state.pt"))
    again = {"state_dict": fresh, "pickle": pickle.loads(pickle.dumps(module)),
             "deepcopy": copy.deepcopy(module)}
    torch.save(module, tmp_path / "module.pt")
    again["torch.save"] = torch.load(tmp_path / "module.pt", weights_only=False)
    for how, other in again.items():
        assert other is not module and type(other) is SparseMLP, how
        with torch.no_grad():
            assert torch.equal(other(torch.from_numpy(x)), logits), how
    copied = again["deepcopy"]
    copied.values0.zero_()  # a deep copy shares nothing with the original
    with torch.no_grad():
        assert torch.equal(module(torch.from_numpy(x)), logits)


def test_a_saved_torch_module_loads_in_a_fresh_interpreter(tmp_path):
    """Where only torch.load runs (no cupynn.export imported before): the class is found by
    its name, cupynn.export.SparseMLP."""
    torch = pytest.importorskip("torch", reason="PyTorch is an optional extra (peer)")
    _, x, module, logits = _exported(torch)
    torch.save(module, tmp_path / "module.pt")
    numpy.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy, torch; m = torch.load(sys.argv[1], weights_only=False); "
            "print(type(m).__module__, type(m).__name__); "
            "x = torch.from_numpy(numpy.load(sys.argv[3])); "
            "numpy.save(sys.argv[2], m(x).detach().numpy())")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "module.pt"),
                           str(tmp_path / "out.npy"), str(tmp_path / "x.npy")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["cupynn.export", "SparseMLP"]
    numpy.testing.assert_array_equal(numpy.load(tmp_path / "out.npy"), logits.numpy())


def test_to_torch_refuses_another_dtype_with_what_to_do():
    torch = pytest.importorskip("torch", reason="PyTorch is an optional extra (peer)")
    _, x, module, logits = _exported(torch)
    with pytest.raises(TypeError, match=r"SparseMLP holds torch.float32 weights, so its input "
                                        r"must be a torch.float32 tensor. Got torch.float64: "
                                        r"cast the input"):
        module(torch.from_numpy(x.astype(numpy.float64)))
    with pytest.raises(ValueError, match=r"takes inputs of shape \(batch, 10\). Got \(120, 9\)"):
        module(torch.from_numpy(x[:, :9].copy()))
    with torch.no_grad():  # converted as torch modules are, it takes float64
        got = module.to(torch.float64)(torch.from_numpy(x.astype(numpy.float64)))
    numpy.testing.assert_allclose(got.numpy(), logits.numpy(), rtol=1e-5, atol=1e-6)
