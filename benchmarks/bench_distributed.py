"""What data-parallel training exchanges and costs: bytes per step, scaling, a projection.

Three tables:

* **bytes all-reduced per training step**: cupynn packs every gradient of a
  step (each sparse layer's ``nnz`` values, biases, dense layers' weights) and
  the loss into one buffer and all-reduces it once; a masked-dense
  data-parallel run (PyTorch DDP) all-reduces every dense weight and bias.
  cupynn's figure is read from a real step: the buffer of
  :class:`cupynn.step.GradientReducer` after one reduction (its length
  times the dtype's size); DDP's is the dense parameter count times 4 bytes.
* **strong scaling on this machine** (``--ranks 1,2``): the same training
  (784-4096-4096-10 at density 0.1, batch 512, float32, ``--steps`` steps of
  synthetic KMNIST-shaped data through :func:`cupynn.fit`) on 1 rank with every
  core and on R ranks with cores / R threads each, each configuration a fresh
  ``mpiexec`` job; seconds per step, the speed-up, and the all-reduce's share
  of a step (time inside ``MPI_Allreduce`` on the slowest rank over the epoch).
* **a projection on paper** of one HIGGS epoch (500 000 rows) on 8 and 64 GPUs,
  cupynn against DDP, from the measured bytes and stated assumptions: NCCL's
  ring all-reduce moves ``2 (R - 1) / R`` times the buffer over each GPU's link
  (bandwidth ``--link-gbs``: NVLink-class within 8 GPUs, InfiniBand-class
  beyond) plus a latency ``2 ceil(log2 R)`` x ``--latency-us`` (tree algorithm
  for small messages); the GPU's compute time per step ``--gpu-step-ms`` is an
  assumption until a GPU has measured it (``scripts/gpu_check.py``). Both
  fixed global batch 128 (the paper's; each GPU gets 128 / R rows, steps per
  epoch unchanged) and batch 128 per GPU (steps per epoch / R) are shown.

Run ``python benchmarks/bench_distributed.py --help``; see docs/distributed.md.
"""

from __future__ import annotations

if __name__ == "__main__":  # the best dense BLAS for the baselines: before NumPy loads
    import os as _os
    import sys as _sys

    _sys.path.insert(0, _os.path.dirname(_os.path.abspath(__file__)))
    import blas_pin

    blas_pin.release()

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))

import cupynn  # noqa: E402
from cupynn.distributed import launcher_env  # noqa: E402
from cupynn.step import GradientReducer  # noqa: E402
from machine import (finish_info, header_lines, load_and_env_lines, load_average,  # noqa: E402
                     machine_info, publish)

SIZES = {  # name -> (sizes, dense layers)
    "kmnist 784-256-256-10": ((784, 256, 256, 10), ()),
    "higgs 21-256-256-256-1": ((21, 256, 256, 256, 1), (-1,)),
    "width 784-4096-4096-10": ((784, 4096, 4096, 10), ()),
}
HIGGS_ROWS, HIGGS_BATCH = 500_000, 128


class Counting:
    """A one-rank communicator that records what it is asked to reduce."""

    size, rank, cuda_aware = 2, 0, False

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0

    def allreduce(self, array, op="sum"):
        self.bytes += int(array.nbytes)
        self.calls += 1
        return array


def step_bytes(sizes: tuple[int, ...], dense: tuple[int, ...], density: float) -> dict[str, Any]:
    """Bytes one step all-reduces: cupynn's (from a real reduction) and DDP's (dense params x 4)."""
    model = cupynn.MLP(sizes, density=density, dense_layers=dense, seed=0, device="cpu")
    rng = numpy.random.default_rng(0)
    x = rng.random((8, sizes[0]), dtype=numpy.float32)
    logits = model.forward(x)
    loss_fn = cupynn.losses.cross_entropy if sizes[-1] > 1 else cupynn.losses.binary_cross_entropy
    labels = rng.integers(0, sizes[-1], 8) if sizes[-1] > 1 else rng.integers(0, 2, 8) * 1.0
    value, grad = loss_fn(logits, labels)
    model.backward(grad, need_input_grad=False)
    counting = Counting()
    GradientReducer(counting).reduce(model, value)
    dense_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    return {"cupynn_bytes": counting.bytes, "calls": counting.calls,
            "ddp_bytes": 4 * dense_params, "ratio": counting.bytes / (4 * dense_params),
            "nnz": model.n_weights, "dense_weights": dense_params}


