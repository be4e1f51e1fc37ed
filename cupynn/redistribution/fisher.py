"""The block-diagonal inverse empirical Fisher, kept by Sherman–Morrison steps.

Blocks are stored packed (upper triangle, row-major: B(B+1)/2 floats per
block, see ``kernels/fisher.cu``), so the inverse of a model with n active
weights costs about n·(B+1)/2 floats, and nothing grows with the number of
gradients m.
"""

from __future__ import annotations

from typing import Any

import numpy

from .. import kernels


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
    """

    def __init__(self, xp: Any, n_params: int, block_size: int, damp: float, dtype: Any,
                 m: int) -> None:
        if m < 1:
            raise ValueError(f"BlockFisherInverse needs m >= 1 gradients. Got {m}.")
        self.xp, self.n_params, self.block_size = xp, int(n_params), int(block_size)
        self.damp, self.m, self.count = float(damp), int(m), 0
        B = self.block_size
        self.n_blocks = max(1, -(-self.n_params // B))
        self._index = packed_index(B)
        self._diag = xp.asarray(numpy.diagonal(self._index).copy())
        self.finv = xp.zeros((self.n_blocks, B * (B + 1) // 2), dtype=dtype)
        self.finv[:, self._diag] = 1.0 / self.damp
        self._g = xp.zeros(self.n_blocks * B, dtype=dtype)
        self._work = xp.empty(self.n_blocks * B, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return int(self.finv.nbytes + self._g.nbytes + self._work.nbytes)

    def update(self, parts: list[Any]) -> Any:
        """Fold one gradient (given as consecutive parts) into every block.

        Returns the gradient as one flat (n_params,) view.
        """
        start = 0
        for part in parts:
            self._g[start:start + part.shape[0]] = part
            start += part.shape[0]
        if start != self.n_params:
            raise ValueError(f"BlockFisherInverse.update: got {start} gradient values for "
                             f"{self.n_params} parameters.")
        kernels.fisher_update(self.finv, self._g, float(self.m), block_size=self.block_size,
                              work=self._work)
        self.count += 1
        return self._g[:self.n_params]

    def diagonal(self) -> Any:
        """[F⁻¹]_qq for every parameter, (n_params,)."""
        return self.finv[:, self._diag].reshape(-1)[:self.n_params]

    def matvec(self, v: Any) -> Any:
        """F⁻¹ v for a (n_params,) vector."""
        padded = self.xp.zeros(self.n_blocks * self.block_size, dtype=self.finv.dtype)
        padded[:self.n_params] = v
        return kernels.packed_matvec(self.finv, padded, block_size=self.block_size)[:self.n_params]

    def dense(self, blocks: Any) -> Any:
        """The given blocks unpacked, (len(blocks), B, B)."""
        return self.finv[blocks][:, self.xp.asarray(self._index)]

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
