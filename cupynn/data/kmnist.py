"""KMNIST (Kuzushiji-MNIST): the official files, their checks, downloads, and a fallback.

Two official layouts are read, per split (train, test), each as an
images/labels pair:

- NumPy: ``kmnist-{train,test}-{imgs,labels}.npz``, one array ``arr_0`` each,
  images ``(n, 28, 28)`` uint8, labels ``(n,)`` uint8;
- IDX: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, gzip-compressed,
  a big-endian header (magic 2051 for images with dims ``n, 28, 28``; 2049 for
  labels with dim ``n``) then the uint8 data.

Every file is checked before it is used: with ``verify=True`` (the default) its
size and MD5 must be the official release's; always, it must decompress
completely and hold what its layout announces. A file that fails is reported
and replaced by a fresh download (when downloading is allowed and works),
never trained on; otherwise loading stops with an error that says why.

The official test images are always needed. The training images are needed
unless ``train_from_test`` asks for a stratified split of the test images
instead (the only real-KMNIST option where the training images are absent).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy

from ..validation import check_int, check_real
from .dataset import Dataset, stratified_split
from .download import DownloadError, absolute, cache_folder, checksum_problem, download_file, \
    search_folders

BASE_URL = "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"
IMAGE_SHAPE = (28, 28)
N_CLASSES = 10
N_IMAGES = {"train": 60_000, "test": 10_000}
SPLITS = ("train", "test")
KINDS = ("images", "labels")
_WHAT = {"train": "training", "test": "test"}


@dataclass(frozen=True)
class OfficialFile:
    """One file of the official release: name, size in bytes (``None``: not known) and MD5."""

    name: str
    size: int | None
    md5: str

    @property
    def url(self) -> str:
        return BASE_URL + self.name


# Sizes and MD5s of the .npz files: the official release, as listed in
# ../shared/data/README.md. MD5s of the IDX files: those torchvision and its
# ports verify against the same URLs (their sizes are not recorded here; the
# header and gzip CRC checks catch truncation).
LAYOUTS: dict[str, dict[tuple[str, str], OfficialFile]] = {
    "npz": {
        ("train", "images"): OfficialFile("kmnist-train-imgs.npz", 18_384_171,
                                          "a183fbc01ed9a345513b145673d3d0bb"),
        ("train", "labels"): OfficialFile("kmnist-train-labels.npz", 29_700,
                                          "b0e1d240e8afec72b50437fc3bc5908a"),
        ("test", "images"): OfficialFile("kmnist-test-imgs.npz", 3_079_479,
                                         "dace6de62ca8b90843cc45366337d02e"),
        ("test", "labels"): OfficialFile("kmnist-test-labels.npz", 5_304,
                                         "3ae489a79983d0fe386152684e3b5412"),
    },
    "idx": {
        ("train", "images"): OfficialFile("train-images-idx3-ubyte.gz", None,
                                          "bdb82020997e1d708af4cf47b453dcf7"),
        ("train", "labels"): OfficialFile("train-labels-idx1-ubyte.gz", None,
                                          "e144d726b3acfaa3e44228e80efcd344"),
        ("test", "images"): OfficialFile("t10k-images-idx3-ubyte.gz", None,
                                         "5c965bf0a639b31b8f53240b1b52f4d7"),
        ("test", "labels"): OfficialFile("t10k-labels-idx1-ubyte.gz", None,
                                         "7320c461ea6c1c855c0b718fb2a4b134"),
    },
}
_IDX_MAGIC = {"images": (2051, 3), "labels": (2049, 1)}


class _Corrupt(Exception):
    """A file failed a check; the message is a phrase that follows the file's path."""


class _Missing(Exception):
    """A split's files were not found (and not downloaded); args: (split, why not downloaded)."""


@dataclass
class _Search:
    folders: list[Path]
    download_dir: Path
    download: bool
    verify: bool
    progress: bool
    notes: list[str]


