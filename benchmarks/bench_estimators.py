"""The estimators' default initialisation, chosen by measurement beside ``MLPClassifier``.

On KMNIST trained from 80 % of the official test images (8 000 for training,
2 000 held out, stratified; the ``--train-from-test 0.8`` split of the
scripts), every configuration is trained for the same ``--max-iter`` epochs
(``tol=0``: none stops early) with the estimators' other defaults (Adam,
``learning_rate_init=1e-3``, ``batch_size="auto"`` = 200, ``(256, 256)``
hidden ReLU layers) and scored on the held-out images:

* ``SparseMLPClassifier`` at ``density=0.1`` with ``redistribution=
  "gradient-global"`` (the estimators' default), ``init="paper"`` and
  ``init="fan_in"``;
* ``SparseMLPClassifier`` at ``density=1.0`` without redistribution (a dense
  network of SparseLinear layers), both inits;
* scikit-learn's ``MLPClassifier`` with its defaults (``alpha=1e-4`` L2,
  Glorot-uniform init), the same sizes, epochs, batch and learning rate,

for every seed of ``--seeds``, all in one run (``random_state`` = the seed; the
split's seed is fixed). The report gives each configuration's accuracy per seed
and its mean, and the seconds of training.

Run ``python benchmarks/bench_estimators.py --json docs/estimators/kmnist-init.json``;
``--help`` lists the options.
"""

from __future__ import annotations

if __name__ == "__main__":  # the best dense BLAS for MLPClassifier: before NumPy loads
    import os as _os
    import sys as _sys

    _sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
    import blas_pin

    blas_pin.release()

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(1, HERE)

import cupynn  # noqa: E402
from machine import (finish_info, header_lines, load_and_env_lines,  # noqa: E402
                     load_average, machine_info, publish)


def configurations(density: float) -> dict[str, dict[str, Any]]:
    """Name -> estimator parameters (None: scikit-learn's MLPClassifier)."""
    sparse = dict(density=density, redistribution="gradient-global")
    dense = dict(density=1.0, redistribution=None)
    return {
        f"sparse d={density:g}, init=paper": dict(sparse, init="paper"),
        f"sparse d={density:g}, init=fan_in": dict(sparse, init="fan_in"),
        "dense, init=paper": dict(dense, init="paper"),
        "dense, init=fan_in": dict(dense, init="fan_in"),
        "sklearn MLPClassifier": None,
    }


def run_one(params: dict[str, Any] | None, data: Any, seed: int, max_iter: int,
            hidden: tuple[int, ...]) -> dict[str, Any]:
    """Train one configuration for ``max_iter`` epochs; held-out accuracy and seconds."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    common = dict(hidden_layer_sizes=hidden, max_iter=max_iter, tol=0.0, random_state=seed)
    clf = (MLPClassifier(**common) if params is None
           else cupynn.SparseMLPClassifier(**common, **params, device="cpu"))
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol=0: every run hits max_iter
        clf.fit(data.x_train, data.y_train)
    seconds = time.perf_counter() - start
    return {"seed": seed, "accuracy": float(clf.score(data.x_test, data.y_test)),
            "final_train_loss": float(clf.loss_curve_[-1]), "n_iter": int(clf.n_iter_),
            "seconds": seconds}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from cupynn.backend import get_backend
    from cupynn.data import load_kmnist

    load_before = load_average()
    info = machine_info(get_backend("cpu"))
    data = load_kmnist(args.data_dir, train_from_test=0.8, seed=0, download=False,
                       progress=False)
    hidden = tuple(args.hidden)
    configs = configurations(args.density)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    wall = time.perf_counter()
    for seed in args.seeds:  # every configuration once per seed, side by side
        for name, params in configs.items():
            result = run_one(params, data, seed, args.max_iter, hidden)
            runs[name].append(result)
            print(f"seed {seed}  {name:<28} accuracy {result['accuracy']:.4f}  "
                  f"({result['seconds']:.1f} s)", flush=True)
    finish_info(info, load_before)
    summary = {name: {"mean_accuracy": statistics.fmean(r["accuracy"] for r in rs),
                      "accuracies": [r["accuracy"] for r in rs],
                      "mean_seconds": statistics.fmean(r["seconds"] for r in rs)}
               for name, rs in runs.items()}
    return {"machine": info, "data": {"name": data.name, "split": data.split,
                                      "train_rows": int(len(data.y_train)),
                                      "test_rows": int(len(data.y_test))},
            "settings": {"max_iter": args.max_iter, "hidden_layer_sizes": list(hidden),
                         "density": args.density, "seeds": list(args.seeds),
                         "learning_rate_init": 1e-3, "batch_size": "auto (200)", "tol": 0.0},
            "runs": runs, "summary": summary,
            "wall_seconds": round(time.perf_counter() - wall, 1)}


def format_report(report: dict[str, Any]) -> str:
    s, d = report["settings"], report["data"]
    lines = [f"KMNIST {d['train_rows']} train / {d['test_rows']} held out ({d['split']}); "
             f"{s['max_iter']} epochs, hidden {tuple(s['hidden_layer_sizes'])}, Adam lr 1e-3, "
             f"batch 200; seeds {s['seeds']}", *header_lines(report["machine"]), "",
             f"{'configuration':<30} {'mean acc':>8}  per seed{'':<18} {'s/fit':>6}"]
    for name, row in report["summary"].items():
        per_seed = " ".join(f"{a:.4f}" for a in row["accuracies"])
        lines.append(f"{name:<30} {row['mean_accuracy']:8.4f}  {per_seed:<26} "
                     f"{row['mean_seconds']:6.1f}")
    lines += ["", *load_and_env_lines(report["machine"], report["wall_seconds"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=None,
                        help="the KMNIST folder (default: the loader's search, which includes "
                             "../shared/data/kmnist)")
    parser.add_argument("--max-iter", type=int, default=20, help="epochs of every fit")
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 256],
                        help="hidden layer sizes")
    parser.add_argument("--density", type=float, default=0.1, help="density of the sparse runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="random_state of each repetition")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report = measure(args)
    return publish(report, format_report(report), args.json)


if __name__ == "__main__":
    sys.exit(main())
