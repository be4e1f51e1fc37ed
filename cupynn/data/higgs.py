"""HIGGS (UCI): a streaming parser of ``HIGGS.csv.gz``, a parsed cache, splits and epochs.

The official file has no header; each line is the label (1 signal, 0
background; written ``1.000000000000000000e+00``) then 28 features, of which
the first 21 are the low-level ones that cupynn keeps. It is 2.6 GB
compressed, 7.7 GB of text, 11 000 000 lines, so it is read in blocks of
lines (about 16 MB of text at a time) from the gzip stream and parsed by
``numpy.loadtxt`` block by block; only the kept float32 columns stay in
memory (about 0.9 GB for the full file). A malformed line stops the parse
with a ``ValueError`` that names the file and the line number.

The parsed columns are cached (``datasets/higgs/<file>.<hash>.npz``), keyed by
the source's absolute path and checked against its size and modification
time, so a second run starts in about a second and an edited or replaced
source is parsed again.

Splits: the complete official file (11 000 000 rows) uses the official split,
the last 500 000 rows being the test rows. Any other file (such as
``HIGGS-sample.csv.gz``, 25 972 rows) gets a seeded random split with
``test_share`` of the rows held out, and a note says so. Features are
standardised with the mean and standard deviation of the training rows only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from ..validation import check_int, check_real
from .download import absolute, cache_folder, search_folders

URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00280/HIGGS.csv.gz"
FILE_NAMES = ("HIGGS.csv.gz", "HIGGS-sample.csv.gz")
N_ROWS = 11_000_000
N_TEST_ROWS = 500_000
N_COLUMNS = 29          # label + 28 features
N_FEATURES = 21         # the low-level features kept
CACHE_FORMAT = 1
_BLOCK_BYTES = 16 << 20


@dataclass(repr=False)
class HiggsData:
    """HIGGS rows split, standardised and ready to sample, on the host.

    Attributes
    ----------
    name : str
        ``"higgs"`` for the complete official file, ``"higgs-subset"`` for any
        other file (such as the 25 972-row sample).
    source : Path
        The CSV file read.
    x_train : (n_train, 21) float32
        Standardised training rows (``sample_epoch`` draws from them).
    y_train : (n_train,) float32, values 0 or 1
    x_test, y_test : all test rows, likewise
    x_val, y_val : the fixed validation rows, drawn once from the test rows
    mean, std : (21,) float64
        The training rows' statistics used to standardise every row.
    split : str
        ``"official"`` or e.g. ``"seeded random, test_share=0.2 (seed 0)"``.
    train_samples : int
        Rows per epoch (the request, capped by the training rows).
    notes : list of str
        Splits, caps, cache use: what a reader of the results should know.
    """

    name: str
    source: Path
    x_train: numpy.ndarray
    y_train: numpy.ndarray
    x_test: numpy.ndarray
    y_test: numpy.ndarray
    x_val: numpy.ndarray
    y_val: numpy.ndarray
    mean: numpy.ndarray
    std: numpy.ndarray
    split: str
    train_samples: int
    notes: list[str] = field(default_factory=list)

    @property
    def n_train_rows(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test_rows(self) -> int:
        return int(self.y_test.shape[0])

    @property
    def val(self) -> tuple[numpy.ndarray, numpy.ndarray]:
        """``(x_val, y_val)``, as :func:`cupynn.fit` takes its test set."""
        return self.x_val, self.y_val

    def sample_epoch(self, rng: numpy.random.Generator) -> tuple[numpy.ndarray, numpy.ndarray]:
        """A fresh random sample of training rows for one epoch: ``take(epoch_rows(rng))``.

        ``train_samples`` distinct rows drawn by ``rng`` (all training rows,
        in a fresh order, when that is every row).

        Returns
        -------
        x : (train_samples, 21) float32
        y : (train_samples,) float32, 0 or 1
        """
        return self.take(self.epoch_rows(rng))

    def epoch_rows(self, rng: numpy.random.Generator) -> numpy.ndarray:
        """The training rows (indices) one epoch uses, drawn by ``rng``.

        With :meth:`take` this lets each rank of a data-parallel run copy only
        the rows of its shards (``cupynn.fit(..., comm=)`` does so).
        """
        if not isinstance(rng, numpy.random.Generator):
            raise TypeError("The 'rng' parameter of HiggsData.sample_epoch must be a "
                            f"numpy.random.Generator. Got {type(rng).__name__} instead.")
        if self.train_samples < self.n_train_rows:
            return rng.choice(self.n_train_rows, self.train_samples, replace=False)
        return rng.permutation(self.n_train_rows)

    def take(self, rows: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
        """Copies of the given training rows: ``(x (len, 21) float32, y (len,) float32)``."""
        return self.x_train[rows], self.y_train[rows]

    def summary(self) -> str:
        return (f"{self.name}: {self.n_train_rows:,} training rows ({self.train_samples:,} per "
                f"epoch), {self.n_test_rows:,} test rows ({len(self.y_val):,} for validation), "
                f"{N_FEATURES} features, split {self.split}, from {self.source}")

    def __repr__(self) -> str:
        return f"HiggsData({self.summary()})"


def load_higgs(path: str | os.PathLike | None = None, *, seed: int = 0,
               train_samples: int = 500_000, val_samples: int = 100_000,
               test_share: float = 0.2, cache: bool = True,
               cache_dir: str | os.PathLike | None = None, progress: bool = True) -> HiggsData:
    """Load HIGGS: parse (or read the cache), split, standardise, fix the validation rows.

    Parameters
    ----------
    path : path, optional
        A CSV file (``.csv.gz`` or ``.csv``) in the official layout, or a folder
        holding ``HIGGS.csv.gz`` or ``HIGGS-sample.csv.gz``. ``None`` searches
        ``$CUPYNN_DATA/higgs``, ``datasets/higgs`` and ``../shared/data/higgs``
        (relative to the working directory), preferring the full file wherever
        it is.
    seed : int
        Seed of the random split (when not the official file) and of the
        choice of validation rows.
    train_samples : int >= 1
        Training rows per epoch (``sample_epoch``); capped by the training
        rows, with a note.
    val_samples : int >= 1
        Validation rows, drawn once from the test rows; capped likewise.
    test_share : float in (0, 1)
        Share of the rows held out as test rows when the file is not the
        complete official one (whose last 500 000 rows are the test rows).
    cache : bool
        Read and write the parsed columns under ``cache_dir``.
    cache_dir : path, optional
        Default ``datasets/higgs``.
    progress : bool
        Show a progress bar while parsing.

    Returns
    -------
    HiggsData

    Raises
    ------
    FileNotFoundError
        No file found; the message names the places searched and the URL.
    ValueError
        A malformed file (the message names the file and line), a file with
        fewer than 2 rows, or a bad parameter.
    """
    owner = "load_higgs"
    seed = check_int(seed, "seed", owner, 0)
    train_samples = check_int(train_samples, "train_samples", owner, 1)
    val_samples = check_int(val_samples, "val_samples", owner, 1)
    test_share = check_real(test_share, "test_share", owner, 0.0, 1.0, "neither")
    source = find_higgs(path)
    notes: list[str] = []
    x, y = _parsed(source, Path(cache_dir) if cache_dir is not None else cache_folder("higgs"),
                   cache, progress, notes)
    n = y.shape[0]
    if n < 2:
        raise ValueError(f"{source} must hold at least 2 rows to split into training and test "
                         f"rows. Got {n} instead.")
    split_seq, val_seq = numpy.random.SeedSequence(seed).spawn(2)
    if n == N_ROWS:
        name, split = "higgs", "official"
        train_rows, test_rows = slice(0, N_ROWS - N_TEST_ROWS), slice(N_ROWS - N_TEST_ROWS, N_ROWS)
    else:
        name, split = "higgs-subset", f"seeded random, test_share={test_share:g} (seed {seed})"
        n_test = min(max(1, round(test_share * n)), n - 1)
        order = numpy.random.default_rng(split_seq).permutation(n)
        train_rows, test_rows = numpy.sort(order[n_test:]), numpy.sort(order[:n_test])
        notes.append(f"{source.name} has {n:,} rows, not the official {N_ROWS:,}, so the "
                     f"official split (last {N_TEST_ROWS:,} rows for testing) does not apply: a "
                     f"seeded random split holds out test_share={test_share:g} of the rows "
                     f"({n_test:,} test, {n - n_test:,} training rows; seed {seed}).")
    x_train, y_train = x[train_rows], y[train_rows]
    x_test, y_test = x[test_rows], y[test_rows]

    mean, std = _column_stats(x_train)
    # The official split slices views of x, so standardising x in place covers both sides.
    for part in ((x,) if isinstance(train_rows, slice) else (x_train, x_test)):
        _standardise_(part, mean, std)

    n_train, n_test = y_train.shape[0], y_test.shape[0]
    if train_samples > n_train:
        notes.append(f"train_samples={train_samples:,} is capped to the {n_train:,} training rows: "
                     "each epoch uses all of them, in a fresh order.")
        train_samples = n_train
    if val_samples >= n_test:
        if val_samples > n_test:
            notes.append(f"val_samples={val_samples:,} is capped to the {n_test:,} test rows: all "
                         "of them are the validation set.")
        x_val, y_val = x_test, y_test
    else:
        rows = numpy.sort(numpy.random.default_rng(val_seq).choice(n_test, val_samples,
                                                                   replace=False))
        x_val, y_val = x_test[rows], y_test[rows]
    as_float = numpy.float32
    return HiggsData(name=name, source=source, x_train=x_train, y_train=y_train.astype(as_float),
                     x_test=x_test, y_test=y_test.astype(as_float), x_val=x_val,
                     y_val=y_val.astype(as_float), mean=mean, std=std, split=split,
                     train_samples=train_samples, notes=notes)


def find_higgs(path: str | os.PathLike | None = None) -> Path:
    """The HIGGS CSV file to read: ``path`` itself, or the first match in the search folders.

    Raises
    ------
    FileNotFoundError
        Saying where it looked and where to get the official file.
    """
    if path is not None:
        path = Path(path)
        if path.is_file():
            return absolute(path)
        folders = [path]
        if not path.is_dir():
            if path.suffix in (".gz", ".csv"):
                raise FileNotFoundError(f"The HIGGS file {absolute(path)} does not exist. Download "
                                        f"the official file (2.6 GB) from {URL}.")
    else:
        folders = search_folders("higgs")
    for name in FILE_NAMES:            # the full file wherever it is, before any sample
        for folder in folders:
            if (folder / name).is_file():
                return absolute(folder / name)
    places = ", ".join(str(absolute(f)) + ("" if f.is_dir() else " (no such folder)")
                       for f in folders)
    # Into the folder the user named, else the one the search looks in first after $CUPYNN_DATA.
    into = absolute(path) if path is not None else absolute(cache_folder("higgs"))
    raise FileNotFoundError(f"No HIGGS file was found: looked for {' or '.join(FILE_NAMES)} in "
                            f"{places}. Download the official file (2.6 GB) from {URL} into "
                            f"{into}, or pass the path of a file in the same layout.")


# -- parsing -------------------------------------------------------------------------------------

def read_higgs_csv(path: str | os.PathLike, *, progress: bool = False,
                   block_bytes: int = _BLOCK_BYTES) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Parse a HIGGS CSV file (gzip-compressed when its name ends in ``.gz``), streaming.

    The decompressed text is read ``block_bytes`` at a time, cut after the
    last complete line, and each block of lines is parsed by
    ``numpy.loadtxt``; only the label and the 21 low-level features are kept.

    Returns
    -------
    x : (n, 21) float32
    y : (n,) uint8, 0 or 1

    Raises
    ------
    ValueError
        Naming the file and line: a line without 29 comma-separated values, a
        value that is not a number, a non-finite feature, a label other than
        0/1; or a truncated or corrupt gzip stream; or an empty file.
    """
    from tqdm.auto import tqdm

    path = absolute(path)
    xs: list[numpy.ndarray] = []
    ys: list[numpy.ndarray] = []
    lines_done = 0
    with open(path, "rb") as raw, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                        unit_divisor=1024, desc=f"parsing {path.name}",
                                        disable=not progress) as bar:
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.name.endswith(".gz") else raw
        carry = b""
        while True:
            try:
                chunk = stream.read(block_bytes)
            except (OSError, EOFError, zlib.error) as exc:
                raise ValueError(f"{path} is truncated or corrupt: reading it failed after "
                                 f"{lines_done:,} complete lines ({type(exc).__name__}: {exc}). "
                                 f"Download it again from {URL}.") from None
            bar.update(raw.tell() - bar.n)
            if chunk:
                data = carry + chunk
                cut = data.rfind(b"\n") + 1
                block, carry = data[:cut], data[cut:]
            else:   # end of file: a last line without its newline is still a line
                block, carry = (carry + b"\n" if carry.strip() else b""), b""
            if block:
                x, y = _parse_block(block, path, lines_done)
                xs.append(x)
                ys.append(y)
                lines_done += block.count(b"\n")
            if not chunk:
                break
    if not ys:
        raise ValueError(f"{path} must hold at least one line of HIGGS data. Got an empty file "
                         "instead.")
    return numpy.concatenate(xs), numpy.concatenate(ys)


