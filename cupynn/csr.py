"""Small CSR utilities shared by the optimizer and redistribution."""

from __future__ import annotations

from typing import Any

from .backend import backend_of


def row_of_entries(indptr: Any) -> Any:
    """Row index of every stored entry, shape (nnz,), int64, on indptr's device.

    The row of entry k is the last r with indptr[r] <= k (empty rows are
    skipped), found by one vectorised ``searchsorted`` on either backend.
    """
    xp = backend_of(indptr).xp
    nnz = int(indptr[-1])
    positions = xp.arange(nnz, dtype=indptr.dtype)
    return (xp.searchsorted(indptr, positions, side="right") - 1).astype(xp.int64)


def linear_keys(indptr: Any, indices: Any, n_cols: int) -> Any:
    """``row * n_cols + col`` per entry, int64 (int32 would overflow at 46k x 46k)."""
    return row_of_entries(indptr) * n_cols + indices.astype("int64")


def match_entries(old_indptr: Any, old_indices: Any, new_indptr: Any, new_indices: Any,
                  n_cols: int) -> Any:
    """For each entry of the new pattern, its position in the old one, or -1.

    Both patterns must be canonical CSR of the same shape; their linear keys
    are then sorted, so one ``searchsorted`` finds every match.

    Returns
    -------
    (new_nnz,) int64 array on the patterns' device.
    """
    xp = backend_of(new_indices).xp
    old_keys = linear_keys(old_indptr, old_indices, n_cols)
    new_keys = linear_keys(new_indptr, new_indices, n_cols)
    if old_keys.shape[0] == 0:
        return xp.full(new_keys.shape[0], -1, dtype=xp.int64)
    pos = xp.searchsorted(old_keys, new_keys)
    pos_clipped = xp.minimum(pos, old_keys.shape[0] - 1)
    found = old_keys[pos_clipped] == new_keys
    return xp.where(found, pos_clipped, -1).astype(xp.int64)
