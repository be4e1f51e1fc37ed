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
written as a stream (:func:`write_npz`): one array at a time is copied from the
device, written and dropped, so a model of tens of GB never has a host copy of
more than its largest array; it goes to a temporary name that is renamed when
complete. The bytes are those ``numpy.savez`` writes for the same arrays.
Loading reads the archive lazily, one layer's arrays at a time, and checks
everything — that the file is a readable zip, that it is a cupynn model, that
its format version is one this cupynn reads, every array's presence, dtype and
shape, and that each sparse layer is canonical CSR — before that layer's arrays
go into the model, so a bad file raises :class:`ModelFileError` naming the
file and what is wrong, and never returns a half-built model. A missing file, a directory, a lone ``.npy``
array, a pickle, an empty or truncated file and a training checkpoint each get
a :class:`ModelFileError` that says which (a missing file's is also a
``FileNotFoundError``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
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


# What reading a damaged archive raises, from its opening or any member's reading (a CRC
# mismatch surfaces only when the member has been read to its end).
_DAMAGED = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zlib.error)


def _damaged(exc: Exception) -> str:
    return (f"it is a damaged .npz archive: corrupt or truncated "
            f"({type(exc).__name__}: {exc})")


class NpzArrays(Mapping[str, numpy.ndarray]):
    """The arrays of an open ``.npz`` archive, each read from the file when asked for
    and not kept: holding none of them costs no memory (see :func:`open_npz`).

    A member that turns out damaged raises ``problem(phrase)``, a missing name a
    ``KeyError``.
    """

    def __init__(self, archive: Any, problem: Callable[[str], Exception]) -> None:
        self._archive = archive
        self._problem = problem

    def __getitem__(self, key: str) -> numpy.ndarray:
        if key not in self._archive:
            raise KeyError(key)
        try:
            return self._archive[key]
        except _DAMAGED as exc:
            raise self._problem(_damaged(exc)) from None

    def __contains__(self, key: object) -> bool:
        return key in self._archive

    def __iter__(self) -> Iterator[str]:
        return iter(self._archive.files)

    def __len__(self) -> int:
        return len(self._archive.files)


@contextlib.contextmanager
def open_npz(path: str | os.PathLike,
             problem: Callable[[str], Exception] = ValueError) -> Iterator[NpzArrays]:
    """The ``.npz`` archive at ``path``, open, as a lazy :class:`NpzArrays` (never
    unpickling anything); it is closed when the ``with`` block ends.

    Raises
    ------
    FileNotFoundError
        No file or directory at ``path``.
    ``problem(phrase)`` (ValueError by default)
        Anything else, on opening or when an array is read: the phrase says
        what the file is instead ("a directory", "empty", "a single NumPy array
        (.npy)", "a pickle", "corrupt or truncated", ...), for the caller to put
        after its own "<path> is not a ...".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise problem("it is a directory")
    try:
        with open(path, "rb") as f:
            start = f.read(len(_NPY_MAGIC))
    except OSError as exc:
        raise problem(f"it cannot be read ({exc.strerror or exc})") from None
    if not start:
        raise problem("the file is empty")
    if start.startswith(_NPY_MAGIC):
        raise problem("it is a single NumPy array (.npy, numpy.save), not a .npz archive")
    if start.startswith(_PICKLE_PROTOCOL):
        raise problem("it is a pickle, not a .npz archive (a pickled object loads with "
                      "pickle.load, and only from a source you trust)")
    if not start.startswith((_ZIP_MAGIC, _EMPTY_ZIP_MAGIC)):
        raise problem(f"it is not a .npz (zip) archive: corrupt or truncated, or another kind "
                      f"of file (it starts with {start[:6]!r})")
    try:
        archive = numpy.load(path, allow_pickle=False)
    except _DAMAGED as exc:
        raise problem(_damaged(exc)) from None
    with archive:
        others = [name for name in archive.zip.namelist() if not name.endswith(".npy")]
        if others:
            raise problem(f"it is a zip archive but not a .npz: it holds "
                          f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''} "
                          f"besides NumPy arrays")
        yield NpzArrays(archive, problem)


def read_npz(path: str | os.PathLike) -> dict[str, numpy.ndarray]:
    """Every array of the ``.npz`` archive at ``path``, read into memory; raises as
    :func:`open_npz` does (``FileNotFoundError``, else ``ValueError``)."""
    with open_npz(path) as arrays:
        return dict(arrays)


def write_npz(path: str | os.PathLike, arrays: Iterable[tuple[str, Any]]) -> Path:
    """Write ``(name, array)`` pairs to ``path`` as an uncompressed ``.npz``, as a stream.

    The pairs are taken one at a time: each array is written into the archive
    and dropped before the next is asked for, so an iterable that copies each
    array from the device as it is taken keeps one host copy at a time. The
    file is what ``numpy.savez(path, **dict(arrays))`` writes (the same calls:
    ``<name>.npy`` members, stored, each forced to ZIP64 so that any size
    fits, written by ``numpy.lib.format.write_array``), to a temporary file
    ``<path>.tmp``, synced and renamed, so an interrupted save never leaves a
    half-written file at ``path``. Returns ``path``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED,
                                 allowZip64=True) as archive:
                for name, array in arrays:
                    with archive.open(name + ".npy", "w", force_zip64=True) as member:
                        numpy.lib.format.write_array(member, numpy.asanyarray(array),
                                                     allow_pickle=False)
                    del array  # before the next pair is made: one array at a time
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def model_arrays(model: Any) -> Iterator[tuple[str, numpy.ndarray]]:
    """``(name, host array)`` for every array of ``model`` (an :class:`cupynn.MLP`), in the
    order and with the names of ``model.state_dict()``, each copied from the device only
    when it is asked for (on the CPU, the model's own array: nothing is copied)."""
    from .backend import to_numpy
    from .layers import SparseLinear

    for i, layer in enumerate(model.layers):
        names = (("indptr", "indices", "data", "bias") if isinstance(layer, SparseLinear)
                 else ("weight", "bias"))
        for name in names:
            yield f"{i}.{name}", to_numpy(getattr(layer, name))


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
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_npz(path, itertools.chain(model_arrays(model),
                                           [("header", numpy.array(json.dumps(header)))]))