# ----------------------------------------------------------------- scaling
def child(args: argparse.Namespace) -> int:
    """One mpiexec job: train ``--steps`` steps through fit; rank 0 writes the times."""
    from cupynn.distributed import init

    comm = init()
    sizes = tuple(int(v) for v in args.sizes.split("-"))
    rng = numpy.random.default_rng(1)
    rows = args.steps * args.batch
    x = rng.random((rows, sizes[0]), dtype=numpy.float32)
    y = rng.integers(0, sizes[-1], rows)
    model = cupynn.MLP(sizes, density=args.density, seed=0, device="cpu")
    cupynn.kernels.warm_up(model.backend)
    warm = rng.random((2 * args.batch, sizes[0]), dtype=numpy.float32), y[:2 * args.batch]
    cupynn.fit(model, cupynn.Adam(model), warm, epochs=1, batch_size=args.batch, progress=False,
               comm=comm)
    reduce_before = getattr(comm, "reduce_seconds", 0.0)
    history = cupynn.fit(model, cupynn.Adam(model), (x, y), epochs=1, batch_size=args.batch,
                         progress=False, comm=comm)
    reduce_s = numpy.array([getattr(comm, "reduce_seconds", 0.0) - reduce_before])
    comm.allreduce(reduce_s, op="max")
    if comm.is_root:
        Path(args.result).write_text(json.dumps({
            "ranks": comm.size, "threads": cupynn.kernels.numba_threads(),
            "train_seconds": history[0]["train_seconds"], "steps": history[0]["n_batches"],
            "allreduce_seconds": float(reduce_s[0])}))
    return 0


def mpiexec() -> str:
    from cupynn.distributed import find_mpiexec

    found = find_mpiexec()
    if found is None:
        raise SystemExit("error: mpiexec or mpi4py not found; pip install -e '.[mpi]'")
    return found


