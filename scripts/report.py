"""Report on a grid of runs: ``python scripts/report.py runs/grid`` (see ``--help``)."""

import sys

from cupynn.paper.report import main

if __name__ == "__main__":
    sys.exit(main())
