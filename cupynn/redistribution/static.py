"""``static``: the fixed-topology baseline; moves nothing."""

from __future__ import annotations

from ..validation import check_real
from .base import Drop, Redistributor


class Static(Redistributor):
    """Keeps every connection; a redistribution is a no-op (counts are 0)."""

    name = "static"

    def redistribute(self, model, optimizer, fraction, x=None, y=None, loss="cross_entropy", *,
                     total=None, weight=None):
        """Check ``fraction`` and report zero counts; nothing is rebuilt or allocated."""
        check_real(fraction, "fraction", f"{type(self).__name__}.redistribute", 0.0, 1.0)
        return super().redistribute(model, optimizer, 0.0, x, y, loss, total=total)

    def drop(self, model, fraction, probe):
        xp = model.backend.xp
        return [Drop(xp.ones(layer.nnz, dtype=bool)) for layer in model.sparse_layers]

    def grow(self, model, drops, kept_keys, probe):
        xp = model.backend.xp
        return [xp.empty(0, dtype=xp.int64) for _ in kept_keys]
