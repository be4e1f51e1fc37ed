"""The masked-dense peer: cupynn's MLPs trained the way most sparse-training code does it.

Most dynamic-sparse-training code (RigL and SET ports to PyTorch, and their
descendants) keeps every layer's weights as a dense ``(out, in)`` tensor and a
dense 0/1 mask of the same shape:

* the forward pass multiplies them, ``F.linear(h, w * mask, b)``, so autograd
  forms the dense ``(out, in)`` weight gradient (zero outside the mask only
  because of the multiplication) and ``torch.optim.Adam`` keeps two dense
  moments per weight;
* after every optimizer step the mask is applied again (``w.mul_(mask)``), as
  that code does to keep pruned weights at exactly zero;
* a redistribution (here RigL's global variant, to match cupynn's
  ``gradient-global``) drops the smallest |w| per layer and grows at the
  largest |dL/d(w * mask)| among inactive positions over all layers, zeroing
  the new weights and the optimizer moments of every changed position.

:class:`MaskedDensePeer` builds such a model from a cupynn model's
:meth:`cupynn.MLP.state_dict`, so the peer starts from the same topology (the
same per-row counts) and the same values, and one training step of each
computes the same thing. This module imports PyTorch; cupynn never does, and
the benchmarks import this module only when ``import torch`` works.

With ``graph=True`` (CUDA only) the peer trains as PyTorch's documentation
shows for whole-network capture: ``torch.optim.Adam(..., capturable=True)``,
warm-up steps on a side stream, then forward, loss, backward, the optimizer's
step and the masks re-applied captured once as a ``torch.cuda.CUDAGraph``,
each batch copied into static input and target tensors before a replay: the
peer of cupynn's own CUDA-graph step (``cupynn.graph``, issue 19).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy
import torch
import torch.nn.functional as F

VERSION = torch.__version__
# torch.optim.Adam's implementations: PyTorch's choice for the device (the per-tensor loop on
# the CPU, "foreach" on CUDA), or one named.
ADAM_IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
GRAPH_WARMUP = 3  # eager steps on a side stream before a capture


def set_threads(n: int) -> None:
    """Use ``n`` intra-op threads (the benchmarks match Numba's thread count)."""
    torch.set_num_threads(int(n))


def device_for(gpu: bool) -> tuple[torch.device | None, str]:
    """The torch device matching cupynn's backend, or None and why not."""
    if not gpu:
        return torch.device("cpu"), ""
    if not torch.cuda.is_available():
        return None, (f"torch {VERSION} has no CUDA device (a CPU-only build?), so it cannot run "
                      f"beside cupynn's GPU backend")
    return torch.device("cuda"), ""


def describe(device: torch.device) -> str:
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"cpu, {torch.get_num_threads()} threads")
    return f"torch {VERSION} ({where})"


