"""The GPU check's ``scale`` part (issue 21): the largest sparse MLP the device holds,
trained for a few steps. Registered as the part ``"scale"``.

The model is ``benchmarks/bench_scale.py``'s family, ``784-W-W-W-10`` with the output
layer dense, at :data:`INPUTS` inputs per neuron, built on the device
(``cupynn.MLP(..., device=ctx.backend)``). A model of width :data:`CALIBRATION_WIDTH`
is built and trained first. From it the part projects the peak of width ``W``:
bench_scale's projection (bytes per weight and per neuron from
:func:`cupynn.memory.footprint`, plus the step's activations) plus, on the GPU, what
the calibration model's peak pool bytes held beyond that projection (the
temporaries of building the transposed pattern, a sort over one layer) per weight
of its largest layer, times the largest layer's weights at ``W``. It takes the
largest ``W`` whose projected peak fits :data:`BUDGET_SHARE` of the device's free
memory, and no larger than what the part's remaining time allows
(build and steps projected at the calibration model's seconds per weight, which
its fixed costs make pessimistic) or what int32 indices allow (``W × INPUTS <
2^31`` per layer). That model is built, trained ``STEPS`` steps after one warm-up
step, and measured: step time (``TrainStep.timed``), peak bytes in use from CuPy's
memory pool, bytes per nonzero. Targets: >= 10 M hidden neurons and >= 1 B weights.

On the CPU (the dry run) and with ``--quick`` the same code runs on tiny models
(``W`` at most :data:`QUICK_MAX_WIDTH`; on the CPU a budget of the current resident
set plus :data:`DRY_RUN_HEADROOM`) and returns the same keys.
"""

from __future__ import annotations

import gc
from typing import Any

from ..context import Context, result

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
QUICK_MAX_WIDTH = 4096


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
    # What the calibration model's peak held beyond the projection, per weight of its
    # largest layer (on the GPU mostly the transposed pattern's sort, one layer at a time).
    cal_own = bs.projected_peak(cal_row["width"], {**cal, "baseline_bytes": 0})["total"]
    # On the CPU the resident set's noise (MBs) over a tiny model would swamp it: 0.
    overhead = (max(0, cal_row["peak_bytes"] - cal_row["baseline_bytes"] - cal_own)
                / max(cal_row["layer_weights"])) if ctx.gpu else 0.0

    def projection(w: int) -> int:
        return int(bs.projected_peak(w, cal)["total"]
                   + overhead * max(bs.layer_weights(w, inputs)))

    seconds_per_weight = ((cal_row["build_s"] + (args.warmup + args.steps) * cal_row["step_s"])
                          / cal_row["n_weights"])
    seconds = max(0.0, TIME_SHARE * ctx.remaining())
    limits = {
        "memory": largest(lambda w: projection(w) <= budget),
        "time": largest(lambda w: seconds_per_weight * sum(bs.layer_weights(w, inputs))
                        <= seconds),
        "int32 indices": INT32_LIMIT // inputs,
    }
    if small:  # a smoke run stays small whatever the memory and the time allow
        limits["quick"] = QUICK_MAX_WIDTH
    width = min(limits.values())
    limited_by = min(limits, key=limits.get)
    data: dict[str, Any] = {
        "inputs": inputs, "overhead_per_layer_weight": overhead, "budget_bytes": budget,
        "free_bytes": free, "total_bytes": total,
        "limits": limits, "limited_by": limited_by, "width": width,
        "calibration": {k: cal_row[k] for k in ("width", "n_weights", "build_s", "step_s",
                                               "peak_bytes", "bytes_per_nonzero")},
    }
    if width < 1:
        return result("failed", f"no width fits: limits {limits}", data)
    projected = projection(width)
    row = bs.measure(width, args, backend, [])
    fp = row["footprint"]
    data.update({
        "sizes": row["sizes"], "n_neurons": row["n_neurons"],
        "n_hidden_neurons": row["n_hidden_neurons"], "n_weights": row["n_weights"],
        "build_s": row["build_s"], "step_s": row["step_s"], "phases_s": row["phases_s"],
        "peak_bytes": row["peak_bytes"], "peak_method": row["peak_method"],
        "projected_peak_bytes": projected,
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
               f"(projected {projected / 2**30:.2f}, budget {budget / 2**30:.2f}), "
               f"{row['bytes_per_nonzero']:.1f} B per nonzero")
    notes = [] if ctx.gpu else ["dry run: tiny models on the CPU, budget = resident set + "
                                f"{DRY_RUN_HEADROOM // 2**20} MiB"]
    return result(ctx.measured(), summary, data, notes, targets)