def scaling(args: argparse.Namespace) -> list[dict[str, Any]]:
    cores = os.cpu_count() or 1
    out = []
    for ranks in args.ranks:
        threads = max(1, cores // ranks)
        env = launcher_env(dict(os.environ, NUMBA_NUM_THREADS=str(threads),
                                OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads)))
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [mpiexec(), "-n", str(ranks), sys.executable, __file__, "--child",
                   "--result", str(result), "--sizes", args.scaling_sizes, "--density",
                   str(args.density), "--batch", str(args.batch), "--steps", str(args.steps)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            row = json.loads(result.read_text())
        row["step_ms"] = 1e3 * row["train_seconds"] / row["steps"]
        row["allreduce_share"] = row["allreduce_seconds"] / row["train_seconds"]
        out.append(row)
        time.sleep(args.pause)
    base = out[0]["step_ms"]
    for row in out:
        row["speedup"] = base / row["step_ms"]
    return out


# ----------------------------------------------------------------- projection
def allreduce_seconds(nbytes: float, ranks: int, link_gbs: float, latency_us: float) -> float:
    """Ring bandwidth term plus tree latency term (see the module doc)."""
    if ranks == 1:
        return 0.0
    return (2 * (ranks - 1) / ranks * nbytes / (link_gbs * 1e9)
            + 2 * math.ceil(math.log2(ranks)) * latency_us * 1e-6)


def projection(bytes_row: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    steps = math.ceil(HIGGS_ROWS / HIGGS_BATCH)
    for ranks, link in ((1, args.link_gbs[0]), (8, args.link_gbs[0]), (64, args.link_gbs[1])):
        for mode in ("global batch 128", "batch 128 per GPU"):
            n_steps = steps if mode.startswith("global") else math.ceil(steps / ranks)
            entry = {"gpus": ranks, "mode": mode, "steps": n_steps, "link_gbs": link}
            for who, key in (("cupynn", "cupynn_bytes"), ("ddp", "ddp_bytes")):
                reduce_s = allreduce_seconds(bytes_row[key], ranks, link, args.latency_us)
                entry[f"{who}_allreduce_us"] = 1e6 * reduce_s
                entry[f"{who}_epoch_s"] = n_steps * (args.gpu_step_ms * 1e-3 + reduce_s)
            rows.append(entry)
    return rows


# ----------------------------------------------------------------- report
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--densities", default="0.1,0.03", help="densities of the bytes table")
    p.add_argument("--ranks", default="1,2", help="rank counts of the scaling table")
    p.add_argument("--scaling-sizes", default="784-4096-4096-10")
    p.add_argument("--density", type=float, default=0.1, help="density of the scaling runs")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=24, help="timed steps per scaling run")
    p.add_argument("--pause", type=float, default=1.0, help="seconds between scaling runs")
    p.add_argument("--no-scaling", action="store_true", help="only the bytes and the projection")
    p.add_argument("--gpu-step-ms", type=float, default=0.6e3 / math.ceil(HIGGS_ROWS / HIGGS_BATCH),
                   help="assumed GPU compute time per HIGGS step (default: the GPU check's "
                        "target of 0.6 s per epoch)")
    p.add_argument("--link-gbs", type=float, nargs=2, default=(200.0, 50.0),
                   metavar=("NVLINK", "NETWORK"),
                   help="per-GPU all-reduce bandwidth, GB/s: within 8 GPUs, and across nodes (64)")
    p.add_argument("--latency-us", type=float, default=10.0, help="per-hop latency, microseconds")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--sizes", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.child:
        args.densities = [float(d) for d in args.densities.split(",")]
        args.ranks = [int(r) for r in args.ranks.split(",")]
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    backend = cupynn.get_backend("cpu")
    info = machine_info(backend)
    load_before = load_average()
    begin = time.perf_counter()
    volume = []
    for name, (sizes, dense) in SIZES.items():
        for density in args.densities:
            volume.append({"model": name, "density": density, **step_bytes(sizes, dense, density)})
    scale = [] if args.no_scaling else scaling(args)
    higgs = next(r for r in volume if r["model"].startswith("higgs") and r["density"] == 0.1)
    finish_info(info, load_before)
    return {"machine": info, "bytes": volume, "scaling": scale,
            "projection": projection(higgs, args),
            "settings": {"gpu_step_ms": args.gpu_step_ms, "link_gbs": list(args.link_gbs),
                         "latency_us": args.latency_us, "scaling_sizes": args.scaling_sizes,
                         "density": args.density, "batch": args.batch, "steps": args.steps,
                         "wall_seconds": round(time.perf_counter() - begin, 1),
                         "command": " ".join(["python", *sys.argv])}}


def format_report(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    lines = [*header_lines(m), *load_and_env_lines(m, s["wall_seconds"]), "",
             "bytes all-reduced per training step (float32)", ""]
    header = (f"{'model':<24} {'density':>7} {'cupynn KiB':>10} {'calls':>5} {'DDP KiB':>9} "
              f"{'ratio':>6}")
    lines += [header, "-" * len(header)]
    for r in report["bytes"]:
        lines.append(f"{r['model']:<24} {r['density']:>7.2f} {r['cupynn_bytes'] / 1024:>10.1f} "
                     f"{r['calls']:>5} {r['ddp_bytes'] / 1024:>9.1f} {r['ratio']:>6.3f}")
    if report["scaling"]:
        lines += ["", f"strong scaling: {s['scaling_sizes']}, density {s['density']}, batch "
                      f"{s['batch']}, {s['steps']} steps through fit, one mpiexec job each", ""]
        header = (f"{'ranks':>5} {'threads':>7} {'step ms':>8} {'speed-up':>8} "
                  f"{'allreduce share':>15}")
        lines += [header, "-" * len(header)]
        for r in report["scaling"]:
            lines.append(f"{r['ranks']:>5} {r['threads']:>7} {r['step_ms']:>8.1f} "
                         f"{r['speedup']:>8.2f} {r['allreduce_share']:>15.3f}")
    lines += ["", f"projection (on paper): one HIGGS epoch, density 0.1, GPU compute "
                  f"{s['gpu_step_ms']:.3f} ms per step (assumed), links {s['link_gbs'][0]:g} / "
                  f"{s['link_gbs'][1]:g} GB/s, latency {s['latency_us']:g} us per hop", ""]
    header = (f"{'GPUs':>4} {'mode':<18} {'steps':>6} {'cupynn AR us':>12} {'DDP AR us':>9} "
              f"{'cupynn epoch s':>14} {'DDP epoch s':>11}")
    lines += [header, "-" * len(header)]
    for r in report["projection"]:
        lines.append(f"{r['gpus']:>4} {r['mode']:<18} {r['steps']:>6} "
                     f"{r['cupynn_allreduce_us']:>12.1f} {r['ddp_allreduce_us']:>9.1f} "
                     f"{r['cupynn_epoch_s']:>14.3f} {r['ddp_epoch_s']:>11.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    report = run(args)
    return publish(report, format_report(report), args.json)


if __name__ == "__main__":
    sys.exit(main())
