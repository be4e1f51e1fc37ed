"""The ``parity`` part: the same seed trained on the CPU and on the device, float64,
for every redistribution algorithm."""

from __future__ import annotations

from typing import Any

import numpy

import cupynn
from cupynn.backend import to_numpy

from ..context import DRY_RUN, FAILED, PASSED, Context, result

PARITY_RTOL = 1e-8  # float64, two epochs: rounding differences only
PARITY_EPOCHS = 2


def small_split(ctx: Context) -> tuple[str, tuple[numpy.ndarray, ...]]:
    """A small real split: KMNIST (stratified from the official test images), or
    scikit-learn's digits where no KMNIST is at hand."""
    from cupynn.data import load_digits, load_kmnist

    rows, test_rows = (400, 100) if ctx.quick else (1600, 400)
    try:
        data = load_kmnist(None if ctx.data_dir is None else ctx.data_dir / "kmnist",
                           train_from_test=0.8, download=False, progress=False)
        name = "KMNIST (official test images, stratified 80/20)"
    except (FileNotFoundError, ValueError) as exc:
        data = load_digits()
        name = f"scikit-learn digits (no KMNIST: {str(exc).splitlines()[0]})"
    return name, (data.x_train[:rows], data.y_train[:rows], data.x_test[:test_rows],
                  data.y_test[:test_rows])


def parity_run(device: str, algorithm: str, data: tuple[numpy.ndarray, ...],
               hidden: int) -> dict[str, Any]:
    """Two epochs of a 4-epoch schedule (a redistribution after each), float64.

    Returns the history and, after each epoch (so after its redistribution),
    every sparse layer's pattern; and the final parameters."""
    x, y, xt, yt = data
    model = cupynn.MLP([x.shape[1], hidden, hidden, 10], density=0.1, seed=3, dtype="float64",
                       device=device)
    patterns: list[list[tuple[numpy.ndarray, numpy.ndarray]]] = []

    def after_epoch(metrics: dict[str, Any]) -> bool:
        patterns.append([(to_numpy(layer.indptr).copy(), to_numpy(layer.indices).copy())
                         for layer in model.sparse_layers])
        return len(patterns) < PARITY_EPOCHS

    history = cupynn.fit(model, cupynn.Adam(model, lr=2e-3), (x, y), (xt, yt),
                         epochs=2 * PARITY_EPOCHS, batch_size=128, seed=5, progress=False,
                         redistribution=algorithm, on_epoch_end=after_epoch)
    params = [to_numpy(value).copy() for layer in model.layers
              for _, value, _ in layer.parameters()]
    return {"history": history, "patterns": patterns, "params": params}


def compare_parity(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    topology = [all(numpy.array_equal(a[0], b[0]) and numpy.array_equal(a[1], b[1])
                    for a, b in zip(ra, rb))
                for ra, rb in zip(ref["patterns"], got["patterns"])]
    loss_diff = 0.0
    for h_ref, h_got in zip(ref["history"], got["history"]):
        for key in ("train_loss", "test_loss", "induced_loss_before", "induced_loss_after"):
            if key in h_ref:
                scale = max(abs(h_ref[key]), 1e-300)
                loss_diff = max(loss_diff, abs(h_ref[key] - h_got[key]) / scale)
    weight_diff = 0.0
    if all(topology):
        scale = max(float(numpy.abs(p).max()) for p in ref["params"])
        weight_diff = max(float(numpy.abs(a - b).max()) for a, b in zip(ref["params"],
                                                                        got["params"])) / scale
    moved = [h.get("redistribution") for h in ref["history"]]
    return {"topology_equal": topology, "loss_rel_diff": loss_diff,
            "weight_rel_diff": weight_diff if all(topology) else None,
            "moved": [sum(r["added"] for r in m) if m else 0 for m in moved],
            "ok": all(topology) and len(topology) == PARITY_EPOCHS
            and loss_diff <= PARITY_RTOL and weight_diff <= PARITY_RTOL}


def part_parity(ctx: Context) -> dict[str, Any]:
    from cupynn.redistribution import NAMES

    name, data = small_split(ctx)
    hidden = 64 if ctx.quick else 256
    rows = []
    for algorithm in NAMES:
        ref = parity_run("cpu", algorithm, data, hidden)
        got = parity_run(ctx.device, algorithm, data, hidden)
        rows.append({"algorithm": algorithm, **compare_parity(ref, got)})
    ok = all(r["ok"] for r in rows)
    bad = [r["algorithm"] for r in rows if not r["ok"]]
    summary = (f"{sum(r['ok'] for r in rows)}/{len(rows)} algorithms equal "
               f"(cpu vs {ctx.device})" + (f"; differ: {', '.join(bad)}" if bad else ""))
    status = (PASSED if ok else FAILED) if ctx.gpu else (DRY_RUN if ok else FAILED)
    return result(status, summary,
                  {"data": name, "rows": len(data[0]), "sizes": [data[0].shape[1], hidden,
                                                                  hidden, 10],
                   "density": 0.1, "dtype": "float64", "rtol": PARITY_RTOL, "results": rows},
                  notes=[] if ctx.gpu else ["cpu against cpu: the code path only, not a GPU "
                                            "result"])
