"""KMNIST experiment (SPEC §6): ``python scripts/train_kmnist.py --help``."""

import sys

from cupynn.paper.experiments import KMNIST, run

if __name__ == "__main__":
    sys.exit(run(KMNIST))
