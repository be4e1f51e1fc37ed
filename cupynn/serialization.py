"""Model files: a trained :class:`cupynn.MLP` in one portable, versioned file.

``cupynn.save(model, path)`` writes an uncompressed ``.npz`` (a zip of ``.npy``
arrays, readable by NumPy alone) holding:

- ``header``: a JSON string — ``{"format": "cupynn-model", "version": 1,
  "cupynn": <version that wrote it>, "config": {"sizes", "density" (per
  layer), "dense_layers", "seed", "dtype", "init", "activation",
  "allocation"}, "layers": [{"kind":
  "sparse" | "dense", "shape": [out, in], "nnz": ...}, ...]}``;
- for each layer ``i``: sparse ``<i>.indptr`` (int32, out + 1),
  ``<i>.indices`` (int32, nnz, sorted and unique per row), ``<i>.data``
  (nnz values, CSR order) and ``<i>.bias``; dense ``<i>.weight`` (out, in) and
  ``<i>.bias``; values in the model's dtype.

Host arrays only, so a file written on the GPU loads on the CPU and the
reverse (``cupynn.load(path, device=...)``), and across machines. The file is
written to a temporary name and renamed. Loading checks everything — that the
file is a readable zip, that it is a cupynn model, that its format version is
one this cupynn reads, every array's presence, dtype and shape, and that each
sparse layer is canonical CSR — before it builds the model, so a bad file
raises :class:`ModelFileError` naming the file and what is wrong, and never
returns a half-built model. A missing file, a directory, a lone ``.npy``
array, a pickle, an empty or truncated file and a training checkpoint each get
a :class:`ModelFileError` that says which (a missing file's is also a
``FileNotFoundError``).
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy

MAGIC = "cupynn-model"
FORMAT_VERSION = 1
CONFIG_KEYS = ("sizes", "density", "dense_layers", "seed", "dtype", "init", "activation")


class ModelFileError(ValueError):
    """A file that is not a readable cupynn model file; the message names it and the problem."""


class MissingModelFileError(ModelFileError, FileNotFoundError):
    """No file at the path given: a :class:`ModelFileError` and a ``FileNotFoundError``."""


# The first bytes of the files a user may give instead of an ``.npz`` (a zip archive).
_ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
_NPY_MAGIC = b"\x93NUMPY"
_PICKLE_PROTOCOL = b"\x80"  # pickle protocols 2 and above start with PROTO


def read_npz(path: str | os.PathLike) -> dict[str, numpy.ndarray]:
    """Every array of the ``.npz`` archive at ``path`` (never unpickling anything).

    Raises
    ------
    FileNotFoundError
        No file or directory at ``path``.
    ValueError
        Anything else: the message is a phrase saying what the file is instead
        ("a directory", "empty", "a single NumPy array (.npy)", "a pickle",
        "corrupt or truncated", ...), for the caller to put after its own
        "<path> is not a ...".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise ValueError("it is a directory")
    try:
        with open(path, "rb") as f:
            start = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise ValueError(f"it cannot be read ({exc.strerror or exc})") from None
    if not start:
        raise ValueError("the file is empty")
    if start.startswith(_NPY_MAGIC):
        raise ValueError("it is a single NumPy array (.npy, numpy.save), not a .npz archive")
    if start.startswith(_PICKLE_PROTOCOL):
        raise ValueError("it is a pickle, not a .npz archive (a pickled object loads with "
                         "pickle.load, and only from a source you trust)")
    if not start.startswith((_ZIP_MAGIC, _EMPTY_ZIP_MAGIC)):
        raise ValueError(f"it is not a .npz (zip) archive: corrupt or truncated, or another kind "
                         f"of file (it starts with {start[:6]!r})")
    damaged = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zlib.error)

    def corrupt(exc: Exception) -> ValueError:
        return ValueError(f"it is a damaged .npz archive: corrupt or truncated "
                          f"({type(exc).__name__}: {exc})")

    try:
        archive = numpy.load(path, allow_pickle=False)
    except damaged as exc:
        raise corrupt(exc) from None
    with archive:
        others = [name for name in archive.zip.namelist() if not name.endswith(".npy")]
        if others:
            raise ValueError(f"it is a zip archive but not a .npz: it holds "
                             f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''} "
                             f"besides NumPy arrays")
        try:
            return {key: archive[key] for key in archive.files}
        except damaged as exc:
            raise corrupt(exc) from None