def load_kmnist(data_dir: str | os.PathLike | None = None, *, train_from_test: float | None = None,
                seed: int = 0, download: bool = True, verify: bool = True, progress: bool = True,
                allow_fallback: bool = False) -> Dataset:
    """Load KMNIST as flattened float32 images in [0, 1] and int64 labels.

    Parameters
    ----------
    data_dir : path, optional
        The one folder to read (and download missing or corrupt files into).
        ``None`` searches ``$CUPYNN_DATA/kmnist``, ``datasets/kmnist`` and
        ``../shared/data/kmnist`` (relative to the working directory), file by
        file, and downloads into ``datasets/kmnist``.
    train_from_test : float in (0, 1), optional
        Train on this fraction of the official *test* images (a stratified,
        seeded split) and test on the rest; the training files are then not
        needed. ``None`` uses the official 60 000 / 10 000 split.
    seed : int
        Seed of the ``train_from_test`` split (and of the fallback's split).
    download : bool
        Fetch missing or corrupt official files (with a progress bar when
        ``progress``), verifying their size and MD5.
    verify : bool
        Require each file's size and MD5 to be the official release's. With
        ``False`` only the structure is checked (decompresses completely,
        holds uint8 ``(n, 28, 28)`` images and labels in [0, 10), as many
        labels as images): for files written by hand, e.g. in tests.
    progress : bool
        Show progress bars for downloads.
    allow_fallback : bool
        When ``data_dir`` is ``None`` and no KMNIST test files can be found or
        downloaded, return scikit-learn's bundled 8x8 digits instead
        (:func:`load_digits`), saying so in ``notes`` and ``name``. A named
        ``data_dir`` never falls back.

    Returns
    -------
    Dataset
        ``name="kmnist"``: ``x_*`` (n, 784) float32, ``y_*`` (n,) int64,
        ``image_shape=(28, 28)``; or the digits fallback (``"sklearn-digits"``,
        (n, 64), ``image_shape=(8, 8)``).

    Raises
    ------
    FileNotFoundError
        Files that are needed are missing and could not be downloaded; the
        message names each missing file, the folders searched, the URLs and
        (for training files) ``train_from_test``.
    ValueError
        A file is corrupt, truncated or not the official one and could not be
        replaced; or a bad parameter.
    """
    owner = "load_kmnist"
    if train_from_test is not None:
        train_from_test = check_real(train_from_test, "train_from_test", owner, 0.0, 1.0, "neither")
    seed = check_int(seed, "seed", owner, 0)
    named = data_dir is not None
    search = _Search(folders=[Path(data_dir)] if named else search_folders("kmnist"),
                     download_dir=Path(data_dir) if named else cache_folder("kmnist"),
                     download=bool(download), verify=bool(verify), progress=bool(progress),
                     notes=[])

    try:
        x_test, y_test, test_paths = _load_split("test", search)
    except _Missing as missing:
        if allow_fallback and not named:
            fallback = load_digits(train_fraction=train_from_test or 0.8, seed=seed)
            places = ", ".join(str(absolute(f)) for f in search.folders)
            fallback.notes.insert(0, f"KMNIST was not found in {places} and could not be "
                                     f"downloaded ({missing.args[1]}); using scikit-learn's "
                                     "bundled 8x8 digits instead.")
            return fallback
        raise FileNotFoundError(_missing_message("test", search, missing.args[1])) from None

    files = list(test_paths)
    if train_from_test is None:
        try:
            x_train, y_train, train_paths = _load_split("train", search)
        except _Missing as missing:
            raise FileNotFoundError(_missing_message("train", search, missing.args[1])) from None
        files += train_paths
        split = "official"
    else:
        train_rows, test_rows = stratified_split(y_test, train_from_test, seed)
        x_train, y_train = x_test[train_rows], y_test[train_rows]
        x_test, y_test = x_test[test_rows], y_test[test_rows]
        split = f"train_from_test={train_from_test:g} (stratified, seed {seed})"
        search.notes.append(
            f"Trained on a stratified split of the official KMNIST test images: {len(y_train):,} "
            f"for training, {len(y_test):,} held out for testing (train_from_test="
            f"{train_from_test:g}, seed {seed}); the official training images were not used.")
    return Dataset(name="kmnist", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   image_shape=IMAGE_SHAPE, n_classes=N_CLASSES, split=split,
                   source=absolute(test_paths[0].parent), files=tuple(absolute(p) for p in files),
                   notes=search.notes)


def load_digits(*, train_fraction: float = 0.8, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1 797 images), split stratified from a seed.

    The fallback of :func:`load_kmnist` when no KMNIST can be found: pixels
    (0..16) are divided by 16 into [0, 1].

    Returns
    -------
    Dataset
        ``name="sklearn-digits"``, ``x_*`` (n, 64) float32, ``y_*`` (n,) int64,
        ``image_shape=(8, 8)``.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    train_fraction = check_real(train_fraction, "train_fraction", "load_digits", 0.0, 1.0,
                                "neither")
    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(numpy.float32)
    y = digits.target.astype(numpy.int64)
    train, test = stratified_split(y, train_fraction, seed)
    split = f"stratified train_fraction={train_fraction:g} (seed {seed})"
    return Dataset(name="sklearn-digits", x_train=x[train], y_train=y[train], x_test=x[test],
                   y_test=y[test], image_shape=(8, 8), n_classes=10, split=split,
                   notes=[f"scikit-learn's 8x8 digits: {len(train):,} train / {len(test):,} test "
                          f"images, {split}."])


