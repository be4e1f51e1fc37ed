"""Checkpoints: everything a training run needs to continue exactly.

One ``.npz`` file holds the model's arrays (CSR ``indptr``/``indices``/
``data``, biases, dense weights), Adam's moments and step, and a JSON record
of the rest: the model's configuration, the training loop's position (epochs
done, history) and every random stream (shuffle and sampling, augmentation,
redistribution). It is written as a stream
(:func:`cupynn.serialization.write_npz`: one array at a time copied from the
device, written and dropped, so the host never holds more than the largest
array) to a temporary file that is renamed when complete, so an interrupted
save never leaves a half-written checkpoint behind. :func:`load_checkpoint`
reads it lazily, moving one array at a time to the device.
"""

from __future__ import annotations

import contextlib
import json
from collections import ChainMap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy

from .backend import to_numpy

FORMAT = 1
FILENAME = "checkpoint.npz"


def save_checkpoint(directory: str | Path, trainer: Any) -> Path:
    """Write ``directory/checkpoint.npz`` for a :class:`cupynn.training.Trainer`.

    The members are those of ``numpy.savez`` over ``model/<key>`` for the model's
    ``state_dict()``, ``optimizer/<key>`` for the optimizer's arrays and ``meta``,
    but no state dict is built: each array is copied from the device as it is
    written.
    """
    from .serialization import model_arrays, write_npz

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    optimizer = trainer.optimizer
    # Adam.state_dict()'s scalars; its arrays are the moments, streamed below.
    optimizer_scalars = {"t": optimizer.t, "lr": optimizer.lr, "betas": list(optimizer.betas),
                         "eps": optimizer.eps}
    meta = {"format": FORMAT, "model": trainer.model.config(), "optimizer": optimizer_scalars,
            "trainer": trainer.state_dict()}

    def arrays() -> Iterator[tuple[str, Any]]:
        for key, value in model_arrays(trainer.model):
            yield f"model/{key}", value
        for key, value in _moments(optimizer):
            yield f"optimizer/{key}", value
        yield "meta", numpy.array(json.dumps(meta))

    return write_npz(directory / FILENAME, arrays())


def _moments(optimizer: Any) -> Iterator[tuple[str, numpy.ndarray]]:
    """Adam's moments as ``Adam.state_dict()`` names and orders them (``"<layer>.<name>.m"``
    then ``".v"``), each copied from the device only when it is asked for."""
    for index, moments in enumerate(optimizer.state):
        for name, (m, v) in moments.items():
            yield f"{index}.{name}.m", to_numpy(m)
            yield f"{index}.{name}.v", to_numpy(v)


@contextlib.contextmanager
def _open_checkpoint(path: str | Path) -> Iterator[tuple[dict[str, Any], Mapping[str, Any]]]:
    """``(meta, arrays)`` of a checkpoint file or of the directory holding one, open: the
    record read and checked, the arrays (``meta`` among them) read from the file when
    asked for."""
    from .serialization import open_npz

    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")

    def bad(problem: str) -> ValueError:
        return ValueError(f"{path} is not a readable cupynn checkpoint: {problem}.")

    with open_npz(path, problem=bad) as arrays:
        if "meta" not in arrays:
            if "header" in arrays:
                raise bad("it is a model file (cupynn.save), which holds the weights but not "
                          "the optimizer's and the training loop's state")
            raise bad(f"it has no checkpoint record (it holds {sorted(arrays)[:8]})")
        record = arrays["meta"]
        try:
            meta = json.loads(str(record))
        except ValueError as exc:
            raise bad(f"its record is not JSON ({exc}); the file is corrupt") from None
        if not isinstance(meta, dict):
            raise bad("its record is not a checkpoint's; the file is corrupt")
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} has checkpoint format {meta.get('format')!r}; this cupynn "
                             f"reads format {FORMAT}.")
        if not all(isinstance(meta.get(key), dict) for key in ("model", "optimizer", "trainer")):
            raise bad("its record lacks the model, optimizer or trainer state; the file is "
                      "corrupt")
        yield meta, arrays


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, numpy.ndarray]]:
    """(meta, arrays) of a checkpoint file or of the directory holding one, every array
    read into memory (:func:`load_checkpoint` reads one at a time).

    Raises
    ------
    FileNotFoundError
        No checkpoint there.
    ValueError
        Any other file: empty, truncated or corrupt, not a ``.npz``, a model
        file, another format; the message names the file and says which.
    """
    with _open_checkpoint(path) as (meta, arrays):
        return meta, {key: arrays[key] for key in arrays if key != "meta"}


def load_checkpoint(path: str | Path, trainer: Any) -> dict[str, Any]:
    """Restore a trainer (its model, optimizer and loop state) from a checkpoint.

    The trainer must have been built with the same model configuration. The
    arrays are read from the file and moved to the device one at a time. The
    record and the configuration are checked before anything is restored; a
    member found damaged part-way (its CRC is checked as it is read) raises the
    ``ValueError`` of :func:`read_checkpoint` with the trainer part-restored.
    Returns the checkpoint's metadata.
    """
    with _open_checkpoint(path) as checkpoint:
        return restore_checkpoint(checkpoint, trainer)


def restore_checkpoint(checkpoint: tuple[dict[str, Any], Mapping[str, numpy.ndarray]],
                       trainer: Any) -> dict[str, Any]:
    """:func:`load_checkpoint` from a checkpoint already read (:func:`read_checkpoint`), for
    example by one rank and sent to the others."""
    meta, arrays = checkpoint
    config = trainer.model.config()
    saved = dict(meta["model"])
    saved.setdefault("allocation", "uniform")  # checkpoints from before allocations existed
    if saved != config:
        raise ValueError(f"The checkpoint's model {meta['model']} differs from the trainer's "
                         f"{config}.")
    # Views, not dicts: each array is taken from ``arrays`` (read from the file) only when
    # load_state_dict asks for it, and dropped once it is on the device.
    trainer.model.load_state_dict(_Section(arrays, "model/"))
    trainer.optimizer.load_state_dict(ChainMap(_Section(arrays, "optimizer/"),
                                               dict(meta["optimizer"])))
    trainer.load_state_dict(meta["trainer"])
    return meta


class _Section(Mapping[str, Any]):
    """The arrays of ``arrays`` whose names start with ``prefix``, without it."""

    def __init__(self, arrays: Mapping[str, Any], prefix: str) -> None:
        self._arrays, self._prefix = arrays, prefix

    def __getitem__(self, key: str) -> Any:
        return self._arrays[self._prefix + key]

    def __iter__(self) -> Iterator[str]:
        n = len(self._prefix)
        return (key[n:] for key in self._arrays if key.startswith(self._prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)