def save(model: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` (an :class:`cupynn.MLP`) to ``path`` (see the module doc); returns it."""
    from ._version import __version__
    from .layers import SparseLinear

    path = Path(path)
    layers = [{"kind": "sparse" if isinstance(layer, SparseLinear) else "dense",
               "shape": [layer.out_features, layer.in_features], "nnz": layer.nnz}
              for layer in model.layers]
    header = {"format": MAGIC, "version": FORMAT_VERSION, "cupynn": __version__,
              "config": model.config(), "layers": layers}
    arrays = model.state_dict()
    arrays["header"] = numpy.array(json.dumps(header))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            numpy.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, numpy.ndarray]]:
    """The checked ``(header, arrays)`` of a model file, without building a model.

    Raises
    ------
    ModelFileError
        Anything wrong with it (see the module doc); for a missing file, a
        :class:`MissingModelFileError`, which is also a ``FileNotFoundError``.
    """
    path = Path(path)

    def bad(problem: str) -> ModelFileError:
        return ModelFileError(f"{path}: {problem}")

    try:
        arrays = read_npz(path)
    except FileNotFoundError:
        raise MissingModelFileError(f"No cupynn model file at {path}.") from None
    except ValueError as exc:
        hint = ""
        if path.is_dir() and (path / "model.npz").is_file():
            hint = f" The run's model is {path / 'model.npz'}."
        raise bad(f"not a readable cupynn model file: {exc}.{hint}") from None
    if "header" not in arrays:
        if "meta" in arrays and any(key.startswith("model/") for key in arrays):
            raise bad("not a cupynn model file but a training checkpoint (cupynn.checkpoint); "
                      "a run's model file is model.npz beside it, or restore the checkpoint "
                      "with cupynn.checkpoint.load_checkpoint.")
        raise bad(f"not a cupynn model file (no cupynn header; it holds "
                  f"{sorted(arrays)[:8]}).")
    try:
        header = json.loads(str(arrays.pop("header")))
    except (ValueError, TypeError) as exc:
        raise bad(f"its header is not JSON ({exc}); the file is corrupt.") from None
    if not isinstance(header, dict) or header.get("format") != MAGIC:
        raise bad("not a cupynn model file (its header does not say format "
                  f"{MAGIC!r}).")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise bad(f"its format version {version!r} is not valid; the file is corrupt.")
    if version > FORMAT_VERSION:
        from ._version import __version__

        raise bad(f"written in model-file format {version} by cupynn {header.get('cupynn')}; "
                  f"this cupynn ({__version__}) reads format {FORMAT_VERSION} and older. "
                  f"Upgrade cupynn to load it.")
    _check_contents(header, arrays, bad)
    return header, arrays


def _check_contents(header: dict[str, Any], arrays: dict[str, numpy.ndarray], bad: Any) -> None:
    from .backend import DTYPES
    from .validation import check_csr

    config = header.get("config")
    layers = header.get("layers")
    if not isinstance(config, dict) or any(key not in config for key in CONFIG_KEYS):
        raise bad(f"its header lacks the model configuration ({', '.join(CONFIG_KEYS)}).")
    sizes = config["sizes"]
    if (not isinstance(layers, list) or not isinstance(sizes, list)
            or len(layers) != len(sizes) - 1):
        raise bad("its header's layers do not match its sizes.")
    if config["dtype"] not in DTYPES:
        raise bad(f"its dtype {config['dtype']!r} is not one of {list(DTYPES)}.")
    dtype = numpy.dtype(config["dtype"])
    for i, spec in enumerate(layers):
        shape = (sizes[i + 1], sizes[i])
        if list(spec.get("shape", ())) != list(shape) or spec.get("kind") not in ("sparse",
                                                                                 "dense"):
            raise bad(f"layer {i} in the header is not a sparse or dense {shape} layer.")
        names = ("indptr", "indices", "data", "bias") if spec["kind"] == "sparse" else \
            ("weight", "bias")
        for name in names:
            if f"{i}.{name}" not in arrays:
                raise bad(f"layer {i} has no array {name!r}.")
        bias = arrays[f"{i}.bias"]
        if bias.shape != (shape[0],) or bias.dtype != dtype:
            raise bad(f"layer {i}'s bias must be {dtype} of shape ({shape[0]},). Got "
                      f"{bias.dtype} {bias.shape}.")
        if spec["kind"] == "dense":
            weight = arrays[f"{i}.weight"]
            if weight.shape != shape or weight.dtype != dtype:
                raise bad(f"layer {i}'s weight must be {dtype} of shape {shape}. Got "
                          f"{weight.dtype} {weight.shape}.")
            continue
        indptr, indices, data = (arrays[f"{i}.{n}"] for n in ("indptr", "indices", "data"))
        if data.dtype != dtype or data.shape != indices.shape or indices.shape != (spec["nnz"],):
            raise bad(f"layer {i}'s data must be {dtype} with {spec['nnz']} values like its "
                      f"indices. Got {data.dtype} {data.shape} and indices {indices.shape}.")
        try:
            check_csr(indptr, indices, shape, what=f"layer {i}")
        except (TypeError, ValueError) as exc:
            raise bad(f"{exc} The file is corrupt.") from None


def load(path: str | os.PathLike, device: Any = "auto") -> Any:
    """The :class:`cupynn.MLP` saved at ``path``, on ``device`` ("auto", "cpu", "gpu").

    Raises
    ------
    ModelFileError
        See :func:`read`; nothing is built unless the whole file is good.
    """
    from .model import MLP

    header, arrays = read(path)
    config = header["config"]
    try:
        model = MLP(config["sizes"], density=config["density"],
                    dense_layers=config["dense_layers"], seed=config["seed"],
                    dtype=config["dtype"], device=device, init=config["init"],
                    activation=config["activation"],
                    allocation=config.get("allocation", "uniform"))
        model.load_state_dict(arrays)
    except (TypeError, ValueError) as exc:
        raise ModelFileError(f"{Path(path)}: its configuration or arrays do not make a model "
                             f"({exc}).") from None
    return model
