"""Masks learned through a straight-through estimator: :class:`STE` (per-weight scores, edge-popup style, with the
weights trained too) and :class:`SRSTE` (N:M masks from |w| with the sparse-refined decay, Zhou et al. 2021).

Both keep a dense latent weight: the stored ``weight`` is never zeroed off the mask while they train. A forward
pre-hook puts ``w ⊙ mask`` in the weight's place for the module's forward (and puts the Parameter back after it);
its backward is straight through, so ``weight.grad`` receives the dense ∂L/∂(w ⊙ m). ``step()`` turns that into
each method's update, then takes the optimizer step. The mask is a function of the weights (SR-STE) or scores
(STE) alone, recomputed whenever they changed (tracked by their version counters), so a checkpoint's model state
determines it and a resumed run recomputes the same masks. ``finalize()`` zeros the weights off the final mask and
takes the hooks off, leaving an ordinary masked model (``to_sparse_linear``, or ``sparsify_semi24`` for 2:4).

Notes for both: move the model to its device before building the optimizer and the sparsifier (STE's scores are
buffers that the optimizer holds). Between ``backward()`` and ``step()``, ``weight.grad`` holds the dense
∂L/∂(w ⊙ m). ``remove()`` alone takes the hooks off and leaves the dense latent weights in the model: end with
``finalize()``. Under ``torch.compile`` the mask hooks cause graph breaks (checked to give the same outputs).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from .._distributed import verify_masks_across_ranks
from ..nn.sparse_linear import SparseLinear
from ..ops.semi24_mask import check_finite_weight, group_topk_mask
from ._optim_state import check_optimizer
from .distribution import DISTRIBUTIONS, _check_sparsity, layer_nnz
from .drop_grow import magnitude_keys, smallest
from .sparsifier import Sparsifier
from .sparsify import MaskedParameter, SparsityReport, _select, _unwrap, is_conv1d, sparse_layers

SCORE_INITS = ("kaiming_uniform", "magnitude")


def nm_mask(weight: torch.Tensor, n: int, m: int, *, dim: int = -1) -> torch.Tensor:
    """The N:M mask of ``weight``: in every group of ``m`` consecutive elements along ``dim``, keep the ``n`` largest
    |w| (ties: the lower index). 2:4 along the last dim is :func:`sparsekern.semi24_mask`'s rule.

    For a Linear weight (out, in) groups run along the input dim (``dim=1``); for a conv weight
    (out, in, *kernel) ``dim=1`` groups input channels at each kernel position (NM-sparsity's NHWC grouping).

    Raises:
        ValueError: ``n``, ``m`` not ints with 0 < n < m; ``weight.shape[dim]`` not a multiple of ``m``; inf or
            NaN in ``weight`` (no magnitude order).
    """
    fn = "nm_mask"
    for name, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{fn}: {name} must be an int, got {value!r}")
    if not 0 < n < m:
        raise ValueError(f"{fn}: need 0 < n < m, got n={n}, m={m}")
    if not isinstance(weight, torch.Tensor) or weight.dim() < 1:
        raise ValueError(f"{fn}: weight must be a tensor of at least 1 dim, got {weight!r}")
    if weight.shape[dim] % m:
        raise ValueError(
            f"{fn}: dim {dim} of the weight (shape {tuple(weight.shape)}) has {weight.shape[dim]} entries, not a "
            f"multiple of m={m}"
        )
    check_finite_weight(fn, "weight", weight)
    return group_topk_mask(weight.movedim(dim, -1), n, m).movedim(-1, dim).contiguous()


def _top_abs(scores: torch.Tensor, count: int, hint: float | None = None) -> tuple[torch.Tensor, float | None]:
    """bool mask of the ``count`` largest |scores| (ties: lower flat index) in O(numel), no sort; and the selection's
    threshold, which as the next call's ``hint`` narrows the search (the result never depends on the hint)."""
    keys = magnitude_keys(scores).reshape(-1).neg_()  # the count largest |s| are the count smallest -|s|
    if count == 0:
        return smallest(keys, 0).view(scores.shape), None
    threshold = _kth_smallest(keys, count, hint)
    return smallest(keys, count, threshold).view(scores.shape), float(threshold)


def _kth_smallest(keys: torch.Tensor, n: int, hint: float | None) -> torch.Tensor:
    """The n-th smallest of the 1-D ``keys`` (1-based), exactly. Scores move little per step, so last step's
    threshold (``hint``) brackets this one closely: two counting passes check a band [lo, hi] around it holds the
    n-th smallest (fewer than n below lo, at least n up to hi), and kthvalue runs on the band alone (a full
    kthvalue is several times slower than the counting passes). A band that misses is widened; then the full one."""
    if hint is not None:
        width = abs(hint) * 2.0**-6 + 2.0**-100
        for _ in range(3):
            lo, hi = hint - width, hint + width
            below = int(torch.count_nonzero(keys < lo))
            if below < n:
                upto = keys <= hi
                if n <= int(torch.count_nonzero(upto)):
                    return torch.kthvalue(keys[upto & (keys >= lo)], n - below).values
            width *= 16
    return torch.kthvalue(keys, n).values


class _StraightThrough(torch.autograd.Function):
    """w ⊙ mask forward; the gradient passes to w unmasked (∂L/∂(w ⊙ m)): the straight-through estimator."""

    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# -- the mask rules: plain data (no reference to a sparsifier), so a deep-copied model keeps working -------------
@dataclasses.dataclass(frozen=True)
class _NMRule:
    n: int
    m: int
    dim: int

    def source(self, module: nn.Module, attr: str) -> torch.Tensor:
        return module._parameters[attr]

    def compute(self, module: nn.Module, attr: str) -> torch.Tensor:
        return nm_mask(module._parameters[attr].detach(), self.n, self.m, dim=self.dim)


@dataclasses.dataclass(frozen=True)
class _ScoreRule:
    count: int

    def source(self, module: nn.Module, attr: str) -> torch.Tensor:
        return module._buffers[f"{attr}_scores"]

    def compute(self, module: nn.Module, attr: str) -> torch.Tensor:
        scores = module._buffers[f"{attr}_scores"]
        check_finite_weight("STE", f"the scores of {attr}", scores)
        hints = module.__dict__.setdefault(_HINTS, {})
        mask, hints[attr] = _top_abs(scores, self.count, hints.get(attr))
        return mask


_HINTS = "_sparsekern_ste_hints"  # module attribute: {attr: the last selection threshold of its scores}
_KEYS = "_sparsekern_ste_keys"  # module attribute: {attr: (version, data_ptr) of the source the mask was made from}
_LATENT = "_sparsekern_ste_latent"  # owner attribute while swapped: {attr: the latent Parameter}


def _refresh(module: nn.Module, attr: str, rule) -> torch.Tensor:
    """The ``<attr>_mask`` buffer, recomputed first if its source (weights or scores) changed since it was made."""
    source = rule.source(module, attr)
    key = (source._version, source.data_ptr())
    keys = module.__dict__.setdefault(_KEYS, {})
    mask = module._buffers[f"{attr}_mask"]
    if keys.get(attr) != key:
        mask.copy_(rule.compute(module, attr))
        keys[attr] = key
    return mask


_SWAPPED = "_sparsekern_ste_swapped"  # reader attribute during its forward: the (owner, attr) it swapped


class _MaskHook:
    """Forward pre-hook and forward hook of a module that reads latent weights: put ``w ⊙ mask`` in each weight's
    place for the forward, then the Parameter back. Installed on each weight's own module and on the modules whose
    forward reads their children's weights directly (MultiheadAttention's out_proj, the encoder layer's fast path);
    the outermost one swaps, inner ones find the weight swapped and leave it."""

    def __init__(self, entries: list[tuple[nn.Module, str, object]]):
        self.entries = entries  # (owner module, Parameter name, mask rule)

    def before(self, module: nn.Module, args) -> None:
        if _SWAPPED in module.__dict__:
            return  # a call inside its own forward
        swapped = []
        try:
            for owner, attr, rule in self.entries:
                latent = owner.__dict__.setdefault(_LATENT, {})
                if attr in latent:
                    continue  # an enclosing reader swapped it already
                weight = owner._parameters[attr]
                owner._parameters[attr] = _StraightThrough.apply(weight, _refresh(owner, attr, rule))
                latent[attr] = weight
                swapped.append((owner, attr))
        except BaseException:
            _restore(swapped)
            raise
        module.__dict__[_SWAPPED] = swapped

    def after(self, module: nn.Module, args, output) -> None:
        _restore(module.__dict__.pop(_SWAPPED, []))


def _restore(swapped: list[tuple[nn.Module, str]]) -> None:
    for owner, attr in swapped:
        latent = owner.__dict__[_LATENT]
        owner._parameters[attr] = latent.pop(attr)
        if not latent:
            del owner.__dict__[_LATENT]


# modules whose forward reads the weights of their children itself (fused kernels, F.multi_head_attention_forward)
_READERS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _input_dim(module: nn.Module) -> int:
    """The weight's input dim: 0 for HF transformers' Conv1D (n_in, n_out), else 1 (Linear, conv, attention)."""
    return 0 if is_conv1d(module) else 1


class _LatentMask(Sparsifier):
    """What STE and SR-STE share: dense latent weights, masks recomputed from them, straight-through forward."""

    flops_rule = "dense_gradient"  # the dense weight gradient every step (2 f_S + f_D)

    def __init__(self, model, optimizer, *, include, exclude, group):
        fn = type(self).__name__
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
        inner = _unwrap(model)
        layers = sparse_layers(inner)
        compressed = [name for name, layer in layers.items() if isinstance(layer, SparseLinear)]
        if compressed:
            raise ValueError(
                f"{fn}: {compressed[0]} is a SparseLinear (layout='sparse'), which stores only the kept weights; "
                f"{fn} trains a dense latent weight under a mask that moves every step, so train the dense model "
                f"(or sparsify(..., layout='masked')), then call finalize() and convert with "
                f"sparsekern.training.to_sparse_linear{self._export}"
            )
        for name, layer in layers.items():
            module = layer.module if isinstance(layer, MaskedParameter) else layer
            if _KEYS in module.__dict__ or any(key.endswith("_scores") for key in module._buffers):
                raise ValueError(f"{fn}: {name} already has a learned mask (finalize() the other sparsifier first)")
        if layers:
            if include is not None or exclude is not None:
                raise ValueError(
                    f"{fn}: include/exclude choose the layers of a dense model; this model is sparsified already "
                    "(its masked layers are used)"
                )
            targets = {
                name: (layer.module, layer.name) if isinstance(layer, MaskedParameter) else (layer, "weight")
                for name, layer in layers.items()
            }
        else:
            targets = _select(fn, inner, include, exclude)
            if not targets:
                raise ValueError(f"{fn}: the model has no layer to sparsify (Linear, Conv1d, Conv2d, Conv1D, ...)")
        self._check_targets(fn, targets)
        # check the optimizer before the model changes (the base class checks it again, as for every sparsifier)
        check_optimizer(fn, optimizer, [getattr(module, attr) for module, attr in targets.values()])
        self._targets = targets
        self._rules = self._make_rules(fn, targets, masked=bool(layers))
        for (module, attr), rule in zip(targets.values(), self._rules.values(), strict=True):
            self._prepare(module, attr, rule)
            mask = rule.compute(module, attr)
            if f"{attr}_mask" in module._buffers:
                module._buffers[f"{attr}_mask"].copy_(mask)
            else:
                module.register_buffer(f"{attr}_mask", mask.clone())
        self._finalized = False
        super().__init__(model, optimizer, group=group)
        entries = [(module, attr, self._rules[name]) for name, (module, attr) in targets.items()]
        readers = {id(owner): owner for owner, _, _ in entries}
        readers.update({id(m): m for m in inner.modules() if isinstance(m, _READERS)})
        for reader in readers.values():
            inside = {id(m) for m in reader.modules()}
            hook = _MaskHook([entry for entry in entries if id(entry[0]) in inside])
            if hook.entries:
                self._hooks.append(reader.register_forward_pre_hook(hook.before))
                self._hooks.append(reader.register_forward_hook(hook.after, always_call=True))
        self.refresh()

    _export = ""  # other conversions named in the SparseLinear refusal

    # -- what the methods fill in ---------------------------------------------------------------------------------
    def _check_targets(self, fn: str, targets) -> None:
        pass

    def _make_rules(self, fn: str, targets, masked: bool) -> dict:
        raise NotImplementedError

    def _prepare(self, module: nn.Module, attr: str, rule) -> None:
        pass

    def _stage(self, name: str, module: nn.Module, attr: str, weight, grad, mask):
        """Compute (allocating) what this layer's gradients become; return the allocation-free swap."""
        raise NotImplementedError

    # -- training ---------------------------------------------------------------------------------------------
    def is_update_step(self, step: int) -> bool:
        return True  # the masks follow the weights (or scores) every step

    def refresh(self) -> None:
        """Recompute every mask whose weights (or scores) changed since it was made; the forward does this too."""
        if self._finalized:
            return
        for name, (module, attr) in self._targets.items():
            _refresh(module, attr, self._rules[name])

    def step(self) -> bool:
        """The method's gradients (from the dense ∂L/∂(w ⊙ m) that the straight-through backward left in
        ``weight.grad``) and the optimizer step. The masks the next forward uses are recomputed from the new
        weights (or scores). Everything that can fail (cross-rank checks, allocations) runs before anything
        changes, so a failed step leaves weights, gradients, masks, optimizer state and step count as they were.
        Returns True (the masks may move on every step)."""
        fn = f"{type(self).__name__}.step"
        if self._finalized:
            raise ValueError(f"{fn}: finalize() was called; keep training the masked model with Static")
        self.refresh()  # the masks of the weights the forward saw (a no-op unless something changed them since)
        if self.group is not None:
            verify_masks_across_ranks(fn, self.group, {name: layer.active() for name, layer in self.layers.items()})
        swaps = []
        for name, (module, attr) in self._targets.items():
            weight = module._parameters[attr]
            if weight.grad is not None:
                swaps.append(self._stage(name, module, attr, weight, weight.grad, module._buffers[f"{attr}_mask"]))
        for swap in swaps:
            swap()
        self.optimizer.step()
        self.steps += 1
        return True

    # -- inspection, checkpoints, the end ------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        self.refresh()
        return super().masks()

    def state_dict(self) -> dict:
        self.refresh()
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.refresh()  # the masks of the weights (and scores) just loaded into the model
        super().load_state_dict(state)

    def report(self) -> SparsityReport:
        """The sparsity report of the effective weights w ⊙ mask (the latent weights off the mask are nonzero by
        design until :meth:`finalize`; they are not counted as stray nonzeros)."""
        self.refresh()
        report = super().report()
        rows = []
        for row in report.layers:
            module, attr = self._targets[row.name]
            effective = module._parameters[attr].detach() != 0
            effective &= module._buffers[f"{attr}_mask"]
            rows.append(dataclasses.replace(row, zeros=row.numel - int(effective.sum()), off_mask=0))
        return SparsityReport(tuple(rows), report.skipped)

    def finalize(self) -> SparsityReport:
        """End training: zero each weight (and its optimizer state) off its final mask, take the hooks off (and, for
        STE, the scores). The model is then an ordinary masked model: convert it with
        :func:`sparsekern.training.to_sparse_linear` (or ``sparsekern.nn.sparsify_semi24`` for 2:4), or keep
        training it with :class:`Static`. Returns the final sparsity report."""
        self.refresh()
        with torch.no_grad():
            for module, attr in self._targets.values():
                weight, mask = module._parameters[attr], module._buffers[f"{attr}_mask"]
                weight.mul_(mask)
                for value in self.optimizer.state.get(weight, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                        value.masked_fill_(~mask, 0)
                module.__dict__.pop(_KEYS, None)
                module.__dict__.pop(_HINTS, None)
        self.remove()
        self._finalized = True
        return super().report()


def _check_int(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {value!r}")
    return value


class SRSTE(_LatentMask):
    """SR-STE (Zhou et al., ICLR 2021, "Learning N:M fine-grained structured sparse neural networks from scratch"):
    N:M masks recomputed every step from |w| of dense latent weights, trained through the straight-through
    estimator with the sparse-refined term.

    The forward uses w ⊙ mask, where the mask keeps the ``n`` largest |w| of every group of ``m`` consecutive
    weights along the input dim (:func:`nm_mask`; ties to the lower index): (out, in) for Linear, the input
    channels at each kernel position for conv (NM-sparsity's grouping), dim 0 of transformers' Conv1D. The
    backward passes ∂L/∂(w ⊙ m) to the dense w unmasked, and ``step()`` adds ``decay · (1 − mask) ⊙ w`` to each
    weight's gradient once (the paper's update w ← w − γ (g(w̃) + λ_W (1 − m) ⊙ w), as the official code's backward
    adds it; added in ``step()`` so that gradient accumulation does not add it once per micro-batch) before the
    optimizer step.

    Build it on the dense model (every Linear/conv the way :func:`sparsify` chooses them, restricted by
    ``include``/``exclude``) or on one with masked layers (``sparsify(..., layout="masked")``: their weights are
    used as they are). It needs the dense latent weight, so SparseLinear layers (``layout="sparse"``) are refused;
    train masked, then :meth:`finalize` and convert (``sparsekern.nn.sparsify_semi24`` for 2:4 in fp16/bf16).
    Every step is an update step; under DDP the masks are compared across ranks (checksums) before each step.
    Cost: the N:M mask of every layer is recomputed after each optimizer step (elementwise comparisons within the
    groups, O(numel · (m − 1)); a dense forward costs O(batch · numel)).

    Args:
        model: the dense or masked model (a DDP wrapper is looked through; its group is used).
        optimizer: the optimizer over the model's parameters.
        n, m: keep n of every m (default 2:4).
        decay: λ_W of the sparse-refined term (default 2e-4, the paper's); 0 gives plain STE.
        include, exclude: fnmatch patterns of module names, for a dense model (as :func:`sparsify`).
        group: a ``torch.distributed`` process group (default: the DDP wrapper's).

    Raises:
        ValueError: n, m not ints with 0 < n < m; a negative or non-finite decay; a chosen layer whose input dim is
            not a multiple of m (exclude it); SparseLinear layers; include/exclude on a masked model.
        TypeError: arguments of the wrong type; an optimizer whose state cannot follow masks.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> srste = sparsekern.SRSTE(model, optimizer, n=2, m=4)
        >>> for _ in range(3):
        ...     x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     moved = srste.step()                 # instead of optimizer.step()
        ...     optimizer.zero_grad()
        >>> report = srste.finalize()                # weights zeroed off the final 2:4 masks, hooks removed
        >>> round(report.sparsity, 4)
        0.5
    """

    _export = " (2:4: sparsekern.nn.sparsify_semi24)"

    def __init__(self, model, optimizer, *, n: int = 2, m: int = 4, decay: float = 2e-4, include=None,
                 exclude=None, group=None):  # fmt: skip
        fn = "SRSTE"
        self.n, self.m = _check_int(fn, "n", n), _check_int(fn, "m", m)
        if not 0 < n < m:
            raise ValueError(f"{fn}: need 0 < n < m (keep n of every m), got n={n}, m={m}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < math.inf:
            raise ValueError(f"{fn}: decay must be a finite number >= 0, got {decay!r}")
        self.decay = float(decay)
        super().__init__(model, optimizer, include=include, exclude=exclude, group=group)

    def _check_targets(self, fn, targets) -> None:
        for name, (module, attr) in targets.items():
            shape, dim = tuple(getattr(module, attr).shape), _input_dim(module)
            if shape[dim] % self.m:
                raise ValueError(
                    f"{fn}: {name} has {shape[dim]} inputs (dim {dim} of shape {shape}), not a multiple of m={self.m}; "
                    "leave it dense (exclude= on the dense model)"
                )

    def _make_rules(self, fn, targets, masked) -> dict:
        return {name: _NMRule(self.n, self.m, _input_dim(module)) for name, (module, _) in targets.items()}

    def _config(self) -> dict:
        return {"n": self.n, "m": self.m, "decay": self.decay}

    def _stage(self, name, module, attr, weight, grad, mask):
        refined = weight.detach().masked_fill(mask, 0).mul_(self.decay)  # λ (1 − m) ⊙ w

        def swap() -> None:
            grad.add_(refined)

        return swap


class STE(_LatentMask):
    """Learned masks (edge-popup, Ramanujan et al. 2020, with the weights trained too): every weight has a score,
    each layer's mask keeps the top-(1 − s) |score| of that layer, and scores and weights learn together through
    the straight-through estimator.

    The forward uses w ⊙ m. Gradients (exactly those of edge-popup's formulation, where m's backward is the
    identity): the weights get ∂L/∂(w ⊙ m) ⊙ m, the scores ∂L/∂(w ⊙ m) ⊙ w ⊙ sign(score). Both come from the dense
    ∂L/∂(w ⊙ m) that the backward leaves in ``weight.grad`` (so DDP's all-reduce of the weight gradients is all
    the data parallel training needs, and micro-batches accumulate exactly); ``step()`` splits it and takes the
    optimizer step, which updates weights and scores together.

    The scores are a buffer ``<weight>_scores`` of each layer (``weight_scores``; saved in the model's
    state_dict) and train in a parameter group that STE adds to ``optimizer``, with the optimizer's defaults
    overridden by ``score_options`` (``{"lr": 0.1, "weight_decay": 0.0}``; a learning-rate scheduler made
    afterwards drives them too). To resume, build the same STE (it adds the same group) before loading the
    optimizer's state_dict. :meth:`finalize` zeros the weights off the final masks and removes the scores and
    their group.

    Every step is an update step; under DDP the masks are compared across ranks (checksums) before each step.
    Cost per step: one O(numel) selection (``kthvalue``) per layer, and the scores' optimizer update.

    Build it on the dense model with ``sparsity`` (layer counts from ``distribution``, as :func:`sparsify`), or
    on one with masked layers (``sparsify(..., layout="masked")``), whose counts are kept. SparseLinear layers
    (``layout="sparse"``) are refused: the method trains a dense latent weight; convert after :meth:`finalize`
    with :func:`sparsekern.training.to_sparse_linear`.

    Args:
        model, optimizer, group: as :class:`SRSTE`.
        sparsity: for a dense model, the overall fraction of zeros in [0, 1).
        distribution, dense_first, include, exclude: for a dense model, as :func:`sparsify`.
        score_init: "kaiming_uniform" (edge-popup's: U(±sqrt(6 / ((1 + 5) fan_in))), from a generator seeded with
            ``seed``, identical on every rank) or "magnitude" (|w|: the first mask is magnitude pruning).
        seed: the score initialisation's seed.
        score_options: the scores' parameter-group options (default: the optimizer's).
        rescale: multiply each layer's weights by sqrt(numel / nnz) first, as ``sparsify(..., rescale=True)``, so
            the masked layers start with the output variance of the dense initialisation (on the digits MLP at
            90% this took the final accuracy from 94.2% to 97.2%).

    Raises:
        ValueError: a dense model without sparsity, or sparsity with a masked one; bad sparsity, distribution,
            score_init; SparseLinear layers; scores that are inf or NaN (no order).
        TypeError: arguments of the wrong type.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> ste = sparsekern.STE(model, optimizer, sparsity=0.9, rescale=True, score_options={"weight_decay": 0.0})
        >>> for _ in range(3):
        ...     x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        ...     nn.functional.cross_entropy(model(x), y).backward()
        ...     moved = ste.step()                   # weights and scores step; the masks follow the scores
        ...     optimizer.zero_grad()
        >>> report = ste.finalize()
        >>> report = sparsekern.training.to_sparse_linear(model)   # now SparseLinear layers
    """

    def __init__(self, model, optimizer, *, sparsity: float | None = None, distribution: str = "erk",
                 dense_first: bool = False, include=None, exclude=None, score_init: str = "kaiming_uniform",
                 seed: int = 0, score_options: dict | None = None, rescale: bool = False,
                 group=None):  # fmt: skip
        fn = "STE"
        self.sparsity = None if sparsity is None else _check_sparsity(fn, sparsity)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"{fn}: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if not isinstance(dense_first, bool):
            raise TypeError(f"{fn}: dense_first must be a bool, got {dense_first!r}")
        if not isinstance(rescale, bool):
            raise TypeError(f"{fn}: rescale must be a bool, got {rescale!r}")
        self.rescale = rescale
        if score_init not in SCORE_INITS:
            raise ValueError(f"{fn}: score_init must be one of {SCORE_INITS}, got {score_init!r}")
        self.seed = _check_int(fn, "seed", seed)
        if score_options is None:
            score_options = {}
        if not isinstance(score_options, dict) or "params" in score_options:
            raise TypeError(f"{fn}: score_options must be a dict of parameter-group options, got {score_options!r}")
        self.distribution, self.dense_first, self.score_init = distribution, dense_first, score_init
        self.generator = torch.Generator().manual_seed(seed)
        super().__init__(model, optimizer, include=include, exclude=exclude, group=group)
        self.scores = {name: module._buffers[f"{attr}_scores"] for name, (module, attr) in self._targets.items()}
        optimizer.add_param_group({"params": list(self.scores.values()), **score_options})

    def _make_rules(self, fn, targets, masked) -> dict:
        if masked:
            if self.sparsity is not None:
                raise ValueError(
                    f"{fn}: the model is sparsified already and its layers keep their counts; pass sparsity only "
                    "with a dense model"
                )
            counts = [int(getattr(module, f"{attr}_mask").sum()) for module, attr in targets.values()]
        else:
            if self.sparsity is None:
                raise ValueError(f"{fn}: a dense model needs sparsity= (the fraction of zeros)")
            shapes = [tuple(getattr(module, attr).shape) for module, attr in targets.values()]
            dense = [self.dense_first and i == 0 for i in range(len(shapes))]
            counts = layer_nnz(shapes, self.sparsity, self.distribution, dense=dense)
        return {name: _ScoreRule(count) for name, count in zip(targets, counts, strict=True)}

    def _prepare(self, module, attr, rule) -> None:
        weight = getattr(module, attr).detach()
        if self.rescale and rule.count:
            weight.mul_(math.sqrt(weight.numel() / rule.count))
        if self.score_init == "magnitude":
            scores = weight.abs()
        else:
            scores = torch.empty(weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(scores, a=math.sqrt(5), generator=self.generator)
            scores = scores.to(device=weight.device, dtype=weight.dtype)
        module.register_buffer(f"{attr}_scores", scores)

    def _config(self) -> dict:
        return {"score_init": self.score_init, "seed": self.seed}

    def _stage(self, name, module, attr, weight, grad, mask):
        scores = module._buffers[f"{attr}_scores"]
        # d/d|s| of w ⊙ m is ∂L/∂(w ⊙ m) ⊙ w (m's backward is the identity), then through |s|: ⊙ sign(s)
        score_grad = (grad * weight.detach()).mul_(scores.sgn())

        def swap() -> None:
            scores.grad = score_grad
            grad.mul_(mask)

        return swap

    def finalize(self) -> SparsityReport:
        report = super().finalize()
        ids = {id(s) for s in self.scores.values()}
        self.optimizer.param_groups[:] = [
            g for g in self.optimizer.param_groups if not any(id(p) in ids for p in g["params"])
        ]
        for (module, attr), scores in zip(self._targets.values(), self.scores.values(), strict=True):
            self.optimizer.state.pop(scores, None)
            del module._buffers[f"{attr}_scores"]
        self.scores = {}
        return report
