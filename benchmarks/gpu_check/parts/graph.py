"""The ``graph`` part (issue 19): the training step captured as a CUDA graph
(:class:`cupynn.graph.GraphStep`) against the same launches run eagerly and
against the eager :class:`cupynn.step.TrainStep`, for the KMNIST and HIGGS shapes.

Per shape:

* equality: three copies of one model (one seed) train the same batches, one
  through a captured ``GraphStep``, one through a ``GraphStep(capture=False)``
  (the same launches, one by one), one through the eager ``TrainStep``: an
  epoch of 8 batches (the last one short, so a second shape is captured), a
  gradient redistribution, then 4 batches of a second epoch (captured again
  on the new topology). The two GraphSteps must end with every parameter, Adam
  moment and batch loss equal bit for bit; the eager step within
  :data:`EAGER_RTOL` (its dense layers, loss and bias gradient take other
  kernels, so other roundings);
* step time: the median over blocks of steps (a device synchronisation around
  each block) of the eager step (the host rows gathered by the order, as
  ``fit`` does, then ``TrainStep``) and of a graph replay (``GraphStep.step``);
* kernels, CUDA calls and host waits per step (the ``launches`` part's
  profiler count and queue probe), eager and replayed.

Then one HIGGS epoch through ``cupynn.fit(graph=True)`` and ``graph=False``
(``bench_training --graph on/off``) and the torch masked-dense peer's epoch
with its step captured as a CUDA graph (``torch_peer``, ``graph=True``).

On the CPU (the dry run) every piece runs at tiny sizes, the captured step
replaced by a second ``GraphStep(capture=False)`` (capture needs CUDA), and the
part says "skipped: no GPU": it never passes a claim only a GPU can make.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import statistics
import time
import traceback
import types
from functools import partial
from typing import Any, Callable

import numpy

import cupynn
from cupynn.backend import to_numpy

from ..context import FAILED, NO_GPU, PASSED, Context, result, target
from .env import torch_cuda
from .launches import host_waits, profile_counts

EAGER_RTOL = 1e-3  # the eager step against the graph: float32 over 12 steps, relative to max |w|
REDISTRIBUTED = 0.3  # the fraction the equality run's redistribution moves
HIGGS_GRAPH_TARGET_S = 0.6  # one HIGGS epoch with graphs, on an H100/H200
GRAPH_PEER_TARGET = 0.5  # x the graphed peer's epoch
KMNIST_STEP_TARGET_MS = 0.1  # one replayed KMNIST step
EAGER_KERNELS_TARGET = 20  # kernels per eager KMNIST step, with the fused settings


def graph_shapes(quick: bool) -> list[dict[str, Any]]:
    """The KMNIST paper shape and bench_training's --higgs-epoch shape (tiny when quick)."""
    hidden = 32 if quick else 256
    return [
        dict(name="kmnist", sizes=(784, hidden, hidden, 10), dense=(), density=0.1,
             batch=64 if quick else 512, loss="cross_entropy"),
        dict(name="higgs", sizes=(21, hidden, hidden, hidden, 1), dense=(-1,), density=0.1,
             batch=32 if quick else 128, loss="binary_cross_entropy")]