@contextlib.contextmanager
def _open_model(path: Path) -> Iterator[tuple[dict[str, Any], _CheckedLayers]]:
    """The model file at ``path``, open: its checked header and its arrays, read one
    layer at a time and checked before any of that layer's arrays is handed out."""

    def bad(problem: str) -> ModelFileError:
        return ModelFileError(f"{path}: {problem}")

    def unreadable(problem: str) -> ModelFileError:
        hint = ""
        if path.is_dir() and (path / "model.npz").is_file():
            hint = f" The run's model is {path / 'model.npz'}."
        return bad(f"not a readable cupynn model file: {problem}.{hint}")

    if not path.exists():
        raise MissingModelFileError(f"No cupynn model file at {path}.")
    with open_npz(path, problem=unreadable) as arrays:
        if "header" not in arrays:
            if "meta" in arrays and any(key.startswith("model/") for key in arrays):
                raise bad("not a cupynn model file but a training checkpoint "
                          "(cupynn.checkpoint); a run's model file is model.npz beside it, or "
                          "restore the checkpoint with cupynn.checkpoint.load_checkpoint.")
            raise bad(f"not a cupynn model file (no cupynn header; it holds "
                      f"{sorted(arrays)[:8]}).")
        text = arrays["header"]
        try:
            header = json.loads(str(text))
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

            raise bad(f"written in model-file format {version} by cupynn "
                      f"{header.get('cupynn')}; this cupynn ({__version__}) reads format "
                      f"{FORMAT_VERSION} and older. Upgrade cupynn to load it.")
        yield header, _CheckedLayers(arrays, _layer_specs(header, arrays, bad), bad)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, numpy.ndarray]]:
    """The checked ``(header, arrays)`` of a model file, without building a model;
    every array is read into memory (:func:`load` reads one layer at a time).

    Raises
    ------
    ModelFileError
        Anything wrong with it (see the module doc); for a missing file, a
        :class:`MissingModelFileError`, which is also a ``FileNotFoundError``.
    """
    with _open_model(Path(path)) as (header, layers):
        checked = {}
        for i in range(len(layers.specs)):
            checked.update(layers.layer(i))
        arrays = {key: checked[key] if key in checked else layers.raw[key]
                  for key in layers.raw if key != "header"}  # in the file's order
    return header, arrays


def _layer_specs(header: dict[str, Any], arrays: Mapping[str, Any],
                 bad: Any) -> list[tuple[str, tuple[int, int], Any, int | None]]:
    """``(kind, shape, dtype, nnz)`` of each layer from a checked header, once every array
    it names is known to be in the file (read from the file's index: no data is read)."""
    from .backend import DTYPES

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
    specs = []
    for i, spec in enumerate(layers):
        shape = (sizes[i + 1], sizes[i])
        if list(spec.get("shape", ())) != list(shape) or spec.get("kind") not in ("sparse",
                                                                                 "dense"):
            raise bad(f"layer {i} in the header is not a sparse or dense {shape} layer.")
        for name in _NAMES[spec["kind"]]:
            if f"{i}.{name}" not in arrays:
                raise bad(f"layer {i} has no array {name!r}.")
        specs.append((spec["kind"], shape, dtype, spec.get("nnz")))
    return specs


