"""Linear interpolation between two trained networks and its error barrier (linear mode connectivity).

Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis"; Paul et al. 2023, "Unmasking
the Lottery Ticket Hypothesis"."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SparseLinear
from ..training.sparsify import _replace

REFERENCES = ("linear", "max")
METRICS = ("error", "loss")


@dataclass(frozen=True)
class InterpolationCurve:
    """Loss and error of w(β) = (1−β)·w_A + β·w_B at each β (``betas`` increasing, in [0, 1])."""

    betas: tuple[float, ...]
    losses: tuple[float, ...]
    errors: tuple[float, ...]

    @property
    def barrier(self) -> float:
        """The error barrier against the linear interpolation of the endpoints (Paul et al.)."""
        return error_barrier(self, reference="linear")

    @property
    def barrier_max(self) -> float:
        """The error barrier against the worse endpoint (Frankle et al. 2020)."""
        return error_barrier(self, reference="max")

    def to_dict(self) -> dict:
        return {
            "betas": list(self.betas),
            "losses": list(self.losses),
            "errors": list(self.errors),
            "barrier": self.barrier,
            "barrier_max": self.barrier_max,
            "loss_barrier": error_barrier(self, reference="linear", metric="loss"),
        }


def error_barrier(curve: InterpolationCurve, *, reference: str = "linear", metric: str = "error") -> float:
    """The barrier of an :func:`interpolate` curve, from the values E(β) of ``metric`` ("error" or "loss").

    - ``reference="linear"`` (Paul et al. 2023): max over β of E(β) − ((1−β)·E(0) + β·E(1)).
    - ``reference="max"`` (Frankle et al. 2020): max over β of E(β) − max(E(0), E(1)).

    Both are 0 or more (the endpoints themselves contribute 0). The curve must start at β=0 and end at β=1.
    Raises ``ValueError`` for another reference or metric, or a curve without both endpoints."""
    if reference not in REFERENCES:
        raise ValueError(f"error_barrier: reference must be one of {REFERENCES}, got {reference!r}")
    if metric not in METRICS:
        raise ValueError(f"error_barrier: metric must be one of {METRICS}, got {metric!r}")
    betas = curve.betas
    if not betas or betas[0] != 0.0 or betas[-1] != 1.0:
        raise ValueError(f"error_barrier: the curve must start at beta=0 and end at beta=1, got betas {betas}")
    values = curve.errors if metric == "error" else curve.losses
    first, last = values[0], values[-1]
    if reference == "max":
        return max(values) - max(first, last)
    return max(v - ((1.0 - b) * first + b * last) for b, v in zip(betas, values, strict=True))


def _betas(betas) -> tuple[float, ...]:
    if isinstance(betas, bool) or not isinstance(betas, (int, Sequence, torch.Tensor)):
        raise TypeError(f"interpolate: betas must be an int or a sequence of floats, got {type(betas).__name__}")
    if isinstance(betas, int):
        if betas < 2:
            raise ValueError(f"interpolate: betas must be at least 2 points, got {betas}")
        return tuple(torch.linspace(0.0, 1.0, betas, dtype=torch.float64).tolist())
    values = tuple(float(b) for b in (betas.tolist() if isinstance(betas, torch.Tensor) else betas))
    if not values or any(not (0.0 <= b <= 1.0) or math.isnan(b) for b in values):
        raise ValueError(f"interpolate: betas must be non-empty and in [0, 1], got {values}")
    if any(b1 <= b0 for b0, b1 in itertools.pairwise(values)):
        raise ValueError(f"interpolate: betas must be strictly increasing, got {values}")
    return values


def _first_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    expected = model.state_dict()
    for key in expected:
        if key not in state:
            return f"{key!r} is missing"
    for key in state:
        if key not in expected:
            return f"{key!r} is not in the model"
    for key, tensor in expected.items():
        owner = model.get_submodule(key.rpartition(".")[0])
        # a SparseLinear's values and index are sized by its nonzeros, which may differ between a and b
        if not isinstance(owner, SparseLinear) and tuple(state[key].shape) != tuple(tensor.shape):
            return f"{key!r} has shape {tuple(state[key].shape)}, the model's is {tuple(tensor.shape)}"
    return None


def _densified(template: nn.Module, endpoint, name: str) -> nn.Module:
    """A scratch copy of ``template`` holding ``endpoint``'s weights, SparseLinear layers turned into nn.Linear."""
    scratch = copy.deepcopy(template)
    if isinstance(endpoint, nn.Module):
        endpoint = endpoint.state_dict()
    mismatch = _first_mismatch(scratch, endpoint)
    if mismatch:
        raise ValueError(f"interpolate: {name} does not fit the model's architecture: {mismatch}")
    try:
        scratch.load_state_dict(endpoint)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"interpolate: {name} does not fit the model's architecture: {err}") from err
    for module in list(scratch.modules()):
        if isinstance(module, SparseLinear):
            _replace(scratch, module, module.to_dense())
    return scratch


