"""A run's output directory: made (or checked for a run to resume), its JSON files
written, and read back to resume (see :mod:`cupynn.paper.experiments` for the files).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy

from ..checkpoint import FILENAME as CHECKPOINT, read_checkpoint
from ..cli import UserError

if TYPE_CHECKING:
    from .experiments import Experiment

MODEL_FILE = "model.npz"
RESULT_FILES = ("config.json", "metrics.jsonl", "summary.json", CHECKPOINT, MODEL_FILE)


def versions(backend: Any) -> dict[str, str]:
    import numba
    import scipy
    import sklearn

    from .._version import __version__

    found = {"cupynn": __version__, "python": platform.python_version(),
             "numpy": numpy.__version__, "scipy": scipy.__version__, "numba": numba.__version__,
             "scikit-learn": sklearn.__version__}
    if backend.is_gpu:
        found["cupy"] = backend.xp.__version__
    return found


def _prepare_output(args: argparse.Namespace, experiment: Experiment) -> Path:
    if args.resume is not None:
        if not (args.resume / "config.json").exists() or not (args.resume / CHECKPOINT).exists():
            raise UserError(f"--resume {args.resume}: no config.json and {CHECKPOINT} there (a run "
                            f"writes its first checkpoint after --checkpoint-every epochs). Give "
                            f"the directory of a run that wrote a checkpoint, or start a new run "
                            f"with --out.")
        return args.resume
    out = args.out or Path("runs") / f"{experiment.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: a run writes several files "
                        f"into its output directory. Give the path of a directory (new or "
                        f"empty), or move the file away.")
    taken = [name for name in RESULT_FILES if (out / name).exists()]
    if taken and not args.overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(taken)}). Choose another --out, "
                        f"continue that run with --resume {out}, or pass --overwrite to replace "
                        f"it.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent that is a file, no permission, a read-only disk
        raise UserError(f"--out {out}: the output directory cannot be made "
                        f"({exc.strerror or exc}: {exc.filename or out}). Choose another "
                        f"--out.") from None
    for name in taken:
        (out / name).unlink()
    return out


def _json_default(value: Any) -> Any:
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    tmp.replace(path)

def _read_run(out: Path) -> tuple[dict[str, Any], Any]:
    """The saved arguments and the checkpoint of a run to resume."""
    try:
        saved = json.loads((out / "config.json").read_text())["arguments"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--resume {out}: its config.json is not a run's configuration "
                        f"({type(exc).__name__}: {exc}). Start a new run with --out.") from None
    try:
        checkpoint = read_checkpoint(out)
    except (OSError, ValueError) as exc:
        raise UserError(f"--resume {out}: {exc} It cannot be resumed; start a new run with "
                        f"--out (or --overwrite it).") from None
    return saved, checkpoint


def _kept(out: Path) -> str:
    if (out / CHECKPOINT).exists():
        epoch = read_checkpoint(out)[0]["trainer"]["epoch"]
        return f"the last good checkpoint (after epoch {epoch}) is kept"
    return "no checkpoint had been written yet"
