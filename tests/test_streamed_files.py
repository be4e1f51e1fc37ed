"""Model files and checkpoints are written as a stream and read lazily (issue 21).

A model of a billion weights on a GPU is tens of GB: building a dict of host copies
of every array before writing (``state_dict()`` then ``numpy.savez``) needs that
much host memory again. Here, the files are what ``numpy.savez`` wrote, byte for
byte, and :mod:`tracemalloc` (which sees NumPy's buffers) shows that saving holds
about the largest array, not all of them; the fake GPU makes every array a device
array whose host copy is an allocation of its own.
"""

from __future__ import annotations

import json
import time
import tracemalloc
import types
import zipfile

import numpy
import pytest
from fake_gpu import fake_gpu  # noqa: F401 (a fixture)

import cupynn
from cupynn.checkpoint import FORMAT, load_checkpoint, read_checkpoint, save_checkpoint
from cupynn.serialization import write_npz
from cupynn.training import Trainer

# Six hidden layers of about the same size: the largest array is a small share of all.
SIZES = [200] + [500] * 6 + [10]


@pytest.fixture
def frozen_clock(monkeypatch):
    """zipfile stamps each member with the time it was written: one second for all."""
    clock = types.SimpleNamespace(time=lambda: 1_700_000_000.0, localtime=time.localtime)
    monkeypatch.setattr(zipfile, "time", clock)


def _members(path):
    """{name: (ZipInfo fields, raw bytes)} of a zip, in the archive's order."""
    with zipfile.ZipFile(path) as archive:
        return {info.filename: ((info.compress_type, info.file_size, info.CRC, info.date_time,
                                 info.extra), archive.read(info))
                for info in archive.infolist()}


def _trainer(device="cpu", epochs=1):
    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((96, 12)).astype(numpy.float32)
    y = x[:, :3].argmax(axis=1)
    model = cupynn.MLP([12, 20, 16, 3], density=0.4, dense_layers=(-1,), seed=5, device=device)
    trainer = Trainer(model, cupynn.Adam(model, lr=3e-3), (x, y), epochs=epochs, batch_size=32,
                      seed=2, progress=False, redistribution="random", alpha=0.3)
    trainer.run()
    return trainer


def test_write_npz_writes_what_numpy_savez_writes(tmp_path, frozen_clock):
    arrays = {"a": numpy.arange(7, dtype=numpy.int32), "b/c": numpy.ones((3, 4)),
              "empty": numpy.zeros(0, numpy.float32), "text": numpy.array('{"x": 1}'),
              "fortran": numpy.asfortranarray(numpy.arange(12.0).reshape(3, 4))}
    write_npz(tmp_path / "streamed.npz", iter(arrays.items()))
    numpy.savez(tmp_path / "savez.npz", **arrays)
    assert (tmp_path / "streamed.npz").read_bytes() == (tmp_path / "savez.npz").read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_write_leaves_no_file(tmp_path):
    def arrays():
        yield "a", numpy.ones(3)
        raise RuntimeError("the device went away")

    with pytest.raises(RuntimeError, match="the device went away"):
        write_npz(tmp_path / "m.npz", arrays())
    assert list(tmp_path.iterdir()) == []


def test_model_file_is_savez_of_the_state_dict(tmp_path, frozen_clock):
    """Member by member and byte for byte what cupynn.save wrote before streaming."""
    model = _trainer().model
    path = cupynn.save(model, tmp_path / "streamed.npz")
    with numpy.load(path) as archive:
        header = archive["header"]
    state = model.state_dict()
    numpy.savez(tmp_path / "savez.npz", **state, header=header)
    streamed, reference = _members(path), _members(tmp_path / "savez.npz")
    assert list(streamed) == [f"{key}.npy" for key in state] + ["header.npy"]
    assert streamed == reference
    assert path.read_bytes() == (tmp_path / "savez.npz").read_bytes()
    assert json.loads(str(header))["version"] == cupynn.serialization.FORMAT_VERSION


def test_checkpoint_is_savez_of_the_state_dicts(tmp_path, frozen_clock):
    """The members, dtypes, shapes and bytes of the checkpoint numpy.savez wrote from the
    model's and the optimizer's state_dict(): the scalars that save_checkpoint reads from
    Adam are the ones its state_dict() gives."""
    trainer = _trainer()
    path = save_checkpoint(tmp_path / "run", trainer)
    arrays = {f"model/{k}": v for k, v in trainer.model.state_dict().items()}
    scalars = {}
    for key, value in trainer.optimizer.state_dict().items():
        if isinstance(value, numpy.ndarray):
            arrays[f"optimizer/{key}"] = value
        else:
            scalars[key] = value
    meta = {"format": FORMAT, "model": trainer.model.config(), "optimizer": scalars,
            "trainer": trainer.state_dict()}
    arrays["meta"] = numpy.array(json.dumps(meta))
    numpy.savez(tmp_path / "savez.npz", **arrays)
    assert _members(path) == _members(tmp_path / "savez.npz")
    assert path.read_bytes() == (tmp_path / "savez.npz").read_bytes()


