"""What the runner and every part share: the statuses, the context a part runs in
and the shape of a part's result."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import cupynn

ROOT = Path(__file__).resolve().parents[2]  # the checkout

PASSED, FAILED, DRY_RUN = "passed", "failed", "dry run"
NO_GPU = "skipped: no GPU"


class Context:
    """What every part knows: the device, the sizes and where the data is."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.backend = cupynn.get_backend(args.device)
        self.gpu = self.backend.is_gpu
        self.device = "gpu" if self.gpu else "cpu"
        self.data_dir = Path(args.data_dir) if args.data_dir else None
        self.out = Path(args.out)
        self.deadline = time.monotonic() + args.part_seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def measured(self) -> str:
        """The status of a measurement that ran: passed on a GPU, a dry run on the CPU."""
        return PASSED if self.gpu else DRY_RUN


def result(status: str, summary: str, data: dict[str, Any] | None = None,
           notes: list[str] | None = None, targets: list[dict[str, Any]] | None = None
           ) -> dict[str, Any]:
    return {"status": status, "summary": summary, "data": data or {}, "notes": notes or [],
            "targets": targets or []}


def target(name: str, value: float | None, limit: float, unit: str = "") -> dict[str, Any]:
    """A speed target: met when ``value <= limit``."""
    met = None if value is None else bool(value <= limit)
    return {"name": name, "value": value, "limit": limit, "unit": unit,
            "verdict": "not measured" if met is None else ("met" if met else "missed")}
