"""The reports of a check: the JSON and Markdown files and the verdict table printed last."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy

from .parts.dense import DENSE_KEYS
from .parts.kernels import KERNELS, MEASURED

REPORT_JSON, REPORT_MD = "gpu-check.json", "gpu-check.md"


def write_reports(out: Path, report: dict[str, Any]) -> None:
    (out / REPORT_JSON).write_text(json.dumps(report, indent=1, default=_jsonable) + "\n")
    (out / REPORT_MD).write_text(format_markdown(report))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (numpy.integer,)):
        return int(value)
    if isinstance(value, (numpy.floating,)):
        return float(value)
    if isinstance(value, numpy.ndarray):
        return value.tolist()
    return str(value)


def format_table(report: dict[str, Any]) -> str:
    """The short verdict table printed last."""
    lines = [f"cupynn GPU check: {report['verdict'].upper()} on {report['device']} "
             f"(commit {report['commit'][:12]}, {report.get('wall_seconds', 0)} s)"]
    width = max([len(p["name"]) for p in report["parts"]] + [4])
    for p in report["parts"]:
        lines.append(f"  {p['name']:<{width}}  {p['status']:<18} {p['wall_seconds']:>6.1f} s  "
                     f"{p['summary'][:110]}")
        for t in p.get("targets", []):
            value = "-" if t["value"] is None else f"{t['value']:.3g}"
            lines.append(f"  {'':<{width}}  target {t['name']} <= {t['limit']:g}: {value} "
                         f"{t['verdict']}")
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def format_markdown(report: dict[str, Any]) -> str:
    lines = [f"# cupynn GPU check: {report['verdict']}", "",
             f"- device: {report['device']} (backend {report['backend']}"
             f"{', quick' if report['quick'] else ''})",
             f"- commit: {report['commit']}", f"- started: {report['started']}, "
             f"{report.get('wall_seconds', 0)} s of a {report['budget_seconds']:.0f} s budget",
             "", "## Verdict", ""]
    lines += _md_table(["part", "status", "seconds", "summary"],
                       [[p["name"], p["status"], p["wall_seconds"], p["summary"]]
                        for p in report["parts"]])
    targets = [(p["name"], t) for p in report["parts"] for t in p.get("targets", [])]
    if targets:
        lines += ["", "## Targets", ""]
        lines += _md_table(["part", "target", "value", "limit", "verdict"],
                           [[n, t["name"], t["value"], t["limit"], t["verdict"]]
                            for n, t in targets])
    for p in report["parts"]:
        lines += ["", f"## {p['name']}: {p['title']}", "", f"{p['status']}: {p['summary']}"]
        lines += _details(p)
        for note in p.get("notes", []):
            lines += ["", "```", note.rstrip(), "```"] if "\n" in note else ["", f"- {note}"]
    return "\n".join(lines) + "\n"


def _details(p: dict[str, Any]) -> list[str]:
    """Markdown tables of one part's data."""
    d = p.get("data") or {}
    out: list[str] = []
    if p["name"] == "parity" and d.get("results"):
        out += ["", f"{d['data']}, {d['rows']} training rows, {d['sizes']}, density "
                    f"{d['density']}, {d['dtype']}, rtol {d['rtol']:g}", ""]
        out += _md_table(["algorithm", "topology equal per redistribution", "moved",
                          "loss rel diff", "weight rel diff", "ok"],
                         [[r["algorithm"], r["topology_equal"], r["moved"], r["loss_rel_diff"],
                           r["weight_rel_diff"], r["ok"]] for r in d["results"]])
    elif p["name"] == "steps" and d.get("steps"):
        out += [""] + _md_table(
            ["sizes", "model", "density", "step ms", "fwd ms", "bwd ms", "adam ms", "/ dense",
             "/ peer"],
            [[r["sizes"], r["model"], r["density"], r["step_ms"], r["forward_ms"],
              r["backward_ms"], r["adam_ms"], r["step_vs_dense"], r["step_vs_peer"]]
             for r in d["steps"]])
        if d.get("memory"):
            out += ["", "Peak device memory (CuPy pool high-water mark; torch "
                        "max_memory_allocated for the peer), building the model and one step:",
                    ""]
            out += _md_table(["sizes", "model", "density", "MiB", "/ dense", "peer MiB",
                              "/ peer"],
                             [[r["sizes"], r["model"], r["density"], r["peak_bytes"] / 2**20,
                               r.get("vs_dense"), (r.get("peer_peak_bytes") or 0) / 2**20 or None,
                               r.get("vs_peer")] for r in d["memory"]])
    elif p["name"] == "kernels" and d.get("groups"):
        out += _kernels_details(d)
    elif p["name"] == "launches" and d.get("models"):
        out += [""] + _md_table(
            ["model", "batch", "kernels/step", "copies/step", "memsets/step", "waits/step (CUPTI)",
             "step made host wait", "phases that waited"],
            [[r["model"], r["batch"], (r.get("per_step") or {}).get("kernels"),
              (r.get("per_step") or {}).get("memcpy"), (r.get("per_step") or {}).get("memset"),
              (r.get("per_step") or {}).get("waits"), r["step_waited"],
              ", ".join(r["phases_that_waited"]) or "none"] for r in d["models"]])
    elif p["name"] == "graph" and (d.get("equality") or d.get("steps") or d.get("epochs")):
        out += _graph_details(d)
    elif p["name"] == "higgs" and d.get("higgs"):
        h = d["higgs"]
        rows = [["cupynn", h["cupynn"]["train_s"], h["cupynn"]["redistribution_s"],
                 h["cupynn"]["epoch_s"]],
                ["cupynn, thread SDDMM", d["thread_sddmm"]["train_s"],
                 d["thread_sddmm"]["redistribution_s"], d["thread_sddmm"]["epoch_s"]]]
        if "peer" in h:
            rows.append(["torch masked-dense", h["peer"]["train_s"], h["peer"]["redistribution_s"],
                         h["peer"]["epoch_s"]])
        out += ["", f"{h['sizes']}, density {h['density']}, {h['samples']:,} rows, "
                    f"gradient-global", ""]
        out += _md_table(["library", "train s", "redistribution s", "epoch s"], rows)
    elif p["name"] == "redistribution" and d.get("rows"):
        out += [""] + _md_table(
            ["setting", "algorithm", "redistribute ms", "start_epoch ms", "observe ms",
             "static step ms", "overhead / epoch"],
            [[r["setting"], r["algorithm"], r["redistribute_ms"], r["start_epoch_ms"],
              r["observe_ms"], r["static_step_ms"], r["overhead_share"]] for r in d["rows"]])
    elif p["name"] == "mpi" and d.get("rows"):
        out += [""] + _md_table(
            ["config", "topology equal", "weight rel diff", "history rel diff", "ranks agree",
             "ok"],
            [[r["config"], r["topology_equal"], r["weight_rel_diff"], r["history_rel_diff"],
              r["histories_equal"], r["ok"]] for r in d["rows"]])
    elif p["name"] == "env" and d:
        out += [""] + [f"- {k}: {v}" for k, v in d.items()]
    elif p["name"] == "tests" and d.get("failures"):
        out += ["", "```"] + d["failures"] + ["```"]
    return out