def _effective(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """A masked Parameter as the network computes with it: zero off its ``<key>_mask``."""
    mask = state.get(f"{key}_mask")
    value = state[key]
    return value * mask if mask is not None and mask.dtype == torch.bool else value


def _mix(state_a, state_b, beta: float) -> dict[str, torch.Tensor]:
    out = {}
    for key, ta in state_a.items():
        tb = state_b[key]
        if ta.dtype == torch.bool and key.endswith("_mask"):
            out[key] = ta | tb  # the interpolated weight lives on the union of the supports
        elif ta.is_floating_point() or ta.is_complex():
            # in float64 so that β=0 and β=1 give the endpoints exactly
            a, b = _effective(state_a, key).double(), _effective(state_b, key).double()
            out[key] = ((1.0 - beta) * a + beta * b).to(ta.dtype)
        else:
            out[key] = ta  # integer buffers (BN num_batches_tracked) come from a
    return out


def _batches(data, fn: str, arg: str) -> Iterable:
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [data]
    if isinstance(data, Iterable):
        return data
    raise TypeError(
        f"{fn}: {arg} must be a tensor, an (x, y) tuple of tensors or an iterable of batches, got {type(data).__name__}"
    )


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, data) -> None:
    """Reset every batch-norm layer's running statistics and recompute them from ``data`` (a tensor of inputs,
    an (x, y) tuple, or an iterable of such batches) in one train-mode pass without gradients. Each batch counts
    equally (``momentum=None``: the running statistics are the mean of the batches' statistics). The model is
    left in eval mode. Raises ``ValueError`` when the model has no batch-norm layer or ``data`` is empty."""
    norms = _batch_norms(model)
    if not norms:
        raise ValueError("recompute_batch_norm: the model has no batch-norm layer with running statistics")
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    try:
        for batch in _batches(data, "recompute_batch_norm", "data"):
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
            seen += 1
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.eval()
    if not seen:
        raise ValueError("recompute_batch_norm: data has no batches")


def _data_evaluator(data, loss_fn, subsample, seed, batch_size) -> Callable[[nn.Module], tuple[float, float]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"interpolate: data x and y differ in length: {x.shape[0]} and {y.shape[0]}")
        if subsample is not None:
            if not 0 < subsample <= x.shape[0]:
                raise ValueError(f"interpolate: subsample must be in [1, {x.shape[0]}], got {subsample}")
            # one fixed subsample for every β, drawn from a seeded generator (reproducible)
            pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:subsample]
            x, y = x[pick.to(x.device)], y[pick.to(y.device)]
        batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    elif subsample is not None:
        raise ValueError("interpolate: subsample needs data as an (x, y) tuple of tensors, not a loader")
    elif isinstance(data, Iterable) and not isinstance(data, torch.Tensor):
        batches = data
    else:
        raise TypeError(
            f"interpolate: data must be an (x, y) tuple of tensors or an iterable of (x, y) batches, "
            f"got {type(data).__name__}"
        )

    def evaluate(model: nn.Module) -> tuple[float, float]:
        loss = wrong = 0.0
        count = 0
        for x, y in batches:
            out = model(x)
            n = y.shape[0]
            loss += float(loss_fn(out, y)) * n
            wrong += float((out.argmax(dim=-1) != y).sum())
            count += n
        if not count:
            raise ValueError("interpolate: data has no samples")
        return loss / count, wrong / count

    return evaluate


