"""Pruning at initialisation beyond SNIP: GraSP (Hessian-gradient product) and SynFlow (iterative, data-free).

Both follow SNIP's pattern: a ``*_scores`` function on the dense model at initialisation, then
``sparsify(model, s, distribution="global", scores=...)`` keeps the top (1 - s), then a fixed-mask sparsifier
(:class:`GraSP`, :class:`SynFlow`) trains with those masks exactly like :class:`~sparsekern.training.Static`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from .._distributed import verify_masks_across_ranks
from .distribution import _check_sparsity
from .sparsifier import Sparsifier
from .sparsify import SUPPORTED, _select, _top_mask, _unwrap


def _batch_losses(fn: str, loss_fn) -> list[Callable[[nn.Module], torch.Tensor]]:
    """``loss_fn`` as a list of per-batch loss callables: a callable is one batch; a sequence holds callables or
    (inputs, targets) pairs, whose loss is the cross-entropy of the model's output (GraSP's)."""
    if callable(loss_fn):
        return [loss_fn]
    if isinstance(loss_fn, (str, bytes)) or not isinstance(loss_fn, Sequence):
        raise TypeError(
            f"{fn}: loss_fn must be callable as loss_fn(model) -> scalar loss, or a list of such callables or of "
            f"(inputs, targets) batches, got {type(loss_fn).__name__}"
        )
    if not loss_fn:
        raise ValueError(f"{fn}: loss_fn is an empty list of batches")
    losses = []
    for i, batch in enumerate(loss_fn):
        if callable(batch):
            losses.append(batch)
        elif isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, torch.Tensor) for t in batch):
            x, y = batch
            losses.append(lambda model, x=x, y=y: nn.functional.cross_entropy(model(x), y))
        else:
            raise TypeError(
                f"{fn}: loss_fn[{i}] must be a callable loss_fn(model) or an (inputs, targets) pair of tensors, "
                f"got {type(batch).__name__}"
            )
    return losses


def _scalar_loss(fn: str, loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"{fn}: loss_fn must return a scalar tensor, got {loss!r}")
    return loss.reshape(())


def _sum_across_ranks(fn: str, group, tensors: list[torch.Tensor], failure: BaseException | None) -> list[torch.Tensor]:
    """The sums over the ranks of ``group`` of ``tensors`` (one all-reduce). ``failure``: this rank could not compute
    its part; every rank learns of it first and raises (this one its own error), so none waits for ever."""
    import torch.distributed as dist

    flag = torch.tensor([0 if failure is None else 1], dtype=torch.int64, device=tensors[0].device)
    dist.all_reduce(flag, group=group)
    if failure is not None:
        raise failure
    if int(flag):
        raise ValueError(f"{fn}: another rank of group failed to compute its gradients (its error says why)")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def _summed_over(parts: Iterable[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """The sums of per-batch gradient lists, in batch order (as the official code accumulates them)."""
    total = None
    for grads in parts:
        total = list(grads) if total is None else [t.add_(g) for t, g in zip(total, grads, strict=True)]
    return total


def _check_temperature(fn: str, temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{fn}: temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{fn}: temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def grasp_scores(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor] | Sequence,
    *,
    temperature: float = 200.0,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    group=None,
) -> dict[str, torch.Tensor]:
    """GraSP's scores (Wang et al., ICLR 2020) of every weight :func:`sparsify` would sparsify, signed so that the
    **kept** weights are the highest: this returns ``θ ⊙ (H g)``, the negation of the paper's ``S = -θ ⊙ (H g)``
    whose highest values GraSP prunes. Keep the top (1 - s) globally with
    ``sparsify(model, s, distribution="global", scores=...)`` and train with :class:`GraSP` (fixed masks).

    As the official code (alecwangcq/GraSP): over the batches b, ``g = Σ_b ∇L_b`` (summed, not averaged), then
    ``H g = Σ_b ∇(gᵀ ∇L_b)`` with g held constant (double backward), the Hessian taken over the scored weights;
    every loss sees the model's output divided by ``temperature`` (the code's T = 200). The model runs in the mode
    it is in (train at initialisation, as in the paper's code: BatchNorm uses batch statistics); its gradients and
    buffers (BatchNorm's running statistics) are left as they were. Ties of the final selection go to the lower
    flat index (``sparsify``'s rule; the official code keeps every tie at its threshold). The official code also
    re-draws the Linear layers with Xavier-normal before scoring; that is left to the caller.

    Args:
        model: the dense model at initialisation (a DDP wrapper is looked through: the losses see the model itself).
        loss_fn: one batch as ``loss_fn(model) -> scalar loss``, or several: a list of such callables or of
            ``(inputs, targets)`` tensor pairs (their loss: ``cross_entropy(model(inputs), targets)``). The official
            code feeds both g and H g with the same batches (balanced samples, split in halves).
        temperature: the model's output is divided by it in every loss (a forward hook on ``model``; the output
            must be a tensor unless ``temperature == 1``).
        include, exclude: as in :func:`sparsify`.
        group: a ``torch.distributed`` process group (default: the DDP wrapper's): g and H g are summed over the
            ranks, so every rank with the same weights gets the same scores from its own batches (the scores one
            process gets from all ranks' batches, up to the order of the sums).

    Returns:
        {weight name: ``θ ⊙ (H g)``, a tensor of the weight's shape and dtype}.

    Raises:
        TypeError: a loss_fn that is neither callable nor a list of batches, a bad temperature, or a model output
            that is not a tensor while ``temperature != 1``.
        ValueError: no weight to score, a scored weight that does not require grad, a loss that is not a scalar, a
            non-finite Hessian-gradient product, or a
            rank of ``group`` that failed.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> batches = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(2)]
        >>> scores = sparsekern.grasp_scores(model, batches)
        >>> report = sparsekern.sparsify(model, 0.9, distribution="global", scores=scores)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sparsifier = sparsekern.GraSP(model, optimizer)      # then step() as with Static
        >>> round(report.sparsity, 4)
        0.9
    """
    fn = "grasp_scores"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    losses = _batch_losses(fn, loss_fn)
    temperature = _check_temperature(fn, temperature)
    if group is None and isinstance(model, nn.parallel.DistributedDataParallel):
        group = model.process_group
    model = _unwrap(model)
    targets = _select(fn, model, include, exclude)
    if not targets:
        raise ValueError(f"{fn}: no weight to score ({SUPPORTED})")
    weights = [getattr(module, param) for module, param in targets.values()]
    frozen = [key for key, w in zip(targets, weights, strict=True) if not w.requires_grad]
    if frozen:
        raise ValueError(f"{fn}: {frozen} do not require grad; GraSP differentiates the loss twice by every scored "
                         "weight (exclude= them, or requires_grad_() first)")  # fmt: skip

    def scale(module, args, output):
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"{fn}: temperature={temperature:g} divides the model's output, which must then be a tensor "
                f"(logits), got {type(output).__name__}; pass temperature=1 and scale inside loss_fn"
            )
        return output / temperature

    def gradients(loss, **kwargs):
        return torch.autograd.grad(_scalar_loss(fn, loss), weights, allow_unused=True, materialize_grads=True, **kwargs)

    def summed(compute) -> list[torch.Tensor]:
        # Under a group a rank that fails must still join the sum, or the others wait for it for ever.
        failure, parts = None, weights
        try:
            parts = compute()
        except Exception as exc:
            if group is None:
                raise
            failure = exc
        return parts if group is None else _sum_across_ranks(fn, group, parts, failure)

    def gradient() -> list[torch.Tensor]:
        return _summed_over(gradients(loss(model)) for loss in losses)

    def hessian_gradient(g) -> list[torch.Tensor]:
        def part(loss):
            grad = gradients(loss(model), create_graph=True)
            z = sum((gi.detach() * fi).sum() for gi, fi in zip(g, grad, strict=True))
            return torch.autograd.grad(z, weights, allow_unused=True, materialize_grads=True)

        return _summed_over(part(loss) for loss in losses)

    # Forward passes in train mode update BatchNorm's running statistics: put them back afterwards.
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    hook = model.register_forward_hook(scale) if temperature != 1.0 else None
    try:
        with torch.enable_grad():
            g = summed(gradient)
            hg = summed(lambda: hessian_gradient(g))
    finally:
        if hook is not None:
            hook.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    scores = {}
    for key, w, h in zip(targets, weights, hg, strict=True):
        if not bool(torch.isfinite(h).all()):
            raise ValueError(f"{fn}: the Hessian-gradient product of {key!r} holds inf or NaN")
        scores[key] = (w.detach() * h).detach()
    return scores


def _round_counts(numel: int, sparsity: float, rounds: int) -> list[int]:
    """Weights SynFlow keeps after each round k = 1..rounds: round((1 - s)^(k / rounds) · numel), the exponential
    schedule; the last is sparsify's global count round((1 - s) · numel)."""
    return [int(round((1.0 - sparsity) ** (k / rounds) * numel)) for k in range(1, rounds + 1)]


def synflow_scores(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    sparsity: float,
    rounds: int = 100,
    dtype: torch.dtype | None = torch.float64,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """SynFlow's scores (Tanaka et al., NeurIPS 2020), data-free and iterative, of every weight :func:`sparsify`
    would sparsify: their global top (1 - ``sparsity``) is exactly SynFlow's final mask. Keep it with
    ``sparsify(model, sparsity, distribution="global", scores=...)`` (same ``include``/``exclude``) and train with
    :class:`SynFlow` (fixed masks).

    As the official code (ganguli-lab/Synaptic-Flow): the model is linearised (every floating parameter and
    buffer replaced by its absolute value, BatchNorm in eval mode with its running statistics), fed an all-ones
    input of ``example_input``'s shape with batch 1, and each scored weight gets ``|θ ⊙ ∂R/∂θ|`` with R the sum of
    the output. Over ``rounds`` rounds the mask shrinks on the exponential schedule: after round k it keeps the
    round((1 - s)^(k / rounds) · N) highest scores among the weights still kept (global over the N scored weights;
    ties: lower flat index), and the next round scores the model masked by it. It all runs on copies
    (``torch.func.functional_call``): the model's weights, signs, buffers, gradients and ``requires_grad`` are never
    touched, and its train/eval modes are put back.

    Args:
        model: the dense model at initialisation (a DDP wrapper is looked through; no data, so every rank with
            the same weights gets the same scores).
        example_input: a floating tensor of the model's input shape (batch first); only its shape is used.
        sparsity: the target sparsity in [0, 1) of the scored weights.
        rounds: pruning rounds (default 100, the paper's); 1 is one-shot SynFlow.
        dtype: the arithmetic (default float64: products of |θ| over many layers overflow float32 in deep nets,
            as the paper warns); None keeps the model's.
        include, exclude: as in :func:`sparsify`.

    Returns:
        {weight name: score tensor of the weight's shape}: the last round's scores where the final mask keeps a
        weight (>= 0), -1 where it does not.

    Raises:
        TypeError: a bad model, example_input, rounds or dtype.
        ValueError: sparsity out of [0, 1), rounds < 1, no weight to score, a model that fails on the all-ones
            input, or scores that are not finite (use dtype=torch.float64).

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> scores = sparsekern.synflow_scores(model, torch.randn(32, 64), sparsity=0.9)
        >>> report = sparsekern.sparsify(model, 0.9, distribution="global", scores=scores, layout="masked")
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sparsifier = sparsekern.SynFlow(model, optimizer)    # then step() as with Static
        >>> round(report.sparsity, 4)
        0.9
    """
    fn = "synflow_scores"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        got = example_input.dtype if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise TypeError(f"{fn}: example_input must be a floating tensor of the model's input shape, got {got}")
    if example_input.dim() < 1:
        raise ValueError(f"{fn}: example_input must have a batch dimension first, got a 0-d tensor")
    sparsity = _check_sparsity(fn, sparsity)
    if isinstance(rounds, bool) or not isinstance(rounds, int):
        raise TypeError(f"{fn}: rounds must be an int, got {rounds!r}")
    if rounds < 1:
        raise ValueError(f"{fn}: rounds must be >= 1, got {rounds}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{fn}: dtype must be a floating torch.dtype or None, got {dtype!r}")
    model = _unwrap(model)
    targets = _select(fn, model, include, exclude)
    if not targets:
        raise ValueError(f"{fn}: no weight to score ({SUPPORTED})")
    names = {id(getattr(module, param)): key for key, (module, param) in targets.items()}

    def linear(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(dtype).abs() if t.is_floating_point() and dtype is not None else t.abs()

    # |θ| of every parameter and buffer (the official code's linearise); the scored weights by their sparsify name
    params = {name: linear(p) for name, p in model.named_parameters()}
    keys = {name: names[id(p)] for name, p in model.named_parameters() if id(p) in names}
    buffers = {name: linear(b) for name, b in model.named_buffers()}
    first = next(iter(params.values()))  # the scored weights are parameters: there is one
    ones = torch.ones((1, *example_input.shape[1:]), dtype=first.dtype, device=first.device)
    numel = {key: getattr(m, p).numel() for key, (m, p) in targets.items()}
    keep = {key: torch.ones(getattr(m, p).shape, dtype=torch.bool, device=first.device)
            for key, (m, p) in targets.items()}  # fmt: skip

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for count in _round_counts(sum(numel.values()), sparsity, rounds):
            scored = {name: (params[name] * keep[key]).requires_grad_() for name, key in keys.items()}
            with torch.enable_grad():
                try:
                    out = torch.func.functional_call(model, ({**params, **scored}, buffers), (ones,))
                except (RuntimeError, ValueError, TypeError) as exc:
                    raise ValueError(
                        f"{fn}: the model fails on an all-ones input of shape {tuple(ones.shape)} (example_input's "
                        f"shape with batch 1): {exc}"
                    ) from exc
                if not isinstance(out, torch.Tensor):
                    raise TypeError(f"{fn}: the model must return a tensor, got {type(out).__name__}")
                grads = torch.autograd.grad(out.sum(), list(scored.values()), allow_unused=True,
                                            materialize_grads=True)  # fmt: skip
            scores = {keys[name]: (w * g).detach().abs() for (name, w), g in zip(scored.items(), grads, strict=True)}
            for key, s in scores.items():
                if not bool(torch.isfinite(s).all()):
                    raise ValueError(f"{fn}: the scores of {key!r} hold inf or NaN; use dtype=torch.float64")
            # The mask only shrinks: select among the weights still kept (ascending flat indices, so ties still go
            # to the lower flat index), which also sorts fewer scores each round.
            alive = torch.cat([keep[key].reshape(-1) for key in targets]).nonzero().squeeze(1)
            flat = torch.cat([scores[key].reshape(-1) for key in targets])
            chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            chosen[alive[_top_mask(flat[alive], count)]] = True
            parts = chosen.split(list(numel.values()))
            keep = {key: part.view(keep[key].shape) for key, part in zip(targets, parts, strict=True)}
    finally:
        for module, training in modes:
            module.training = training
    return {key: torch.where(keep[key], scores[key], -1.0) for key in targets}


class _PrunedAtInit(Sparsifier):
    """A fixed-mask sparsifier whose masks were chosen once at initialisation; under a process group it checks at
    construction that every rank holds the same masks."""

    flops_rule = "sparse"
    _hint = ""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, group=None):
        super().__init__(model, optimizer, group=group)
        try:
            verify_masks_across_ranks(type(self).__name__, self.group, {n: m.active() for n, m in self.layers.items()})
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} ({self._hint})") from exc


class GraSP(_PrunedAtInit):
    """GraSP (Wang et al., ICLR 2020): masks chosen once by the Hessian-gradient product at initialisation
    (:func:`grasp_scores` and ``sparsify(..., distribution="global", scores=...)`` on the dense model), then fixed:
    trains exactly like :class:`Static`. Both layouts work (``sparsify``'s ``layout``); under a process group the
    constructor checks that every rank holds the same masks.

    Args:
        model, optimizer, group: as :class:`Static`.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> x0, y0 = torch.randn(128, 64), torch.randint(0, 10, (128,))
        >>> scores = sparsekern.grasp_scores(model, [(x0[:64], y0[:64]), (x0[64:], y0[64:])])
        >>> report = sparsekern.sparsify(model, 0.9, distribution="global", scores=scores)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sparsifier = sparsekern.GraSP(model, optimizer)
        >>> for _ in range(3):
        ...     nn.functional.cross_entropy(model(x0), y0).backward()
        ...     moved = sparsifier.step()                 # instead of optimizer.step(); never moves the masks
        ...     optimizer.zero_grad()
        >>> moved, round(sparsekern.sparsity_report(model).sparsity, 4)
        (False, 0.9)
    """

    _hint = "compute grasp_scores with group= on synchronised weights"


class SynFlow(_PrunedAtInit):
    """SynFlow (Tanaka et al., NeurIPS 2020): masks chosen once, data-free and iteratively, at initialisation
    (:func:`synflow_scores` and ``sparsify(..., distribution="global", scores=...)`` on the dense model), then fixed:
    trains exactly like :class:`Static`. Both layouts work; under a process group the constructor checks that every
    rank holds the same masks.

    Args:
        model, optimizer, group: as :class:`Static`.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
        ...                       nn.Linear(16 * 6 * 6, 10))
        >>> scores = sparsekern.synflow_scores(model, torch.randn(8, 3, 8, 8), sparsity=0.8, rounds=20)
        >>> report = sparsekern.sparsify(model, 0.8, distribution="global", scores=scores)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> sparsifier = sparsekern.SynFlow(model, optimizer)     # then step() as with Static
        >>> [layer.layout for layer in report.layers], report.nnz     # round(0.2 * (432 + 5760)) kept
        (['masked', 'sparse'], 1238)
    """

    _hint = "compute synflow_scores from the same weights on every rank"
