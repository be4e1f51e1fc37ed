"""Verify and measure cupynn on a GPU in one command; on the CPU, a dry run of the same.

``scripts/gpu_check.py`` is the entry point (``--help`` lists the options), and
``python -m benchmarks.gpu_check`` from the checkout the same. A lent GPU comes
rarely and for minutes, with nothing to install: this runs, in one call of at
most about eight minutes on one H100, everything that can only be checked there,
and writes one JSON and one Markdown report into the folder it is given. The
parts run in this order, each in a process of its own under a time limit, and
each records its status and seconds even when an earlier one failed or hung:

correctness
    ``tests``: the test suite's GPU tests (``pytest -m gpu``: every kernel
    against its NumPy twin, float64 gradient checks, redistribution invariants
    and brute-force references, checkpoint and resume, on the GPU backend);
    ``parity``: the same seed trained for two epochs with a redistribution
    after each, on the CPU and on the GPU, in float64, for every algorithm:
    topologies equal after every redistribution, losses and weights within
    :data:`.parts.parity.PARITY_RTOL`.
speed and memory
    ``steps``: training step of sparse, dense and masked-dense (PyTorch) models
    at 784-256-256-10 and 784-4096-4096-10, batch 512, densities 0.1 and 0.03,
    and the peak device memory of each; ``kernels`` (issue 20): every variant
    of the three sparse products at every layer shape, with bandwidth, FLOP/s,
    bit-equality with the default, the fastest per shape against
    ``kernels.choice.choose``'s pick, dense baselines by precision (cuBLAS FP32
    and TF32, torch masked-dense), the 4096 layer and the 784-4096-4096-10
    step with default and "auto" kernels against the issue's targets;
    ``launches``: kernel launches and
    host waits per training step; ``graph``: the step captured as a CUDA
    graph (``cupynn.graph``, issue 19) against its eager launches (bit for
    bit) and the eager step, its time, kernels and host waits per step, and
    HIGGS epochs through ``fit(graph=True)``, ``graph=False`` and the torch
    peer captured as a CUDA graph; ``higgs``: one HIGGS-sized epoch (500 000
    rows, batch 128, gradient-global at density 0.1), against the peer and the
    paper; ``redistribution``: seconds per redistribution of every algorithm at
    the paper's sizes.
environment
    ``env``: GPU, driver, CUDA runtime, library versions, the commit.

With ``--device cpu --quick`` it is a dry run of seconds that CI runs, so that
the script cannot rot while no GPU is lent: every part's code runs on the CPU
at small sizes and says "dry run"; what needs a GPU says "skipped: no GPU".
A dry run never says "passed".

The package: :mod:`.runner` runs the parts (each in a process of its own, under
its limit and the budget) and gives the verdict; :mod:`.parts` holds the parts,
a module for one or a few (``tests``, ``parity``, ``speed``: steps, higgs and
redistribution, ``kernels`` with ``dense``, ``launches``, ``graph``, ``mpi``, ``env``), all on what
:mod:`.context` gives them; :mod:`.report` writes the reports; :mod:`.failures`
is the pytest plugin of the tests part.
"""

from .runner import main

__all__ = ["main"]
