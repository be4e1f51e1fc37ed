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
    threshold = kth_largest(scores, k)
    above = xp.flatnonzero(scores > threshold)
    ties = xp.flatnonzero(scores == threshold)[: k - int(above.shape[0])]
    if ties.shape[0] == 0:
        return above.astype(xp.int64, copy=False)
    return xp.sort(xp.concatenate([above, ties])).astype(xp.int64, copy=False)


def bottom_k(scores: Any, k: int) -> Any:
    """Indices of the ``k`` smallest scores, ascending; ties go to lower indices."""
    return top_k(-scores, k)


def kth_largest(scores: Any, k: int, *, overwrite: bool = False) -> Any:
    """The ``k``-th largest of ``scores`` (1 <= k <= n), as a 0-d array of their dtype.

    With ``overwrite`` the partition runs in place on ``scores`` (which it
    reorders) instead of on a copy.
    """
    work = scores if overwrite else scores.copy()
    n = int(work.shape[0])
    work.partition(n - k)
    return work[n - k].copy()


def kth_smallest(scores: Any, k: int, *, overwrite: bool = False) -> Any:
    """The ``k``-th smallest of ``scores`` (1 <= k <= n), as a 0-d array of their dtype."""
    work = scores if overwrite else scores.copy()
    work.partition(k - 1)
    return work[k - 1].copy()


def smallest_mask(scores: Any, k: int, threshold: Any = None) -> Any:
    """Boolean mask of the ``k`` smallest scores; ties go to lower indices.

    The entries :func:`bottom_k` returns, as a mask: no index arrays beyond
    the ties at the threshold. ``threshold``, when given, must be
    ``kth_smallest(scores, k)`` (computed by the caller, for example in place
    on a scratch copy).
    """
    xp = backend_of(scores).xp
    n = int(scores.shape[0])
    if k <= 0:
        return xp.zeros(n, dtype=bool)
    if k >= n:
        return xp.ones(n, dtype=bool)
    if threshold is None:
        threshold = kth_smallest(scores, k)
    mask = scores < threshold
    need = k - int(xp.count_nonzero(mask))
    if need > 0:
        mask[xp.flatnonzero(scores == threshold)[:need]] = True
    return mask


