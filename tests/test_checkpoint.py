"""Checkpoints: a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import pickle

import numpy
import pytest

import cupynn
from cupynn import to_numpy
from cupynn.backend import backend_of
from cupynn.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from cupynn.training import Trainer

TIMING = {"train_seconds", "eval_seconds", "redistribution_seconds"}


def _data(rng):
    x = rng.standard_normal((240, 20)).astype(numpy.float32)
    y = (x[:, :3].argmax(axis=1)).astype(numpy.int64)
    return x, y


class Resampled:
    """Draws each epoch's rows, as the HIGGS loader does."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def sample_epoch(self, rng):
        rows = rng.choice(len(self.x), size=150, replace=False)
        return self.x[rows], self.y[rows]


def _noise(x, rng):
    """A stand-in augmentation that consumes its random stream."""
    xp = backend_of(x).xp
    return x + xp.asarray(rng.standard_normal(x.shape).astype(x.dtype)) * x.dtype.type(0.01)


def _trainer(backend, data, name, epochs=5):
    model = cupynn.MLP([20, 24, 16, 3], density=0.3, dense_layers=(-1,), seed=1, device=backend)
    optimizer = cupynn.Adam(model, lr=5e-3)
    return Trainer(model, optimizer, Resampled(*data), data, epochs=epochs, batch_size=32,
                   seed=4, progress=False, redistribution=name, alpha=0.5, augment=_noise)


def _strip(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


@pytest.mark.parametrize("name", ["woodtaylor", "random", "loss"])
def test_resume_gives_the_uninterrupted_result(backend, rng, tmp_path, name):
    data = _data(rng)
    full = _trainer(backend, data, name)
    full.run()

    first = _trainer(backend, data, name)
    first.on_epoch_end = lambda metrics: metrics["epoch"] < 2  # stop after epoch 2
    first.run()
    save_checkpoint(tmp_path, first)

    resumed = _trainer(backend, data, name)
    load_checkpoint(tmp_path, resumed)
    assert resumed.epoch == 2
    resumed.run()

    assert _strip(resumed.history) == _strip(full.history)
    assert any("induced_loss_before" in h for h in resumed.history[2:])
    for a, b in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert a[0] == b[0]
        numpy.testing.assert_array_equal(a[1], b[1])
    for key, value in full.optimizer.state_dict().items():
        other = resumed.optimizer.state_dict()[key]
        if isinstance(value, numpy.ndarray):
            numpy.testing.assert_array_equal(value, other)
        else:
            assert value == other


def test_checkpoint_holds_csr_moments_and_rng(backend, rng, tmp_path):
    data = _data(rng)
    trainer = _trainer(backend, data, "gradient", epochs=1)
    trainer.run()
    save_checkpoint(tmp_path, trainer)
    meta, arrays = read_checkpoint(tmp_path)
    assert meta["trainer"]["epoch"] == 1 and meta["optimizer"]["t"] == trainer.optimizer.t
    layer = trainer.model.layers[0]
    numpy.testing.assert_array_equal(arrays["model/0.indices"], to_numpy(layer.indices))
    numpy.testing.assert_array_equal(arrays["optimizer/0.data.m"],
                                     to_numpy(trainer.optimizer.moments(layer, "data")[0]))
    assert meta["trainer"]["rng"]["bit_generator"] == "PCG64"
    assert not list(tmp_path.glob("*.tmp"))


def test_checkpoint_for_another_model_is_refused(backend, rng, tmp_path):
    data = _data(rng)
    trainer = _trainer(backend, data, None, epochs=1)
    save_checkpoint(tmp_path, trainer)
    model = cupynn.MLP([20, 30, 3], device=backend)
    other = Trainer(model, cupynn.Adam(model), data, epochs=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="The checkpoint's model .* differs from the trainer's"):
        load_checkpoint(tmp_path, other)
    with pytest.raises(FileNotFoundError, match="No checkpoint at"):
        read_checkpoint(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="is not a readable cupynn checkpoint"):
        read_checkpoint(tmp_path / "bad")


def _npy_named_npz(path):
    with open(path, "wb") as f:
        numpy.save(f, numpy.ones(3))


def _model_file(path):
    cupynn.save(cupynn.MLP([4, 5, 2], density=0.5), path)


def _directory(path):
    path.unlink()
    path.mkdir()


NOT_CHECKPOINTS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
                  r"a damaged .npz archive: corrupt or truncated \(BadZipFile"),
    "cut in its last bytes": (lambda p: p.write_bytes(p.read_bytes()[:-10]),
                              "corrupt or truncated"),
    "empty": (lambda p: p.write_bytes(b""), "the file is empty"),
    "garbage": (lambda p: p.write_bytes(bytes(range(7, 256)) * 4),
                r"not a .npz \(zip\) archive: corrupt or truncated, or another kind of file"),
    "model file": (_model_file, r"it is a model file \(cupynn.save\), which holds the weights but "
                                r"not the optimizer's and the training loop's state"),
    "npy": (_npy_named_npz, r"a single NumPy array \(.npy"),
    "pickle": (lambda p: p.write_bytes(pickle.dumps({"meta": "{}"})), "it is a pickle"),
    "foreign npz": (lambda p: numpy.savez(p, w=numpy.ones(2)),
                    r"it has no checkpoint record \(it holds \['w'\]\)"),
    "record not json": (lambda p: numpy.savez(p, meta=numpy.array("{oops")),
                        "its record is not JSON"),
    "record not a dict": (lambda p: numpy.savez(p, meta=numpy.array("[1, 2]")),
                          "its record is not a checkpoint's"),
    "record without state": (lambda p: numpy.savez(p, meta=numpy.array('{"format": 1}')),
                             "its record lacks the model, optimizer or trainer state"),
    "directory": (_directory, "it is a directory"),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_what_is_not_a_checkpoint_is_a_value_error_that_says_what(rng, tmp_path, case):
    """Never a zipfile.BadZipFile, EOFError, pickle message or KeyError: the scripts turn this
    ValueError into one paragraph and status 2 (tests/test_cli_errors.py)."""
    trainer = _trainer("cpu", _data(rng), None, epochs=1)
    path = save_checkpoint(tmp_path, trainer)
    damage, message = NOT_CHECKPOINTS[case]
    damage(path)
    with pytest.raises(ValueError, match=message) as info:
        read_checkpoint(tmp_path)
    assert str(info.value).startswith(f"{path} is not a readable cupynn checkpoint: ")
