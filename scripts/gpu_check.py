"""Verify and measure cupynn on a GPU in one command: ``python scripts/gpu_check.py --help``.

On a lent GPU, from the checkout::

    PYTHONPATH=. python scripts/gpu_check.py --out $OUT --data-dir gpu-data

CI runs the CPU dry run: ``python scripts/gpu_check.py --device cpu --quick --out DIR``.
The parts, their limits and the reports are described in ``benchmarks/gpu_check/``
(``python -m benchmarks.gpu_check`` from the checkout is the same command).

The check is the package ``benchmarks.gpu_check`` of this checkout, which is not
installed: so the checkout's root goes first on ``sys.path``, as ``python -m`` puts the
current folder there, and the script runs without PYTHONPATH from any folder.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
