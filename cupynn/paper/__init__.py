"""The paper's experiments: its two training scripts, the grid of runs and the report.

- :mod:`.experiments`: the KMNIST and HIGGS experiments as library code
  (``scripts/train_kmnist.py`` and ``train_higgs.py`` parse arguments and call
  :func:`.experiments.run`); their command line in :mod:`.arguments`, a run's
  output directory in :mod:`.run_dir`;
- :mod:`.grid`: every algorithm x density x seed plus the dense baselines, one
  process per run (``scripts/run_grid.py``); its runs planned in :mod:`.grid_plan`
  and run in :mod:`.grid_launch`;
- :mod:`.report`: the paper's figures, tables and claims from a grid's runs
  (``scripts/report.py``); the runs read back and their statistics in
  :mod:`.results`, the figures (matplotlib) in :mod:`.figures`.

They build on the library (``cupynn``) and nothing in it depends on them.
"""
