"""``woodfisher`` and ``woodtaylor``: second-order (OBS) removal, random growth.

Parameters are the active weights of all sparse layers, concatenated in CSR
order and cut into consecutive blocks of ``block_size`` B. The block-diagonal
empirical Fisher ``F_b = λI + (1/m) Σ_i g_i g_i^T`` over the m mini-batch
gradients of the epoch before a redistribution is inverted on the fly:
:meth:`observe` applies one Sherman–Morrison step per gradient as it arrives
(:class:`cupynn.redistribution.fisher.BlockFisherInverse`), so the extra
memory is the packed blocks (B(B+1)/2 floats per B weights), not the gradients.

Removal is global, by the OBS statistic (``r = w`` for woodfisher,
``r = w − F⁻¹ḡ`` for woodtaylor, ḡ the mean of the epoch's gradients)::

    ρ_q = r_q² / (2 [F⁻¹]_qq)

the round(α·nnz) smallest go. Survivors take the OBS update
``δw = −F⁻¹ s`` (woodtaylor: ``δw = −F⁻¹ḡ − F⁻¹ s``) with ``s_q = r_q / [F⁻¹]_qq``
for removed q and 0 otherwise — the sum of the single-weight updates; with
``joint=True`` the exact joint update inside each block,
``δw = −F⁻¹[:, Q] (F⁻¹[Q, Q])⁻¹ r_Q`` (plus ``−F⁻¹ḡ``). Removed weights are
set to exactly 0 and leave the CSR.

Growth: the removed count is shared among layers in proportion to their size
(out × in possible connections, largest remainder; a layer too full to take
its share gives the surplus to the others) and added uniformly at random.
"""

from __future__ import annotations

from typing import Any

import numpy

from ..validation import check_int, check_real
from .base import Drop, Redistributor, chunks
from .fisher import BlockFisherInverse
from .selection import allocate, kth_smallest, round_half_up, smallest_mask


def grow_in_proportion(rng: numpy.random.Generator, model: Any, kept_keys: list[Any]
                       ) -> list[Any]:
    """The total removed count shared among the sparse layers in proportion to their size
    (out x in; largest remainder, capped by free positions), added at random in each."""
    from .random_growth import grow_at_random

    layers = model.sparse_layers
    sizes = [layer.out_features * layer.in_features for layer in layers]
    removed = sum(layer.nnz - int(kept.shape[0]) for layer, kept in zip(layers, kept_keys))
    capacity = [size - int(kept.shape[0]) for size, kept in zip(sizes, kept_keys)]
    return grow_at_random(rng, model, kept_keys, allocate(removed, sizes, capacity))


