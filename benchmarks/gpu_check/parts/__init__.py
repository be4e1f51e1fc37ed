"""The parts of the GPU check: each a function of the :class:`~..context.Context` that
returns its result (:func:`~..context.result`)."""

from __future__ import annotations

from typing import Any, Callable

from ..context import Context
from .env import part_env
from .graph import part_graph
from .kernels import part_kernels
from .launches import part_launches
from .mpi import part_mpi
from .parity import part_parity
from .scale import part_scale
from .speed import part_higgs, part_redistribution, part_steps
from .tests import part_tests

PART_FUNCTIONS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "tests": part_tests, "parity": part_parity, "steps": part_steps, "kernels": part_kernels,
    "launches": part_launches, "graph": part_graph, "higgs": part_higgs,
    "redistribution": part_redistribution, "mpi": part_mpi, "scale": part_scale,
    "env": part_env}
