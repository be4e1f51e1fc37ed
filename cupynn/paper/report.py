"""Report on a grid of runs (see :mod:`cupynn.paper.grid`): figures, tables and the paper's claims.

:func:`write_report` reads every run directory under a grid directory (any
directory with a ``config.json``), groups the completed runs by dataset,
algorithm (or dense baseline) and density, and writes ``report.md`` with

- the settings found (dataset, device, epochs, samples, seeds, …);
- the paper's qualitative claims (SPEC §7), each checked against the runs and
  marked *holds* / *does not hold* / *not checked* with the numbers behind it;
- final test accuracy (and AUC for HIGGS) per algorithm × density;
- test accuracy per epoch (the paper's Figures 2 and 4), one figure per density;
- the loss induced by each redistribution (Figure 3);
- time per epoch, training and redistribution (Table 1);
- peak memory (Table 2);

plus the PNG figures beside it. Figures need matplotlib (``pip install
"cupynn[plot]"``), imported only here and only when present; without it the
page says so and still has every table.

The runs and their statistics are in :mod:`cupynn.paper.results`, the figures in
:mod:`cupynn.paper.figures`; this module writes the page: settings, claims and tables.

Measures, chosen once for every table:

- *final accuracy* is the test accuracy after the last epoch, not the best
  epoch's (choosing the epoch by test accuracy would select on the test set);
- ``mean ± std`` is over seeds, with the sample standard deviation (n − 1);
  figure bands span the seeds' minimum to maximum;
- the *induced loss* of a redistribution is ``induced_loss_after −
  induced_loss_before`` (training loss on a fixed batch just after minus just
  before), so 0 is harmless and negative means the step lowered the loss;
  Figure 3's log scale is symmetric (linear near 0) to keep those visible.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy

from ..cli import DEBUG_FLAG, DEBUG_HELP, UserError, run_main
from .figures import _accuracy_figure, _health_figure, _induced_figure, _matplotlib
from .results import (HEALTH, LABELS, Groups, RunResult, Stat, _rank, curve, densities,
                      final_stats, group, induced_stats, keys, load_runs, memory_stats,
                      timing_stats, zero_share)
# Importable from here as before the split (cupynn.paper.report held them).
from .results import ORDER, Timing, hidden_share, induced_losses  # noqa: F401
from ..redistribution import NAMES

REPORT = "report.md"
GLOBAL = ("gradient-global", "woodfisher")
PER_LAYER = ("random", "gradient", "loss")
# SPEC §7: gradient-global is within this many percentage points of neuron-eq dense at 0.1.
WITHIN = {"kmnist": 2.0, "higgs": 1.0}
CLAIM_DENSITY = 0.1


# ------------------------------------------------------------------ claims
@dataclass(frozen=True)
class Claim:
    """One of the paper's statements, its precise form here, and the verdict."""

    statement: str
    definition: str
    verdict: str  # "holds", "does not hold" or "not checked"
    evidence: str


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _means(accuracy: dict[tuple[str, float | None], Stat], names: Iterable[str],
           density: float | None) -> dict[str, float]:
    return {name: accuracy[(name, density)].mean for name in names if (name, density) in accuracy}


def _listing(means: dict[str, float]) -> str:
    return ", ".join(f"{LABELS.get(k, k)} {_pct(v)}" for k, v in means.items())