def _parse_block(block: bytes, path: Path,
                 lines_before: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Parse whole lines (``block`` ends with a newline), numbered on from ``lines_before``."""
    # loadtxt skips empty lines, which would shift the line numbers of later errors.
    if block.startswith((b"\n", b"\r\n")) or b"\n\n" in block or b"\n\r\n" in block:
        _diagnose(block, path, lines_before)
    try:
        table = numpy.loadtxt(io.BytesIO(block), delimiter=",", dtype=numpy.float32,
                              comments=None, ndmin=2, encoding="latin-1")
    except ValueError:
        table = None
    if table is None or table.shape[1] != N_COLUMNS:
        _diagnose(block, path, lines_before)
        last = lines_before + block.count(b"\n")
        raise ValueError(f"{path}: lines {lines_before + 1:,} to {last:,} could not be parsed as "
                         f"{N_COLUMNS} comma-separated numbers per line.")
    labels = table[:, 0]
    bad = numpy.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise ValueError(f"Line {lines_before + bad[0] + 1:,} of {path} must start with a label of "
                         f"0 or 1. Got {float(labels[bad[0]]):g} instead.")
    finite = numpy.isfinite(table[:, 1:])
    if not finite.all():
        row, col = numpy.argwhere(~finite)[0]
        raise ValueError(f"Line {lines_before + row + 1:,} of {path} must hold finite features. "
                         f"Got {float(table[row, col + 1])} in column {col + 2} instead.")
    return numpy.ascontiguousarray(table[:, 1:1 + N_FEATURES]), labels.astype(numpy.uint8)


def _diagnose(block: bytes, path: Path, lines_before: int) -> None:
    """Find the first malformed line of a block that failed to parse, and raise on it.

    Slow (Python per field), so only run after the fast parse has failed.
    """
    for i, line in enumerate(block.split(b"\n")[:-1]):
        where = f"Line {lines_before + i + 1:,} of {path}"
        fields = line.rstrip(b"\r").split(b",")
        if fields == [b""]:
            raise ValueError(f"{where} must hold {N_COLUMNS} comma-separated values (a 0/1 label, "
                             "then 28 features). Got an empty line instead.")
        if len(fields) != N_COLUMNS:
            raise ValueError(f"{where} must hold {N_COLUMNS} comma-separated values (a 0/1 label, "
                             f"then 28 features). Got {len(fields)} instead.")
        for column, text in enumerate(fields, 1):
            try:
                float(text)
            except ValueError:
                shown = text.decode("latin-1")
                raise ValueError(f"{where} must hold numbers only. Got {shown!r} in column "
                                 f"{column} instead.") from None


# -- cache and statistics ------------------------------------------------------------------------

def _parsed(source: Path, cache_dir: Path, cache: bool, progress: bool,
            notes: list[str]) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(x (n, 21) float32, y (n,) uint8) of ``source``, from the cache when it is current."""
    stat = source.stat()
    meta = {"format": CACHE_FORMAT, "source": str(source), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}
    key = hashlib.sha1(str(source).encode()).hexdigest()[:10]
    cached = cache_dir / f"{source.name}.{key}.npz"
    if cache and cached.is_file():
        try:
            with numpy.load(cached, allow_pickle=False) as archive:
                if json.loads(str(archive["meta"])) == meta:
                    x, y = archive["x"], archive["y"]
                    if x.shape == (y.shape[0], N_FEATURES):
                        notes.append(f"Read the parsed rows of {source.name} from the cache "
                                     f"{absolute(cached)}.")
                        return x, y
        except Exception:  # an unreadable cache is only a cache: parse again and rewrite it
            pass
    start = time.perf_counter()
    x, y = read_higgs_csv(source, progress=progress)
    seconds = time.perf_counter() - start
    notes.append(f"Parsed {y.shape[0]:,} rows of {source.name} in {seconds:.1f} s "
                 f"({y.shape[0] / max(seconds, 1e-9):,.0f} rows/s).")
    if cache:
        temporary = cached.with_name(cached.name + ".tmp")
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as handle:
                numpy.savez(handle, x=x, y=y, meta=numpy.array(json.dumps(meta)))
            os.replace(temporary, cached)
        except OSError as exc:
            temporary.unlink(missing_ok=True)
            notes.append(f"Could not write the parse cache {absolute(cached)} ({exc}); the next "
                         "run parses the file again.")
    return x, y


def _column_stats(x: numpy.ndarray, rows_per_chunk: int = 1 << 20,
                  ) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Mean and standard deviation of each column, in float64, chunk by chunk.

    Chunks merged with Chan et al.'s pairwise formula, so no float64 copy of a
    10.5-million-row array is ever made. A constant column gets std 1 (it
    standardises to 0 instead of dividing by 0).
    """
    count = 0
    mean = numpy.zeros(x.shape[1])
    m2 = numpy.zeros(x.shape[1])
    for start in range(0, x.shape[0], rows_per_chunk):
        chunk = x[start:start + rows_per_chunk].astype(numpy.float64)
        k = chunk.shape[0]
        chunk_mean = chunk.mean(axis=0)
        chunk_m2 = ((chunk - chunk_mean) ** 2).sum(axis=0)
        delta = chunk_mean - mean
        total = count + k
        mean = mean + delta * (k / total)
        m2 = m2 + chunk_m2 + delta ** 2 * (count * k / total)
        count = total
    std = numpy.sqrt(m2 / max(count, 1))
    return mean, numpy.where(std > 0, std, 1.0)


def _standardise_(x: numpy.ndarray, mean: numpy.ndarray, std: numpy.ndarray,
                  rows_per_chunk: int = 1 << 20) -> None:
    """``x = (x - mean) / std`` in place, in chunks (float32 result, float64 arithmetic)."""
    for start in range(0, x.shape[0], rows_per_chunk):
        chunk = x[start:start + rows_per_chunk]
        chunk[...] = (chunk - mean) / std
