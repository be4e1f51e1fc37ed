"""A grid's runs as numbers: the run directories read back, grouped, and the statistics
that :mod:`cupynn.paper.report` shows in its tables and :mod:`cupynn.paper.figures` draws.

:func:`load_runs` reads every run directory under a grid directory (any directory with a
``config.json``) as a :class:`RunResult`; :func:`group` keeps the completed ones by
(algorithm or dense baseline, density), in the paper's order. The measures
(final accuracy, ``mean ± std`` over seeds, the induced loss, …) are described in
:mod:`cupynn.paper.report`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy

from .experiments import BASELINES
from ..redistribution import NAMES

LABELS = {"baseline-neuron": "dense neuron-eq", "baseline-parameter": "dense param-eq"}
ORDER = (*NAMES, *(f"baseline-{b}" for b in BASELINES))


# ------------------------------------------------------------------ reading
@dataclass
class RunResult:
    """One run directory: its config, per-epoch metrics and summary."""

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def arguments(self) -> dict[str, Any]:
        return self.config.get("arguments", {})

    @property
    def dataset(self) -> str:
        return self.config.get("experiment", "?")

    @property
    def key(self) -> str:
        """The algorithm's name, or ``baseline-neuron`` / ``baseline-parameter``."""
        baseline = self.arguments.get("baseline")
        return f"baseline-{baseline}" if baseline else self.arguments.get("algorithm", "?")

    @property
    def density(self) -> float | None:
        """The sparse density (rounded, so 0.1 from any run matches); ``None`` for baselines."""
        if self.arguments.get("baseline"):
            return None
        return round(float(self.arguments.get("density", math.nan)), 6)

    @property
    def seed(self) -> int:
        return int(self.arguments.get("seed", 0))

    @property
    def status(self) -> str:
        return self.summary.get("status", "unfinished (no summary.json)")

    @property
    def completed(self) -> bool:
        return self.status == "completed" and bool(self.metrics)

    def final(self, metric: str = "test_accuracy") -> float | None:
        return self.metrics[-1].get(metric) if self.metrics else None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    metrics = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                metrics.append(json.loads(line))
            except ValueError:  # a line cut short by a crash
                break
    return metrics


def load_runs(grid_dir: str | Path) -> list[RunResult]:
    """Every run under ``grid_dir`` (directories holding ``config.json``), sorted by path."""
    runs = []
    for config_path in sorted(Path(grid_dir).rglob("config.json")):
        try:
            config = json.loads(config_path.read_text())
        except ValueError:
            continue
        if "arguments" not in config:
            continue
        summary_path = config_path.parent / "summary.json"
        try:
            summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        except ValueError:
            summary = {}
        runs.append(RunResult(config_path.parent, config,
                              _read_metrics(config_path.parent / "metrics.jsonl"), summary))
    return runs


# ------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation (nan for one value), n, min and max."""

    mean: float
    std: float
    n: int
    min: float
    max: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat | None:
        a = numpy.asarray([v for v in values if v is not None and math.isfinite(v)], float)
        if a.size == 0:
            return None
        std = float(a.std(ddof=1)) if a.size > 1 else math.nan
        return cls(float(a.mean()), std, int(a.size), float(a.min()), float(a.max()))

    def format(self, scale: float = 1.0, digits: int = 2, n: bool = True, sci: bool = False) -> str:
        def number(x: float) -> str:
            return f"{x * scale:.{digits}g}" if sci else f"{x * scale:.{digits}f}"

        text = number(self.mean)
        if self.n > 1:
            text += f" ± {number(self.std)}"
        return text + (f" (n={self.n})" if n else "")


Groups = dict[tuple[str, float | None], list[RunResult]]


def group(runs: Iterable[RunResult]) -> Groups:
    """Completed runs by (algorithm or baseline key, density), in the paper's order."""
    groups: Groups = {}
    for run in runs:
        if run.completed:
            groups.setdefault((run.key, run.density), []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: (_rank(kv[0][0]), kv[0][0],
                                                        -(kv[0][1] or 0))))


def _rank(key: str) -> int:
    """The paper's algorithms first, in its order; then compositions (by name); then the
    dense baselines."""
    if key in NAMES:
        return NAMES.index(key)
    if key.startswith("baseline-"):
        return len(ORDER) + ORDER.index(key) if key in ORDER else 2 * len(ORDER)
    return len(NAMES)


def densities(groups: Groups) -> list[float]:
    return sorted({d for _, d in groups if d is not None}, reverse=True)


