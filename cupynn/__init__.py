"""cupynn: truly sparse MLPs trained from scratch on the GPU (CuPy) or CPU.

Sparse weights are CSR arrays on the device from the first step to the last;
forward and backward passes are hand-written; Adam is hand-written.
"""

from . import data, distributed, export, losses, redistribution
from ._version import __version__
from .backend import Backend, get_backend, gpu_available, to_numpy
from .layers import Linear, ReLU, Sigmoid, SparseLinear
from .model import MLP
from .memory import MemoryTracker
from .optim import Adam
from .serialization import ModelFileError, load, save
from .evaluation import evaluate
from .training import Trainer, fit

_LAZY = {"SparseMLPClassifier": "estimators", "SparseMLPRegressor": "estimators"}


def __getattr__(name: str):
    """The scikit-learn estimators, imported on first use (scikit-learn is slow to import)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cupynn' has no attribute {name!r}")


__all__ = [
    "Adam", "Backend", "Linear", "MLP", "MemoryTracker", "ModelFileError", "ReLU", "Sigmoid",
    "SparseLinear", "SparseMLPClassifier", "SparseMLPRegressor", "Trainer", "data", "distributed",
    "evaluate", "export", "fit", "get_backend", "gpu_available", "load", "losses",
    "redistribution", "save", "to_numpy", "__version__",
]