def read_images(path: str | os.PathLike) -> numpy.ndarray:
    """Read one images file of either layout, checking its structure only.

    Returns
    -------
    (n, 28, 28) uint8 array
    """
    path = Path(path)
    try:
        return _read_file(path, _layout_of(path), "images")
    except _Corrupt as exc:
        raise ValueError(f"{absolute(path)} {exc}.") from None


def read_labels(path: str | os.PathLike) -> numpy.ndarray:
    """Read one labels file of either layout, checking its structure only.

    Returns
    -------
    (n,) uint8 array, values in [0, 10)
    """
    path = Path(path)
    try:
        return _read_file(path, _layout_of(path), "labels")
    except _Corrupt as exc:
        raise ValueError(f"{absolute(path)} {exc}.") from None


# -- locating ------------------------------------------------------------------------------------

def _locate(split: str, folders: list[Path]) -> tuple[str, dict[str, Path]] | None:
    """The first layout whose files of ``split`` are all found: (layout, {kind: path}).

    Each file is taken from the first folder that has it, so a file replaced
    into the cache shadows a corrupt one in a read-only folder further down.
    """
    for layout, table in LAYOUTS.items():
        paths = {}
        for kind in KINDS:
            name = table[(split, kind)].name
            paths[kind] = next((f / name for f in folders if (f / name).is_file()), None)
        if all(p is not None for p in paths.values()):
            return layout, paths
    return None


def _load_split(split: str, search: _Search) -> tuple[numpy.ndarray, numpy.ndarray, list[Path]]:
    """Checked (x, y, paths) of one split: x (n, 784) float32 in [0, 1], y (n,) int64."""
    found = _locate(split, search.folders)
    if found is None:
        if not search.download:
            raise _Missing(split, "download=False")
        table = LAYOUTS["npz"]
        paths = {}
        for kind in KINDS:
            official = table[(split, kind)]
            present = next((f / official.name for f in search.folders
                            if (f / official.name).is_file()), None)
            if present is None:
                try:
                    present = download_file(official.url, search.download_dir / official.name,
                                            size=official.size, md5=official.md5,
                                            progress=search.progress)
                except DownloadError as exc:
                    raise _Missing(split, str(exc)) from None
                search.notes.append(f"Downloaded {official.url} to {absolute(present)}.")
            paths[kind] = present
        found = ("npz", paths)
    layout, paths = found
    arrays = {}
    for kind in KINDS:
        arrays[kind], paths[kind] = _read_checked(paths[kind], layout, split, kind, search)
    images, labels = arrays["images"], arrays["labels"]
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{absolute(paths['images'])} holds {images.shape[0]:,} images, but "
                         f"{absolute(paths['labels'])} holds {labels.shape[0]:,} labels; they "
                         "must be a pair of the same release.")
    x = images.reshape(images.shape[0], -1).astype(numpy.float32) / numpy.float32(255)
    return x, labels.astype(numpy.int64), [paths["images"], paths["labels"]]


def _missing_message(split: str, search: _Search, why: str) -> str:
    npz = [LAYOUTS["npz"][(split, kind)] for kind in KINDS]
    idx = [LAYOUTS["idx"][(split, kind)].name for kind in KINDS]
    lines = [f"The KMNIST {_WHAT[split]} files were not found. Looked for "
             f"{npz[0].name} and {npz[1].name} (or the IDX pair {idx[0]} and {idx[1]}) in:"]
    for folder in search.folders:
        present = [o.name for table in LAYOUTS.values() for (s, _), o in table.items()
                   if s == split and (folder / o.name).is_file()]
        missing = [o.name for o in npz if o.name not in present]
        has = f"; has {', '.join(present)}" if present else ""
        state = (f"missing {', '.join(missing)}{has}" if folder.is_dir()
                 else "not a folder" if folder.exists() else "no such folder")
        lines.append(f"  {absolute(folder)}: {state}")
    lines.append(f"Download {npz[0].url} and {npz[1].url} into {absolute(search.download_dir)}.")
    lines.append("(Not downloaded automatically: download=False.)" if why == "download=False"
                 else f"(The automatic download failed: {why})")
    if split == "train":
        lines.append("Or pass train_from_test=0.8 (--train-from-test 0.8) to train on a stratified "
                     "80/20 split of the official test images.")
    return "\n".join(lines)


# -- reading and checking ------------------------------------------------------------------------

