"""The CPU kernels against this machine's limits: bandwidth, roofline, compile time.

Three measurements, each printed as a table (and written as JSON with ``--json``):

* **probe**: the read bandwidth of this machine's caches and memory. A
  parallel Numba loop (as many threads as the kernels use) sums a buffer over
  and over; each thread reads its own buffer of a size chosen to sit in L2,
  the shared L3, or main memory (the sizes come from ``/sys``). These are
  the roofs the kernels are compared with. (L1 is left out: there the loop's
  own adds, four 256-bit chains, limit it to ~32 bytes a cycle, not the cache,
  and no kernel streams its rows from L1.)
* **kernels**: each sparse kernel of a training step (``spmm``, the forward
  product with bias and ReLU; ``sddmm``, the weight gradient; ``spmm_t``, the
  input gradient) on one layer, timed alone (best of ``--repeats``). Each
  nonzero makes the kernel stream one or two rows of ``batch`` floats, so its
  time is that traffic over a bandwidth; the table gives the bytes per nonzero
  of the dominant stream, where that stream lives (the cache level its working
  set fits in), the bandwidth achieved, and its fraction of the probe's roof
  for that level:

  - ``spmm``: per nonzero, one row of ``x`` (the layer's input, ``in x batch``);
    the output row it accumulates into stays in L1 (once per four nonzeros).
  - ``sddmm``: per nonzero, one row of ``x``; the ``dy`` row of the output row
    stays in L1 across the row's nonzeros.
  - ``spmm_t``: per nonzero, one row of the output ``dx`` read and written
    (two rows), in a band of rows sized to stay in L2.

* **compile**: Numba's compile time of every CPU kernel (``kernels.warm_up``,
  float32 and float64) in a fresh process with an empty cache — what a new
  machine pays once — and the load time from the cache it left.

Run ``python benchmarks/bench_kernels.py --help``; results are quoted in
``docs/benchmarks.md``.
"""

from __future__ import annotations

if __name__ == "__main__":  # the best BLAS, as in every benchmark: before NumPy loads
    import os as _os
    import sys as _sys

    _sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
    import blas_pin

    blas_pin.release()

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(1, HERE)

import cupynn  # noqa: E402
from cupynn import kernels  # noqa: E402
from machine import (finish_info, header_lines, load_and_env_lines, load_average,  # noqa: E402
                     machine_info, publish)

# (name, in, out, density, batch): the paper's sizes and the memory experiment's width.
LAYERS = [
    ("kmnist layer 1", 784, 256, 0.1, 512),
    ("kmnist layer 2", 256, 256, 0.1, 512),
    ("higgs layer 2", 256, 256, 0.1, 128),
    ("width 4096, d 0.1", 4096, 4096, 0.1, 512),
    ("width 4096, d 0.03", 4096, 4096, 0.03, 512),
]
QUICK_LAYERS = [("kmnist layer 2", 256, 256, 0.1, 64)]
LEVELS = ("L2", "L3", "memory")