def _verdict(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def check_claims(groups: Groups, dataset: str) -> list[Claim]:
    """SPEC §7's qualitative accuracy claims, checked on mean final test accuracy over seeds."""
    accuracy = final_stats(groups)
    d = CLAIM_DENSITY
    all_densities = densities(groups)
    sparse_names = keys(groups, sparse=True)
    claims = []

    # 1. At density 0.1 every sparse algorithm beats param-eq dense.
    statement = "At density 0.1 every sparse run beats the parameter-equivalent dense network."
    definition = ("every algorithm's mean final accuracy at density 0.1 > dense param-eq's mean")
    param = accuracy.get(("baseline-parameter", None))
    sparse = _means(accuracy, sparse_names, d)
    if param is None or not sparse:
        claims.append(Claim(statement, definition, "not checked",
                            "needs dense param-eq runs and sparse runs at density 0.1"))
    else:
        losers = {k: v for k, v in sparse.items() if not v > param.mean}
        evidence = f"dense param-eq {_pct(param.mean)}; lowest sparse: " + _listing(
            dict([min(sparse.items(), key=lambda kv: kv[1])]))
        if losers:
            evidence += "; not above it: " + _listing(losers)
        claims.append(Claim(statement, definition, _verdict(not losers), evidence))

    # 2. Global algorithms beat the per-layer ones, at every density.
    statement = ("The global algorithms (gradient-global, woodfisher) beat the per-layer ones "
                 "(random, gradient, loss).")
    definition = ("at each density, the lowest mean final accuracy among the global algorithms > "
                  "the highest among the per-layer ones (each global beats each per-layer)")
    claims += _group_claims(accuracy, all_densities, statement, definition, GLOBAL, PER_LAYER)

    # 3. Every dynamic algorithm beats static.
    statement = "Every dynamic algorithm beats static sparse training (no redistribution)."
    definition = "at each density, every dynamic algorithm's mean final accuracy > static's"
    dynamic = tuple(n for n in NAMES if n != "static")
    claims += _group_claims(accuracy, all_densities, statement, definition, dynamic, ("static",))

    # 4. Neuron-eq dense is best.
    statement = "The neuron-equivalent dense network is the best."
    definition = ("dense neuron-eq's mean final accuracy > the mean of every other algorithm at "
                  "every density and of dense param-eq")
    neuron = accuracy.get(("baseline-neuron", None))
    others = {(k, dd): s.mean for (k, dd), s in accuracy.items() if k != "baseline-neuron"}
    if neuron is None or not others:
        claims.append(Claim(statement, definition, "not checked",
                            "needs dense neuron-eq runs and at least one other"))
    else:
        (bk, bd), best = max(others.items(), key=lambda kv: kv[1])
        name = LABELS.get(bk, bk) + (f" at density {bd:g}" if bd is not None else "")
        claims.append(Claim(statement, definition, _verdict(neuron.mean > best),
                            f"dense neuron-eq {_pct(neuron.mean)}; best other: {name} "
                            f"{_pct(best)}"))

    # 5. Gradient-global within 2 % (KMNIST) / 1 % (HIGGS) of neuron-eq dense at 0.1.
    limit = WITHIN.get(dataset, 2.0)
    statement = (f"At density 0.1 gradient-global is within {limit:g} % of the neuron-equivalent "
                 f"dense network.")
    definition = (f"dense neuron-eq's mean final accuracy − gradient-global's at density 0.1 < "
                  f"{limit:g} percentage points")
    gg = accuracy.get(("gradient-global", d))
    if neuron is None or gg is None:
        claims.append(Claim(statement, definition, "not checked",
                            "needs dense neuron-eq runs and gradient-global at density 0.1"))
    else:
        gap = 100 * (neuron.mean - gg.mean)
        claims.append(Claim(statement, definition, _verdict(gap < limit),
                            f"dense neuron-eq {_pct(neuron.mean)}, gradient-global "
                            f"{_pct(gg.mean)}: gap {gap:.2f} points"))
    return claims


def _group_claims(accuracy: dict[tuple[str, float | None], Stat], all_densities: list[float],
                  statement: str, definition: str, winners: Sequence[str],
                  losers: Sequence[str]) -> list[Claim]:
    """One claim per density: every ``winners`` mean > every ``losers`` mean."""
    claims = []
    for density in all_densities or [CLAIM_DENSITY]:
        at = f"density {density:g}: "
        high, low = _means(accuracy, winners, density), _means(accuracy, losers, density)
        if not high or not low:
            claims.append(Claim(statement, definition, "not checked",
                                at + "needs runs of both groups"))
            continue
        missing = [n for n in (*winners, *losers) if n not in high and n not in low]
        ok = min(high.values()) > max(low.values())
        evidence = at + _listing(high) + " vs " + _listing(low)
        if missing:
            evidence += f" (not in the grid: {', '.join(missing)})"
        claims.append(Claim(statement, definition, _verdict(ok), evidence))
    return claims


# ------------------------------------------------------------------ settings
def _values(runs: Sequence[RunResult], get: Any) -> str:
    found = []
    for run in runs:
        value = get(run)
        if value is not None and value not in found:
            found.append(value)
    if not found:
        return "—"
    found = sorted(found, key=str) if len(found) > 1 else found
    text = ", ".join(str(v) for v in found)
    return text if len(found) == 1 else f"{text} (**mixed**)"


def settings_lines(runs: Sequence[RunResult], dataset: str, grid_info: dict[str, Any] | None
                   ) -> list[str]:
    """Markdown bullet lines: what the runs were (from their config.json)."""
    def arg(name: str) -> Any:
        return lambda r: r.arguments.get(name)

    lines = [
        # The data split follows each run's seed: one dataset, not "mixed".
        "- dataset: " + _values(runs, lambda r: re.sub(rf"\bseed {r.seed}\b",
                                                        "seed = the run's seed",
                                                        str(r.config.get("dataset")))),
        f"- device: {_values(runs, lambda r: r.config.get('device'))} "
        f"(backend {_values(runs, lambda r: r.config.get('backend'))})",
        f"- epochs: {_values(runs, arg('epochs'))}; batch size {_values(runs, arg('batch_size'))}; "
        f"learning rate {_values(runs, arg('lr'))}; hidden width {_values(runs, arg('hidden'))}",
    ]
    if dataset == "higgs":
        lines.append(f"- training rows per epoch: {_values(runs, arg('train_samples'))}; "
                     f"validation rows: {_values(runs, arg('val_samples'))}")
    else:
        lines.append(f"- train from test fraction: {_values(runs, arg('train_from_test'))}; "
                     f"augmentation off: {_values(runs, arg('no_augment'))}")
    seeds = sorted({r.seed for r in runs})
    dens = sorted({r.density for r in runs if r.density is not None}, reverse=True)
    algorithms = sorted({r.key for r in runs}, key=lambda k: (_rank(k), k))
    lines += [
        f"- seeds: {', '.join(map(str, seeds))}; densities: {', '.join(f'{d:g}' for d in dens)}",
        f"- algorithms and baselines: {', '.join(LABELS.get(k, k) for k in algorithms)}",
        f"- cupynn {_values(runs, lambda r: r.config.get('versions', {}).get('cupynn'))}",
    ]
    if grid_info:
        lines.append(f"- run {grid_info.get('jobs', '?')} at a time on one machine, "
                     f"{grid_info.get('threads_per_run', '?')} CPU thread(s) each"
                     + (" — runs shared the machine, so timings include contention"
                        if grid_info.get("jobs", 1) > 1 else ""))
    done = sum(r.completed for r in runs)
    lines.append(f"- runs: {len(runs)} found, {done} completed"
                 + (" (only completed runs are used below)" if done < len(runs) else ""))
    return lines


# ------------------------------------------------------------------ Markdown
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _grid_table(table: dict[tuple[str, float | None], Any], groups: Groups, fmt: Any
                ) -> list[str]:
    """Rows: algorithms then baselines; columns: densities, then 'dense' for the baselines."""
    dens = densities(groups)
    has_dense = any(d is None for _, d in table)
    header = ["algorithm", *(f"density {d:g}" for d in dens)] + (["dense"] if has_dense else [])
    rows = []
    for key in keys(groups):
        if not any(k == key for k, _ in table):
            continue
        cells = [LABELS.get(key, key)]
        cells += [fmt(table[(key, d)]) if (key, d) in table else "—" for d in dens]
        if has_dense:
            cells.append(fmt(table[(key, None)]) if (key, None) in table else "—")
        rows.append(cells)
    return _table(header, rows)


def _health_section(groups: Groups, dens: list[float], out_dir: Path, dataset: str,
                    mpl: Any) -> list[str]:
    md = ["### Network health per epoch", "",
          "At the end of each epoch's training, before its redistribution: the share of the "
          "stored weights exactly 0, of the hidden neurons dead (every weight in, or every "
          "weight out, absent or 0, or a ReLU at 0 on the whole probe batch), and of those whose "
          "ReLU is 0 on the whole probe batch. A rise over the epochs is a slow collapse; a "
          "sparse output layer leaves many neurons without an outgoing weight from the start.",
          ""]
    if not any(zero_share(m) is not None for rs in groups.values() for r in rs for m in r.metrics):
        return md + ["No run recorded its health (runs from before it was recorded).", ""]
    for density in dens:
        name = f"{dataset}-health-d{density:g}.png"
        if mpl is not None:
            _health_figure(groups, density, out_dir / name, dataset)
            md += [f"![network health per epoch at density {density:g}]({name})", ""]
        rows, header_epochs = [], None
        for key in keys(groups, sparse=True):
            runs_here = groups.get((key, density))
            if not runs_here:
                continue
            cells = []
            for _, get in HEALTH:
                epochs, mean, _, _ = curve(runs_here, get)
                header_epochs = header_epochs or _selected_epochs(epochs)
                at = dict(zip(epochs.tolist(), mean.tolist()))
                cells.append(" / ".join(f"{100 * at[e]:.1f}" if e in at else "—"
                                        for e in header_epochs))
            rows.append([LABELS.get(key, key), *cells])
        if rows:
            epochs_text = ", ".join(str(e) for e in header_epochs or [])
            md += [f"Density {density:g}, mean over seeds at epochs {epochs_text}:", ""]
            md += _table(["algorithm", "zero weights (%)", "dead hidden neurons (%)",
                          "hidden ReLUs at 0 (%)"], rows) + [""]
    return md


def _selected_epochs(epochs: numpy.ndarray, count: int = 6) -> list[int]:
    if len(epochs) <= count:
        return [int(e) for e in epochs]
    picks = numpy.unique(numpy.linspace(0, len(epochs) - 1, count).round().astype(int))
    return [int(epochs[i]) for i in picks]


def dataset_section(dataset: str, runs: Sequence[RunResult], out_dir: Path,
                    grid_info: dict[str, Any] | None, mpl: Any) -> tuple[list[str], list[Claim]]:
    """The Markdown lines of one dataset's part of the report, and its claims."""
    groups = group(runs)
    dens = densities(groups)
    md = [f"## {dataset.upper()}", "", "### Settings found", "",
          *settings_lines(runs, dataset, grid_info), ""]
    if not groups:
        return md + ["No completed runs.", ""], []

    claims = check_claims(groups, dataset)
    md += ["### The paper's claims (SPEC §7), checked", "",
           "On the mean final-epoch test accuracy over seeds.", ""]
    md += _table(["claim", "checked as", "verdict", "numbers"],
                 [[c.statement, c.definition, f"**{c.verdict}**", c.evidence] for c in claims])

    md += ["", "### Final test accuracy (%)", "",
           "After the last epoch; mean ± sample std over seeds (n seeds). Dense baselines do not "
           "depend on the density (param-eq has the width of the density-0.1 model's weight "
           "count).",
           ""]
    md += _grid_table(final_stats(groups), groups, lambda s: s.format(100))
    if dataset == "higgs" or any("test_auc" in r.metrics[-1] for rs in groups.values() for r in rs):
        md += ["", "### Final test AUC", "", "Mean ± sample std over seeds (n seeds).", ""]
        md += _grid_table(final_stats(groups, "test_auc"), groups, lambda s: s.format(1, 4))

    md += ["", "### Test accuracy per epoch (Figures 2 and 4)", ""]
    for density in dens:
        name = f"{dataset}-accuracy-d{density:g}.png"
        if mpl is not None:
            _accuracy_figure(groups, density, out_dir / name, dataset)
            md += [f"![test accuracy per epoch at density {density:g}]({name})", ""]
        md += [f"Density {density:g}: test accuracy (%) at selected epochs, mean over seeds "
               f"(the figure's band spans min–max over seeds).", ""]
        rows, header_epochs = [], None
        for key in keys(groups):
            runs_here = groups.get((key, density)) or groups.get((key, None))
            if not runs_here:
                continue
            epochs, mean, _, _ = curve(runs_here)
            header_epochs = header_epochs or _selected_epochs(epochs)
            at = dict(zip(epochs.tolist(), mean.tolist()))
            rows.append([LABELS.get(key, key)]
                        + [f"{100 * at[e]:.2f}" if e in at else "—" for e in header_epochs])
        md += _table(["algorithm", *(f"epoch {e}" for e in header_epochs or [])], rows) + [""]

    md += _health_section(groups, dens, out_dir, dataset, mpl)

    md += ["### Loss induced by a redistribution (Figure 3)", "",
           "induced_loss_after − induced_loss_before: the training loss on a fixed batch just "
           "after the redistribution step minus just before; mean ± sample std over every "
           "redistribution of every seed (n redistributions).", ""]
    induced = induced_stats(groups)
    if induced:
        if mpl is not None and _induced_figure(groups, out_dir / f"{dataset}-induced-loss.png",
                                               dataset):
            md += [f"![induced loss per redistribution]({dataset}-induced-loss.png)", ""]
        md += _grid_table(induced, groups, lambda s: s.format(1, 3, sci=True)) + [""]
    else:
        md += ["No redistribution was recorded (a run redistributes after epoch e only while "
               "e < end_fraction × epochs).", ""]

    timing = timing_stats(groups)
    md += ["### Time per epoch (Table 1)", "",
           "Seconds per epoch, mean ± sample std over seeds: training (forward, backward, "
           "optimizer; evaluation excluded) and redistribution averaged over every epoch; "
           "'per redistribution' is over the epochs that redistributed.", ""]
    neuron = timing.get(("baseline-neuron", None))
    for density in dens:
        md += [f"Density {density:g}:", ""]
        rows = []
        for key in keys(groups):
            t = timing.get((key, density)) or timing.get((key, None))
            if t is None:
                continue
            ratio = f"{t.total.mean / neuron.total.mean:.2f}×" if neuron else "—"
            rows.append([LABELS.get(key, key), t.train.format(1, 3, n=False),
                         t.redistribution.format(1, 3, n=False), t.total.format(1, 3, n=False),
                         t.per_step.format(1, 3, n=False) if t.per_step else "—", ratio,
                         str(t.train.n)])
        md += _table(["algorithm", "training s/epoch", "redistribution s/epoch", "total s/epoch",
                      "s per redistribution", "total vs dense neuron-eq", "n"], rows) + [""]

    memory = memory_stats(groups)
    hidden = _values(runs, lambda r: r.arguments.get("hidden"))
    md += ["### Peak memory (Table 2)", "",
           f"MB (10⁶ bytes), the largest epoch's peak per run, mean ± sample std over seeds; "
           f"hidden width {hidden} (the paper's Table 2 used 4096: run a grid with "
           f"`-- --hidden 4096`), measured on {_values(runs, lambda r: r.config.get('backend'))} "
           f"by cupynn.memory.", ""]
    md += _grid_table(memory, groups, lambda s: s.format(1e-6, 1)) + [""]

    unfinished = [r for r in runs if not r.completed]
    if unfinished:
        md += ["### Runs not completed (left out above)", ""]
        md += [f"- `{r.path}`: {r.status}" + (f" — {r.summary['message']}"
                                              if r.summary.get("message") else "")
               for r in unfinished]
        md.append("")
    return md, claims


def _grid_info(grid_dir: Path, dataset: str) -> dict[str, Any] | None:
    """What :mod:`cupynn.paper.grid` recorded about how it ran (``<grid-dir>/<dataset>/grid.json``)."""
    for path in (grid_dir / dataset / "grid.json", grid_dir / "grid.json"):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if info.get("dataset") == dataset:
            return info
    return None


def write_report(grid_dir: str | Path, out_dir: str | Path | None = None,
                 datasets: Sequence[str] | None = None, out: Any = None) -> Path:
    """Write ``report.md`` and the figures for every dataset found under ``grid_dir``.

    Returns the path of ``report.md`` (in ``out_dir``, default
    ``grid_dir/report``). Prints the claims' verdicts to ``out``.
    """
    grid_dir = Path(grid_dir)
    out_dir = Path(out_dir) if out_dir is not None else grid_dir / "report"
    runs = [r for r in load_runs(grid_dir) if out_dir.resolve() not in r.path.resolve().parents]
    if not runs:
        raise FileNotFoundError(f"No runs (directories with config.json) under {grid_dir}.")
    out_dir.mkdir(parents=True, exist_ok=True)
    mpl = _matplotlib()
    found = sorted({r.dataset for r in runs}, key=lambda d: (d != "kmnist", d))
    md = [f"# Grid report: {grid_dir}", "",
          "Final accuracy is the test accuracy after the last epoch; ± is the sample standard "
          "deviation over seeds; figure bands span min–max over seeds.", ""]
    if mpl is None:
        md += ["**Figures skipped: matplotlib is not installed** "
               "(`pip install \"cupynn[plot]\"`); the tables below are complete.", ""]
    verdicts = []
    for dataset in found:
        if datasets and dataset not in datasets:
            continue
        subset = [r for r in runs if r.dataset == dataset]
        info = _grid_info(grid_dir, dataset)
        lines, claims = dataset_section(dataset, subset, out_dir, info, mpl)
        md += lines
        verdicts += [(dataset, c) for c in claims]
    path = out_dir / REPORT
    path.write_text("\n".join(md) + "\n")
    stream = out or sys.stdout
    for dataset, claim in verdicts:
        print(f"{dataset}: {claim.verdict:>13}: {claim.statement} [{claim.evidence}]", file=stream)
    if mpl is None:
        print("figures skipped: matplotlib is not installed (pip install \"cupynn[plot]\")",
              file=stream)
    print(f"report: {path}", file=stream)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``report.py``: parse, write the report; the exit status (2 for a mistake in the input)."""
    return run_main(_main, argv, "report.py")


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="report.py",
        description="Read a grid directory (scripts/run_grid.py) and write report.md with "
                    "tables, PNG figures (with matplotlib) and the paper's claims checked against "
                    "the runs.")
    parser.add_argument("grid_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: GRID_DIR/report)")
    parser.add_argument("--dataset", choices=("kmnist", "higgs"), action="append",
                        help="only this dataset (repeatable; default: every one found)")
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    args = parser.parse_args(argv)
    if not args.grid_dir.is_dir():
        raise UserError(f"{args.grid_dir} is not a folder. Give the --grid-dir that "
                        f"scripts/run_grid.py ran.")
    try:
        write_report(args.grid_dir, args.out, args.dataset)
    except FileNotFoundError as exc:
        raise UserError(f"{exc} Give the --grid-dir that scripts/run_grid.py ran.") from None
    except PermissionError as exc:
        raise UserError(f"the report cannot be written ({exc}); choose another --out.") from None
    return 0