def interpolate(
    a: nn.Module | Mapping[str, torch.Tensor],
    b: nn.Module | Mapping[str, torch.Tensor],
    *,
    data=None,
    evaluate: Callable[[nn.Module], tuple[float, float]] | None = None,
    model: nn.Module | None = None,
    betas: int | Sequence[float] = 11,
    bn_data=None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    subsample: int | None = None,
    seed: int = 0,
    batch_size: int = 1024,
) -> InterpolationCurve:
    """Loss and error along the straight line w(β) = (1−β)·w_A + β·w_B between two networks.

    ``a`` and ``b`` are models or state_dicts of one architecture. ``model`` gives the architecture when both are
    state_dicts (otherwise it defaults to ``a``). Every evaluation runs on a scratch copy: neither ``a``, ``b``
    nor ``model`` is changed.

    Give exactly one of:
      - ``data``: an ``(x, y)`` tuple of tensors (evaluated in chunks of ``batch_size``; ``subsample=n`` uses one
        fixed random subset of n samples for every β, drawn with ``seed``) or an iterable of ``(x, y)`` batches
        (a DataLoader or a list, not a one-shot iterator: it is read once per β). Loss is ``loss_fn(model(x), y)``
        (default cross-entropy; it must return the batch mean) averaged over samples; error is the top-1
        misclassification rate.
      - ``evaluate``: ``evaluate(model) -> (loss, error)``, called once per β under ``torch.no_grad()`` with
        the interpolated scratch model in eval mode.

    ``betas``: an int n (n points ``linspace(0, 1, n)``) or an increasing sequence in [0, 1].

    What is interpolated: floating Parameters and buffers. Integer buffers (batch-norm ``num_batches_tracked``)
    are taken from ``a``. Masked layers (a bool ``<name>_mask`` buffer) interpolate ``weight * mask`` of each side
    and the result's mask is ``mask_A | mask_B`` (the union of supports). ``SparseLinear`` layers are densified
    on the scratch copy (a plain ``nn.Linear`` whose weight is zero off each side's support), so two sparse models
    with different supports interpolate on their union as well.

    Batch norm: with ``bn_data`` (inputs, ``(x, y)`` or an iterable of batches) the running statistics are reset
    and recomputed at every β (:func:`recompute_batch_norm`) before evaluating; without it the interpolated
    running statistics are used as they are.

    Returns an :class:`InterpolationCurve` (``.barrier``, ``.barrier_max``, ``.to_dict()``).

    Raises ``ValueError`` when the architectures differ (naming the first mismatching key), when neither or both
    of ``data`` and ``evaluate`` are given, for bad ``betas`` or ``subsample``, or when ``bn_data`` is given for
    a model without batch norm; ``TypeError`` for arguments of the wrong kind.

    Example:

    >>> a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    >>> curve = sparsekern.tickets.interpolate(a, b, data=(x, y), betas=5)
    >>> curve.betas
    (0.0, 0.25, 0.5, 0.75, 1.0)
    >>> curve.barrier >= 0 and curve.barrier_max >= 0
    True
    """
    if (data is None) == (evaluate is None):
        raise ValueError("interpolate: give exactly one of data= ((x, y) or a loader) and evaluate= (a callable)")
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, (nn.Module, Mapping)):
            raise TypeError(f"interpolate: {name} must be an nn.Module or a state_dict, got {type(value).__name__}")
    template = model if model is not None else (a if isinstance(a, nn.Module) else b)
    if not isinstance(template, nn.Module):
        raise ValueError("interpolate: a and b are both state_dicts: pass model= (the architecture to load them in)")
    points = _betas(betas)
    for arg, value in (("data", data), ("bn_data", bn_data)):
        if isinstance(value, Iterator):
            raise TypeError(
                f"interpolate: {arg} is a one-shot iterator, but it is read once per beta: pass tensors, a list of "
                "batches or a DataLoader"
            )
    if evaluate is None:
        evaluate = _data_evaluator(data, loss_fn, subsample, seed, batch_size)
    elif not callable(evaluate):
        raise TypeError(f"interpolate: evaluate must be callable, got {type(evaluate).__name__}")

    scratch = _densified(template, a, "a")
    state_a = scratch.state_dict()
    state_b = _densified(template, b, "b").state_dict()
    state_a = {k: v.detach().clone() for k, v in state_a.items()}  # scratch's own tensors are overwritten below
    if bn_data is not None and not _batch_norms(scratch):
        raise ValueError("interpolate: bn_data is given but the model has no batch-norm layer")

    losses, errors = [], []
    for beta in points:
        scratch.load_state_dict(_mix(state_a, state_b, beta))
        if bn_data is not None:
            recompute_batch_norm(scratch, bn_data)
        scratch.eval()
        with torch.no_grad():
            loss, error = evaluate(scratch)
        losses.append(float(loss))
        errors.append(float(error))
    return InterpolationCurve(points, tuple(losses), tuple(errors))