def _read_checked(path: Path, layout: str, split: str, kind: str,
                  search: _Search) -> tuple[numpy.ndarray, Path]:
    """Read a file that passed its checks; replace a failing one by a fresh download."""
    official = LAYOUTS[layout][(split, kind)]
    try:
        return _read_file(path, layout, kind, official if search.verify else None), path
    except _Corrupt as exc:
        problem = str(exc)
    where = absolute(path)
    if not search.download:
        raise ValueError(f"{where} {problem}. It was not used. Delete it and download "
                         f"{official.url} again, or pass download=True to replace it.")
    # Replace it where it is; a read-only folder (e.g. shared data) gets its copy in the cache,
    # which _locate searches first next time.
    dest = path if os.access(path.parent, os.W_OK) else search.download_dir / path.name
    try:
        download_file(official.url, dest, size=official.size, md5=official.md5,
                      progress=search.progress)
    except DownloadError as exc:
        raise ValueError(f"{where} {problem}. It was not used, and replacing it failed: {exc} "
                         f"Download {official.url} into {absolute(dest.parent)} by hand.") from None
    search.notes.append(f"{where} {problem}; replaced it by a fresh download of {official.url}"
                        + ("" if dest == path else f" into {absolute(dest)}") + ".")
    try:
        return _read_file(dest, layout, kind, official if search.verify else None), dest
    except _Corrupt as exc:
        raise ValueError(f"{absolute(dest)} {exc}, even after a fresh download.") from None


def _layout_of(path: Path) -> str:
    if path.name.endswith(".npz"):
        return "npz"
    if path.name.endswith(".gz"):
        return "idx"
    raise ValueError(f"The 'path' parameter must name an .npz or an IDX .gz file. "
                     f"Got {str(path)!r} instead.")


def _read_file(path: Path, layout: str, kind: str, official: OfficialFile | None = None,
               ) -> numpy.ndarray:
    """Read images (n, 28, 28) or labels (n,), uint8; raise ``_Corrupt`` on any failed check.

    With ``official``, the file's size and MD5 must match it first, and the
    number of rows must be the official one.
    """
    if official is not None:
        problem = checksum_problem(path, official.size, official.md5)
        if problem is not None:
            raise _Corrupt(problem)
    array = _read_npz(path) if layout == "npz" else _read_idx(path, kind)
    if kind == "images":
        if array.dtype != numpy.uint8 or array.ndim != 3 or array.shape[1:] != IMAGE_SHAPE:
            raise _Corrupt(f"must hold uint8 images of shape (n, 28, 28). Got {array.dtype} "
                           f"{array.shape} instead")
    else:
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise _Corrupt(f"must hold a 1-D array of integer labels. Got {array.dtype} "
                           f"{array.shape} instead")
        if array.size and (int(array.min()) < 0 or int(array.max()) >= N_CLASSES):
            raise _Corrupt(f"must hold labels in [0, {N_CLASSES}). Got values in "
                           f"[{int(array.min())}, {int(array.max())}] instead")
    if array.shape[0] == 0:
        raise _Corrupt(f"holds no {kind}")
    if official is not None:
        split = "train" if "train" in official.name else "test"
        if array.shape[0] != N_IMAGES[split]:
            raise _Corrupt(f"holds {array.shape[0]:,} {kind}, but the official file holds "
                           f"{N_IMAGES[split]:,}")
    return array


def _read_npz(path: Path) -> numpy.ndarray:
    from ..serialization import read_npz

    try:
        arrays = read_npz(path)  # says what the file is instead: .npy, pickle, empty, damaged
    except ValueError as exc:
        raise _Corrupt(f"cannot be read as an .npz archive: {exc}") from None
    if "arr_0" not in arrays:
        raise _Corrupt(f"must hold an array named 'arr_0'. Got {sorted(arrays)} instead")
    return arrays["arr_0"]


def _read_idx(path: Path, kind: str) -> numpy.ndarray:
    magic, ndim = _IDX_MAGIC[kind]
    try:
        with gzip.open(path, "rb") as handle:  # reading to the end checks gzip's CRC and length
            data = handle.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise _Corrupt(f"is not a complete gzip file, so it is corrupt or truncated "
                       f"({type(exc).__name__}: {exc})") from None
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _Corrupt(f"is too short to hold an IDX header: {len(data)} bytes after "
                       "decompression")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise _Corrupt(f"must start with the IDX magic number {magic} of a {kind} file. "
                       f"Got {found} instead")
    dims = tuple(int(d) for d in numpy.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(numpy.prod(dims))
    if len(data) - header != expected:
        raise _Corrupt(f"holds {len(data) - header:,} bytes of data, but its header announces "
                       f"{dims} = {expected:,}, so it is truncated or corrupt")
    return numpy.frombuffer(data, numpy.uint8, offset=header).reshape(dims)
