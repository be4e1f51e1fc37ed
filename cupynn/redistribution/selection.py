"""Selection primitives shared by every redistribution algorithm.

All work on the arrays' own device (NumPy or CuPy) and are deterministic: ties
in a score are broken by position (the lower index, or the lower linear key
``row * n_cols + col``, wins), so a brute-force reference that sorts by
``(-score, key)`` selects exactly the same entries.
"""

from __future__ import annotations

import math
from typing import Any

import numpy

from ..backend import backend_of


def round_half_up(x: float) -> int:
    """round() without banker's rounding: 2.5 -> 3."""
    return int(math.floor(x + 0.5))


def top_k(scores: Any, k: int) -> Any:
    """Indices of the ``k`` largest scores, ascending; ties go to lower indices.

    O(n) partition plus a sort of the selection only. ``-inf`` scores are
    selected only when fewer than ``k`` others exist (callers filter them).
    """
    xp = backend_of(scores).xp
    n = int(scores.shape[0])
    if k <= 0:
        return xp.empty(0, dtype=xp.int64)
    if k >= n:
        return xp.arange(n, dtype=xp.int64)
    threshold = xp.partition(scores, n - k)[n - k]  # the k-th largest value
    above = xp.flatnonzero(scores > threshold)
    ties = xp.flatnonzero(scores == threshold)[: k - int(above.shape[0])]
    return xp.sort(xp.concatenate([above, ties])).astype(xp.int64)


def bottom_k(scores: Any, k: int) -> Any:
    """Indices of the ``k`` smallest scores, ascending; ties go to lower indices."""
    return top_k(-scores, k)


class StreamingTopK:
    """Running top-k of (score, key) pairs pushed in increasing key order.

    Only the current ``k`` best candidates are kept between pushes, so the
    full set of scores (for example a model's whole dense gradient) never
    exists at once. Since keys arrive in increasing order and candidates stay
    sorted by key, the tie rule of :func:`top_k` (lower position) is the rule
    "lower key wins" over everything pushed.
    """

    def __init__(self, xp: Any, k: int, dtype: Any = numpy.float64) -> None:
        self.xp = xp
        self.k = int(k)
        self.scores = xp.empty(0, dtype=dtype)
        self.keys = xp.empty(0, dtype=xp.int64)
        self._last_key = -1

    def push(self, scores: Any, first_key: int) -> None:
        """Offer the candidates with keys ``first_key + arange(len(scores))``.

        ``first_key`` must exceed every key pushed before. Scores of ``-inf``
        mark positions that may not be chosen.
        """
        xp = self.xp
        if first_key <= self._last_key:
            raise ValueError("StreamingTopK.push: keys must arrive in increasing order.")
        self._last_key = first_key + int(scores.shape[0]) - 1
        if self.k <= 0 or scores.shape[0] == 0:
            return
        best = top_k(scores, self.k)
        best = best[scores[best] > -xp.inf]
        if best.shape[0] == 0:
            return
        cand_scores = xp.concatenate([self.scores, scores[best].astype(self.scores.dtype)])
        cand_keys = xp.concatenate([self.keys, best + first_key])
        keep = top_k(cand_scores, self.k)
        self.scores, self.keys = cand_scores[keep], cand_keys[keep]

    def result(self) -> Any:
        """The selected keys, ascending."""
        return self.keys


def allocate(total: int, weights: Any, capacity: Any) -> numpy.ndarray:
    """Split ``total`` into integer parts proportional to ``weights``, capped.

    Largest-remainder rounding (ties to the lower index); a part that exceeds
    its ``capacity`` is capped and the surplus is shared among the others by
    the same rule, until everything is placed. Host arrays (one entry per
    layer or per neuron).

    Raises
    ------
    ValueError
        When ``total`` exceeds the capacity of the slots with positive weight.
    """
    weights = numpy.asarray(weights, dtype=numpy.float64)
    capacity = numpy.asarray(capacity, dtype=numpy.int64)
    usable = int(capacity[weights > 0].sum())
    if total > usable:
        raise ValueError(f"Cannot place {total} entries in a capacity of {usable}.")
    parts = numpy.zeros(len(weights), dtype=numpy.int64)
    remaining = int(total)
    while remaining > 0:
        open_ = parts < capacity
        w = numpy.where(open_, weights, 0.0)
        if w.sum() <= 0:
            raise ValueError(f"Cannot place {remaining} more entries: every slot with "
                             f"capacity left has weight 0.")
        exact = remaining * w / w.sum()
        share = numpy.floor(exact).astype(numpy.int64)
        leftover = remaining - int(share.sum())
        order = numpy.lexsort((numpy.arange(len(w)), -(exact - share)))
        share[order[:leftover]] += 1
        share = numpy.minimum(share, capacity - parts)
        parts += share
        remaining -= int(share.sum())
    return parts


def keys_to_csr(keys: Any, n_rows: int, n_cols: int) -> tuple[Any, Any]:
    """CSR (indptr, indices) int32 from sorted, unique linear keys."""
    xp = backend_of(keys).xp
    rows = keys // n_cols
    indices = (keys - rows * n_cols).astype(xp.int32)
    indptr = xp.searchsorted(rows, xp.arange(n_rows + 1, dtype=rows.dtype), side="left")
    return indptr.astype(xp.int32), indices


def sample_inactive(rng: numpy.random.Generator, xp: Any, active_keys: Any, n_positions: int,
                    k: int) -> Any:
    """``k`` distinct positions of [0, n_positions) not in ``active_keys``, uniformly.

    ``active_keys`` is sorted and unique (on the device). Candidates are drawn
    on the host from ``rng`` (same draws on every backend) and rejected when
    active or already drawn, which is exact sampling without replacement.
    When the free positions are few, they are enumerated instead.

    Returns the keys, ascending, int64.
    """
    n_active = int(active_keys.shape[0])
    free = n_positions - n_active
    if k > free:
        raise ValueError(f"Cannot add {k} entries: only {free} free positions.")
    if k <= 0:
        return xp.empty(0, dtype=xp.int64)
    if free < 4 * k or n_positions <= 1 << 16:
        mask = xp.ones(n_positions, dtype=bool)
        mask[active_keys] = False
        candidates = xp.flatnonzero(mask)
        chosen = rng.choice(free, size=k, replace=False)
        return xp.sort(candidates[xp.asarray(chosen)]).astype(xp.int64)
    picked = xp.empty(0, dtype=xp.int64)
    while int(picked.shape[0]) < k:
        need = k - int(picked.shape[0])
        draw = xp.asarray(rng.integers(0, n_positions, size=int(need * n_positions / free) + 16))
        pos = xp.minimum(xp.searchsorted(active_keys, draw), max(n_active - 1, 0))
        if n_active:
            draw = draw[active_keys[pos] != draw]
        merged = xp.concatenate([picked, draw])
        _, first = xp.unique(merged, return_index=True)
        picked = merged[xp.sort(first)][:k]  # draw order kept: earlier draws win
    return xp.sort(picked)
