"""Checkpoints: everything a training run needs to continue exactly.

One ``.npz`` file holds the model's arrays (CSR ``indptr``/``indices``/
``data``, biases, dense weights), Adam's moments and step, and a JSON record
of the rest: the model's configuration, the training loop's position (epochs
done, history) and every random stream (shuffle and sampling, augmentation,
redistribution). It is written to a temporary file and renamed, so an
interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy

FORMAT = 1
FILENAME = "checkpoint.npz"


def save_checkpoint(directory: str | Path, trainer: Any) -> Path:
    """Write ``directory/checkpoint.npz`` for a :class:`cupynn.training.Trainer`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, numpy.ndarray] = {}
    for key, value in trainer.model.state_dict().items():
        arrays[f"model/{key}"] = value
    optimizer_scalars = {}
    for key, value in trainer.optimizer.state_dict().items():
        if isinstance(value, numpy.ndarray):
            arrays[f"optimizer/{key}"] = value
        else:
            optimizer_scalars[key] = value
    meta = {"format": FORMAT, "model": trainer.model.config(), "optimizer": optimizer_scalars,
            "trainer": trainer.state_dict()}
    arrays["meta"] = numpy.array(json.dumps(meta))
    path = directory / FILENAME
    tmp = directory / (FILENAME + ".tmp")
    with open(tmp, "wb") as f:
        numpy.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, numpy.ndarray]]:
    """(meta, arrays) of a checkpoint file or of the directory holding one.

    Raises
    ------
    FileNotFoundError
        No checkpoint there.
    ValueError
        Any other file: empty, truncated or corrupt, not a ``.npz``, a model
        file, another format; the message names the file and says which.
    """
    from .serialization import read_npz

    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")

    def bad(problem: str) -> ValueError:
        return ValueError(f"{path} is not a readable cupynn checkpoint: {problem}.")

    try:
        arrays = read_npz(path)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if "meta" not in arrays:
        if "header" in arrays:
            raise bad("it is a model file (cupynn.save), which holds the weights but not the "
                      "optimizer's and the training loop's state")
        raise bad(f"it has no checkpoint record (it holds {sorted(arrays)[:8]})")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError as exc:
        raise bad(f"its record is not JSON ({exc}); the file is corrupt") from None
    if not isinstance(meta, dict):
        raise bad("its record is not a checkpoint's; the file is corrupt")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has checkpoint format {meta.get('format')!r}; this cupynn "
                         f"reads format {FORMAT}.")
    if not all(isinstance(meta.get(key), dict) for key in ("model", "optimizer", "trainer")):
        raise bad("its record lacks the model, optimizer or trainer state; the file is corrupt")
    return meta, arrays


def load_checkpoint(path: str | Path, trainer: Any) -> dict[str, Any]:
    """Restore a trainer (its model, optimizer and loop state) from a checkpoint.

    The trainer must have been built with the same model configuration.
    Returns the checkpoint's metadata.
    """
    return restore_checkpoint(read_checkpoint(path), trainer)


def restore_checkpoint(checkpoint: tuple[dict[str, Any], dict[str, numpy.ndarray]],
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
    trainer.model.load_state_dict({k[6:]: v for k, v in arrays.items() if k.startswith("model/")})
    optimizer_state = dict(meta["optimizer"])
    optimizer_state.update({k[10:]: v for k, v in arrays.items() if k.startswith("optimizer/")})
    trainer.optimizer.load_state_dict(optimizer_state)
    trainer.load_state_dict(meta["trainer"])
    return meta