DENSE_HEADERS = {"cublas_fp32": "cuBLAS FP32", "cublas_tf32": "cuBLAS TF32",
                 "torch_masked_fp32": "torch masked FP32", "torch_masked_tf32": "torch masked TF32"}


def _variant_cell(v: dict[str, Any]) -> Any:
    if v["status"] == MEASURED:
        return v["us"]
    return "absent" if v["status"] == "absent" else "error"


def _kernels_details(d: dict[str, Any]) -> list[str]:
    """The kernels part's tables: each kernel's variants per shape, the 4096 layer's
    sums, the step and its peak memory."""
    peak = d.get("peak") or {}
    out = ["", f"Microseconds per call, float32: the median of {d['reps']} calls, each between "
               f"two CUDA events (a wall clock on the CPU: not GPU figures). For the fastest "
               f"variant: GB/s under two byte models (min: every array once, the DRAM view; "
               f"L2: a whole dense row per nonzero), GFLOP/s (2 nnz batch) and its share of "
               f"the FP32 peak ({peak.get('formula')}). \"bits != default\": variants whose "
               f"output is not the default method's bit for bit. Dense baselines by "
               f"precision: " + "; ".join(f"{DENSE_HEADERS[k]} = {v}" for k, v in
                                         (d.get("dense_precisions") or {}).items()) + "."]
    for kernel in KERNELS:
        groups = [g for g in d["groups"] if g["kernel"] == kernel]
        if not groups:
            continue
        labels = list(groups[0]["variants"])
        rows = []
        for g in groups:
            best = g["variants"].get(g["fastest"]) or {}
            differ = [k for k, v in g["variants"].items()
                      if v["status"] == MEASURED and not v["bits_equal_default"]]
            dense = g.get("dense_us") or {}
            rows.append([g["shape"], g["density"], g["nnz"],
                         *[_variant_cell(g["variants"][k]) for k in labels], g["fastest"],
                         best.get("gb_s_min"), best.get("gb_s_l2"), best.get("gflop_s"),
                         best.get("peak_fraction"), ", ".join(differ) or "none", g["default"],
                         g["default_vs_fastest"], g.get("choice"), g["choice_vs_fastest"],
                         g["auto_vs_fastest"], *[dense.get(k) for k in DENSE_KEYS],
                         g["fastest_vs_dense_fp32"]])
        out += ["", f"`{kernel}`:", ""]
        out += _md_table(["shape", "density", "nnz", *labels, "fastest", "GB/s min", "GB/s L2",
                          "GFLOP/s", "of FP32 peak", "bits != default", "default",
                          "default / fastest", "choose()", "choose() / fastest",
                          "auto / fastest", *[f"{DENSE_HEADERS[k]} us" for k in DENSE_KEYS],
                          "fastest / cuBLAS FP32"], rows)
    if d.get("layer_ms"):
        out += ["", "The 4096 x 4096 layer at batch 512, its three kernels summed (ms), by "
                    "the fastest variants, the default, choose()'s picks and \"auto\" (issue "
                    "20's targets: the part's Targets):", ""]
        out += _md_table(["layer", "fastest", "default", "choose()", "auto"],
                         [[k, v["fastest"], v["default"], v["choice"], v["auto"]]
                          for k, v in d["layer_ms"].items()])
    if d.get("targets"):
        out += ["", "Issue 20's targets (met when the value is at most the limit; not measured "
                    "off a GPU):", ""]
        out += _md_table(["target", "value", "limit", "verdict"],
                         [[t["name"], t["value"], t["limit"], t["verdict"]]
                          for t in d["targets"]])
    if d.get("steps"):
        peaks = {(m["density"], m["kernels"]): m for m in d.get("memory") or []}
        out += ["", f"The training step (median ms; dense = every layer cupynn.Linear, "
                    f"{DENSE_HEADERS['cublas_fp32']}), by kernel setting, and its peak memory "
                    f"({d.get('memory_how')}), building the model and one step:", ""]
        out += _md_table(["sizes", "batch", "model", "density", "kernels", "step ms",
                          "/ dense FP32", "peak MiB", "/ default's peak"],
                         [[r["sizes"], r["batch"], r["model"], r["density"],
                           r["kernels"] or "-", r["step_ms"] if r["step_ms"] is not None
                           else r.get("status"), r["vs_dense_fp32"],
                           (peaks.get((r["density"], r["kernels"])) or {}).get("peak_bytes", 0)
                           / 2**20 or None,
                           (peaks.get((r["density"], r["kernels"])) or {}).get("vs_default")]
                          for r in d["steps"]])
    return out


