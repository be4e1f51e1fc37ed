"""Run the paper's grid for one dataset: ``python scripts/run_grid.py kmnist --help``."""

import sys

from cupynn.paper.grid import main

if __name__ == "__main__":
    sys.exit(main())
