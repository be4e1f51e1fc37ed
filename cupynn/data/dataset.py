"""The result type of the image loaders, and a seeded stratified split."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy

from ..validation import check_int, check_real


@dataclass(repr=False)
class Dataset:
    """A classification dataset split into training and test rows, on the host.

    Attributes
    ----------
    name : str
        The dataset actually used: ``"kmnist"`` or ``"sklearn-digits"`` (the
        fallback). Results files should record it.
    x_train, x_test : (n, features) float32 numpy arrays
        Pixels in [0, 1], images flattened row-major (28x28 -> 784).
    y_train, y_test : (n,) int64 numpy arrays
        Class indices in [0, n_classes).
    image_shape : (int, int)
        (height, width) of one image, e.g. for :class:`~cupynn.data.RandomAffine`.
    n_classes : int
    split : str
        How train and test rows were formed: ``"official"``, or e.g.
        ``"train_from_test=0.8 (stratified, seed 0)"``.
    source : Path or None
        The folder the test images were read from (``None`` for built-in data).
    files : tuple of Path
        Every file read.
    notes : list of str
        What the loader did that a reader of the results should know:
        fallbacks, splits, replaced or downloaded files.
    """

    name: str
    x_train: numpy.ndarray
    y_train: numpy.ndarray
    x_test: numpy.ndarray
    y_test: numpy.ndarray
    image_shape: tuple[int, int]
    n_classes: int
    split: str
    source: Path | None = None
    files: tuple[Path, ...] = ()
    notes: list[str] = field(default_factory=list)

    @property
    def train(self) -> tuple[numpy.ndarray, numpy.ndarray]:
        """``(x_train, y_train)``, as :func:`cupynn.fit` takes it."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[numpy.ndarray, numpy.ndarray]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    def summary(self) -> str:
        """One line: name, sizes, split and source."""
        where = f" from {self.source}" if self.source is not None else ""
        return (f"{self.name}: {len(self.y_train):,} train / {len(self.y_test):,} test rows, "
                f"{self.x_train.shape[1]} features, {self.n_classes} classes, "
                f"split {self.split}{where}")

    def __repr__(self) -> str:
        return f"Dataset({self.summary()})"


def stratified_split(labels: numpy.ndarray, train_fraction: float, seed: int = 0,
                     ) -> tuple[numpy.ndarray, numpy.ndarray]:
    """Split row indices into train and test, keeping class shares, from a seed.

    Each class contributes ``train_fraction`` of its rows to the training side,
    rounded so that the training side holds ``round(train_fraction * n)`` rows
    in all (largest remainders get the extra rows, ties to the smaller class
    index). Within each class the rows are chosen by a permutation drawn from
    ``numpy.random.default_rng(seed)``, so the split depends only on the
    labels, the fraction and the seed (not on the NumPy or scikit-learn version's
    splitting heuristics).

    Parameters
    ----------
    labels : (n,) integer array
    train_fraction : float in (0, 1)
    seed : int

    Returns
    -------
    train, test : int64 arrays of row indices, each sorted ascending;
        together a partition of ``range(n)``.
    """
    owner = "stratified_split"
    train_fraction = check_real(train_fraction, "train_fraction", owner, 0.0, 1.0, "neither")
    seed = check_int(seed, "seed", owner, 0)
    labels = numpy.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"The 'labels' parameter of {owner} must be 1-D. "
                         f"Got shape {labels.shape} instead.")
    classes, inverse, counts = numpy.unique(labels, return_inverse=True, return_counts=True)
    exact = counts * train_fraction
    take = numpy.floor(exact).astype(numpy.int64)
    extra = int(round(train_fraction * labels.size)) - int(take.sum())
    if extra > 0:  # largest remainders first; the stable sort breaks ties by class order
        take[numpy.argsort(-(exact - take), kind="stable")[:extra]] += 1
    rng = numpy.random.default_rng(seed)
    train, test = [], []
    for k in range(classes.size):
        rows = rng.permutation(numpy.flatnonzero(inverse == k))
        train.append(rows[:take[k]])
        test.append(rows[take[k]:])
    empty = numpy.empty(0, numpy.int64)
    return (numpy.sort(numpy.concatenate(train + [empty])).astype(numpy.int64),
            numpy.sort(numpy.concatenate(test + [empty])).astype(numpy.int64))
