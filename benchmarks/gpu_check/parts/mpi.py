"""The ``mpi`` part: two MPI ranks sharing the device against one process."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..context import FAILED, ROOT, Context, result


MPI_CONFIGS = ("gradient-global", "woodfisher", "dense")


def part_mpi(ctx: Context) -> dict[str, Any]:
    """tests/mpi_worker.py under mpiexec -n 2 on the device (device arrays through MPI),
    against one process on the same device."""
    from cupynn.distributed import find_mpiexec, launcher_env

    sys.path.insert(0, str(ROOT / "tests"))
    import mpi_worker

    launcher = find_mpiexec()
    if launcher is None:
        return result("skipped: no mpiexec or mpi4py", "MPI is not installed here")
    env = launcher_env(dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1"))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([launcher, "-n", "2", sys.executable,
                               str(ROOT / "tests" / "mpi_worker.py"), "train", tmp, ctx.device,
                               *MPI_CONFIGS], capture_output=True, text=True, env=env,
                              timeout=max(5.0, ctx.remaining() - 10))
        if done.returncode:
            return result(FAILED, f"mpiexec -n 2 ended with status {done.returncode}",
                          notes=[done.stderr[-3000:]])
        rows = [{"config": name, **mpi_worker.compare(Path(tmp), name, ctx.device)}
                for name in MPI_CONFIGS]
    for row in rows:
        row["ok"] = bool(row["histories_equal"] and row["topology_equal"] and row["same_moves"]
                         and row["weight_rel_diff"] <= 1e-9 and row["history_rel_diff"] <= 1e-9)
    ok = all(r["ok"] for r in rows)
    summary = (f"{sum(r['ok'] for r in rows)}/{len(rows)} configurations equal to one process "
               f"(worst weight diff {max(r['weight_rel_diff'] for r in rows):.1e})")
    return result((ctx.measured() if ok else FAILED), summary, {"rows": rows})
