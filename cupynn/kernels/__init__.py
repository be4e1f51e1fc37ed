"""Sparse kernels, dispatched on the array's backend.

One module per operation, beside its CUDA source, holds the operation's checks,
its settings, its GPU launch and its CPU call; the ``if backend.is_gpu`` in its
wrapper is the one place that chooses the device:

==============  ==============================================================
``spmm.py``     ``W @ x`` (+ bias, ReLU) and ``W.T @ dy``; ``spmm.cu`` or
                cuSPARSE (:func:`set_spmm`); :func:`transpose_pattern`,
                :func:`row_swizzle`
``sddmm.py``    the weight gradient at the active entries; ``sddmm.cu``
                (:func:`set_sddmm`); :func:`relu_grad_rowsum` before it
``adam.py``     the fused Adam update; ``adam.cu``; its scalars
                (:func:`adam_scalars`), made once a step per dtype; every
                array in one launch (:func:`adam_multi`, :func:`set_adam`)
``loss.py``     the losses and their gradients in two launches; ``loss.cu``
                (its setting ``CUPYNN_LOSS``; imported as a module:
                ``from cupynn.kernels import loss``)
``fisher.py``   WoodFisher's packed inverse Fisher: update and product;
                ``fisher.cu``
``batch.py``    a captured step's batch gather, transpose and loss record,
                driven by a device counter; ``batch.cu``
``choice.py``   the rule of the GPU method ``"auto"`` (:func:`choose`, by
                shape) and the vector width of the ``"vec"`` kernels
``_launch.py``  per-device compilation of the ``.cu`` files, grids, the lazy
                import of the Numba kernels
``_checks.py``  dtype, contiguity, device and CSR checks shared by the wrappers
``_warm.py``    :func:`warm_up`
==============  ==============================================================

The CPU runs compiled Numba kernels (:mod:`.cpu`, :mod:`.cpu_fisher`; they stay
in those files because Numba's on-disk cache is keyed to the file). Every custom
CUDA kernel has a NumPy twin of the same name in :mod:`.numpy_twins`; the tests
compare all of them.

The wrappers check dtypes, contiguity and shapes on every call (cheap, no
device synchronisation). Index ranges cost a pass over the indices, so they are
checked when ``check=True`` (the default for direct calls); layers validate
their topology once when it is set and then call with ``check=False``. The
optimizer checks the arrays it owns itself and calls :func:`adam` with
``check=False``, which then checks nothing.

This package only hands the names on. ``cupynn.kernels.spmm``, ``.sddmm`` and
``.adam`` are the functions, not their modules (the functions were here first);
reach a module's own state with ``importlib.import_module("cupynn.kernels.spmm")``
or ``from cupynn.kernels.spmm import ...``.
"""

from __future__ import annotations

from ._checks import (_check_contiguous, _check_no_overlap, _check_pattern,
                      _check_same_backend, _float_suffix, _rows_of)
from ._launch import (_CPU_MODULE, _SUFFIX, CUDA_SOURCES, KERNEL_DIR, MAX_BLOCKS,
                      THREADS_PER_BLOCK, WARP_SIZE, _cpu, _cuda_module, _grid, cuda_function,
                      numba_threads)
from .adam import (ADAM_ENV, ADAM_METHODS, AdamPointers, AdamScalars, adam, adam_multi,
                   adam_scalars, adam_setting, set_adam)
from .batch import end_step, gather_batch, gather_labels, transpose
from .choice import choose, vector_width
from .fisher import (FISHER_TILE, _check_fisher_blocks, fisher_shape, fisher_update,
                     packed_matvec)
from .sddmm import (_SDDMM_DEFAULT, RELU_GRAD_ENV, RELU_GRAD_METHODS, SDDMM_ENV,
                    SDDMM_MAX_GROUP, SDDMM_METHODS, _check_sddmm_choice, _sddmm_from_env,
                    relu_grad_rowsum, relu_grad_setting, sddmm, sddmm_group, sddmm_setting,
                    set_relu_grad, set_sddmm)
from .spmm import (SPMM_ENV, SPMM_MAX_THREADS, SPMM_METHODS, _check_spmm_choice,
                   _check_transpose, _gpu_csr, _spmm_launch, row_swizzle, set_spmm, spmm,
                   spmm_setting, spmm_t, transpose_pattern)
from ._warm import warm_up