def shape_data(spec: dict[str, Any], n: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """``n`` random host rows of the shape: inputs in [0, 1), labels of the loss."""
    rng = numpy.random.default_rng(1)
    x = rng.random((n, spec["sizes"][0]), dtype=numpy.float32)
    y = (rng.integers(0, 2, n).astype(numpy.float32) if spec["loss"] == "binary_cross_entropy"
         else rng.integers(0, spec["sizes"][-1], n))
    return x, y


def build(ctx: Context, spec: dict[str, Any]) -> tuple[Any, Any]:
    """A model of the shape and its Adam; the same seed, so the same start every time."""
    model = cupynn.MLP(spec["sizes"], density=spec["density"], dense_layers=spec["dense"],
                       seed=0, device=ctx.backend)
    return model, cupynn.Adam(model)


def batch_rows(n: int, batch: int, count: int | None = None) -> list[int]:
    """The rows of each batch of an epoch of ``n`` rows (the last one short), the first
    ``count`` of them."""
    rows = [min(batch, n - start) for start in range(0, n, batch)]
    return rows[:count]


def state_arrays(model: Any, opt: Any) -> list[tuple[str, numpy.ndarray]]:
    """Host copies of what a step changes: every parameter and Adam moment, by name."""
    out = [(f"{i}.{name}", to_numpy(value).copy())
           for i, layer in enumerate(model.layers) for name, value, _ in layer.parameters()]
    out += [(f"{i}.{name}.{which}", to_numpy(a).copy()) for i, moments in enumerate(opt.state)
            for name, pair in moments.items() for which, a in zip("mv", pair)]
    return out


def topology(model: Any) -> list[tuple[numpy.ndarray, numpy.ndarray]]:
    return [(to_numpy(layer.indptr).copy(), to_numpy(layer.indices).copy())
            for layer in model.sparse_layers]


def same_topology(a: list[tuple[numpy.ndarray, ...]], b: list[tuple[numpy.ndarray, ...]]) -> bool:
    return all(numpy.array_equal(p, q) for pa, pb in zip(a, b) for p, q in zip(pa, pb))


# ----------------------------------------------------------------- equality
def graph_run(ctx: Context, spec: dict[str, Any], data: tuple[Any, ...], capture: bool
              ) -> dict[str, Any]:
    """Train through a GraphStep: epoch 1, a redistribution, 4 batches of epoch 2."""
    from cupynn.graph import GraphStep

    x, y, orders, xr, yr = data
    model, opt = build(ctx, spec)
    g = GraphStep(model, opt, spec["loss"], spec["batch"], capture=capture)
    losses = []
    # The model was built on the default stream, which the graph's (non-blocking) stream
    # does not wait for.
    ctx.backend.synchronize()
    with g.on_stream():  # the replays and the eager work between them, as fit runs them
        for order, count in zip(orders, (None, 4)):
            rows = batch_rows(len(x), spec["batch"])
            g.begin_epoch(x, y, order, len(rows))
            for r in rows[:count]:
                g.step(r)
            losses.append(to_numpy(g.losses)[:count].copy())
            if count is None:
                cupynn.redistribution.create("gradient", seed=0).redistribute(
                    model, opt, REDISTRIBUTED, xr, yr, loss=spec["loss"])
    g.stream_done()
    return {"state": state_arrays(model, opt), "topology": topology(model),
            "losses": numpy.concatenate(losses), "captures": g.captures}


def eager_run(ctx: Context, spec: dict[str, Any], data: tuple[Any, ...]) -> dict[str, Any]:
    """The same batches through the eager TrainStep (the default path)."""
    from cupynn.step import TrainStep

    x, y, orders, xr, yr = data
    model, opt = build(ctx, spec)
    step = TrainStep(model, opt, spec["loss"])
    losses = []
    for order, count in zip(orders, (None, 4)):
        for b, _ in enumerate(batch_rows(len(x), spec["batch"], count)):
            idx = order[b * spec["batch"]:(b + 1) * spec["batch"]]
            losses.append(float(step(x[idx], y[idx], check=False)))
        if count is None:
            cupynn.redistribution.create("gradient", seed=0).redistribute(
                model, opt, REDISTRIBUTED, xr, yr, loss=spec["loss"])
    return {"state": state_arrays(model, opt), "topology": topology(model),
            "losses": numpy.array(losses)}


def max_abs_diff(a: list[tuple[str, numpy.ndarray]], b: list[tuple[str, numpy.ndarray]]) -> float:
    return max((float(numpy.abs(p.astype(numpy.float64) - q).max(initial=0.0))
                for (_, p), (_, q) in zip(a, b)), default=0.0)


def max_rel_diff(a: list[tuple[str, numpy.ndarray]], b: list[tuple[str, numpy.ndarray]],
                 parameters: int) -> float:
    """The largest |a - b| of a parameter relative to the largest |b| of that parameter."""
    out = 0.0
    for (_, p), (_, q) in list(zip(a, b))[:parameters]:
        scale = max(float(numpy.abs(q).max(initial=0.0)), 1e-30)
        out = max(out, float(numpy.abs(p.astype(numpy.float64) - q).max(initial=0.0)) / scale)
    return out


def equality(ctx: Context, spec: dict[str, Any]) -> dict[str, Any]:
    """The captured GraphStep against the eager-launch one (bits) and the eager TrainStep."""
    batch = spec["batch"]
    n = 7 * batch + batch // 2  # 8 batches, the last one short: a second captured shape
    x, y = shape_data(spec, n)
    rng = numpy.random.default_rng(2)
    orders = (rng.permutation(n), rng.permutation(n))
    data = (x, y, orders, ctx.backend.asarray(x[:batch]), ctx.backend.asarray(y[:batch]))
    graphed = graph_run(ctx, spec, data, capture=ctx.gpu)  # capture needs CUDA
    launched = graph_run(ctx, spec, data, capture=False)
    eager = eager_run(ctx, spec, data)
    parameters = sum(len(layer.parameters()) for layer in build(ctx, spec)[0].layers)
    both = graphed["state"] + [("losses", graphed["losses"])]
    bits = all(numpy.array_equal(p, q, equal_nan=True) for (_, p), (_, q)
               in zip(both, launched["state"] + [("losses", launched["losses"])]))
    bits = bits and same_topology(graphed["topology"], launched["topology"])
    eager_topology = same_topology(graphed["topology"], eager["topology"])
    rel = max_rel_diff(graphed["state"], eager["state"], parameters) if eager_topology else None
    loss_rel = float(numpy.max(numpy.abs(graphed["losses"] - eager["losses"])
                               / numpy.maximum(numpy.abs(eager["losses"]), 1e-30)))
    return {"shape": spec["name"], "sizes": "-".join(map(str, spec["sizes"])), "batch": batch,
            "steps": len(graphed["losses"]), "captures": graphed["captures"],
            "captured": ctx.gpu, "equal": bool(bits),
            "max_abs_diff": max_abs_diff(graphed["state"], launched["state"]),
            "topology_equal": same_topology(graphed["topology"], launched["topology"]),
            "eager_topology_equal": eager_topology, "eager_max_rel_diff": rel,
            "eager_loss_rel_diff": loss_rel,
            "eager_ok": bool(eager_topology and rel is not None and rel <= EAGER_RTOL),
            "finite": bool(numpy.all(numpy.isfinite(graphed["losses"])))}


# ----------------------------------------------------------------- step time
def block_median_ms(fn: Callable[[], Any], sync: Callable[[], None], warm: int, blocks: int,
                    per_block: int) -> float:
    """The median over ``blocks`` blocks of ``per_block`` calls of milliseconds per call,
    the device synchronised before and after each block."""
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(blocks):
        begin = time.perf_counter()
        for _ in range(per_block):
            fn()
        sync()
        times.append((time.perf_counter() - begin) / per_block)
    return 1e3 * statistics.median(times)


def step_times(ctx: Context, spec: dict[str, Any], torch: Any) -> dict[str, Any]:
    """Eager step against graph replay: median ms per step, kernels and host waits."""
    sizes = (2, 2, 2, 10) if ctx.quick or not ctx.gpu else (10, 10, 20, 10)
    warm, blocks, per_block, profiled = sizes
    batch = spec["batch"]
    x, y = shape_data(spec, 8 * batch)
    # Enough batches for every step below; a tiled permutation (rows repeat, the step's
    # work does not change).
    n_batches = warm + blocks * per_block + 2 * profiled + 8
    order = numpy.tile(numpy.random.default_rng(3).permutation(len(x)), -(-n_batches // 8))
    out: dict[str, Any] = {"shape": spec["name"], "batch": batch,
                           "steps_timed": blocks * per_block}
    out.update(eager_times(ctx, spec, (x, y, order, n_batches), sizes, torch))
    gc.collect()
    with fused_eager():  # CUPYNN_ADAM=multi, CUPYNN_LOSS=fused, CUPYNN_RELU_GRAD=kernel
        fused = eager_times(ctx, spec, (x, y, order, n_batches), sizes, torch)
    out.update({k.replace("eager", "eager_fused"): v for k, v in fused.items()})
    gc.collect()
    out.update(replay_times(ctx, spec, (x, y, order, n_batches), sizes, torch))
    out["graph_vs_eager"] = out["graph_ms"] / out["eager_ms"]
    return out


@contextlib.contextmanager
def fused_eager() -> Any:
    """The eager step with fewer launches: one Adam launch, the loss in two, the ReLU
    gradient and bias sum in one per layer (the settings' defaults are restored after)."""
    from cupynn import kernels
    from cupynn.kernels import loss

    before = (kernels.adam_setting(), loss.loss_setting(), kernels.relu_grad_setting())
    kernels.set_adam("multi")
    loss.set_loss("fused")
    kernels.set_relu_grad("kernel")
    try:
        yield
    finally:
        kernels.set_adam(before[0])
        loss.set_loss(before[1])
        kernels.set_relu_grad(before[2])


def eager_times(ctx: Context, spec: dict[str, Any], data: tuple[Any, ...],
                sizes: tuple[int, ...], torch: Any) -> dict[str, Any]:
    """The eager step, as fit's epoch takes it: the host rows by the order, then TrainStep."""
    from cupynn.step import TrainStep

    x, y, order, n_batches = data
    warm, blocks, per_block, profiled = sizes
    batch, sync = spec["batch"], ctx.backend.synchronize
    model, opt = build(ctx, spec)
    step = TrainStep(model, opt, spec["loss"])
    k = itertools.count()

    def eager_step() -> Any:
        idx = order[(next(k) % n_batches) * batch:][:batch]
        return step(x[idx], y[idx], check=False)

    out: dict[str, Any] = {"eager_ms": block_median_ms(eager_step, sync, warm, blocks,
                                                       per_block)}
    if ctx.gpu:
        if torch is not None:
            profile_counts(torch, eager_step, 1, sync)  # the profiler's own first-use costs
            out["eager_counts"] = profile_counts(torch, eager_step, profiled, sync)
        out["eager_waited"] = host_waits(ctx, [("eager step", eager_step)])[0]["waited"]
    return out


def replay_times(ctx: Context, spec: dict[str, Any], data: tuple[Any, ...],
                 sizes: tuple[int, ...], torch: Any) -> dict[str, Any]:
    """The graph's step: one replay of the captured step (eager launches on the CPU)."""
    from cupynn.graph import GraphStep

    x, y, order, n_batches = data
    warm, blocks, per_block, profiled = sizes
    sync = ctx.backend.synchronize
    model, opt = build(ctx, spec)
    g = GraphStep(model, opt, spec["loss"], spec["batch"], capture=ctx.gpu)
    out: dict[str, Any] = {}
    sync()  # the default stream's work (the model), which the graph's stream does not wait for
    with g.on_stream():  # sync (the current stream's) then waits for the graph's stream
        g.begin_epoch(x, y, order, n_batches)
        replay = partial(g.step, spec["batch"])
        out["graph_ms"] = block_median_ms(replay, sync, warm, blocks, per_block)
        if ctx.gpu:
            if torch is not None:
                out["graph_counts"] = profile_counts(torch, replay, profiled, sync)
            out["graph_waited"] = host_waits(ctx, [("graph step", replay)])[0]["waited"]
        losses = to_numpy(g.losses)[:int(to_numpy(g.counter)[0])]
    g.stream_done()
    out["captures"] = g.captures
    out["finite"] = bool(numpy.all(numpy.isfinite(losses)))
    return out


# ----------------------------------------------------------------- epochs
def higgs_args(ctx: Context, graph: str) -> argparse.Namespace:
    from benchmarks import bench_training as bt

    return bt.parse_args(["--higgs-epoch", "--device", ctx.device, "--samples",
                          "4096" if ctx.quick else "500000", "--repeats", "1", "--pause", "0",
                          "--no-progress", "--graph", graph])


def higgs_epoch(ctx: Context, mode: str) -> dict[str, Any] | None:
    """One HIGGS epoch (then a gradient-global redistribution) through cupynn.fit with
    ``bench_training --graph mode``, after an untimed epoch of 4 batches (compilation,
    first use); ``{"refused": why}`` where fit refuses graph=True (the CPU), as it should."""
    from benchmarks import bench_training as bt

    args = higgs_args(ctx, mode)
    sizes, density = args.sizes[0], args.densities[0]
    data = bt.epoch_data(args.samples, sizes[0], args)
    epoch = partial(bt.cupynn_epoch, sizes, density, args=args, backend=ctx.backend)
    try:
        epoch(tuple(a[:4 * args.batch] for a in data))
    except ValueError as exc:
        if ctx.gpu or mode != "on":
            raise
        return {"refused": str(exc)}
    return epoch(data)


def graphed_peer_epoch(ctx: Context) -> dict[str, Any]:
    """The same epoch for the torch masked-dense peer with its step captured as a CUDA
    graph (``torch_peer``'s ``graph=True``), after an untimed epoch of 4 batches."""
    from benchmarks import bench_training as bt

    args = higgs_args(ctx, "off")
    sizes, density = args.sizes[0], args.densities[0]
    peer, why = bt.load_peer(args, ctx.backend)
    if peer is None:
        raise RuntimeError(f"no peer: {why}")
    data = bt.epoch_data(args.samples, sizes[0], args)
    # bt.peer_epoch builds its model with peer.module.MaskedDensePeer: hand it the graphed one.
    graphed = bt.Peer(types.SimpleNamespace(
        MaskedDensePeer=partial(peer.module.MaskedDensePeer, graph=True)), peer.device)
    bt.peer_epoch(graphed, sizes, density, tuple(a[:4 * args.batch] for a in data), args,
                  ctx.backend)
    return {**bt.peer_epoch(graphed, sizes, density, data, args, ctx.backend),
            "peer": peer.describe()}


def higgs_epochs(ctx: Context, torch: Any, errors: list[str]) -> dict[str, Any]:
    """The HIGGS epochs: fit(graph=False), fit(graph=True) and the graphed peer, each a
    section of its own (one that fails leaves the others)."""
    args = higgs_args(ctx, "off")
    out: dict[str, Any] = {"sizes": "-".join(map(str, args.sizes[0])),
                           "density": args.densities[0], "samples": args.samples,
                           "batch": args.batch, "notes": []}
    for mode in ("off", "on"):
        out[f"graph_{mode}"] = _section(f"HIGGS epoch, graph {mode}",
                                        partial(higgs_epoch, ctx, mode), errors)
    refused = (out["graph_on"] or {}).pop("refused", None)
    if refused is not None:
        out["graph_on"] = None
        out["notes"].append(f"fit(graph=True) on the CPU refused, as it should: {refused}")
    if torch is None:
        out["notes"].append("graphed peer: not run (torch has no CUDA)")
    else:
        out["peer_graph"] = _section("HIGGS epoch, graphed peer",
                                     partial(graphed_peer_epoch, ctx), errors)
    return out


# ----------------------------------------------------------------- the part
def _section(name: str, fn: Callable[[], Any], errors: list[str]) -> Any:
    """Run one section; an exception is recorded and the next section still runs.
    Each section's result is printed as it ends, so that a part stopped at its limit
    still leaves what it measured in the report (the runner keeps the output's tail)."""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - reported, and the other sections go on
        errors.append(f"{name}: {type(exc).__name__}: {exc}\n{traceback.format_exc()[-2500:]}")
        print(f"[graph] {name}: {type(exc).__name__}: {exc}", flush=True)
        return None
    print(f"[graph] {name}: {json.dumps(value, default=str)[:1500]}", flush=True)
    return value


def graph_targets(equal: list[dict[str, Any]], steps: list[dict[str, Any]],
                  epochs: dict[str, Any] | None) -> list[dict[str, Any]]:
    by_shape = {s["shape"]: s for s in steps}
    kmnist = by_shape.get("kmnist", {})
    epochs = epochs or {}
    ours = (epochs.get("graph_on") or {}).get("epoch_s")
    peer = (epochs.get("peer_graph") or {}).get("epoch_s")
    return [target("HIGGS epoch with graphs (s)", ours, HIGGS_GRAPH_TARGET_S, "s"),
            target("HIGGS graph epoch / graphed peer epoch",
                   None if ours is None or not peer else ours / peer, GRAPH_PEER_TARGET),
            target("KMNIST step with graphs (ms)", kmnist.get("graph_ms"),
                   KMNIST_STEP_TARGET_MS, "ms"),
            target("kernels per eager KMNIST step (fused settings)",
                   (kmnist.get("eager_fused_counts") or {}).get("kernels"),
                   EAGER_KERNELS_TARGET)]


def part_graph(ctx: Context) -> dict[str, Any]:
    torch, why = torch_cuda() if ctx.gpu else (None, "no GPU")
    if torch is not None:
        torch.cuda.init()
    errors: list[str] = []
    shapes = graph_shapes(ctx.quick)
    equal = [e for spec in shapes
             if (e := _section(f"equality {spec['name']}", partial(equality, ctx, spec), errors))]
    steps = [s for spec in shapes
             if (s := _section(f"steps {spec['name']}", partial(step_times, ctx, spec, torch),
                               errors))]
    epochs = higgs_epochs(ctx, torch, errors)
    notes = epochs.pop("notes")
    if ctx.gpu and torch is None:
        notes.append(f"kernels per step not counted: {why}")
    notes += errors
    bad = [e["shape"] for e in equal if not (e["equal"] and e["eager_ok"] and e["finite"])]
    bad += [s["shape"] + " steps" for s in steps if not s["finite"]]
    bad += [s["shape"] + " replay waited" for s in steps if s.get("graph_waited")]
    parts = [f"{e['shape']}: graph {'==' if e['equal'] else '!='} eager launches"
             + (f", {e['eager_max_rel_diff']:.1e} from TrainStep"
                if e["eager_max_rel_diff"] is not None else ", TrainStep topology differs")
             for e in equal]
    parts += [f"{s['shape']} step {s['eager_ms']:.3g} -> {s['graph_ms']:.3g} ms" for s in steps]
    parts += [f"HIGGS epoch {label} {epochs[key]['epoch_s']:.2f} s"
              for key, label in (("graph_off", "eager"), ("graph_on", "graph"),
                                 ("peer_graph", "graphed peer")) if epochs.get(key)]
    summary = "; ".join(parts) or "nothing measured"
    if errors or bad:
        status = FAILED
        summary = (f"{len(errors)} section(s) raised, differ: {', '.join(bad) or 'none'}; "
                   + summary)
    elif ctx.gpu:
        status = PASSED
    else:
        status = NO_GPU
        notes.insert(0, "capture, replay timing, kernel counts and the graphed epochs need "
                        "CUDA: on the CPU both GraphSteps launch eagerly (the code path only)")
    return result(status, summary, {"equality": equal, "steps": steps, "epochs": epochs,
                                    "eager_rtol": EAGER_RTOL}, notes,
                  graph_targets(equal, steps, epochs) if ctx.gpu and not ctx.quick else [])