class StreamingTopK:
    """Running top-k of (score, key) pairs pushed in increasing key order.

    Only the best candidates seen so far are kept between pushes, so the
    full set of scores (for example a model's whole dense gradient) never
    exists at once. Since keys arrive in increasing order and candidates stay
    sorted by key, the tie rule of :func:`top_k` (lower position) is the rule
    "lower key wins" over everything pushed.

    Candidates are filtered as they arrive: once ``k`` of them are held, the
    k-th best score is a bar that a later score must beat strictly (an equal
    score arrives with a higher key, so it loses every tie). Candidates that
    pass are appended to one buffer, which is cut back to the best ``k``
    whenever the next push would overflow ``k + slack`` entries (default
    ``slack = max(k // 4, 1024)``); a push that brings more than ``k`` is cut
    to its own best ``k`` first. Memory: the buffer, at most ``2 k`` scores
    and keys, plus one copy of the scores being cut; work: O(pushed + cuts *
    (k + slack)).

    Parameters
    ----------
    xp : numpy or cupy
    k : int
    dtype : dtype of the scores kept (use the pushed scores' dtype; a wider
        one only costs memory)
    key_dtype : dtype of the keys kept (int64 by default; int32 suffices when
        every key fits)
    slack : int, optional

    ``bar`` (a host float, ``-inf`` until the first cut) is the k-th best score
    held at the last cut: a score that does not beat it can never be chosen, so
    a caller that can bound a push's scores by it may skip the push.
    """

    def __init__(self, xp: Any, k: int, dtype: Any = numpy.float64, key_dtype: Any = numpy.int64,
                 slack: int | None = None) -> None:
        self.xp = xp
        self.k = int(k)
        self.slack = max(self.k // 4, 1024) if slack is None else max(1, int(slack))
        self._scores = xp.empty(0, dtype=dtype)
        self._keys = xp.empty(0, dtype=key_dtype)
        self._count = 0
        self._bar: Any = -numpy.inf  # the k-th best held score, once k are held
        self.bar = -numpy.inf  # the same, a host float (read once per cut)
        self._last_key = -1

    @property
    def scores(self) -> Any:
        """Scores of the candidates held now, in key order."""
        return self._scores[:self._count]

    @property
    def keys(self) -> Any:
        """Keys of the candidates held now, ascending."""
        return self._keys[:self._count]

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
        chosen = None
        n = int(scores.shape[0])
        if n >= 4 * self.k:
            # A push much larger than k: a bar from every 8th score, low enough
            # that about 2k pass, skips most of the work. It is only a filter:
            # when at least k scores beat it, the k-th best beats it too, so
            # every score that can be chosen passes; otherwise it is ignored.
            sample = scores[::8]
            j = min(int(sample.shape[0]), 2 * (-(-self.k // 8)) + 8)
            bar = xp.maximum(kth_largest(sample, j), self._bar)
            chosen = xp.flatnonzero(scores > bar)
            if int(chosen.shape[0]) < self.k:
                chosen = None
        if chosen is None:
            chosen = xp.flatnonzero(scores > self._bar)  # never -inf
        c = int(chosen.shape[0])
        if c == 0:
            return
        if c > self.k:  # at most k of them can be among the best: keep those
            values = scores[chosen]
            bar = kth_largest(values, self.k)
            keep = values > bar
            need = self.k - int(xp.count_nonzero(keep))
            if need > 0:
                keep[xp.flatnonzero(values == bar)[:need]] = True
            del values
            chosen = chosen[keep]
            c = self.k
        if self._count + c > self._scores.shape[0]:
            self._cut()
            if self._count + c > self._scores.shape[0]:
                self._resize(max(self.k + self.slack, self._count + c))
        n = self._count
        self._scores[n:n + c] = scores[chosen].astype(self._scores.dtype, copy=False)
        chosen += first_key
        self._keys[n:n + c] = chosen.astype(self._keys.dtype, copy=False)
        self._count = n + c

    def _resize(self, capacity: int) -> None:
        xp = self.xp
        scores = xp.empty(capacity, dtype=self._scores.dtype)
        keys = xp.empty(capacity, dtype=self._keys.dtype)
        scores[:self._count] = self._scores[:self._count]
        keys[:self._count] = self._keys[:self._count]
        self._scores, self._keys = scores, keys

    def _cut(self) -> None:
        """Keep only the best k held candidates (in key order)."""
        xp = self.xp
        n = self._count
        if n <= self.k:
            return
        held = self._scores[:n]
        bar = kth_largest(held, self.k)
        keep = held > bar
        need = self.k - int(xp.count_nonzero(keep))
        if need > 0:
            keep[xp.flatnonzero(held == bar)[:need]] = True
        self._scores[:self.k] = held[keep]
        self._keys[:self.k] = self._keys[:n][keep]
        self._count = self.k
        self._bar = bar
        self.bar = float(bar)

    def result(self) -> Any:
        """The selected keys, ascending (int64)."""
        self._cut()
        return self.keys.astype(numpy.int64)


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


def _members(sorted_keys: Any, queries: Any) -> Any:
    """Boolean mask: which of ``queries`` are in ``sorted_keys`` (sorted, unique)."""
    xp = backend_of(queries).xp
    n = int(sorted_keys.shape[0])
    if n == 0:
        return xp.zeros(queries.shape[0], dtype=bool)
    pos = xp.searchsorted(sorted_keys, queries)
    xp.minimum(pos, n - 1, out=pos)
    return sorted_keys[pos] == queries


def sample_inactive(rng: numpy.random.Generator, xp: Any, active_keys: Any, n_positions: int,
                    k: int) -> Any:
    """``k`` distinct positions of [0, n_positions) not in ``active_keys``, uniformly.

    ``active_keys`` is sorted and unique (on the device). Candidates are drawn
    on the host from ``rng`` (same draws on every backend) and rejected when
    active or already drawn, which is exact sampling without replacement:
    each round keeps, after the positions picked before, the new distinct
    draws in the order they were drawn, up to ``k`` in all. When the free
    positions are few, they are enumerated instead.

    Only the set is returned, so a round needs the draw order only when it
    brings more new positions than still needed; otherwise the draws are
    sorted by value (no index arrays) and checked against the sorted active
    and picked keys.

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
        del mask
        chosen = rng.choice(free, size=k, replace=False)
        return xp.sort(candidates[xp.asarray(chosen)]).astype(xp.int64, copy=False)
    picked = xp.empty(0, dtype=xp.int64)  # sorted
    while int(picked.shape[0]) < k:
        need = k - int(picked.shape[0])
        draw = xp.asarray(rng.integers(0, n_positions, size=int(need * n_positions / free) + 16))
        values = xp.sort(draw)
        fresh = values[1:] != values[:-1]  # first of each run of equal values
        fresh = xp.concatenate([xp.ones(1, dtype=bool), fresh])
        fresh &= ~_members(active_keys, values)
        fresh &= ~_members(picked, values)
        values = values[fresh]
        del fresh
        if int(values.shape[0]) > need:
            # Too many: the first `need` new positions in draw order win.
            order = xp.argsort(draw, kind="stable")
            ordered = draw[order]
            first = xp.concatenate([xp.ones(1, dtype=bool), ordered[1:] != ordered[:-1]])
            first &= ~_members(active_keys, ordered)
            first &= ~_members(picked, ordered)
            positions = xp.sort(order[first])[:need]  # draw positions of the first occurrences
            values = xp.sort(draw[positions])
        del draw
        picked = merge_sorted(picked, values)
    return picked


def merge_sorted(a: Any, b: Any) -> Any:
    """The union of two sorted arrays with no value in common, sorted (no sort)."""
    xp = backend_of(b).xp
    if a.shape[0] == 0:
        return b
    if b.shape[0] == 0:
        return a
    where = xp.searchsorted(a, b)
    where += xp.arange(b.shape[0], dtype=where.dtype)
    out = xp.empty(a.shape[0] + b.shape[0], dtype=xp.result_type(a, b))
    from_a = xp.ones(out.shape[0], dtype=bool)
    from_a[where] = False
    out[where] = b
    out[from_a] = a
    return out