_NAMES = {"sparse": ("indptr", "indices", "data", "bias"), "dense": ("weight", "bias")}


class _CheckedLayers(Mapping[str, numpy.ndarray]):
    """A model file's layer arrays (``"<layer>.<name>"``), read from the open archive one
    layer at a time: asking for any array of layer ``i`` reads all of that layer's arrays,
    checks them (dtypes, shapes, canonical CSR) and keeps them until another layer is
    asked for, so that ``MLP.load_state_dict``, which takes a layer's arrays together,
    holds about one layer's host arrays, never the whole file's."""

    def __init__(self, raw: NpzArrays, specs: list[Any], bad: Any) -> None:
        self.raw, self.specs, self._bad = raw, specs, bad
        self._current: tuple[int, dict[str, numpy.ndarray]] | None = None

    def layer(self, i: int) -> dict[str, numpy.ndarray]:
        """Layer ``i``'s arrays, checked."""
        if self._current is None or self._current[0] != i:
            self._current = None  # dropped before the next layer is read
            kind = self.specs[i][0]
            arrays = {f"{i}.{name}": self.raw[f"{i}.{name}"] for name in _NAMES[kind]}
            _check_layer(i, self.specs[i], arrays, self._bad)
            self._current = (i, arrays)
        return self._current[1]

    def __getitem__(self, key: str) -> numpy.ndarray:
        layer, _, name = key.partition(".")
        if (not layer.isdigit() or int(layer) >= len(self.specs)
                or name not in _NAMES[self.specs[int(layer)][0]]):
            raise KeyError(key)
        return self.layer(int(layer))[key]

    def __iter__(self) -> Iterator[str]:
        return (f"{i}.{name}" for i, spec in enumerate(self.specs) for name in _NAMES[spec[0]])

    def __len__(self) -> int:
        return sum(len(_NAMES[spec[0]]) for spec in self.specs)


def _check_layer(i: int, spec: tuple[str, tuple[int, int], Any, int | None],
                 arrays: dict[str, numpy.ndarray], bad: Any) -> None:
    from .validation import check_csr

    kind, shape, dtype, nnz = spec
    bias = arrays[f"{i}.bias"]
    if bias.shape != (shape[0],) or bias.dtype != dtype:
        raise bad(f"layer {i}'s bias must be {dtype} of shape ({shape[0]},). Got "
                  f"{bias.dtype} {bias.shape}.")
    if kind == "dense":
        weight = arrays[f"{i}.weight"]
        if weight.shape != shape or weight.dtype != dtype:
            raise bad(f"layer {i}'s weight must be {dtype} of shape {shape}. Got "
                      f"{weight.dtype} {weight.shape}.")
        return
    indptr, indices, data = (arrays[f"{i}.{n}"] for n in ("indptr", "indices", "data"))
    if data.dtype != dtype or data.shape != indices.shape or indices.shape != (nnz,):
        raise bad(f"layer {i}'s data must be {dtype} with {nnz} values like its "
                  f"indices. Got {data.dtype} {data.shape} and indices {indices.shape}.")
    try:
        check_csr(indptr, indices, shape, what=f"layer {i}")
    except (TypeError, ValueError) as exc:
        raise bad(f"{exc} The file is corrupt.") from None


def load(path: str | os.PathLike, device: Any = "auto") -> Any:
    """The :class:`cupynn.MLP` saved at ``path``, on ``device`` ("auto", "cpu", "gpu").

    The archive is read lazily: each layer's arrays are read, checked and moved
    to the device in turn, so the host holds about one layer's arrays at a time.

    Raises
    ------
    ModelFileError
        See :func:`read`; a model is returned only when the whole file is good.
    """
    from .model import MLP

    path = Path(path)
    with _open_model(path) as (header, arrays):
        config = header["config"]
        try:
            model = MLP(config["sizes"], density=config["density"],
                        dense_layers=config["dense_layers"], seed=config["seed"],
                        dtype=config["dtype"], device=device, init=config["init"],
                        activation=config["activation"],
                        allocation=config.get("allocation", "uniform"))
            model.load_state_dict(arrays)
        except ModelFileError:
            raise  # a layer's arrays failed their check: the half-loaded model is dropped
        except (TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: its configuration or arrays do not make a model "
                                 f"({exc}).") from None
    return model
