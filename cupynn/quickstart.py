"""A short sparse training run: ``python -m cupynn.quickstart``.

Trains a 784-256-256-10 MLP at density 0.1 on KMNIST when its files can be
found (the official train/test files, or a stratified 80/20 split of the
official test files when only those exist), and otherwise says so and falls
back to the 8x8 digits dataset that ships with scikit-learn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy

import cupynn

SEARCH = (Path("datasets") / "kmnist", Path("..") / "shared" / "data" / "kmnist")


def _load_npz(path: Path) -> numpy.ndarray:
    with numpy.load(path) as archive:
        return archive["arr_0"]


def load_data(data_dir: Path | None, seed: int) -> tuple[str, tuple, tuple]:
    """(description, (x_train, y_train), (x_test, y_test)), pixels in [0, 1]."""
    from sklearn.model_selection import train_test_split

    folders = [data_dir] if data_dir is not None else list(SEARCH)
    for folder in folders:
        test_imgs = folder / "kmnist-test-imgs.npz"
        test_labels = folder / "kmnist-test-labels.npz"
        if not (test_imgs.exists() and test_labels.exists()):
            continue
        x = _load_npz(test_imgs).reshape(-1, 784).astype(numpy.float32) / 255
        y = _load_npz(test_labels).astype(numpy.int64)
        train_imgs = folder / "kmnist-train-imgs.npz"
        if train_imgs.exists():
            x_train = _load_npz(train_imgs).reshape(-1, 784).astype(numpy.float32) / 255
            y_train = _load_npz(folder / "kmnist-train-labels.npz").astype(numpy.int64)
            return f"KMNIST (official split) from {folder}", (x_train, y_train), (x, y)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
        return (f"KMNIST test images from {folder}, stratified 80/20 split (training images "
                f"not found)", (xtr, ytr), (xte, yte))
    if data_dir is not None:
        raise SystemExit(f"error: no kmnist-test-imgs.npz / kmnist-test-labels.npz in {data_dir}")
    from sklearn.datasets import load_digits

    print("KMNIST was not found in " + ", ".join(str(f) for f in SEARCH)
          + "; falling back to scikit-learn's bundled 8x8 digits dataset.")
    digits = load_digits()
    x = (digits.data / 16.0).astype(numpy.float32)
    xtr, xte, ytr, yte = train_test_split(x, digits.target, test_size=0.2, stratify=digits.target,
                                          random_state=seed)
    return "scikit-learn digits (fallback)", (xtr, ytr), (xte, yte)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--device", default=None, help="auto, cpu or gpu (default $CUPYNN_DEVICE or auto)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    name, train, test = load_data(args.data_dir, args.seed)
    features = train[0].shape[1]
    model = cupynn.MLP([features, 256, 256, 10], density=args.density, seed=args.seed,
                       device=args.device)
    print(f"dataset: {name}: {len(train[1])} train / {len(test[1])} test rows")
    print(f"device: {model.backend.device_name()}; weights per layer {model.nnz}")
    history = cupynn.fit(model, cupynn.Adam(model, lr=2e-3), train, test, epochs=args.epochs,
                         batch_size=128, seed=args.seed, progress=not args.quiet)
    for h in history:
        print(f"epoch {h['epoch']}: train loss {h['train_loss']:.4f}, test accuracy "
              f"{h['test_accuracy']:.4f}, {h['train_seconds']:.2f} s")
    return history


if __name__ == "__main__":
    main()
