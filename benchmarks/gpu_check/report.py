"""The reports of a check: the JSON and Markdown files and the verdict table printed last."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy

from .parts.sddmm import SDDMM_TILED_VARIANTS, SDDMM_VARIANTS

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
    elif p["name"] == "sddmm" and d.get("rows"):
        labels = [m if g is None else f"{m}{g}"
                  for m, g in SDDMM_VARIANTS + SDDMM_TILED_VARIANTS]
        out += ["", f"microseconds per call: the mean of {d['reps']} calls between two CUDA "
                    f"events (a wall clock on the CPU); `tiles` is issue 20's tiled kernel, "
                    f"off by default", ""]
        out += _md_table(["shape", "density", "nnz", *labels, "fastest", "default"],
                         [[r["shape"], r["density"], r["nnz"],
                           *[r["us"].get(k) for k in labels], r["fastest"], r["default"]]
                          for r in d["rows"]])
        if d.get("products"):
            out += ["", "The layer's products, microseconds per call: `spmm` (with bias and "
                        "ReLU) and `spmm_t`, by spmm.cu (`rows`, the default; `tiles`, issue "
                        "20's tiled kernels, off by default) and by cuSPARSE "
                        "(`$CUPYNN_SPMM=cusparse`):", ""]
            out += _md_table(["shape", "density", "nnz", "spmm rows", "spmm tiles",
                              "spmm cuSPARSE", "spmm_t rows", "spmm_t tiles", "spmm_t cuSPARSE",
                              "rows / cuSPARSE", "tiles / rows", "max rel diff"],
                             [[r["shape"], r["density"], r["nnz"], r["spmm_us"]["rows"],
                               r["spmm_us"].get("tiles"), r["spmm_us"]["cusparse"],
                               r["spmm_t_us"]["rows"], r["spmm_t_us"].get("tiles"),
                               r["spmm_t_us"]["cusparse"], r["rows_us"] / r["cusparse_us"],
                               (r["tiles_us"] / r["rows_us"]) if r.get("tiles_us") else None,
                               r["max_rel_diff"]] for r in d["products"]])
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