def _wide(device):
    model = cupynn.MLP(SIZES, density=0.2, dense_layers=(-1,), seed=1, dtype="float64",
                       device=device)
    sizes = [a.nbytes for a in model.state_dict().values()]
    return model, sum(sizes), max(sizes)


@pytest.fixture
def traced():
    """tracemalloc on for the whole test: a block is counted when it is freed only if it
    was allocated while tracing, so the arrays a load replaces must be traced too."""
    tracemalloc.start()
    yield
    tracemalloc.stop()


def _peak(call):
    """Bytes allocated at the peak of ``call()`` above what was allocated before it, and
    what it returned."""
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    result = call()
    return tracemalloc.get_traced_memory()[1] - before, result


def _devices(fake_gpu):
    return {"cpu": "cpu", "fake gpu": fake_gpu.backend}


@pytest.mark.parametrize("device", ["cpu", "fake gpu"])
def test_saving_a_model_holds_one_array_not_all(tmp_path, fake_gpu, traced, device):
    """Before: state_dict() held a host copy of every array (peak >= total)."""
    model, total, largest = _wide(_devices(fake_gpu)[device])
    peak, _ = _peak(lambda: cupynn.save(model, tmp_path / "m.npz"))
    # One host copy of the array being written and write_array's bytes of it.
    assert peak < 0.6 * total, (peak, total, largest)
    assert peak < 2 * largest + 2**20, (peak, total, largest)
    again = cupynn.load(tmp_path / "m.npz", device="cpu")
    for (ka, a), (kb, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert ka == kb
        numpy.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("device", ["cpu", "fake gpu"])
def test_saving_a_checkpoint_holds_one_array_not_all(tmp_path, fake_gpu, traced,
                                                     device):
    model, total, largest = _wide(_devices(fake_gpu)[device])
    optimizer = cupynn.Adam(model)  # moments of zeros: two more arrays per parameter
    total += sum(a.nbytes for a in optimizer.state_dict().values()
                 if isinstance(a, numpy.ndarray))
    trainer = Trainer(model, optimizer, (numpy.zeros((4, SIZES[0])), numpy.zeros(4, int)),
                      epochs=1, batch_size=4, progress=False)
    peak, _ = _peak(lambda: save_checkpoint(tmp_path, trainer))
    assert peak < 0.6 * total, (peak, total, largest)
    assert peak < 2 * largest + 2**20, (peak, total, largest)


def test_loading_holds_about_one_layer_not_the_file(tmp_path, traced):
    """cupynn.load and load_checkpoint read the archive lazily: beyond the model (and the
    optimizer) they fill, the host holds about a layer's arrays, not the file's. Before:
    the whole file was read into a dict first (peak: the arrays, again)."""
    model, total, largest = _wide("cpu")
    path = cupynn.save(model, tmp_path / "m.npz")
    # A load builds the model (its own arrays, then replaced by the file's) and more.
    peak, again = _peak(lambda: cupynn.load(path, device="cpu"))
    after = tracemalloc.get_traced_memory()[0]
    again = None
    gone = tracemalloc.get_traced_memory()[0]
    assert after - gone >= 0.9 * total  # the model it built, all of it traced
    peak, again = _peak(lambda: cupynn.load(path, device="cpu"))
    assert peak < 1.6 * total, (peak, total)
    numpy.testing.assert_array_equal(again.layers[3].data, model.layers[3].data)

    optimizer = cupynn.Adam(model)
    trainer = Trainer(model, optimizer, (numpy.zeros((4, SIZES[0])), numpy.zeros(4, int)),
                      epochs=1, batch_size=4, progress=False)
    save_checkpoint(tmp_path, trainer)
    total += sum(a.nbytes for a in optimizer.state_dict().values()
                 if isinstance(a, numpy.ndarray))
    peak, meta = _peak(lambda: load_checkpoint(tmp_path, trainer))  # arrays replaced in place
    assert meta["format"] == FORMAT
    assert peak < 0.6 * total, (peak, total)


def test_a_damaged_member_found_while_loading_is_named(tmp_path):
    """The CRC of a member is checked only as it is read: a flipped byte in an array
    raises the damaged-archive message of each reader, not zipfile's BadZipFile."""
    model = _trainer().model
    path = cupynn.save(model, tmp_path / "m.npz")
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("2.weight.npy")  # the dense layer
    data = bytearray(path.read_bytes())
    data[info.header_offset + 200] ^= 0xFF  # inside the member's data, past its headers
    path.write_bytes(bytes(data))
    with pytest.raises(cupynn.ModelFileError, match=r"m.npz: not a readable cupynn model "
                                                    r"file: it is a damaged .npz archive: "
                                                    r"corrupt or truncated \(BadZipFile"):
        cupynn.load(path)

    trainer = _trainer()
    path = save_checkpoint(tmp_path, trainer)
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("optimizer/0.data.v.npy")
    data = bytearray(path.read_bytes())
    data[info.header_offset + 250] ^= 0xFF
    path.write_bytes(bytes(data))
    message = rf"{path} is not a readable cupynn checkpoint: it is a damaged .npz archive"
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path, _trainer())
    with pytest.raises(ValueError, match=message):
        read_checkpoint(tmp_path)