def _graph_details(d: dict[str, Any]) -> list[str]:
    """The graph part's tables: equality, step time and launches, the epochs."""
    out: list[str] = []
    if d.get("equality"):
        out += ["", "Equality: an epoch of 8 batches (the last short), a gradient redistribution "
                    "of 0.3, 4 batches of the next epoch; the captured GraphStep against its "
                    "launches run eagerly (every parameter, Adam moment and batch loss, bit for "
                    f"bit) and against the eager TrainStep (within {d.get('eager_rtol', 0):g} "
                    "of each parameter's largest value):", ""]
        out += _md_table(["shape", "sizes", "batch", "steps", "graphs captured", "bit-equal",
                          "max abs diff", "vs TrainStep: topology equal", "max rel diff",
                          "loss rel diff", "ok"],
                         [[r["shape"], r["sizes"], r["batch"], r["steps"],
                           r["captures"] if r["captured"] else "none (CPU)", r["equal"],
                           r["max_abs_diff"], r["eager_topology_equal"], r["eager_max_rel_diff"],
                           r["eager_loss_rel_diff"], r["eager_ok"]] for r in d["equality"]])
    if d.get("steps"):
        def counts(r: dict[str, Any], side: str, key: str) -> Any:
            return (r.get(f"{side}_counts") or {}).get(key)

        out += ["", "Step time: median ms per step over blocks of steps, the device "
                    "synchronised around each block (eager: the host rows by the order, then "
                    "TrainStep; graph: GraphStep.step, one replay); kernels and CUDA calls per "
                    "step by the profiler; whether the step made the host wait (queue probe):",
                ""]
        out += _md_table(["shape", "batch", "steps timed", "eager ms", "fused eager ms",
                          "graph ms", "graph / eager", "eager kernels", "fused eager kernels",
                          "graph kernels", "eager CUDA calls", "graph CUDA calls",
                          "eager waited", "graph waited"],
                         [[r["shape"], r["batch"], r["steps_timed"], r["eager_ms"],
                           r.get("eager_fused_ms"), r["graph_ms"], r["graph_vs_eager"],
                           counts(r, "eager", "kernels"), counts(r, "eager_fused", "kernels"),
                           counts(r, "graph", "kernels"), counts(r, "eager", "api_calls"),
                           counts(r, "graph", "api_calls"), r.get("eager_waited"),
                           r.get("graph_waited")] for r in d["steps"]])
    e = d.get("epochs") or {}
    rows = [[label, e[key]["train_s"], e[key]["redistribution_s"], e[key]["epoch_s"],
             e[key]["steps"]]
            for key, label in (("graph_off", "cupynn, fit(graph=False)"),
                               ("graph_on", "cupynn, fit(graph=True)"),
                               ("peer_graph", "torch masked-dense, CUDA graph"))
            if e.get(key)]
    if rows:
        out += ["", f"HIGGS epoch: {e['sizes']}, density {e['density']}, {e['samples']:,} rows, "
                    f"batch {e['batch']}, then a gradient-global redistribution", ""]
        out += _md_table(["library", "train s", "redistribution s", "epoch s", "steps"], rows)
    return out