# ----------------------------------------------------------------- the machine's caches
def cache_sizes() -> dict[str, int]:
    """Data-cache sizes in bytes from Linux's ``/sys`` (L1d, L2 per core; L3 shared).

    Falls back to common sizes (32 KiB, 1 MiB, 32 MiB) where ``/sys`` says nothing.
    """
    sizes = {"L1": 32 << 10, "L2": 1 << 20, "L3": 32 << 20}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return sizes
    for entry in entries:
        try:
            with open(f"{base}/{entry}/level") as f:
                level = int(f.read())
            with open(f"{base}/{entry}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{entry}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or level not in (1, 2, 3):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        value = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        sizes[f"L{level}"] = value
    return sizes


def level_of(working_bytes: float, caches: dict[str, int]) -> str:
    """The cache level a working set fits in: L2 per core, L3 shared (L1 is not
    probed: no kernel's stream of rows fits in it). Half of a level counts as
    room, since the kernels' other streams share it.
    """
    if working_bytes <= caches["L2"] / 2:
        return "L2"
    if working_bytes <= caches["L3"] / 2:
        return "L3"
    return "memory"


# ----------------------------------------------------------------- the probe
def _probe_kernel() -> Callable[..., Any]:
    import numba

    @numba.njit(parallel=True, fastmath={"reassoc", "contract"}, nogil=True)
    def read_all(buffers, passes):  # pragma: no cover - compiled
        """Each thread sums its own buffer ``passes`` times; returns the sums."""
        sums = numpy.zeros(buffers.shape[0], dtype=numpy.float32)
        for t in numba.prange(buffers.shape[0]):
            acc = numpy.float32(0)
            row = buffers[t]
            for _ in range(passes):
                for j in range(row.shape[0]):
                    acc += row[j]
            sums[t] = acc
        return sums

    return read_all


def probe(caches: dict[str, int], threads: int, seconds: float) -> dict[str, dict[str, float]]:
    """Read bandwidth (GB/s, all threads together) from each level, best of 5."""
    read_all = _probe_kernel()
    per_thread = {"L2": caches["L2"] // 2,
                  "L3": caches["L3"] // (2 * threads), "memory": max(256 << 20, 8 * caches["L3"])
                  // threads}
    result = {}
    for level in LEVELS:
        n = max(1024, per_thread[level] // 4)
        buffers = numpy.ones((threads, n), dtype=numpy.float32)
        read_all(buffers, 1)  # compile, and fault the pages in
        passes = 1
        while True:  # passes for a run of about seconds / 20
            start = time.perf_counter()
            read_all(buffers, passes)
            elapsed = time.perf_counter() - start
            if elapsed > seconds / 20 or passes > 1 << 20:
                break
            passes *= 4
        best = min(_timed(lambda: read_all(buffers, passes)) for _ in range(5))
        result[level] = {"bytes_per_thread": int(buffers[0].nbytes),
                         "gb_s": buffers.nbytes * passes / best / 1e9}
    return result


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----------------------------------------------------------------- the kernels
def kernel_rows(layers: list[tuple], repeats: int, caches: dict[str, int],
                roofs: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Each kernel on each layer: best time, multiply-adds, bytes and roof."""
    rows = []
    for name, n_in, n_out, density, batch in layers:
        layer = cupynn.SparseLinear(n_in, n_out, density, seed=0, device="cpu")
        rng = numpy.random.default_rng(0)
        x = rng.standard_normal((n_in, batch), dtype=numpy.float32)
        dy = rng.standard_normal((n_out, batch), dtype=numpy.float32)
        nnz, row_bytes = layer.nnz, batch * 4
        indptr, indices, data, bias = layer.indptr, layer.indices, layer.data, layer.bias
        # (kernel, call, stream bytes per nonzero, the stream's working set)
        band = min(n_in * row_bytes, caches["L2"] // 4)  # spmm_t's band of output rows
        cases = [
            ("spmm", lambda: kernels.spmm(indptr, indices, data, x, check=False, bias=bias,
                                          relu=True), row_bytes, x.nbytes),
            ("sddmm", lambda: kernels.sddmm(indptr, indices, dy, x, check=False),
             row_bytes, x.nbytes),
            # As a layer calls it: its pattern is canonical, checked when set.
            ("spmm_t", lambda: kernels.spmm_t(indptr, indices, data, dy, n_in, check=False,
                                              sorted_rows=True), 2 * row_bytes, band),
        ]
        for kernel, call, per_nnz, working in cases:
            call()
            best = min(_timed(call) for _ in range(repeats))
            level = level_of(working, caches)
            achieved = nnz * per_nnz / best / 1e9
            rows.append({
                "layer": name, "shape": f"{n_in}x{n_out}", "density": density, "batch": batch,
                "nnz": nnz, "kernel": kernel, "ms": best * 1e3,
                "gmadd_s": nnz * batch / best / 1e9, "bytes_per_nnz": per_nnz,
                "working_set_kib": working / 1024, "level": level, "achieved_gb_s": achieved,
                "roof_gb_s": roofs[level]["gb_s"],
                "fraction_of_roof": achieved / roofs[level]["gb_s"],
            })
    return rows


# ----------------------------------------------------------------- compile time
COMPILE_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
start = time.perf_counter()
import numpy
from cupynn import kernels
from cupynn.backend import get_backend
imported = time.perf_counter()
for dtype in (numpy.float32, numpy.float64):
    kernels.warm_up(get_backend("cpu"), dtype)
print(imported - start, time.perf_counter() - imported)
"""


def compile_times(runs: int, baseline: str | None = None) -> dict[str, Any]:
    """``warm_up`` of both dtypes in fresh processes: from an empty Numba cache, then
    from the cache it filled. Seconds, best of ``runs`` each (import time apart).
    With ``baseline`` (another checkout of cupynn) the same is timed for it, the
    two alternating run by run, so that both see the same machine."""
    roots = {"this": ROOT, **({"baseline": os.path.abspath(baseline)} if baseline else {})}
    times: dict[str, dict[str, list[float]]] = {k: {"cold": [], "warm": []} for k in roots}
    for _ in range(runs):
        for name, root in roots.items():
            child = COMPILE_CHILD.format(root=root)
            with tempfile.TemporaryDirectory(prefix="cupynn-numba-cache-") as cache:
                env = dict(os.environ, NUMBA_CACHE_DIR=cache)
                for kind in ("cold", "warm"):
                    done = subprocess.run([sys.executable, "-c", child], env=env, text=True,
                                          capture_output=True, timeout=900, cwd=root)
                    if done.returncode:
                        raise RuntimeError(f"the compile-time child ({root}) failed:\n"
                                           f"{done.stderr}")
                    times[name][kind].append(float(done.stdout.split()[1]))
    result: dict[str, Any] = {"runs": runs}
    for name, t in times.items():
        prefix = "" if name == "this" else "baseline_"
        result[prefix + "empty_cache_s"] = min(t["cold"])
        result[prefix + "from_cache_s"] = min(t["warm"])
        result[prefix + "empty_cache_runs"] = t["cold"]
        result[prefix + "from_cache_runs"] = t["warm"]
    if baseline:
        result["baseline"] = roots["baseline"]
        result["baseline_commit"] = _commit_of(roots["baseline"])
    result["commit"] = _commit_of(ROOT)
    return result


def _commit_of(root: str) -> str | None:
    done = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root,
                          capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


# ----------------------------------------------------------------- report
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="timed calls per kernel (best kept)")
    p.add_argument("--probe-seconds", type=float, default=2.0,
                   help="about how long the bandwidth probe runs per level, in all")
    p.add_argument("--compile-runs", type=int, default=1,
                   help="fresh processes timing the Numba compile (0: skip)")
    p.add_argument("--compile-baseline", metavar="CHECKOUT",
                   help="another checkout of cupynn (a git worktree of an earlier commit) whose "
                        "compile time is measured beside this one's")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one small layer, 3 repeats, short probe, no compile timing")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.probe_seconds, args.compile_runs = 3, 0.2, 0
    if args.repeats < 1 or args.probe_seconds <= 0 or args.compile_runs < 0:
        p.error("--repeats must be >= 1, --probe-seconds > 0 and --compile-runs >= 0")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    import numba

    backend = cupynn.get_backend("cpu")
    info = machine_info(backend)
    load_before = load_average()
    start = time.perf_counter()
    threads = numba.get_num_threads()
    caches = cache_sizes()
    kernels.warm_up(backend)
    roofs = probe(caches, threads, args.probe_seconds)
    rows = kernel_rows(QUICK_LAYERS if args.quick else LAYERS, args.repeats, caches, roofs)
    compiled = (compile_times(args.compile_runs, args.compile_baseline)
                if args.compile_runs else None)
    finish_info(info, load_before)
    return {"machine": info, "caches": caches, "threads": threads, "probe": roofs,
            "kernels": rows, "compile": compiled,
            "settings": {"repeats": args.repeats, "probe_seconds": args.probe_seconds,
                         "compile_runs": args.compile_runs,
                         "wall_seconds": round(time.perf_counter() - start, 1),
                         "command": " ".join(["python", *sys.argv])}}


def format_report(report: dict[str, Any]) -> str:
    m, s, caches = report["machine"], report["settings"], report["caches"]
    lines = [*header_lines(m), *load_and_env_lines(m, s["wall_seconds"]), ""]
    lines.append("caches  : " + ", ".join(f"{k} {v // 1024:,} KiB" for k, v in caches.items())
                 + " (L1, L2 per core; L3 shared)")
    lines.append(f"probe   : read bandwidth with {report['threads']} threads, each summing "
                 f"its own buffer, best of 5")
    for level, p in report["probe"].items():
        lines.append(f"  {level:<7} {p['bytes_per_thread'] / 1024:>10,.0f} KiB per thread "
                     f"{p['gb_s']:>8.1f} GB/s")
    lines.append("")
    header = (f"{'layer':<19} {'shape':>9} {'batch':>5} {'nnz':>9} {'kernel':<7} {'ms':>8} "
              f"{'Gmadd/s':>7} {'B/nnz':>6} {'set KiB':>8} {'level':<6} {'GB/s':>6} "
              f"{'roof':>6} {'of roof':>7}")
    lines += [f"kernels : best of {s['repeats']} calls; the stream each nonzero makes, where "
              f"it lives, and how close it comes to that level's probed bandwidth", header,
              "-" * len(header)]
    for r in report["kernels"]:
        lines.append(f"{r['layer']:<19} {r['shape']:>9} {r['batch']:>5} {r['nnz']:>9,} "
                     f"{r['kernel']:<7} {r['ms']:>8.3f} {r['gmadd_s']:>7.1f} "
                     f"{r['bytes_per_nnz']:>6,} {r['working_set_kib']:>8,.0f} {r['level']:<6} "
                     f"{r['achieved_gb_s']:>6.1f} {r['roof_gb_s']:>6.1f} "
                     f"{r['fraction_of_roof']:>7.2f}")
    c = report["compile"]
    if c:
        lines += ["", f"compile : every CPU kernel, float32 and float64 (kernels.warm_up), in a "
                      f"fresh process: {c['empty_cache_s']:.1f} s from an empty Numba cache, "
                      f"{c['from_cache_s']:.1f} s from its cache (best of {c['runs']}; "
                      f"commit {c['commit']})"]
        if "baseline_empty_cache_s" in c:
            lines.append(f"          the baseline (commit {c['baseline_commit']}), alternating "
                         f"with it: {c['baseline_empty_cache_s']:.1f} s from an empty cache, "
                         f"{c['baseline_from_cache_s']:.1f} s from its cache")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    return publish(report, format_report(report), args.json)


if __name__ == "__main__":
    sys.exit(main())
