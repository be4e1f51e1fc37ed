"""HIGGS experiment (SPEC §6): ``python scripts/train_higgs.py --help``."""

import sys

from cupynn.paper.experiments import HIGGS, run

if __name__ == "__main__":
    sys.exit(run(HIGGS))
