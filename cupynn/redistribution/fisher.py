"""The block-diagonal inverse empirical Fisher, kept by Sherman–Morrison steps.

Blocks are stored packed (upper triangle, row-major: B(B+1)/2 floats per
block) and tiled (entry p of 64 consecutive blocks side by side, see
``kernels/fisher.cu``), so the inverse of a model with n active weights costs
about n·(B+1)/2 floats (plus at most 63 blocks of padding), and nothing grows
with the number of gradients m.

Beyond the blocks, nothing of size n is kept: a gradient arrives as the
layers' own arrays, which :func:`cupynn.kernels.fisher_update` takes. On the
CPU its one compiled call reads them where they are (every tile in parallel,
its scratch per tile); on the GPU, whose kernels read one vector, they are copied
into a small buffer a chunk of tiles at a time (:data:`CHUNK_BLOCKS`), which
the update kernels read, with a scratch of the same size. Products ``F⁻¹ v``
run chunk by chunk and may be written over ``v``.
"""

from __future__ import annotations

from typing import Any

import numpy

from .. import kernels

CHUNK_BLOCKS = 2048  # blocks per kernel call (whole tiles): 2048 x 34 parameters, 272 KiB of float32


def packed_index(block_size: int) -> numpy.ndarray:
    """(B, B) map from (i, j) to the packed position of (min(i,j), max(i,j))."""
    i, j = numpy.meshgrid(numpy.arange(block_size), numpy.arange(block_size), indexing="ij")
    lo, hi = numpy.minimum(i, j), numpy.maximum(i, j)
    return lo * block_size - lo * (lo - 1) // 2 + (hi - lo)


