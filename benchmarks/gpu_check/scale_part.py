"""The GPU check's ``scale`` part (issue 21): the largest sparse MLP the device holds,
trained for a few steps. To be registered in ``parts/__init__.py`` as ``"scale"``.

The model is ``benchmarks/bench_scale.py``'s family, ``784-W-W-W-10`` with the output
layer dense, at :data:`INPUTS` inputs per neuron, built on the device
(``cupynn.MLP(..., device=ctx.backend)``). A model of width :data:`CALIBRATION_WIDTH`
is built and trained first; from it (bench_scale's projection: bytes per weight and
per neuron from :func:`cupynn.memory.footprint`, plus the step's activations) the
part takes the largest ``W`` whose projected peak fits :data:`BUDGET_SHARE` of the
device's free memory, and no larger than what the part's remaining time allows
(build and steps projected at the calibration model's seconds per weight, which
its fixed costs make pessimistic) or what int32 indices allow (``W × INPUTS <
2^31`` per layer). That model is built, trained ``STEPS`` steps after one warm-up
step, and measured: step time (``TrainStep.timed``), peak bytes in use from CuPy's
memory pool, bytes per nonzero. Targets: >= 10 M hidden neurons and >= 1 B weights.

On the CPU (the dry run) and with ``--quick`` the same code runs on tiny models
with a budget of the current resident set plus :data:`DRY_RUN_HEADROOM` and
returns the same keys.
"""

from __future__ import annotations

import gc
from typing import Any

from .context import Context, result

INPUTS = 100  # inputs per neuron: 10 M hidden neurons x 100 = 1 B weights
TARGET_HIDDEN_NEURONS = 10_000_000
TARGET_WEIGHTS = 1_000_000_000
BUDGET_SHARE = 0.8  # of the device's free memory
TIME_SHARE = 0.5  # of the part's remaining seconds, for the big model's build and steps
CALIBRATION_WIDTH = 100_000
STEPS = 3
INT32_LIMIT = 2**31 - 1
DRY_RUN_HEADROOM = 32 * 2**20
DRY_RUN = {"inputs": 20, "width": 64, "batch": 16, "steps": 1}


def at_least(name: str, value: float | None, limit: float, unit: str = "") -> dict[str, Any]:
    """A size target: met when ``value >= limit`` (the shape of ``context.target``)."""
    met = None if value is None else bool(value >= limit)
    return {"name": name, "value": value, "limit": limit, "unit": unit,
            "verdict": "not measured" if met is None else ("met" if met else "missed")}


def largest(fits: Any) -> int:
    """The largest W >= 1 with ``fits(W)`` (monotone), or 0."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def part_scale(ctx: Context) -> dict[str, Any]:
    from benchmarks import bench_scale as bs
    from cupynn import memory

    backend = ctx.backend
    small = ctx.quick or not ctx.gpu
    inputs = DRY_RUN["inputs"] if small else INPUTS
    args = bs.parse_args(["--device", ctx.device, "--inputs", str(inputs),
                          "--batch", str(DRY_RUN["batch"] if small else 128),
                          "--steps", str(DRY_RUN["steps"] if small else STEPS),
                          "--warmup", "1", "--out", "", "--quiet"])
    bs.warm_up(args, backend)
    cal_row = bs.measure(DRY_RUN["width"] if small else CALIBRATION_WIDTH, args, backend, [])
    gc.collect()
    if ctx.gpu:
        backend.xp.get_default_memory_pool().free_all_blocks()
        free, total = (int(v) for v in backend.xp.cuda.runtime.memGetInfo())
        budget, baseline = int(BUDGET_SHARE * free), 0
    else:
        free = total = None
        baseline = int(memory.rss_bytes() or cal_row["peak_bytes"])
        budget = baseline + DRY_RUN_HEADROOM
    cal = bs.calibration(cal_row, baseline, args.batch, args.dtype, inputs)
    seconds_per_weight = ((cal_row["build_s"] + (args.warmup + args.steps) * cal_row["step_s"])
                          / cal_row["n_weights"])
    seconds = max(0.0, TIME_SHARE * ctx.remaining())
    limits = {
        "memory": bs.largest_width(budget, cal) or 0,
        "time": largest(lambda w: seconds_per_weight * sum(bs.layer_weights(w, inputs))
                        <= seconds),
        "int32 indices": INT32_LIMIT // inputs,
    }
    width = min(limits.values())
    limited_by = min(limits, key=limits.get)
    data: dict[str, Any] = {
        "inputs": inputs, "budget_bytes": budget, "free_bytes": free, "total_bytes": total,
        "limits": limits, "limited_by": limited_by, "width": width,
        "calibration": {k: cal_row[k] for k in ("width", "n_weights", "build_s", "step_s",
                                               "peak_bytes", "bytes_per_nonzero")},
    }
    if width < 1:
        return result("failed", f"no width fits: limits {limits}", data)
    projection = bs.projected_peak(width, cal)
    row = bs.measure(width, args, backend, [])
    fp = row["footprint"]
    data.update({
        "sizes": row["sizes"], "n_neurons": row["n_neurons"],
        "n_hidden_neurons": row["n_hidden_neurons"], "n_weights": row["n_weights"],
        "build_s": row["build_s"], "step_s": row["step_s"], "phases_s": row["phases_s"],
        "peak_bytes": row["peak_bytes"], "peak_method": row["peak_method"],
        "projected_peak_bytes": projection["total"],
        "bytes_per_nonzero": row["bytes_per_nonzero"], "components": fp["components"],
        "dense_twin_bytes": row["dense_twin"]["total_bytes"],
    })
    targets = []
    if ctx.gpu and not ctx.quick:
        targets = [at_least("hidden neurons", row["n_hidden_neurons"], TARGET_HIDDEN_NEURONS),
                   at_least("weights", row["n_weights"], TARGET_WEIGHTS)]
    summary = (f"784-{width:,}x3-10: {row['n_hidden_neurons']:,} hidden neurons, "
               f"{row['n_weights']:,} weights ({limited_by} limits W); {row['step_s']:.2f} s "
               f"per step at batch {args.batch}, peak {row['peak_bytes'] / 2**30:.2f} GiB "
               f"(projected {projection['total'] / 2**30:.2f}, budget {budget / 2**30:.2f}), "
               f"{row['bytes_per_nonzero']:.1f} B per nonzero")
    notes = [] if ctx.gpu else ["dry run: tiny models on the CPU, budget = resident set + "
                                f"{DRY_RUN_HEADROOM // 2**20} MiB"]
    return result(ctx.measured(), summary, data, notes, targets)
