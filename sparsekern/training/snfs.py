"""SNFS / sparse momentum (Dettmers & Zettlemoyer 2019): drop by magnitude, redistribute by momentum, grow by
momentum, with the rules of their reference code (github.com/TimDettmers/sparse_learning, ``Masking``)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .._distributed import verify_masks_across_ranks
from ._optim_state import snapshot_step
from .drop_grow import CompressedLayer, DropGrowPlan
from .sparsifier import _DropGrow

MIN_PRUNE_RATE = 0.005  # sparse_learning's CosineDecay floor (eta_min)
NEAR_DENSE = 0.2  # below this sparsity a layer whose momentum share is above average prunes at most its sparsity


def prune_rate_at(step: int, prune_rate: float, total_steps: int) -> float:
    """SNFS's cosine-decayed prune rate at optimizer step ``step``: from ``prune_rate`` at step 0 down to
    :data:`MIN_PRUNE_RATE` at ``total_steps`` (sparse_learning's ``CosineDecay``, PyTorch's CosineAnnealingLR
    stepped once per optimizer step, in closed form)."""
    return MIN_PRUNE_RATE + (prune_rate - MIN_PRUNE_RATE) / 2 * (1 + math.cos(math.pi * step / total_steps))


class SNFS(_DropGrow):
    """Sparse momentum (SNFS, Dettmers & Zettlemoyer 2019): every ``delta_t`` optimizer steps, each layer drops its
    smallest-magnitude weights, the dropped total is redistributed across layers by their mean momentum magnitude,
    and each layer grows its share where the momentum of the inactive weights is largest.

    The rule of the reference code (sparse_learning's ``Masking``), update by update:

    1. prune rate p = 0.005 + (prune_rate − 0.005)/2 · (1 + cos(π t / total_steps)) (their cosine decay);
    2. per layer, the statistic s_l = mean |M| over its active weights, M the momentum below;
    3. per layer, drop ⌈p_l · nnz_l⌉ smallest |w| (ties: the lower flat index), where p_l = p except that a
       nearly dense layer (sparsity < 0.2) whose share s_l / Σ s is above 1 / layers prunes min(sparsity, p);
    4. the dropped total is split across the layers in proportion to s_l, a layer capped at dense and its overflow
       spread evenly over the others (:func:`~sparsekern.training.drop_grow.redistribute`; their code caps at 0.99
       of dense and rounds so that the count drifts, corrected by a smoothed adjustment; here the counts sum to the
       dropped total exactly, so the total number of weights never changes);
    5. each layer grows its share at the largest |M| among the positions not kept by the drop (ties: the lower flat
       index; a dropped weight grown again keeps its value; new weights start at 0 with zero optimizer state).

    The momentum M is a **dense** exponential average of the dense weight gradient, kept by this sparsifier for
    every sparse layer (one dense float32 tensor per layer): M ← ``momentum`` · M + ∂L/∂W at every optimizer step
    (SGD's momentum buffer, as the reference code reads it from SGD over the dense masked weights; with Adam that
    code reads Adam's exp_avg / sqrt(exp_avg_sq) instead, while this M is the same whatever the optimizer). Inactive
    weights need it, so SNFS costs a dense weight gradient every step: on masked layers it is the gradient autograd
    computes anyway (read before it is masked); on SparseLinear layers a hook (RigL's recording, on at every step)
    adds gᵀx of each backward pass (layer input x, output gradient g; micro-batches summed) into one dense buffer,
    an n_out × n_in GEMM per layer and backward pass. Hence ``flops_rule = "dense_gradient"`` (2 f_S + f_D per step).
    No nnz-sized shortcut is exact here: the optimizer's momentum equals M at the active weights only for SGD with
    the same momentum, no dampening, Nesterov or weight decay, and only for weights active since the start (grown
    weights start with zero optimizer state), so both the statistic and the grow read M.
    Under DDP (masked layers) the gradients are all-reduced by DDP; SparseLinear layers change their nonzero counts,
    which a DDP wrapper cannot follow, so there pass the model itself with ``group=`` and average the gradients
    yourself: the dense gradient is then all-reduced (averaged) over ``group``. M and the masks are identical on
    every rank (checked by mask checksums).

    Each update takes the optimizer step first and then changes the masks from the weights after it, as the
    reference code does at the end of an epoch (a failed update undoes that step too: update steps hold a copy of
    the parameters, gradients and optimizer state).

    Args:
        model, optimizer, group: as :class:`Static`.
        total_steps: optimizer steps in the run (the prune rate's cosine period).
        delta_t: optimizer steps between updates. The paper updates once per epoch: pass the steps per epoch
            (default 100, RigL's).
        prune_rate: the initial prune rate in (0, 1] (default 0.5, the paper's and the reference code's).
        t_end: the last step that may update, as a step (int) or a fraction of ``total_steps`` (default 1.0: the
            reference code updates at the end of every epoch but the last).
        momentum: the decay β of M in [0, 1) (default 0.9, the paper's SGD momentum).

    Attributes:
        density_history: {layer name: density} after every update, in update order (part of ``state_dict()``).
        dense_momentum: {layer name: M}, dense, of the weight's shape (part of ``state_dict()``).

    Raises:
        as :class:`Static`; ValueError for schedule values or a momentum out of range, or a DDP wrapper around
        SparseLinear layers; ``step()`` raises ValueError on non-finite momentum, leaving the model, masks,
        optimizer, momentum and step count unchanged.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> report = sparsekern.sparsify(model, 0.9)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> snfs = sparsekern.SNFS(model, optimizer, total_steps=40, delta_t=10)
        >>> for step in range(40):
        ...     x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     moved = snfs.step()                           # instead of optimizer.step()
        ...     optimizer.zero_grad()
        >>> len(snfs.density_history), round(sparsekern.sparsity_report(model).sparsity, 4)
        (3, 0.9)
    """

    grow = "scores"
    flops_rule = "dense_gradient"
    _saved_before = {}

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        total_steps: int,
        delta_t: int = 100,
        prune_rate: float = 0.5,
        t_end: float | int = 1.0,
        momentum: float = 0.9,
        group=None,
    ):
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"SNFS: momentum must be a number in [0, 1), got {momentum!r}")
        if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float)) or not 0 < prune_rate <= 1:
            raise ValueError(f"SNFS: prune_rate must be a number in (0, 1], got {prune_rate!r}")
        super().__init__(model, optimizer, total_steps=total_steps, delta_t=delta_t, alpha=prune_rate, t_end=t_end,
                         keep_optimizer_step=True, redistribution="momentum", group=group)  # fmt: skip
        self.momentum = float(momentum)
        self.dense_momentum = {
            name: torch.zeros(layer.shape, dtype=_momentum_dtype(layer.param), device=layer.param.device)
            for name, layer in self.layers.items()
        }
        self._next: dict[str, torch.Tensor] | None = None  # M of the step being taken, until it is installed
        self._gradients: dict[str, torch.Tensor] = {}  # SparseLinear dense gradients of the step being taken
        self._record_inputs()
        self._capturing = True  # the dense gradient is needed at every step

    def _config(self) -> dict:
        schedule = self.schedule
        return {
            "total_steps": schedule.total_steps,
            "delta_t": schedule.delta_t,
            "prune_rate": schedule.alpha,
            "t_end": schedule.t_end,
            "momentum": self.momentum,
        }

    def prune_rate(self, step: int) -> float:
        """The prune rate p of an update at optimizer step ``step``."""
        return prune_rate_at(step, self.schedule.alpha, self.schedule.total_steps)

    # -- training -------------------------------------------------------------------------------------------
    def step(self) -> bool:
        """One optimizer step, M updated with this step's dense gradient, and on an update step the mask update
        (after the optimizer step). True if the masks changed. If anything raises, nothing has changed."""
        t = self.steps + 1
        momentum = self._momentum_step()  # new tensors: nothing changes before the end
        updated = self.is_update_step(t)
        if not updated:
            self._optimizer_step()
        else:
            restore = snapshot_step(self.optimizer)
            self._next = momentum
            try:
                self._optimizer_step()
                plans = self._plan(t)
                verify_masks_across_ranks("SNFS.step", self.group, {n: p.active for n, p in plans.items()})
                swaps = [self.layers[name].stage(plan, self.optimizer) for name, plan in plans.items()]
            except BaseException:
                restore()
                raise
            finally:
                self._next = None
            del restore
            for swap in swaps:
                swap()
            self.density_history.append(self._densities())
        self.dense_momentum = momentum
        self.steps = t
        self._records.clear()
        self._gradients.clear()
        return updated

    def _momentum_step(self) -> dict[str, torch.Tensor]:
        """{layer: β · M + this step's dense weight gradient}, as new tensors."""
        beta = self.momentum
        out = {}
        for name, layer in self.layers.items():
            m = self.dense_momentum[name]
            if not isinstance(layer, CompressedLayer):
                grad = layer.param.grad  # dense, accumulated over micro-batches, all-reduced by DDP; not yet masked
                out[name] = m * beta if grad is None else torch.add(grad.to(m.dtype), m, alpha=beta)
                continue
            # Σ gᵀx over this step's backward passes (see _record); left as it is, so a failed step can be retried
            grad = self._gradients.get(name)
            if self.group is not None:
                grad = torch.zeros_like(m) if grad is None else grad.clone()  # every rank joins the all-reduce
                dist.all_reduce(grad, group=self.group)
                grad.div_(dist.get_world_size(self.group))  # DDP averages the ranks' gradients
            out[name] = m * beta if grad is None else torch.add(grad, m, alpha=beta)
        return out

    def _record(self, name: str, x: torch.Tensor, g: torch.Tensor) -> None:
        """Add one backward pass's dense weight gradient gᵀx of a SparseLinear to this step's (an n_out × n_in GEMM
        into one buffer: nothing of the batch is kept)."""
        m = self.dense_momentum[name]
        x, g = x.to(m.dtype), g.to(m.dtype)
        grad = self._gradients.get(name)
        if grad is None:
            self._gradients[name] = g.t() @ x
        else:
            grad.addmm_(g.t(), x)

    def _drop_counts(self, step: int, statistics: dict[str, float] | None) -> dict[str, int]:
        p = self.prune_rate(step)
        total = math.fsum(statistics.values())
        counts = {}
        for name, layer in self.layers.items():
            nnz = layer.count()
            sparsity = (layer.numel - nnz) / layer.numel
            rate = p
            if sparsity < NEAR_DENSE and total > 0 and statistics[name] / total > 1 / len(statistics):
                rate = min(sparsity, p)  # a nearly dense layer that is still growing: prune at most its sparsity
            counts[name] = math.ceil(rate * nnz)
        return counts

    def _active_momentum(self, name: str) -> torch.Tensor:
        return self._next[name].reshape(-1)[self.layers[name].active()]

    def _scores(self, name: str):
        return self._next[name]

    def _plan(self, step: int) -> dict[str, DropGrowPlan]:
        if self._next is None:
            raise RuntimeError("SNFS._plan: only step() plans (it holds this step's momentum)")
        for name, m in self._next.items():
            if not bool(torch.isfinite(m).all()):
                raise ValueError(f"SNFS.step: the momentum of {name!r} holds inf or NaN; no connection was changed")
        return super()._plan(step)

    # -- checkpoints -----------------------------------------------------------------------------------------
    def _extra_state(self) -> dict:
        return {**super()._extra_state(), "dense_momentum": {n: m.cpu() for n, m in self.dense_momentum.items()}}

    def _check_extra_state(self, fn: str, state: dict) -> None:
        super()._check_extra_state(fn, state)
        saved = state["dense_momentum"]
        if not isinstance(saved, dict) or set(saved) != set(self.layers):
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"{fn}: dense_momentum must hold the layers {sorted(self.layers)}, got {got}")
        for name, m in self.dense_momentum.items():
            value = saved[name]
            if not (isinstance(value, torch.Tensor) and value.shape == m.shape and value.dtype == m.dtype):
                raise ValueError(f"{fn}: dense_momentum[{name!r}] must be a {m.dtype} tensor of shape {tuple(m.shape)}")

    def _load_extra_state(self, state: dict) -> None:
        super()._load_extra_state(state)
        self.dense_momentum = {
            name: state["dense_momentum"][name].to(m.device, copy=True) for name, m in self.dense_momentum.items()
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._gradients.clear()
        self._capturing = True


def _momentum_dtype(param: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 weights: M averages many gradients, so never in half precision."""
    return torch.promote_types(param.dtype, torch.float32)
