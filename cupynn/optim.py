"""Adam, hand-written, with moments aligned to each layer's parameter arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy

from . import kernels
from .backend import backend_of
from .csr import match_entries
from .kernels.adam import AdamPointers, adam_multi, adam_setting
from .layers import Layer, SparseLinear
from .validation import check_real

STEPS_PER_TABLE = 256  # rows of the multi-tensor update's table of coming steps


class Adam:
    """Adam (Kingma & Ba) with bias correction.

    At step ``t``, for every parameter ``p`` with gradient ``g``::

        m <- b1 m + (1 - b1) g
        v <- b2 v + (1 - b2) g**2
        p <- p - lr * (m / (1 - b1**t)) / (sqrt(v / (1 - b2**t)) + eps)

    One fused kernel per parameter array (``kernels/adam.cu`` on the GPU, its
    Numba twin on the CPU), or with ``multi_tensor`` one launch for every
    array of a dtype (:func:`cupynn.kernels.adam.adam_multi`, issue 19; the
    same bits). The multi-tensor launch reads its scalars from the device: a
    table of the next :data:`STEPS_PER_TABLE` steps' :class:`AdamScalars`, made
    on the host with the expressions of the per-array path and copied once per
    that many steps (or when ``lr``, ``betas`` or ``eps`` change), and a
    ``row`` argument that is a one-element view of a device ``arange``, so an
    eager step copies nothing for its scalars. A captured CUDA graph would
    instead hold a table of the epoch's steps and point ``row`` at a device
    counter that a kernel captured after the update advances; the arrays'
    address tables (:class:`~cupynn.kernels.adam.AdamPointers`) are made again
    only when arrays move (a redistribution, :meth:`remap`, new gradients).

    The moments of a sparse layer are flat arrays aligned with its CSR
    ``data``; when redistribution changes a layer's topology, :meth:`remap`
    carries the moments of kept entries over and starts new entries at zero.

    Parameters
    ----------
    model : MLP (or any object with a ``layers`` list of :class:`Layer`)
    lr : float > 0
    betas : (float, float), each in [0, 1)
    eps : float > 0, representable in the model's dtype
    multi_tensor : bool, optional
        One launch for all arrays instead of one per array; ``None`` (the
        default) follows :func:`cupynn.kernels.adam.adam_setting`
        (``$CUPYNN_ADAM=multi|per-array``, default ``per-array``).
    """

    def __init__(self, model: Any, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, multi_tensor: bool | None = None) -> None:
        owner = "Adam"
        if multi_tensor is not None and not isinstance(multi_tensor, (bool, numpy.bool_)):
            raise ValueError(f"The 'multi_tensor' parameter of {owner} must be True, False or "
                             f"None. Got {multi_tensor!r} instead.")
        self._multi_tensor_given = multi_tensor
        self.multi_tensor = (adam_setting() == "multi" if multi_tensor is None
                             else bool(multi_tensor))
        # Per dtype: the address tables and the table of coming steps of adam_multi.
        self._pointers: dict[Any, AdamPointers] = {}
        self._steps: dict[Any, _StepTable] = {}
        self.lr = check_real(lr, "lr", owner, 0.0, None, closed="neither")
        if not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"The 'betas' parameter of {owner} must be a pair of floats. "
                             f"Got {betas!r} instead.")
        self.betas = tuple(check_real(b, "betas", owner, 0.0, 1.0, closed="left") for b in betas)
        self.eps = check_real(eps, "eps", owner, 0.0, None, closed="neither")
        self.model = model
        self.layers: list[Layer] = list(model.layers)
        dtypes = {layer.dtype for layer in self.layers}
        for dtype in dtypes:
            if dtype.type(self.eps) == 0:
                raise ValueError(f"The 'eps' parameter of {owner} underflows to 0 in {dtype}. "
                                 f"Got {eps!r} instead.")
        self.t = 0
        # state[layer index][name] = (m, v), flat arrays on the layer's device.
        self.state: list[dict[str, tuple[Any, Any]]] = []
        for layer in self.layers:
            xp = layer.backend.xp
            self.state.append({
                name: (xp.zeros(value.size, dtype=value.dtype), xp.zeros(value.size, dtype=value.dtype))
                for name, value, _ in layer.parameters()
            })

    def state_dict(self) -> dict[str, Any]:
        """Step count, hyper-parameters and every moment (host copies).

        Moments are keyed ``"<layer>.<name>.m"`` / ``".v"``.
        """
        from .backend import to_numpy

        state: dict[str, Any] = {"t": self.t, "lr": self.lr, "betas": list(self.betas),
                                 "eps": self.eps}
        for index, moments in enumerate(self.state):
            for name, (m, v) in moments.items():
                state[f"{index}.{name}.m"] = to_numpy(m).copy()
                state[f"{index}.{name}.v"] = to_numpy(v).copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; moments must match the parameters' sizes."""
        self.t = int(state["t"])
        self.lr, self.betas, self.eps = float(state["lr"]), tuple(state["betas"]), float(state["eps"])
        for index, layer in enumerate(self.layers):
            xp = layer.backend.xp
            for name, value, _ in layer.parameters():
                m, v = (state[f"{index}.{name}.{k}"] for k in ("m", "v"))
                if m.shape != (value.size,) or v.shape != (value.size,):
                    raise ValueError(f"Adam.load_state_dict: moments of layer {index} {name!r} "
                                     f"must have shape ({value.size},). Got {m.shape} instead.")
                # Copies: on the CPU asarray would keep the caller's arrays, and the
                # steps would then change their state dict (or another optimizer's).
                self.state[index][name] = (xp.array(m, dtype=value.dtype),
                                           xp.array(v, dtype=value.dtype))

    def __getstate__(self) -> dict[str, Any]:
        """The model (pickled by its own rules), :meth:`state_dict` (host copies) and
        ``multi_tensor`` as it was given (None: the loading process's setting)."""
        return {"model": self.model, "state": self.state_dict(),
                "multi_tensor": self._multi_tensor_given}

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state["state"]
        self.__init__(state["model"], lr=saved["lr"], betas=tuple(saved["betas"]),
                      eps=saved["eps"], multi_tensor=state.get("multi_tensor"))
        self.load_state_dict(saved)

    def hyper(self, t: int) -> dict[str, float]:
        """The hyper-parameters of step ``t`` as :func:`kernels.adam_scalars` takes them:
        one expression for both updates, so that they give the same bits."""
        b1, b2 = self.betas
        return dict(lr=self.lr, b1=b1, b2=b2, eps=self.eps, bc1=1.0 - b1 ** t,
                    bc2=1.0 - b2 ** t)

    def scalar_table(self, first: int, n: int, dtype: Any) -> numpy.ndarray:
        """The :class:`kernels.AdamScalars` of steps ``first ... first + n - 1`` as the
        rows of a host (n, 8) array of ``dtype``, for :func:`kernels.adam_multi`. Each
        row is what ``kernels.adam_scalars(dtype, **self.hyper(t))`` gives, the
        per-array update's bits: only the bias corrections change from row to row,
        each computed with Python's ``**`` as :meth:`hyper` does and rounded once."""
        constant = kernels.adam_scalars(dtype, **self.hyper(first))
        steps = [self.hyper(t) for t in range(first, first + n)]
        table = numpy.empty((n, 8), dtype=dtype)
        table[:, :6] = numpy.array(constant[:6], dtype=dtype)
        table[:, 6] = numpy.array([h["bc1"] for h in steps]).astype(dtype)
        table[:, 7] = numpy.array([h["bc2"] for h in steps]).astype(dtype)
        return table

    def step(self) -> None:
        """Apply one update from the gradients of the last backward pass."""
        self.t += 1
        hyper = self.hyper(self.t)
        scalars: dict[Any, kernels.AdamScalars] = {}  # per dtype, made once a step
        groups: dict[Any, list[list[Any]]] = {}  # per dtype: ps, gs, ms, vs for adam_multi
        for p, g, m, v, odd in self.arrays():
            if self.multi_tensor and not odd:
                group = groups.setdefault(p.dtype, [[], [], [], []])
                for arrays, a in zip(group, (p, g, m, v)):
                    arrays.append(a)
                continue
            if p.dtype not in scalars:
                scalars[p.dtype] = kernels.adam_scalars(p.dtype, **hyper)
            kernels.adam(p, g, m, v, scalars[p.dtype], check=odd)
        for dtype, (ps, gs, ms, vs) in groups.items():
            if dtype not in self._steps:
                self._steps[dtype] = _StepTable(backend_of(ps[0]).xp, dtype)
                self._pointers[dtype] = AdamPointers()
            table, row = self._steps[dtype].at(self)
            adam_multi(ps, gs, ms, vs, table, row, pointers=self._pointers[dtype], check=False)

    def arrays(self) -> Any:
        """(p, g, m, v, odd) for every parameter array, flat, in the model's order (the
        arrays :meth:`step` updates; ``cupynn.graph`` points its update at them);
        ``odd`` when an array the user can swap needs the kernel's own checks."""
        for index, layer in enumerate(self.layers):
            for name, value, grad in layer.parameters():
                if grad is None:
                    raise RuntimeError(f"Adam.step: layer {index} has no gradient for {name!r}; "
                                       f"call model.backward first.")
                m, v = self.state[index][name]
                if m.shape[0] != value.size:
                    raise RuntimeError(f"Adam.step: the moments of layer {index} {name!r} have "
                                       f"{m.shape[0]} entries for {value.size} values; the "
                                       f"topology changed without Adam.remap.")
                p, g = value.reshape(-1), grad.reshape(-1)
                # The moments are this optimizer's own (flat, contiguous, the value's
                # dtype) and so are the scalars; what a user can swap is checked here,
                # and anything odd is left to the kernel's checks for their error.
                odd = (g.dtype != p.dtype or g.shape != p.shape or not p.flags.c_contiguous
                       or not g.flags.c_contiguous or type(g) is not type(p)
                       or m.dtype != p.dtype)
                yield p, g, m, v, odd

    def remap(self, layer: SparseLinear | int, mapping: Any) -> None:
        """Re-align a sparse layer's ``data`` moments with a new topology.

        Parameters
        ----------
        layer : SparseLinear or its index in ``model.layers``
        mapping : (new_nnz,) int array
            For each entry of the new ``data``, its position in the old one,
            or -1 for a new entry (its moments start at 0).
        """
        index = layer if isinstance(layer, int) else self._index(layer)
        target = self.layers[index]
        xp = target.backend.xp
        mapping = xp.asarray(mapping)
        if mapping.shape != (target.nnz,):
            raise ValueError(f"Adam.remap: mapping must have shape ({target.nnz},) (the layer's new "
                             f"nnz). Got {mapping.shape} instead.")
        kept = mapping >= 0
        sources = mapping[kept]
        # One moment at a time, each old one freed as soon as it is replaced:
        # redistribution runs this on the largest layers.
        for which in range(2):
            moments = list(self.state[index]["data"])
            moment = xp.zeros(target.nnz, dtype=moments[which].dtype)
            if sources.shape[0]:
                moment[kept] = moments[which][sources]
            moments[which] = moment
            self.state[index]["data"] = tuple(moments)
            del moments, moment

    def remap_from_pattern(self, layer: SparseLinear, old_indptr: Any, old_indices: Any) -> Any:
        """:meth:`remap` by matching the layer's new CSR pattern with its old one.

        Returns the mapping used (new entry -> old position or -1).
        """
        mapping = match_entries(old_indptr, old_indices, layer.indptr, layer.indices,
                                layer.in_features)
        self.remap(layer, mapping)
        return mapping

    def _index(self, layer: Layer) -> int:
        for i, candidate in enumerate(self.layers):
            if candidate is layer:
                return i
        raise ValueError("Adam.remap: the layer is not one of this optimizer's model layers.")

    def moments(self, layer: Layer | int, name: str) -> tuple[Any, Any]:
        """The (m, v) arrays of a parameter, flat."""
        index = layer if isinstance(layer, int) else self._index(layer)
        return self.state[index][name]


