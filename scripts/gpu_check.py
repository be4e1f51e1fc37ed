"""Verify and measure cupynn on a GPU in one command: ``python scripts/gpu_check.py --help``.

On a lent GPU, from the checkout::

    PYTHONPATH=. python scripts/gpu_check.py --out $OUT --data-dir gpu-data

CI runs the CPU dry run: ``python scripts/gpu_check.py --device cpu --quick --out DIR``.
The parts, their limits and the reports are described in ``benchmarks/gpu_check.py``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