class WoodFisher(Redistributor):
    """See the module doc.

    Parameters
    ----------
    seed : int
    block_size : int >= 1
        B, the Fisher block size (default 34, as in the paper).
    damp : float > 0
        λ, the dampening (default 1e-4).
    joint : bool
        Exact joint OBS update inside each block instead of the sum of
        single-weight updates.
    fisher_batches : int >= 1, optional
        Build the Fisher from the last ``fisher_batches`` mini-batch gradients
        of the epoch only (default: all of them, the paper's choice): the
        per-batch Sherman–Morrison update then runs on those batches alone.
        WoodTaylor's mean gradient ḡ is taken over the same batches.
    """

    name = "woodfisher"
    is_global = True
    taylor = False
    default_damp = 1e-4

    def __init__(self, *, seed: int = 0, block_size: int = 34, damp: float | None = None,
                 joint: bool = False, fisher_batches: int | None = None) -> None:
        super().__init__(seed=seed)
        owner = type(self).__name__
        self.block_size = check_int(block_size, "block_size", owner, low=1)
        self.damp = check_real(self.default_damp if damp is None else damp, "damp", owner, 0.0,
                               None, closed="neither")
        if not isinstance(joint, bool):
            raise TypeError(f"The 'joint' parameter of {owner} must be a bool. Got {joint!r}.")
        self.joint = joint
        self.fisher_batches = (None if fisher_batches is None
                               else check_int(fisher_batches, "fisher_batches", owner, low=1))
        self.fisher: BlockFisherInverse | None = None
        self._grad_sum: Any = None
        self._skip = 0  # gradients of the epoch before the ones the Fisher takes
        self.per_layer = False  # remove round(α·nnz) per layer (a composition's scope="layer")

    def start_epoch(self, model: Any, n_batches: int, will_redistribute: bool) -> None:
        """Start a fresh Fisher inverse when this epoch ends in a redistribution."""
        self.fisher = None
        self._grad_sum = None
        if will_redistribute:
            m = n_batches if self.fisher_batches is None else min(self.fisher_batches, n_batches)
            self._skip = n_batches - m
            n_params = sum(layer.nnz for layer in model.sparse_layers)
            self.fisher = BlockFisherInverse(model.backend.xp, n_params, self.block_size,
                                             self.damp, model.dtype, m)
            if self.taylor:
                self._grad_sum = model.backend.xp.zeros(n_params, dtype=model.dtype)

    def observe(self, model: Any) -> None:
        """One Sherman–Morrison step with the gradient of the last backward pass."""
        if self.fisher is None:
            return
        if self._skip > 0:  # not yet among the last fisher_batches of the epoch
            self._skip -= 1
            return
        self.fisher.update([layer.grad_data for layer in model.sparse_layers], self._grad_sum)

    def drop(self, model, fraction, probe):
        fisher = self.fisher
        layers = model.sparse_layers
        if fisher is None or fisher.count == 0:
            raise RuntimeError(
                f"{self.name} removes by the Fisher of the epoch before the redistribution: call "
                f"start_epoch(model, n_batches, True) and observe(model) after every backward "
                f"pass of that epoch (cupynn.fit does this).")
        xp = model.backend.xp
        n = sum(layer.nnz for layer in layers)
        if n != fisher.n_params:
            raise RuntimeError(f"{self.name}: the topology changed since the Fisher was started.")
        # Memory: besides the blocks, at most the diagonal, ρ (later s, then the
        # step), the removal mask and, for woodtaylor, F⁻¹ḡ (in ḡ's buffer);
        # r = w − F⁻¹ḡ is recomputed per chunk where needed, w read from the layers.
        newton = None
        if self.taylor:
            newton = self._grad_sum
            self._grad_sum = None
            newton /= fisher.count
            fisher.matvec(newton, out=newton)
        diag = fisher.diagonal()

        def pieces():
            """(start, stop, r) over the parameters, chunk by chunk."""
            offset = 0
            for layer in layers:
                for a, b in chunks(layer.nnz):
                    r = layer.data[a:b]
                    if newton is not None:
                        r = r - newton[offset + a:offset + b]
                    yield offset + a, offset + b, r
                offset += layer.nnz

        rho = xp.empty(n, dtype=model.dtype)
        for a, b, r in pieces():
            rho[a:b] = r * r / (2 * diag[a:b])
        k = round_half_up(fraction * n)
        if self.per_layer:  # round(α·nnz) of each layer, by the OBS score
            removed = xp.empty(n, dtype=bool)
            offset = 0
            for layer in layers:
                stop = offset + layer.nnz
                removed[offset:stop] = smallest_mask(rho[offset:stop],
                                                     round_half_up(fraction * layer.nnz))
                offset = stop
        elif 0 < k < n:
            threshold = kth_smallest(rho, k, overwrite=True)
            for a, b, r in pieces():  # the partition reordered rho
                rho[a:b] = r * r / (2 * diag[a:b])
            removed = smallest_mask(rho, k, threshold)
        else:
            removed = xp.full(n, k >= n, dtype=bool)
        if self.joint:
            r = xp.concatenate([r for *_, r in pieces()])
            step = fisher.joint_obs_step(xp.flatnonzero(removed), r)
            del r
        else:
            step = rho  # s_q = r_q / [F⁻¹]_qq on the removed, 0 elsewhere; then F⁻¹ s
            for a, b, r in pieces():
                step[a:b] = xp.where(removed[a:b], r / diag[a:b], 0)
            fisher.matvec(step, out=step)
        del diag, rho
        self.fisher = None  # the blocks are freed as soon as they are used
        fisher = None
        step *= -1
        if newton is not None:
            step -= newton
        del newton
        drops, offset = [], 0
        for layer in layers:
            stop = offset + layer.nnz
            values = layer.data + step[offset:stop]
            gone = removed[offset:stop]
            values[gone] = 0  # exactly zero, and gone from the CSR below
            drops.append(Drop(~gone, values))
            offset = stop
        return drops

    def grow(self, model, drops, kept_keys, probe):
        return grow_in_proportion(self.rng, model, kept_keys)


class WoodTaylor(WoodFisher):
    """WoodFisher with the gradient term (see the module doc); default λ = 1,
    which the paper found much better for woodtaylor on KMNIST."""

    name = "woodtaylor"
    taylor = True
    default_damp = 1.0
