"""The speed and memory parts that run the training and redistribution benchmarks:
``steps``, ``higgs`` and ``redistribution``."""

from __future__ import annotations

import argparse
import gc
from functools import partial
from typing import Any

from cupynn import kernels

from ..context import NO_GPU, Context, result, target

HIGGS_TARGET_S = 0.6  # one HIGGS epoch on an H100
HIGGS_PEER_TARGET = 1.0  # x the masked-dense peer's epoch on the same GPU


# ----------------------------------------------------------------- part: steps
def peer_peak_bytes(bt: Any, peer: Any, sizes: tuple[int, ...], density: float,
                    args: argparse.Namespace, backend: Any) -> int:
    """torch.cuda.max_memory_allocated over building the peer and one step (batch not counted)."""
    import torch

    state = bt.build(sizes, density, args, backend)[0].state_dict()
    gc.collect()
    x, y = bt.make_host_batch(sizes, args)
    xb = torch.from_numpy(x).to(peer.device, getattr(torch, args.dtype))
    yb = torch.from_numpy(y).to(peer.device).long()  # the step table's loss: cross-entropy
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model = bt.build_peer(peer, state, sizes, args)
    model.step(xb, yb)
    peak = torch.cuda.max_memory_allocated() - base
    del model
    torch.cuda.empty_cache()
    return int(peak)


def part_steps(ctx: Context) -> dict[str, Any]:
    from benchmarks import bench_training as bt

    sizes = "784-64-64-10" if ctx.quick else "784-256-256-10,784-4096-4096-10"
    argv = ["--device", ctx.device, "--sizes", sizes, "--densities", "0.1,0.03",
            "--batch", "64" if ctx.quick else "512", "--steps", "2" if ctx.quick else "20",
            "--per-round", "2" if ctx.quick else "5", "--warmup", "1" if ctx.quick else "3",
            "--pause", "0", "--no-memory"]
    args = bt.parse_args(argv)
    report = bt.run(args)
    notes = [f"peer: {report['machine']['peer'] or report['machine']['peer_note']}"]
    memory: list[dict[str, Any]] = []
    if ctx.gpu:
        peer, _ = bt.load_peer(args, ctx.backend)
        for size in args.sizes:
            label = "-".join(map(str, size))
            dense = bt.peak_memory(None, size, args, ctx.backend)
            memory.append({"sizes": label, "model": "dense", "density": 1.0, "peak_bytes": dense})
            for d in args.densities:
                sparse = bt.peak_memory(d, size, args, ctx.backend)
                row = {"sizes": label, "model": "sparse", "density": d, "peak_bytes": sparse,
                       "vs_dense": sparse / dense}
                if peer is not None:
                    theirs = peer_peak_bytes(bt, peer, size, d, args, ctx.backend)
                    row.update(peer_peak_bytes=theirs, vs_peer=sparse / theirs)
                memory.append(row)
    else:
        notes.append("peak device memory: " + NO_GPU)
    rows = [{k: r[k] for k in ("sizes", "model", "density", "step_ms", "forward_ms",
                               "backward_ms", "adam_ms", "step_vs_dense")}
            for r in report["results"]]
    vs_peer = {(c["sizes"], c["density"]): c["epoch_ratio"] for c in report["peer_comparison"]}
    for r in rows:
        r["step_vs_peer"] = vs_peer.get((r["sizes"], r["density"])) if r["model"] == "sparse" \
            else None
    summary = "; ".join(f"{r['sizes']} d{r['density']:g}: {r['step_vs_dense']:.2f}x dense"
                        + (f", {r['step_vs_peer']:.2f}x peer" if r["step_vs_peer"] else "")
                        for r in rows if r["model"] == "sparse")
    return result(ctx.measured(), summary,
                  {"settings": report["settings"], "steps": rows, "memory": memory,
                   "peer": report["machine"]["peer"]}, notes)


# ----------------------------------------------------------------- part: higgs
def part_higgs(ctx: Context) -> dict[str, Any]:
    from benchmarks import bench_training as bt

    samples = "4096" if ctx.quick else "500000"
    args = bt.parse_args(["--higgs-epoch", "--device", ctx.device, "--samples", samples,
                          "--repeats", "1", "--pause", "0", "--no-progress"])
    report = bt.higgs_epochs(args)
    row = report["higgs"][0]
    # The same epoch with the thread SDDMM, for the kernel choice (warmed up like the others).
    method, group = kernels.sddmm_setting()
    kernels.set_sddmm("thread")
    try:
        data = bt.epoch_data(args.samples, args.sizes[0][0], args)
        epoch = partial(bt.cupynn_epoch, args.sizes[0], args.densities[0], args=args,
                        backend=ctx.backend)
        epoch(tuple(a[:4 * args.batch] for a in data))
        thread = epoch(data)
    finally:
        kernels.set_sddmm(method, group)
    ours = row["cupynn"]
    peer = row.get("peer")
    targets = []
    if ctx.gpu and not ctx.quick:
        targets = [target("HIGGS epoch (s)", ours["epoch_s"], HIGGS_TARGET_S, "s"),
                   target("HIGGS epoch / peer epoch", row.get("cupynn_vs_peer"),
                          HIGGS_PEER_TARGET)]
    summary = (f"epoch {ours['epoch_s']:.2f} s (train {ours['train_s']:.2f} + redistribution "
               f"{ours['redistribution_s']:.3f}), {ours['steps']} steps"
               + (f"; peer {peer['epoch_s']:.2f} s" if peer else "")
               + f"; thread SDDMM {thread['epoch_s']:.2f} s; paper 22.2 s")
    notes = [] if peer else [f"peer: {report['machine']['peer_note']}"]
    return result(ctx.measured(), summary,
                  {"higgs": row, "thread_sddmm": thread, "settings": report["settings"]},
                  notes, targets)


# ----------------------------------------------------------------- part: redistribution
def part_redistribution(ctx: Context) -> dict[str, Any]:
    from benchmarks import bench_redistribution as br

    argv = ["--device", ctx.device, "--no-memory", "--pause", "0"]
    argv += (["--quick", "--settings", "higgs"] if ctx.quick else
             ["--settings", "kmnist,higgs", "--repeats", "3", "--steps", "6", "--per-round", "3",
              "--train-steps", "2", "--warmup", "1"])
    report = br.run(br.parse_args(argv))
    rows = [{k: r[k] for k in ("setting", "sizes", "algorithm", "redistribute_ms",
                               "start_epoch_ms", "observe_ms", "static_step_ms",
                               "overhead_share")} for r in report["results"]]
    slowest = max(rows, key=lambda r: r["redistribute_ms"])
    summary = (f"{len(rows)} rows; slowest {slowest['algorithm']} at {slowest['setting']}: "
               f"{slowest['redistribute_ms']:.1f} ms")
    return result(ctx.measured(), summary, {"rows": rows, "settings": report["settings"]})
