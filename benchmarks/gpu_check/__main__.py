"""``python -m benchmarks.gpu_check``, from the checkout: the GPU check (``--help``)."""

import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
