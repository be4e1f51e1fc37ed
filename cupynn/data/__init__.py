"""Datasets: KMNIST and HIGGS loaders, their downloads and checks, and image augmentation.

- :func:`load_kmnist` -> :class:`Dataset`: the official KMNIST files (NumPy
  ``.npz`` or IDX ``.gz`` layout), checked and downloaded when missing; a
  stratified split of the test images with ``train_from_test``; scikit-learn's
  digits as an announced fallback (:func:`load_digits`).
- :func:`load_higgs` -> :class:`HiggsData`: ``HIGGS.csv.gz`` parsed in a
  stream and cached; official or seeded split; standardised; a fresh sample of
  training rows per epoch (:meth:`HiggsData.sample_epoch`).
- :class:`RandomAffine`: per-image random rotation, translation and scale of a
  batch, on the batch's device.

Folders searched when none is named: ``$CUPYNN_DATA/<dataset>``,
``datasets/<dataset>`` (the git-ignored cache; downloads go there) and
``../shared/data/<dataset>``, relative to the working directory.
"""

from .augment import RandomAffine, affine_transform
from .dataset import Dataset, stratified_split
from .download import DownloadError, download_file
from .higgs import HiggsData, find_higgs, load_higgs, read_higgs_csv
from .kmnist import load_digits, load_kmnist, read_images, read_labels

__all__ = [
    "Dataset", "DownloadError", "HiggsData", "RandomAffine", "affine_transform", "download_file",
    "find_higgs", "load_digits", "load_higgs", "load_kmnist", "read_higgs_csv", "read_images",
    "read_labels", "stratified_split",
]
