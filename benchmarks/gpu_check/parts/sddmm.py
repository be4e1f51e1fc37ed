"""The ``sddmm`` part: the thread, warp and tiled SDDMM kernels, and spmm.cu against
cuSPARSE, timed at the layers' shapes."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import numpy

import cupynn
from cupynn import kernels
from cupynn.backend import to_numpy

from ..context import FAILED, Context, result


SDDMM_SHAPES = [  # (in, out, batch): the layers of the step table and of HIGGS
    (784, 256, 512), (256, 256, 512), (784, 4096, 512), (4096, 4096, 512),
    (21, 256, 128), (256, 256, 128)]
SDDMM_VARIANTS = [("thread", None), ("warp", 4), ("warp", 8), ("warp", 16), ("warp", 32)]
# Issue 20's tiled kernel (dy staged in shared memory, off by default), at the warp
# kernel's default groups: its sums are the warp kernel's at the same group, so the part
# also says whether the bits agree on the device. Kept apart from SDDMM_VARIANTS, the
# report's columns (its table shows them in the rows' "us").
SDDMM_TILED_VARIANTS = [("tiles", 8), ("tiles", 16)]


def timer(ctx: Context, fn: Callable[[], Any], reps: int) -> float:
    """Seconds per call: CUDA events around ``reps`` calls on the GPU, a wall clock on the CPU."""
    for _ in range(2):
        fn()
    if ctx.gpu:
        cupy = ctx.backend.xp
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return cupy.cuda.get_elapsed_time(start, end) / 1e3 / reps
    begin = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - begin) / reps


def part_sddmm(ctx: Context) -> dict[str, Any]:
    xp = ctx.backend.xp
    shapes = [(64, 32, 64)] if ctx.quick else SDDMM_SHAPES
    densities = (0.1,) if ctx.quick else (0.1, 0.03)
    reps = 2 if ctx.quick else 20
    rows, products = [], []
    rng = numpy.random.default_rng(0)
    for fan_in, fan_out, batch in shapes:
        for density in densities:
            layer = cupynn.SparseLinear(fan_in, fan_out, density, seed=1, device=ctx.backend)
            dy = xp.asarray(rng.standard_normal((fan_out, batch), dtype=numpy.float32))
            x = xp.asarray(rng.standard_normal((fan_in, batch), dtype=numpy.float32))
            out = xp.empty(layer.nnz, dtype=numpy.float32)
            times, results = {}, {}
            for method, group in SDDMM_VARIANTS + SDDMM_TILED_VARIANTS:
                label = method if group is None else f"{method}{group}"

                def call(method=method, group=group):
                    return kernels.sddmm(layer.indptr, layer.indices, dy, x, out, check=False,
                                         method=method, group=group)

                times[label] = timer(ctx, call, reps)
                results[label] = to_numpy(call()).copy()
            products.append(time_products(ctx, layer, x, dy, reps, f"{fan_in}->{fan_out} b{batch}",
                                          density))
            ref = results["thread"]
            spread = max(float(numpy.abs(r - ref).max()) for r in results.values())
            scale = float(numpy.abs(ref).max()) or 1.0
            fastest = min(times, key=times.get)
            default = f"warp{kernels.sddmm_group(batch)}"
            tiled = [f"{m}{g}" for m, g in SDDMM_TILED_VARIANTS]
            rows.append({"shape": f"{fan_in}->{fan_out} b{batch}", "density": density,
                         "nnz": layer.nnz, "us": {k: 1e6 * v for k, v in times.items()},
                         "fastest": fastest, "default": default,
                         "default_vs_fastest": times[default] / times[fastest],
                         "warp_best_vs_thread": min(v for k, v in times.items()
                                                    if k.startswith("warp")) / times["thread"],
                         "tiles_best_vs_default": min(times[k] for k in tiled) / times[default],
                         "tiles_bits_equal_warp": all(
                             numpy.array_equal(results[k], results[f"warp{k[5:]}"])
                             for k in tiled),
                         "max_rel_diff": spread / scale})
    agree = sum(r["fastest"] == r["default"] for r in rows)
    worst = max(r["max_rel_diff"] for r in rows)
    best = min(r["warp_best_vs_thread"] for r in rows)
    recommended = recommend(rows)
    tiles_best = statistics.geometric_mean(r["tiles_best_vs_default"] for r in rows)
    tiles_equal = sum(r["tiles_bits_equal_warp"] for r in rows)
    rows_vs_cusparse = statistics.geometric_mean(
        r["rows_us"] / r["cusparse_us"] for r in products)
    product_diff = max(r["max_rel_diff"] for r in products)
    summary = (f"default (warp, group by batch) fastest at {agree}/{len(rows)} shapes; best warp "
               f"{1 / best:.2f}x faster than thread at best; fastest overall {recommended} "
               f"({sddmm_env(recommended)}); tiles (best group) {tiles_best:.2f}x the default's "
               f"time (geometric mean), the warp kernel's bits at {tiles_equal}/{len(rows)} "
               f"shapes; variants agree to {worst:.1e}; products: spmm.cu "
               f"{rows_vs_cusparse:.2f}x cuSPARSE's time (geometric mean), agree to "
               f"{product_diff:.1e}")
    status = ctx.measured() if max(worst, product_diff) <= 1e-4 else FAILED
    return result(status, summary, {"rows": rows, "reps": reps, "recommended": recommended,
                                    "recommended_env": sddmm_env(recommended),
                                    "tiles_best_vs_default": tiles_best,
                                    "products": products,
                                    "products_rows_vs_cusparse": rows_vs_cusparse},
                  notes=[] if ctx.gpu else ["on the CPU every variant is the one Numba kernel"])


def time_products(ctx: Context, layer: Any, x: Any, dy: Any, reps: int, shape: str,
                  density: float) -> dict[str, Any]:
    """``W @ x`` and ``W.T @ dy`` of one layer by spmm.cu ("rows", the default), by its
    tiled kernels ("tiles", issue 20) and by cuSPARSE: microseconds per call, how far
    "rows" and cuSPARSE are apart, and whether "tiles" gives the bits of "rows"."""
    times, results = {}, {}
    for method in kernels.SPMM_METHODS:
        def forward(method=method):
            return kernels.spmm(layer.indptr, layer.indices, layer.data, x, check=False,
                                bias=layer.bias, relu=True, method=method)

        def backward(method=method):
            transposed = layer.transposed_pattern() if method in ("rows", "tiles") else None
            return kernels.spmm_t(layer.indptr, layer.indices, layer.data, dy,
                                  layer.in_features, check=False, method=method,
                                  transpose=transposed)

        times[method] = (timer(ctx, forward, reps), timer(ctx, backward, reps))
        results[method] = (to_numpy(forward()), to_numpy(backward()))
    diff = max(float(numpy.abs(a - b).max()) / (float(numpy.abs(b).max()) or 1.0)
               for a, b in zip(results["rows"], results["cusparse"]))
    return {"shape": shape, "density": density, "nnz": layer.nnz,
            "spmm_us": {m: 1e6 * t[0] for m, t in times.items()},
            "spmm_t_us": {m: 1e6 * t[1] for m, t in times.items()},
            "rows_us": 1e6 * sum(times["rows"]), "cusparse_us": 1e6 * sum(times["cusparse"]),
            "tiles_us": 1e6 * sum(times["tiles"]),
            "tiles_bits_equal_rows": all(numpy.array_equal(a, b) for a, b in
                                         zip(results["tiles"], results["rows"])),
            "max_rel_diff": diff}


def recommend(rows: list[dict[str, Any]]) -> str:
    """The variant with the smallest geometric mean, over the shapes, of its time over the
    fastest variant's time there."""
    labels = list(rows[0]["us"])
    score = {label: statistics.geometric_mean(r["us"][label] / min(r["us"].values())
                                              for r in rows) for label in labels}
    return min(labels, key=score.get)


def sddmm_env(label: str) -> str:
    """The $CUPYNN_SDDMM setting of a variant label ("thread", "warp16", "tiles8")."""
    method = label.rstrip("0123456789")
    group = label[len(method):]
    return f"{kernels.SDDMM_ENV}=" + (f"{method}:{group}" if group else method)