class _StepTable:
    """The scalars of the coming steps in one dtype, for :func:`adam_multi`.

    ``table`` (STEPS_PER_TABLE, 8) holds, on the device, the :class:`AdamScalars`
    of steps ``first``, ``first + 1``, ... made by :meth:`Adam.scalar_table`
    (the per-array path's bits); ``rows`` is
    ``arange(STEPS_PER_TABLE)`` on the device, and step t's ``row`` argument is
    the view ``rows[t - first:t - first + 1]``: no copy a step. The table is
    made again when a step falls outside it or the hyper-parameters it was
    made with change (a loaded state, a user's new ``lr``).
    """

    def __init__(self, xp: Any, dtype: Any) -> None:
        self.xp, self.dtype = xp, dtype
        self.made_with: tuple | None = None
        self.first = 0
        self.table: Any = None
        self.rows = xp.arange(STEPS_PER_TABLE, dtype=xp.int64)

    def at(self, optimizer: Adam) -> tuple[Any, Any]:
        """``(table, row)`` for the optimizer's step ``t``."""
        t = optimizer.t
        made_with = (optimizer.lr, optimizer.betas, optimizer.eps)
        if made_with != self.made_with or not 0 <= t - self.first < STEPS_PER_TABLE:
            host = optimizer.scalar_table(t, STEPS_PER_TABLE, self.dtype)
            self.table = self.xp.asarray(host)  # one host-to-device copy per table
            self.made_with, self.first = made_with, t
        k = t - self.first
        return self.table, self.rows[k:k + 1]