def keys(groups: Groups, sparse: bool | None = None) -> list[str]:
    found = []
    for key, density in groups:
        if key not in found and (sparse is None or sparse == (density is not None)):
            found.append(key)
    return found


def final_stats(groups: Groups, metric: str = "test_accuracy"
                ) -> dict[tuple[str, float | None], Stat]:
    """Final-epoch ``metric`` over seeds, per (key, density)."""
    table = {}
    for group_key, runs in groups.items():
        stat = Stat.of(run.final(metric) for run in runs)
        if stat is not None:
            table[group_key] = stat
    return table


def curve(runs: Sequence[RunResult], metric: str | Any = "test_accuracy"
          ) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """Epochs and the mean, min and max of ``metric`` (a key, or a function of an epoch's
    metrics that may return None) over the runs at each epoch."""
    get = metric if callable(metric) else (lambda m: m.get(metric))
    by_epoch: dict[int, list[float]] = {}
    for run in runs:
        for m in run.metrics:
            value = get(m)
            if value is not None:
                by_epoch.setdefault(int(m["epoch"]), []).append(float(value))
    epochs = numpy.array(sorted(by_epoch), dtype=int)
    values = [numpy.asarray(by_epoch[e]) for e in epochs]
    return (epochs, numpy.array([v.mean() for v in values]), numpy.array([v.min() for v in values]),
            numpy.array([v.max() for v in values]))


def zero_share(m: dict[str, Any]) -> float | None:
    """The share of the stored weights exactly 0 at the end of an epoch's training."""
    if m.get("zero_weights") is None or not m.get("nnz"):
        return None
    return m["zero_weights"] / sum(m["nnz"])


def hidden_share(count: str) -> Any:
    """A function of an epoch's metrics: the share of the hidden neurons counted under
    ``count`` in its ``health`` (``"dead"``: no input, no output or inactive; ``"inactive"``:
    a ReLU at 0 on the whole probe batch, the part of the dead that moves when a network
    collapses — no-input/no-output are mostly topology), or None without one."""
    def share(m: dict[str, Any]) -> float | None:
        hidden = (m.get("health") or {}).get("hidden")
        if not hidden:
            return None
        return sum(h[count] for h in hidden) / sum(h["neurons"] for h in hidden)
    return share


HEALTH = (("zero weights (% of stored)", zero_share),
          ("dead hidden neurons (%)", hidden_share("dead")),
          ("hidden ReLUs at 0 on the probe batch (%)", hidden_share("inactive")))


def induced_losses(run: RunResult) -> list[tuple[int, float]]:
    """(epoch, induced_loss_after − induced_loss_before) for each redistribution of the run."""
    return [(int(m["epoch"]), float(m["induced_loss_after"]) - float(m["induced_loss_before"]))
            for m in run.metrics if "induced_loss_before" in m and "induced_loss_after" in m]


def induced_stats(groups: Groups) -> dict[tuple[str, float | None], Stat]:
    """Induced loss over every redistribution of every seed, per (algorithm, density)."""
    table = {}
    for group_key, runs in groups.items():
        stat = Stat.of(delta for run in runs for _, delta in induced_losses(run))
        if stat is not None:
            table[group_key] = stat
    return table


@dataclass(frozen=True)
class Timing:
    train: Stat            # training seconds per epoch (mean over epochs, then over seeds)
    redistribution: Stat   # redistribution seconds per epoch, averaged over every epoch
    total: Stat            # their sum per epoch
    per_step: Stat | None  # seconds per redistribution, over the epochs that redistributed


def timing_stats(groups: Groups) -> dict[tuple[str, float | None], Timing]:
    table = {}
    for group_key, runs in groups.items():
        train = [numpy.mean([m["train_seconds"] for m in r.metrics]) for r in runs]
        redis = [numpy.mean([m.get("redistribution_seconds", 0.0) for m in r.metrics])
                 for r in runs]
        steps = [m["redistribution_seconds"] for r in runs for m in r.metrics if "fraction" in m]
        table[group_key] = Timing(Stat.of(train), Stat.of(redis),
                                  Stat.of(t + s for t, s in zip(train, redis)), Stat.of(steps))
    return table


def memory_stats(groups: Groups) -> dict[tuple[str, float | None], Stat]:
    """Peak memory in bytes (the largest epoch's, per run) over seeds."""
    table = {}
    for group_key, runs in groups.items():
        stat = Stat.of(max((m.get("peak_memory_bytes", 0) for m in r.metrics), default=None)
                       for r in runs)
        if stat is not None:
            table[group_key] = stat
    return table
