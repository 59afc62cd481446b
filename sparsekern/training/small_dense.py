"""The small-dense baseline of the RigL paper: a narrower dense model with as many weights as the sparse one."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction

from torch import nn

from .distribution import _check_sparsity
from .drop_grow import is_masked

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)
# modules that keep the channels (or features) they are given, and hold no weight to resize
_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_PASS_MODULES = ("torch.nn.modules.activation", "torch.nn.modules.pooling", "torch.nn.modules.padding")
SUPPORTED = (
    "nn.Sequential (nested too) of Linear, Conv1d/2d/3d (groups=1), BatchNorm, LayerNorm (over the features), "
    "Flatten, activations, dropout, pooling and padding"
)


@dataclass
class _Dim:
    """A feature (or channel) count: ``width[layer] · factor``; layer -1 is the model's input, never narrowed."""

    layer: int
    factor: int = 1


@dataclass
class _Step:
    """One leaf module: its weight layer index (or None), and the dims of its input and output."""

    module: nn.Module
    index: int | None
    dim: _Dim  # the input's (a norm: the features it normalises)


def _leaves(fn: str, model: nn.Module, prefix: str = ""):
    """(name, module) of every leaf of a nested Sequential, in order."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if type(child) is nn.Sequential:
            yield from _leaves(fn, child, f"{full}.")
        else:
            yield full, child


def _passes(module: nn.Module) -> bool:
    if isinstance(module, _PASS):
        return True
    return type(module).__module__ in _PASS_MODULES and not isinstance(module, nn.MultiheadAttention)


def _analyse(fn: str, model: nn.Module) -> tuple[list[_Step], list[int]]:
    """The steps, and the original output width of every weight layer (the last one is the model's output)."""
    steps, widths = [], []
    dim, conv, flattened = _Dim(-1), None, False  # conv: the current tensor has channels; flattened: C·spatial
    for name, module in _leaves(fn, model):
        where = f"{name} ({type(module).__name__})"
        if is_masked(module) or type(module).__name__ == "SparseLinear":
            raise ValueError(f"{fn}: {where} is sparse; call small_dense on the dense model")
        if isinstance(module, (nn.Linear, *_CONV)):
            n_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            if isinstance(module, _CONV) and module.groups != 1:
                raise ValueError(f"{fn}: {where} has groups={module.groups}; only groups=1 convolutions are narrowed")
            if isinstance(module, _CONV) and flattened:
                raise ValueError(f"{fn}: {where} follows a Flatten; cannot follow its channels")
            if dim.layer >= 0:
                width = widths[dim.layer]
                if flattened:  # the features are the channels times the positions each channel was flattened from
                    if n_in % width:
                        raise ValueError(f"{fn}: {where} takes {n_in} features, not a multiple of the {width} "
                                         "channels flattened into it")  # fmt: skip
                    dim = _Dim(dim.layer, n_in // width)
                elif n_in != width * dim.factor:
                    raise ValueError(f"{fn}: {where} takes {n_in} inputs, but the layer before gives {width}")
            steps.append(_Step(module, len(widths), dim))
            widths.append(module.out_features if isinstance(module, nn.Linear) else module.out_channels)
            dim, conv, flattened = _Dim(len(widths) - 1), isinstance(module, _CONV), False
        elif isinstance(module, _NORM):
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                raise ValueError(f"{fn}: {where} normalises over {tuple(module.normalized_shape)}; only a LayerNorm "
                                 "over the features alone follows a narrower width")  # fmt: skip
            if flattened and dim.layer >= 0:
                raise ValueError(f"{fn}: {where} follows a Flatten; put it after the next Linear")
            n = module.normalized_shape[0] if isinstance(module, nn.LayerNorm) else module.num_features
            if dim.layer >= 0 and n != widths[dim.layer] * dim.factor:
                raise ValueError(f"{fn}: {where} has {n} features, but the layer before gives {widths[dim.layer]}")
            steps.append(_Step(module, None, dim))
        elif isinstance(module, nn.Flatten):
            flattened = flattened or bool(conv)
            steps.append(_Step(module, None, dim))
        elif _passes(module):
            steps.append(_Step(module, None, dim))
        else:
            raise ValueError(f"{fn}: cannot narrow {where}; small_dense handles {SUPPORTED}")
    if len(widths) < 2:
        raise ValueError(f"{fn}: the model has {len(widths)} weight layer(s), so no hidden width to narrow")
    return steps, widths


def _scaled(widths: list[int], f: Fraction) -> list[int]:
    """Hidden widths scaled by f and rounded half up (at least 1); the output width stays."""
    return [max(1, math.floor(f * w + Fraction(1, 2))) for w in widths[:-1]] + [widths[-1]]


def _in_width(step: _Step, new: list[int]) -> int | None:
    """The step's input width with the widths ``new`` (None: the model's input, unchanged)."""
    return None if step.dim.layer < 0 else new[step.dim.layer] * step.dim.factor


def _weights(steps: list[_Step], new: list[int]) -> int:
    total = 0
    for step in steps:
        if step.index is not None:
            m = step.module
            n_in = _in_width(step, new) or (m.in_features if isinstance(m, nn.Linear) else m.in_channels)
            total += new[step.index] * n_in * (1 if isinstance(m, nn.Linear) else math.prod(m.kernel_size))
    return total


def _rebuilt(module: nn.Module, steps: dict[int, _Step], new: list[int]) -> nn.Module:
    if type(module) is nn.Sequential:
        return nn.Sequential(OrderedDict((n, _rebuilt(c, steps, new)) for n, c in module.named_children()))
    step = steps[id(module)]
    width = _in_width(step, new)
    w = module.weight if getattr(module, "weight", None) is not None else None
    kw = {"device": w.device, "dtype": w.dtype} if w is not None else {}
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return nn.Linear(width or module.in_features, new[step.index], bias=bias, **kw)
    if isinstance(module, _CONV):
        return type(module)(width or module.in_channels, new[step.index], module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, bias=bias,
                            padding_mode=module.padding_mode, **kw)  # fmt: skip
    if width is None:  # before the first weight layer: the input's size, kept
        return copy.deepcopy(module)
    if isinstance(module, nn.LayerNorm):
        return nn.LayerNorm(width, eps=module.eps, elementwise_affine=module.elementwise_affine, bias=bias, **kw)
    if isinstance(module, _NORM):
        buffer = module.running_mean if module.running_mean is not None else None
        kw = kw or ({"device": buffer.device, "dtype": buffer.dtype} if buffer is not None else {})
        return type(module)(width, eps=module.eps, momentum=module.momentum, affine=module.affine,
                            track_running_stats=module.track_running_stats, **kw)  # fmt: skip
    return copy.deepcopy(module)


def small_dense(model: nn.Module, sparsity: float) -> nn.Sequential:
    """The RigL paper's small-dense baseline: a narrower dense copy of ``model`` with as many weights as ``model``
    sparsified at ``sparsity`` has nonzeros.

    Every hidden width (the outputs of all weight layers but the last, and the BatchNorm/LayerNorm layers that
    follow them) is scaled by one factor f and rounded; the input and output widths stay. f is found by search over
    every value where a rounded width changes, so the weight count is the closest to the target
    ``round((1 - sparsity) · Σ numel)`` that one factor reaches: within one unit of a width of it. Weights are the
    Linear and conv weight matrices (biases and norms, which sparsify never touches, are not counted). The new
    model is freshly initialised (torch's default initialisation, from the global RNG) on the model's device and
    dtype; the model itself is not changed.

    Args:
        model: an ``nn.Sequential`` (nested Sequentials too) of Linear, Conv1d/2d/3d (groups=1), BatchNorm,
            LayerNorm (over the features), Flatten, activations, dropout, pooling and padding; dense.
        sparsity: the sparsity whose nonzero count to match, in [0, 1).

    Returns:
        the narrower ``nn.Sequential`` (module names as in ``model``).

    Raises:
        ValueError: a sparsity outside [0, 1), a model that is not such a Sequential (a module it cannot narrow, a
            sparse layer, grouped convolutions, widths that do not chain, fewer than two weight layers).
        TypeError: a model that is not an nn.Module.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> small = sparsekern.small_dense(model, 0.9)          # 8432 weights for the 8448 nonzeros at 90%
        >>> [m.out_features for m in small if isinstance(m, nn.Linear)]
        [62, 62, 10]
    """
    fn = "small_dense"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    sparsity = _check_sparsity(fn, sparsity)
    if type(model) is not nn.Sequential:
        raise ValueError(f"{fn}: model must be an nn.Sequential, got {type(model).__name__}; it handles {SUPPORTED}")
    if len(list(model.modules())) != len(list(model.modules(remove_duplicate=False))):
        raise ValueError(f"{fn}: the model uses a module at two places; small_dense narrows each module once")
    steps, widths = _analyse(fn, model)
    target = round((1.0 - sparsity) * _weights(steps, widths))
    # the factors where some rounded hidden width steps up: width w reaches n at f = (n - 1/2) / w
    factors = sorted({Fraction(2 * n - 1, 2 * w) for w in widths[:-1] for n in range(1, w + 1)} | {Fraction(1)})
    lo, hi = 0, len(factors) - 1  # the weight count only grows with f: bisect for the last count <= target
    if _weights(steps, _scaled(widths, factors[0])) > target:
        hi = 0
    else:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _weights(steps, _scaled(widths, factors[mid])) <= target:
                lo = mid
            else:
                hi = mid - 1
        hi = min(lo + 1, len(factors) - 1)
    below, above = _scaled(widths, factors[lo]), _scaled(widths, factors[hi])
    new = min((below, above), key=lambda w: abs(_weights(steps, w) - target))  # a tie keeps the smaller model
    return _rebuilt(model, {id(s.module): s for s in steps}, new)
