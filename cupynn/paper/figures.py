"""The report's figures (PNG, with matplotlib): test accuracy per epoch (the paper's
Figures 2 and 4), the loss induced by each redistribution (Figure 3) and the network's
health per epoch.

matplotlib is optional (``pip install "cupynn[plot]"``): :func:`_matplotlib` says whether
it is there, and only the functions that draw import it (its ``Figure``, without pyplot).
:mod:`cupynn.paper.report` writes the page that shows them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy

from .results import HEALTH, LABELS, Groups, curve, densities, induced_losses, keys


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401 (the part used, without pyplot)
    except ImportError:
        return None
    return matplotlib


def _accuracy_figure(groups: Groups, density: float, path: Path, dataset: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for key in keys(groups):
        runs = groups.get((key, density)) or groups.get((key, None))
        if not runs:
            continue
        epochs, mean, low, high = curve(runs)
        style = "--" if key.startswith("baseline-") else "-"
        (line,) = ax.plot(epochs, 100 * mean, style,
                          label=f"{LABELS.get(key, key)} (n={len(runs)})",
                          marker="o" if len(epochs) < 12 else None, markersize=3)
        if len(runs) > 1:
            ax.fill_between(epochs, 100 * low, 100 * high, color=line.get_color(), alpha=0.15,
                            linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="test accuracy (%)",
           title=f"{dataset.upper()}, density {density:g}: mean over seeds, band min–max")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def _induced_figure(groups: Groups, path: Path, dataset: str) -> bool:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dens = [d for d in densities(groups)
            if any(induced_losses(r) for (k, dd), rs in groups.items() if dd == d for r in rs)]
    if not dens:
        return False
    fig = Figure(figsize=(4.2 * len(dens), 4.2), layout="constrained")
    axes = numpy.atleast_1d(fig.subplots(1, len(dens), sharey=True))
    deltas = [abs(v) for rs in groups.values() for r in rs for _, v in induced_losses(r) if v != 0]
    # Linear below the smallest change that matters: rounding noise of 1e-9 would squeeze the rest.
    floor = max(min(deltas), 1e-4 * max(deltas)) if deltas else 1e-6
    linthresh = 10 ** math.floor(math.log10(floor))
    for ax, density in zip(axes, dens):
        for key in keys(groups, sparse=True):
            by_epoch: dict[int, list[float]] = {}
            for run in groups.get((key, density), []):
                for epoch, delta in induced_losses(run):
                    by_epoch.setdefault(epoch, []).append(delta)
            if by_epoch:
                epochs = sorted(by_epoch)
                ax.plot(epochs, [numpy.mean(by_epoch[e]) for e in epochs], marker="o",
                        markersize=3, label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set(title=f"density {density:g}", xlabel="epoch of the redistribution")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("induced loss: after − before (symlog)")
    axes[-1].legend(fontsize="small")
    fig.suptitle(f"{dataset.upper()}: training loss induced by each redistribution "
                 f"(mean over seeds; linear within ±{linthresh:g})")
    fig.savefig(path, dpi=120)
    return True


def _health_figure(groups: Groups, density: float, path: Path, dataset: str) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5 * len(HEALTH), 4.2), layout="constrained")
    axes = fig.subplots(1, len(HEALTH))
    for ax, (label, get) in zip(axes, HEALTH):
        for key in keys(groups, sparse=True):
            runs = groups.get((key, density))
            if not runs:
                continue
            epochs, mean, low, high = curve(runs, get)
            if not len(epochs):
                continue
            (line,) = ax.plot(epochs, 100 * mean, label=f"{LABELS.get(key, key)} (n={len(runs)})",
                              marker="o" if len(epochs) < 12 else None, markersize=3)
            if len(runs) > 1:
                ax.fill_between(epochs, 100 * low, 100 * high, color=line.get_color(),
                                alpha=0.15, linewidth=0)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", ylabel=label)
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize="small")
    fig.suptitle(f"{dataset.upper()}, density {density:g}: network health at the end of each "
                 f"epoch's training (mean over seeds, band min–max)")
    fig.savefig(path, dpi=120)
