"""The benchmarks (``bench_*.py``, each run as a script: ``python benchmarks/bench_x.py``)
and the GPU check (:mod:`benchmarks.gpu_check`); a package so that the GPU check and its
tests import them as ``benchmarks.*`` from the checkout."""