class BlockFisherInverse:
    """Inverse of ``F_b = λI + (1/m) Σ g gᵀ`` for consecutive blocks of size B.

    Parameters
    ----------
    xp : numpy or cupy
    n_params : int
        Number of parameters (the last block is padded with zeros, which
        leaves its padded part at λ⁻¹I and never touches the real entries).
    block_size : int
    damp : float
        λ > 0.
    dtype : float32 or float64
    m : int
        Number of gradients the epoch will bring (the 1/m of the average).
    chunk_blocks : int
        Blocks per kernel call on the GPU and per ``matvec`` step (the size of
        the two buffers), rounded down to whole tiles of
        :data:`cupynn.kernels.FISHER_TILE` blocks (at least one tile). The CPU
        update needs no buffer and ignores it.
    """

    def __init__(self, xp: Any, n_params: int, block_size: int, damp: float, dtype: Any,
                 m: int, chunk_blocks: int = CHUNK_BLOCKS) -> None:
        if m < 1:
            raise ValueError(f"BlockFisherInverse needs m >= 1 gradients. Got {m}.")
        self.xp, self.n_params, self.block_size = xp, int(n_params), int(block_size)
        self.damp, self.m, self.count = float(damp), int(m), 0
        B = self.block_size
        self.n_blocks = max(1, -(-self.n_params // B))
        tile = kernels.FISHER_TILE
        shape = kernels.fisher_shape(self.n_blocks, B)
        self.chunk_tiles = max(1, min(int(chunk_blocks) // tile, shape[0]))
        self.chunk_blocks = self.chunk_tiles * tile
        self._index = packed_index(B)
        self._diag = numpy.diagonal(self._index).tolist()  # packed positions of (i, i)
        self.finv = xp.zeros(shape, dtype=dtype)
        self.finv[:, self._diag, :] = 1.0 / self.damp
        self._g = xp.zeros(self.chunk_blocks * B, dtype=dtype)
        self._work = xp.empty(self.chunk_blocks * B, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return int(self.finv.nbytes + self._g.nbytes + self._work.nbytes)

    def _chunks(self):
        """(first block, stop block, first parameter, stop parameter) per chunk of whole tiles."""
        B, n = self.block_size, self.n_params
        for b0 in range(0, self.n_blocks, self.chunk_blocks):
            b1 = min(self.n_blocks, b0 + self.chunk_blocks)
            yield b0, b1, min(n, b0 * B), min(n, b1 * B)

    def _tiles(self, b0: int, b1: int) -> Any:
        """The tiles of finv that hold blocks b0 .. b1-1 (b0 starts a tile)."""
        tile = kernels.FISHER_TILE
        return self.finv[b0 // tile:-(-b1 // tile)]

    def _plan(self, lengths: tuple[int, ...]) -> list[tuple[Any, ...]]:
        """Per chunk: its blocks, parameters and the copies from the parts that fill it.

        The same every step of an epoch, so it is worked out once per list of
        part lengths.
        """
        plan = getattr(self, "_plan_cache", None)
        if plan is not None and plan[0] == lengths:
            return plan[1]
        ends = numpy.cumsum(lengths)
        steps = []
        for b0, b1, p0, p1 in self._chunks():
            copies = []
            for index, (end, length) in enumerate(zip(ends.tolist(), lengths)):
                start = end - length
                lo, hi = max(p0, start), min(p1, end)
                if lo < hi:
                    copies.append((index, lo - start, hi - start, lo - p0, hi - p0))
            steps.append((b0, b1, p0, p1, (b1 - b0) * self.block_size, copies))
        self._plan_cache = (lengths, steps)
        return steps

    def update(self, parts: list[Any], grad_sum: Any = None) -> None:
        """Fold one gradient (given as consecutive parts) into every block.

        ``grad_sum``, a (n_params,) array of the blocks' dtype, gets the
        gradient added to it.
        """
        lengths = tuple(int(part.shape[0]) for part in parts)
        if sum(lengths) != self.n_params:
            raise ValueError(f"BlockFisherInverse.update: got {sum(lengths)} gradient values for "
                             f"{self.n_params} parameters.")
        if grad_sum is not None and (grad_sum.shape != (self.n_params,)
                                     or grad_sum.dtype != self.finv.dtype
                                     or not grad_sum.flags.c_contiguous):
            raise ValueError(f"BlockFisherInverse.update: grad_sum must be a C-contiguous "
                             f"({self.n_params},) {self.finv.dtype} array. Got "
                             f"{grad_sum.shape} {grad_sum.dtype}.")
        if self.xp is numpy:
            self._update_in_place(parts, grad_sum)
        else:
            self._update_chunks(parts, lengths, grad_sum)
        self.count += 1

    def _update_in_place(self, parts: list[Any], grad_sum: Any) -> None:
        """One kernel call reads the parts where they are: no copies, every tile in
        parallel (the CPU's kernel can; the GPU's read one vector).

        Its inputs are made here with the right dtype and layout, so the
        dispatcher's checks (a tenth of the kernel's time on the paper's HIGGS
        network) are skipped.
        """
        dtype = self.finv.dtype
        parts = [self.xp.ascontiguousarray(part, dtype=dtype) for part in parts]
        kernels.fisher_update(self.finv, parts, self.m, block_size=self.block_size,
                              grad_sum=grad_sum, check=False)

    def _update_chunks(self, parts: list[Any], lengths: tuple[int, ...], grad_sum: Any) -> None:
        """The parts copied into a small buffer a chunk of tiles at a time, one kernel call each."""
        g, work, B, m = self._g, self._work, self.block_size, float(self.m)
        for b0, b1, p0, p1, size, copies in self._plan(lengths):
            for index, src0, src1, dst0, dst1 in copies:
                g[dst0:dst1] = parts[index][src0:src1]
            if p1 - p0 < size:
                g[p1 - p0:size] = 0  # the padding of the last block
            finv = self._tiles(b0, b1)
            kernels.fisher_update(finv, g[:size], m, block_size=B, work=work[:size])
            if grad_sum is not None:  # (the padding of the last block is not the gradient's)
                grad_sum[p0:p1] += g[:p1 - p0]

    def diagonal(self) -> Any:
        """[F⁻¹]_qq for every parameter, (n_params,): one array of n_params, no temporaries."""
        n_tiles, _, tile = self.finv.shape
        B = self.block_size
        out = self.xp.empty(n_tiles * tile * B, dtype=self.finv.dtype)
        blocks = out.reshape(n_tiles, tile, B)
        for i, p in enumerate(self._diag):
            blocks[:, :, i] = self.finv[:, p, :]
        return out[:self.n_params]

    def matvec(self, v: Any, out: Any = None) -> Any:
        """F⁻¹ v for a (n_params,) vector; ``out`` may be ``v`` itself (in place)."""
        xp, B = self.xp, self.block_size
        if out is None:
            out = xp.empty(self.n_params, dtype=self.finv.dtype)
        g, work = self._g, self._work
        for b0, b1, p0, p1 in self._chunks():
            size = (b1 - b0) * B
            g[:p1 - p0] = v[p0:p1]
            if p1 - p0 < size:
                g[p1 - p0:size] = 0
            kernels.packed_matvec(self._tiles(b0, b1), g[:size], block_size=B, out=work[:size])
            out[p0:p1] = work[:p1 - p0]
        return out

    def dense(self, blocks: Any) -> Any:
        """The given blocks unpacked, (len(blocks), B, B)."""
        tile = kernels.FISHER_TILE
        packed = self.finv[blocks // tile, :, blocks % tile]  # (len(blocks), P)
        return packed[:, self.xp.asarray(self._index)]

    def joint_obs_step(self, removed: Any, r: Any, chunk: int = 4096) -> Any:
        """``F⁻¹[:, Q] (F⁻¹[Q, Q])⁻¹ r_Q`` per block, Q the removed entries in it.

        Blocks without removals contribute 0. Returns a (n_params,) vector.
        """
        xp, B = self.xp, self.block_size
        mask = xp.zeros(self.n_blocks * B, dtype=bool)
        mask[removed] = True
        rq = xp.zeros(self.n_blocks * B, dtype=self.finv.dtype)
        rq[removed] = r[removed]
        out = xp.zeros(self.n_blocks * B, dtype=self.finv.dtype)
        affected = xp.flatnonzero(mask.reshape(self.n_blocks, B).any(axis=1))
        eye = xp.eye(B, dtype=self.finv.dtype)
        for start in range(0, int(affected.shape[0]), chunk):
            blocks = affected[start:start + chunk]
            dense = self.dense(blocks)
            q = mask.reshape(self.n_blocks, B)[blocks].astype(dense.dtype)
            # Solve F⁻¹[Q,Q] λ_Q = r_Q, with the identity on the rows/cols outside Q.
            system = dense * q[:, :, None] * q[:, None, :] + eye * (1 - q)[:, :, None]
            lam = xp.linalg.solve(system, rq.reshape(self.n_blocks, B)[blocks][:, :, None])
            step = xp.matmul(dense, lam * q[:, :, None])[:, :, 0]
            out.reshape(self.n_blocks, B)[blocks] = step
        return out[:self.n_params]