class MaskedDensePeer:
    """A masked-dense MLP, its ``torch.optim.Adam`` and one training step.

    Parameters
    ----------
    state : dict of host arrays
        :meth:`cupynn.MLP.state_dict` of the model to copy: sparse layers
        (``"<i>.indptr"``, ``"<i>.indices"``, ``"<i>.data"``) become a dense
        weight that is zero outside the pattern plus a float 0/1 mask; dense
        layers (``"<i>.weight"``) stay plain dense layers without a mask.
    sizes : sequence of int
    device : torch.device
    dtype : {"float32", "float64"}
    loss : {"cross_entropy", "binary_cross_entropy"}
    lr, betas, eps : torch.optim.Adam's settings (its defaults otherwise)
    adam : {"default", "foreach", "fused"}
        Which implementation of torch.optim.Adam (see ``ADAM_IMPLEMENTATIONS``).
    graph : bool
        :meth:`train_epoch` replays one CUDA graph of the whole step for every
        full batch (:meth:`capture`); Adam is then made ``capturable``. CUDA only.
    """

    def __init__(self, state: dict[str, numpy.ndarray], sizes: Sequence[int], device: torch.device,
                 dtype: str = "float32", loss: str = "cross_entropy", lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 adam: str = "default", graph: bool = False) -> None:
        if graph and device.type != "cuda":
            raise ValueError(f"MaskedDensePeer(graph=True) needs a CUDA device. Got {device}.")
        self.sizes, self.device, self.loss = tuple(sizes), device, loss
        self.graphed = bool(graph)
        self.graph: Any = None  # a torch.cuda.CUDAGraph, captured by the first full batch
        self.dtype = getattr(torch, dtype)
        self.weights: list[torch.Tensor] = []
        self.masks: list[torch.Tensor | None] = []
        self.biases: list[torch.Tensor] = []
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            if f"{i}.weight" in state:
                w = torch.tensor(state[f"{i}.weight"], device=device, dtype=self.dtype)
                mask = None
            else:
                counts = numpy.diff(state[f"{i}.indptr"])
                rows = torch.repeat_interleave(torch.arange(fan_out, device=device),
                                               torch.as_tensor(counts, device=device))
                cols = torch.as_tensor(state[f"{i}.indices"], device=device).long()
                w = torch.zeros(fan_out, fan_in, dtype=self.dtype, device=device)
                w[rows, cols] = torch.as_tensor(state[f"{i}.data"], device=device).to(self.dtype)
                mask = torch.zeros(fan_out, fan_in, dtype=self.dtype, device=device)
                mask[rows, cols] = 1
                del rows, cols
            self.weights.append(w.requires_grad_())
            self.masks.append(mask)
            self.biases.append(torch.tensor(state[f"{i}.bias"], device=device, dtype=self.dtype)
                               .requires_grad_())
        params = [p for pair in zip(self.weights, self.biases) for p in pair]
        # capturable: Adam keeps its step count on the device, so that a replay advances it.
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps,
                                          **ADAM_IMPLEMENTATIONS[adam],
                                          **({"capturable": True} if graph else {}))

    # ---------------------------------------------------------------- structure
    @property
    def n_weights(self) -> int:
        """Active weights: ones in the masks, plus every weight of the dense layers."""
        return int(sum(w.numel() if m is None else int(m.sum().item())
                       for w, m in zip(self.weights, self.masks)))

    def sparse_values(self, index: int, indptr: numpy.ndarray,
                      indices: numpy.ndarray) -> numpy.ndarray:
        """Layer ``index``'s weights at a CSR pattern, in CSR order (host copy)."""
        rows = numpy.repeat(numpy.arange(len(indptr) - 1), numpy.diff(indptr))
        return self.weights[index].detach().cpu().numpy()[rows, indices]

    # ---------------------------------------------------------------- step
    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def batch(self, x: numpy.ndarray, y: numpy.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A host batch on the device: labels int64 (cross-entropy) or float (binary)."""
        xt = torch.from_numpy(numpy.ascontiguousarray(x)).to(self.device, self.dtype)
        yt = torch.from_numpy(numpy.ascontiguousarray(y)).to(self.device)
        return xt, (yt.long() if self.loss == "cross_entropy" else yt.to(self.dtype))

    def forward(self, x: torch.Tensor,
                effective: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; ``effective`` replaces the ``w * mask`` products (for the gradient probe)."""
        h = x
        last = len(self.weights) - 1
        for i, (w, mask, b) in enumerate(zip(self.weights, self.masks, self.biases)):
            if effective is not None:
                w = effective[i]
            elif mask is not None:
                w = w * mask
            h = F.linear(h, w, b)
            if i < last:
                h = F.relu(h)
        return h

    def loss_of(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss == "cross_entropy":
            return F.cross_entropy(logits, y)
        return F.binary_cross_entropy_with_logits(logits.reshape(-1), y)

    @torch.no_grad()
    def apply_masks(self) -> None:
        for w, mask in zip(self.weights, self.masks):
            if mask is not None:
                w.mul_(mask)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One training step; seconds per phase (as cupynn's benchmark step), each
        ended by a device sync. ``adam`` includes re-applying the masks."""
        self.synchronize()
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_of(self.forward(x), y)
        self.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        self.synchronize()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.apply_masks()
        self.synchronize()
        t3 = time.perf_counter()
        self.last_loss = loss.detach()
        return {"forward": t1 - t0, "backward": t2 - t1, "adam": t3 - t2, "step": t3 - t0}

    # ---------------------------------------------------------------- CUDA graph
    def _train(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Forward, loss, backward, Adam, masks: the step as captured (``.grad`` kept)."""
        loss = self.loss_of(self.forward(x), y)
        loss.backward()
        self.optimizer.step()
        self.apply_masks()
        return loss

    def capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Capture one training step on batches shaped as ``(x, y)`` (device tensors).

        As PyTorch's documentation does for whole-network capture: a few eager
        steps on a side stream first (they create Adam's state and the libraries'
        handles for that stream), the gradients set to None so that the captured
        backward allocates them from the graph's private pool, then the capture,
        on the same stream. The warm-up's changes are undone in place (values,
        moments, step counts), so that training starts from the state the peer
        was built with."""
        self.static_x, self.static_y = x.clone(), y.clone()
        params = [p for pair in zip(self.weights, self.biases) for p in pair]
        saved = [p.detach().clone() for p in params]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                self.optimizer.zero_grad(set_to_none=True)
                self._train(self.static_x, self.static_y)
            with torch.no_grad():
                for p, value in zip(params, saved):
                    p.copy_(value)
                for slots in self.optimizer.state.values():
                    for slot in slots.values():
                        if torch.is_tensor(slot):
                            slot.zero_()  # in place: the graph reads these addresses
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph, stream=side):
            self.static_loss = self._train(self.static_x, self.static_y)

    def replay(self, x: numpy.ndarray, y: numpy.ndarray) -> torch.Tensor:
        """One captured step on a host batch of the captured shape, copied into the
        static tensors first. Returns the loss (the graph's own tensor)."""
        self.static_x.copy_(torch.from_numpy(numpy.ascontiguousarray(x)))
        self.static_y.copy_(torch.from_numpy(numpy.ascontiguousarray(y)))
        self.graph.replay()
        return self.static_loss

    # ---------------------------------------------------------------- epoch
    def train_epoch(self, x: numpy.ndarray, y: numpy.ndarray, batch_size: int,
                    rng: numpy.random.Generator) -> tuple[float, numpy.ndarray]:
        """One pass over host data in a fresh permutation, as :func:`cupynn.fit` does:
        each mini-batch is copied to the device, losses stay there until the end.
        With ``graph=True`` the full batches replay the captured step (captured by the
        first one, inside the timed epoch, as cupynn's is) and a short last batch runs
        eagerly. Returns (seconds, the permutation)."""
        n = x.shape[0]
        n_batches = -(-n // batch_size)
        order = rng.permutation(n)
        losses = torch.empty(n_batches, dtype=torch.float64, device=self.device)
        self.synchronize()
        start = time.perf_counter()
        for b in range(n_batches):
            idx = order[b * batch_size:(b + 1) * batch_size]
            if self.graphed and len(idx) == batch_size:
                if self.graph is None:
                    self.capture(*self.batch(x[idx], y[idx]))
                loss = self.replay(x[idx], y[idx])
            else:
                xb, yb = self.batch(x[idx], y[idx])
                # After a capture the gradients are the graph's tensors: zeroed in place
                # (set to None, the eager backward would leave them behind).
                self.optimizer.zero_grad(set_to_none=self.graph is None)
                loss = self._train(xb, yb)
            losses[b] = loss.detach()
        host = losses.cpu().numpy()  # one sync per epoch
        seconds = time.perf_counter() - start
        if not numpy.all(numpy.isfinite(host)):
            raise FloatingPointError("the peer's training loss became NaN or infinite")
        return seconds, order

    # ---------------------------------------------------------------- redistribution
    @torch.no_grad()
    def _reset_moments(self, index: int, keep: torch.Tensor) -> None:
        state = self.optimizer.state.get(self.weights[index], {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                state[name].mul_(keep)

    def redistribute_gradient_global(self, fraction: float, x: torch.Tensor,
                                     y: torch.Tensor) -> int:
        """RigL's global variant on the masks: per sparse layer drop the
        round(fraction * nnz) smallest |w|; grow as many in total at the largest
        |dL/d(w * mask)| on the batch (x, y) among positions inactive after the
        drop, over all sparse layers at once. New weights are 0 and the Adam
        moments of every dropped or grown position are reset. Returns the count
        moved."""
        sparse = [i for i, m in enumerate(self.masks) if m is not None]
        if fraction <= 0 or not sparse:
            return 0
        effective = [w.detach() * m if m is not None else w.detach()
                     for w, m in zip(self.weights, self.masks)]
        for i in sparse:
            effective[i].requires_grad_()
        loss = self.loss_of(self.forward(x, effective), y)
        grads = torch.autograd.grad(loss, [effective[i] for i in sparse])
        with torch.no_grad():
            scores, offsets, total = [], [0], 0
            for i, g in zip(sparse, grads):
                w, mask = self.weights[i], self.masks[i]
                active = mask.bool()
                k = int(numpy.floor(fraction * int(active.sum().item()) + 0.5))
                magnitude = torch.where(active, w.abs(), torch.full_like(w, float("inf")))
                dropped = torch.topk(magnitude.reshape(-1), k, largest=False).indices
                mask.view(-1)[dropped] = 0
                total += k
                scores.append(torch.where(mask.bool(), torch.full_like(g, -float("inf")),
                                          g.abs()).reshape(-1))
                offsets.append(offsets[-1] + g.numel())
            grown = torch.topk(torch.cat(scores), total).indices
            for j, i in enumerate(sparse):
                mine = grown[(grown >= offsets[j]) & (grown < offsets[j + 1])] - offsets[j]
                old = self.masks[i].clone()
                self.masks[i].view(-1)[mine] = 1
                self.weights[i].mul_(old)  # dropped and grown positions: 0
                self._reset_moments(i, old)
        return total
