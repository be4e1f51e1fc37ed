"""The packed block-diagonal inverse Fisher of WoodFisher: its Sherman-Morrison
update (:func:`fisher_update`) and product (:func:`packed_matvec`), from
``fisher.cu`` on the GPU and :mod:`.cpu_fisher` on the CPU, and the tiled layout
they share (:data:`FISHER_TILE`, :func:`fisher_shape`).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy

from ..backend import backend_of
from ._checks import (_check_contiguous, _check_no_overlap, _check_same_backend,
                      _float_suffix)
from ._launch import _SUFFIX, THREADS_PER_BLOCK, _grid, cuda_function

# Blocks per tile of the packed inverse Fisher (fisher.cu): two warps' worth of
# lanes, and the width of the CPU kernels' vectorised loops.
FISHER_TILE = 64


def fisher_shape(n_blocks: int, block_size: int) -> tuple[int, int, int]:
    """Shape of the tiled packed inverse Fisher of n_blocks blocks of B: (n_tiles, P, TILE)."""
    return (-(-int(n_blocks) // FISHER_TILE), block_size * (block_size + 1) // 2, FISHER_TILE)


def _check_block_size(what: str, block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, numpy.integer)) \
            or block_size < 1:
        raise ValueError(f"{what}: block_size must be a positive int. Got {block_size!r} instead.")
    return int(block_size)


def _check_fisher_blocks(what: str, finv: Any, block_size: int, n_blocks: int | None = None,
                         **vectors: Any) -> int:
    """Check a tiled packed inverse Fisher ``finv`` against flat ``vectors`` of
    ``n_blocks`` blocks (by default, as many as the first vector holds); return n_blocks."""
    b = _check_block_size(what, block_size)
    packed = b * (b + 1) // 2
    if finv.ndim != 3 or tuple(finv.shape[1:]) != (packed, FISHER_TILE):
        raise ValueError(f"{what}: finv must have shape (n_tiles, {packed}, {FISHER_TILE}) for "
                         f"block_size={b} (the packed upper triangles of {FISHER_TILE} blocks "
                         f"per tile, see fisher.cu). Got {finv.shape} instead.")
    name = "g"
    if n_blocks is None:
        (name, first), *_ = vectors.items()
        if first.ndim != 1 or first.shape[0] % b:
            raise ValueError(f"{what}: {name} must be flat with a multiple of block_size={b} "
                             f"values (pad the last block with zeros). Got {first.shape} instead.")
        n_blocks = int(first.shape[0]) // b
    if fisher_shape(n_blocks, b) != tuple(finv.shape):
        raise ValueError(f"{what}: {name} has {n_blocks} blocks, which need finv of shape "
                         f"{fisher_shape(n_blocks, b)}. Got {finv.shape} instead.")
    if n_blocks * b > 2**31 - 1:
        raise ValueError(f"{what}: n_blocks * block_size must fit int32. Got {n_blocks} * {b}.")
    for name, a in vectors.items():
        if a.shape != (n_blocks * b,):
            raise ValueError(f"{what}: {name} must have shape ({n_blocks * b},) = n_blocks * "
                             f"block_size (pad the last block with zeros). Got {a.shape} instead.")
    _check_contiguous(what, finv=finv, **vectors)
    return n_blocks


def fisher_update(finv: Any, g: Any, m: float, *, block_size: int, work: Any = None,
                  grad_sum: Any = None, check: bool = True, max_blocks: int | None = None) -> None:
    """Sherman-Morrison rank-1 update of a packed block-diagonal inverse Fisher, in place.

    For every block b: ``u = F_b^{-1} g_b``, ``den = m + g_b . u``,
    ``F_b^{-1} <- F_b^{-1} - u u^T / den``: the inverse of ``F_b + g_b g_b^T / m``.
    Starting from ``finv = I / lambda`` and applying the m gradients of a batch
    gives ``inv(lambda I + G^T G / m)`` per block (the WoodFisher estimate).
    A block whose g_b is all zero is left as it is. On the GPU this is two
    launches (``packed_matvec``, ``fisher_rank1_update``), on the CPU one pass.

    Parameters
    ----------
    finv : (n_tiles, P, TILE) float32 or float64, C-contiguous, P = B (B + 1) / 2
        Upper triangles, row-major, of the symmetric blocks, TILE
        (:data:`FISHER_TILE`) blocks side by side per tile (see ``fisher.cu``;
        :func:`fisher_shape` gives the shape).
    g : (n_blocks * B,) same dtype, C-contiguous; or a list or tuple of parts
        One gradient, the last block padded with zeros; n_tiles = ceil(n_blocks / TILE).
        Given as parts (flat, C-contiguous arrays of the dtype, e.g. the layers'
        gradients), it is their concatenation, zero-padded to n_blocks =
        ceil(total length / B) blocks: the CPU reads the parts where they are;
        the GPU copies them into one vector first (to bound that memory, pass
        a chunk of tiles at a time, as ``BlockFisherInverse`` does).
    m : float > 0
        The number of gradients the Fisher averages over.
    block_size : int
        B.
    work : (n_blocks * B,) same dtype, optional
        Scratch for u (allocated on the GPU when not given); must not overlap
        finv, g or grad_sum. On return it holds u = F_b^{-1} g_b of the blocks
        before the step. Passing one saves an allocation per call on the GPU.
    grad_sum : flat, same dtype, as long as g (all parts together), optional
        Gets the gradient added to it; must not overlap the other arrays.
    check : bool
        False when the caller made every array as described above: nothing is
        checked (on the CPU the checks cost about a tenth of the kernel's time
        on the paper's HIGGS network).
    max_blocks : int, optional
        Cap on the CUDA grid (tests use it to exercise the grid-stride loop).
    """
    what = "fisher_update"
    parts = tuple(g) if isinstance(g, (list, tuple)) else (g,)
    if check:
        n_blocks = _check_update(what, finv, g, parts, m, block_size, work, grad_sum)
    else:
        n_blocks = -(-sum(int(part.shape[0]) for part in parts) // int(block_size))
    backend = backend_of(finv)
    t = finv.dtype.type
    if not backend.is_gpu:
        from . import cpu_fisher

        # The kernel takes the parts padded to a few tuple lengths (one compiled
        # version serves a single vector and every model of up to four layers).
        none = numpy.empty(0, dtype=finv.dtype)
        cpu_fisher.fisher_update(finv, cpu_fisher.padded_parts(parts, none),
                                 _part_starts(tuple(int(part.shape[0]) for part in parts)),
                                 none if work is None else work, t(m), int(block_size),
                                 none if grad_sum is None else grad_sum)
        return
    if n_blocks == 0:
        return
    xp = backend.xp
    size = n_blocks * int(block_size)
    if len(parts) == 1 and parts[0].shape[0] == size:
        vector = parts[0]
    else:  # the parts side by side, then the padding of the last block
        vector = xp.zeros(size, dtype=finv.dtype)
        offset = 0
        for part in parts:
            vector[offset:offset + part.shape[0]] = part
            offset += int(part.shape[0])
    if work is None:
        work = xp.empty(size, dtype=finv.dtype)
    # u = F^{-1} g into work, then the rank-1 step (see fisher.cu).
    grid = _grid(int(finv.shape[0]) * int(block_size) * FISHER_TILE, max_blocks)
    sizes = (numpy.int32(n_blocks), numpy.int32(block_size), numpy.int32(FISHER_TILE))
    suffix = _SUFFIX[finv.dtype]
    cuda_function("fisher.cu", f"packed_matvec_{suffix}")(
        grid, (THREADS_PER_BLOCK,), (finv, vector, work) + sizes)
    cuda_function("fisher.cu", f"fisher_rank1_update_{suffix}")(
        grid, (THREADS_PER_BLOCK,), (finv, vector, work, t(m)) + sizes)
    if grad_sum is not None:
        grad_sum += vector[:grad_sum.shape[0]]


@functools.lru_cache(maxsize=16)
def _part_starts(lengths: tuple[int, ...]) -> Any:
    """cpu_fisher.part_starts, made once per list of part lengths (every step of an
    epoch has the same); the kernel only reads it."""
    from . import cpu_fisher

    return cpu_fisher.part_starts(lengths)


def _check_update(what: str, finv: Any, g: Any, parts: tuple, m: float, block_size: int,
                  work: Any, grad_sum: Any) -> int:
    """:func:`fisher_update`'s checks; returns n_blocks."""
    arrays = {"finv": finv, **{("g" if len(parts) == 1 and parts[0] is g else f"g[{k}]"): part
                               for k, part in enumerate(parts)}}
    for name, a in (("work", work), ("grad_sum", grad_sum)):
        if a is not None:
            arrays[name] = a
    _check_same_backend(what, *arrays.values())
    _float_suffix(*arrays.values(), what=what)
    extra = {k: a for k, a in (("work", work),) if a is not None}
    if parts and parts[0] is g:
        n_blocks = _check_fisher_blocks(what, finv, block_size, g=g, **extra)
        n_values = int(g.shape[0])
    else:
        for k, part in enumerate(parts):
            if part.ndim != 1:
                raise ValueError(f"{what}: g[{k}] must be flat. Got shape {part.shape} instead.")
        n_values = sum(int(part.shape[0]) for part in parts)
        b = _check_block_size(what, block_size)
        n_blocks = _check_fisher_blocks(what, finv, b, -(-n_values // b), **extra)
        _check_contiguous(what, **{f"g[{k}]": part for k, part in enumerate(parts)})
    if grad_sum is not None:
        if grad_sum.shape != (n_values,):
            raise ValueError(f"{what}: grad_sum must have shape ({n_values},), the length of g. "
                             f"Got {grad_sum.shape} instead.")
        _check_contiguous(what, grad_sum=grad_sum)
    m = float(m)
    if not (m > 0 and numpy.isfinite(m)):
        raise ValueError(f"{what}: m must be a positive finite number. Got {m!r} instead.")
    xp = backend_of(finv).xp
    vectors = {k: a for k, a in arrays.items() if k not in ("finv", "work", "grad_sum")}
    _check_no_overlap(what, xp, "finv", {"finv": finv, **vectors})
    for name in ("work", "grad_sum"):
        if name in arrays:
            _check_no_overlap(what, xp, name, arrays)
    return n_blocks


def packed_matvec(finv: Any, v: Any, *, block_size: int, out: Any = None,
                  max_blocks: int | None = None) -> Any:
    """``out_b = F_b^{-1} v_b`` for a packed block-diagonal ``finv`` (see :func:`fisher_update`).

    Parameters
    ----------
    finv : (n_tiles, P, TILE) float32 or float64, C-contiguous, P = B (B + 1) / 2
    v : (n_blocks * B,) same dtype, C-contiguous, n_tiles = ceil(n_blocks / TILE)
    block_size : int
        B.
    out : (n_blocks * B,) same dtype, optional; must not overlap finv or v.
    max_blocks : int, optional
        Cap on the CUDA grid.

    Returns
    -------
    (n_blocks * B,) array on the operands' device.
    """
    what = "packed_matvec"
    arrays = {"finv": finv, "v": v, **({} if out is None else {"out": out})}
    backend = _check_same_backend(what, *arrays.values())
    suffix = _float_suffix(*arrays.values(), what=what)
    n_blocks = _check_fisher_blocks(what, finv, block_size, **{k: a for k, a in arrays.items()
                                                               if k != "finv"})
    xp = backend.xp
    if out is None:
        out = xp.empty(n_blocks * block_size, dtype=finv.dtype)
    else:
        _check_no_overlap(what, xp, "out", arrays)
    if n_blocks == 0:
        return out
    if backend.is_gpu:
        kernel = cuda_function("fisher.cu", f"packed_matvec_{suffix}")
        n_threads = int(finv.shape[0]) * int(block_size) * FISHER_TILE
        kernel(_grid(n_threads, max_blocks), (THREADS_PER_BLOCK,),
               (finv, v, out, numpy.int32(n_blocks), numpy.int32(block_size),
                numpy.int32(FISHER_TILE)))
    else:
        from . import cpu_fisher

        cpu_fisher.packed_matvec(finv, v, out, int(block_size))
    return out
