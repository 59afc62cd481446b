"""sparsify(): pick the weights to sparsify, allocate exact per-layer counts, and make the layers sparse."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.sparse_linear import SparseLinear
from .distribution import DISTRIBUTIONS, _check_sparsity, layer_nnz
from .drop_grow import as_layer, is_masked

LAYOUTS = ("compressed", "masked")
# Layers whose weights are sparsified. Norms, embeddings and biases are never touched.
ELIGIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class LayerReport:
    name: str  # the weight's name, e.g. "fc1.weight"
    kind: str  # "Linear", "Conv2d", ...
    shape: tuple[int, ...]
    nnz: int
    layout: str  # "compressed" (SparseLinear) or "masked"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and overall sparsity of the sparsified weights (``str()`` gives a table)."""

    layers: tuple[LayerReport, ...]

    @property
    def nnz(self) -> int:
        return sum(layer.nnz for layer in self.layers)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    def to_dict(self) -> dict:
        return {
            "overall": {"nnz": self.nnz, "numel": self.numel, "sparsity": self.sparsity},
            "layers": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "shape": list(r.shape),
                    "nnz": r.nnz,
                    "numel": r.numel,
                    "sparsity": r.sparsity,
                    "layout": r.layout,
                }
                for r in self.layers
            ],
        }

    def __str__(self) -> str:
        rows = [("weight", "kind", "shape", "nnz", "sparsity", "layout")]
        for r in self.layers:
            rows.append((r.name, r.kind, "x".join(map(str, r.shape)), str(r.nnz), f"{r.sparsity:.4f}", r.layout))
        rows.append(("overall", "", "", str(self.nnz), f"{self.sparsity:.4f}", ""))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and DataParallel keep the real model in .module; names are the real model's.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def sparse_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{weight name: module} of every sparse layer: SparseLinear and masked (``weight_mask``) modules."""
    model = _unwrap(model)
    return {
        f"{name}.weight" if name else "weight": m
        for name, m in model.named_modules()
        if isinstance(m, SparseLinear) or is_masked(m)
    }


def sparsity_report(model: nn.Module) -> SparsityReport:
    """The :class:`SparsityReport` of a model's sparse layers as they are now."""
    layers = []
    for name, module in sparse_layers(model).items():
        layer = as_layer(module)
        kind = "Linear" if isinstance(module, SparseLinear) else type(module).__name__
        layout = "compressed" if isinstance(module, SparseLinear) else "masked"
        layers.append(LayerReport(name, kind, tuple(layer.shape), layer.count(), layout))
    return SparsityReport(tuple(layers))


def _patterns(fn: str, name: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{fn}: {name} must be a module-name pattern or a list of them (fnmatch), got {value!r}")
    return value


def _select(model: nn.Module, include, exclude) -> dict[str, nn.Module]:
    fn = "sparsify"
    include, exclude = _patterns(fn, "include", include), _patterns(fn, "exclude", exclude)
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, ELIGIBLE) or isinstance(module, SparseLinear) or is_masked(module):
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        chosen[name] = module
    for pattern in include or ():
        if not any(fnmatch.fnmatchcase(name, pattern) for name in chosen):
            raise ValueError(f"{fn}: include pattern {pattern!r} matches no Linear/Conv1d/Conv2d module")
    return chosen


def _top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool mask of the ``count`` largest scores (ties: lower flat index)."""
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:count]
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[order] = True
    return mask.view(scores.shape)


def _random_mask(shape, count: int, generator: torch.Generator, device) -> torch.Tensor:
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:count]] = True
    return mask.view(shape).to(device)


def _check_scores(fn: str, scores, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    if not isinstance(scores, dict):
        raise TypeError(f"{fn}: scores must be a dict {{weight name: tensor}}, got {type(scores).__name__}")
    out = {}
    for name, module in modules.items():
        key = f"{name}.weight"
        if key not in scores:
            raise ValueError(f"{fn}: scores has no entry for {key!r} (it has {sorted(scores)})")
        s = scores[key]
        if not isinstance(s, torch.Tensor) or s.shape != module.weight.shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(
                f"{fn}: scores[{key!r}] must have the weight's shape {tuple(module.weight.shape)}, got {got}"
            )
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{fn}: scores[{key!r}] holds inf or NaN")
        out[name] = s.detach().to(torch.float64)
    return out


def make_masked(module: nn.Module, mask: torch.Tensor) -> None:
    """Mask a module's dense ``weight`` in place: zero it off ``mask`` and keep ``mask`` as the bool buffer
    ``weight_mask`` (saved in the state_dict). A sparsifier's ``step()`` keeps the zeros: it zeros the gradient
    off the mask before the optimizer step and re-applies the mask after it."""
    mask = mask.to(device=module.weight.device, dtype=torch.bool)
    with torch.no_grad():
        module.weight.mul_(mask)
    if "weight_mask" in module._buffers:
        module.weight_mask.copy_(mask)
    else:
        module.register_buffer("weight_mask", mask.clone())


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def sparsify(
    model: nn.Module,
    sparsity: float,
    *,
    distribution: str = "erk",
    layout: str = "compressed",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    dense_first: bool = False,
    scores: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    rescale: bool = False,
) -> SparsityReport:
    """Make a model's Linear/Conv1d/Conv2d weights sparse with exact per-layer nonzero counts.

    Counts come from the layer-wise distribution (:func:`layer_nnz`): "uniform", "er" or "erk" (the default,
    RigL's; with the capacity loop), or "global" with ``scores`` (one top-k over all layers, as SNIP does). Which
    positions are kept: uniformly at random (``generator``), or with ``scores`` the largest scores per layer
    (ties: lower flat index). Norm layers, biases and embeddings are never sparsified.

    Layouts:
        "compressed": each ``nn.Linear`` is replaced by a :class:`~sparsekern.nn.SparseLinear` holding the
            kept weights (only the nonzeros are stored and trained; create the optimizer afterwards). Conv layers,
            which SparseLinear does not cover, are masked.
        "masked": the dense weights stay; each is zeroed off its mask and gets a bool ``weight_mask`` buffer. Any
            sparsifier's ``step()`` (``Static`` for a fixed mask) keeps the masked entries at zero.

    Args:
        model: the model, changed in place (a DDP/DataParallel wrapper is looked through).
        sparsity: target fraction of zeros over the chosen weights, in [0, 1).
        include, exclude: fnmatch patterns of module names (``"encoder.*"``) to restrict the choice.
        dense_first: keep the first chosen layer dense (its nonzeros come out of the others' budget under
            ER/ERK, as in google-research/rigl).
        scores: {weight name ("fc1.weight"): tensor of the weight's shape}: keep the highest-scoring positions.
        generator: for the random positions (default: torch's global generator).
        rescale: multiply each layer's kept weights by sqrt(numel / nnz), so its outputs start with the variance
            the dense initialisation gives (a sparsity-aware initialisation; without it, deep very sparse
            networks start with vanishing signals).

    Returns:
        the :class:`SparsityReport` (per layer and overall; ``print`` it for a table).

    Raises:
        ValueError: bad sparsity, distribution, layout, patterns that match nothing, no eligible layer, scores
            missing a layer or of the wrong shape, "global" without scores.
        TypeError: arguments of the wrong type.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> report = sparsekern.sparsify(model, 0.9)          # ERK, SparseLinear layers
        >>> [layer.nnz for layer in report.layers], round(report.sparsity, 4)
        ([2462, 3939, 2047], 0.9)
    """
    fn = "sparsify"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    sparsity = _check_sparsity(fn, sparsity)
    if distribution not in (*DISTRIBUTIONS, "global"):
        raise ValueError(f"{fn}: distribution must be one of {(*DISTRIBUTIONS, 'global')}, got {distribution!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    if distribution == "global" and scores is None:
        raise ValueError(f"{fn}: distribution='global' needs scores= (a global top-k by score, e.g. SNIP's)")
    if distribution == "global" and dense_first:
        raise ValueError(f"{fn}: dense_first applies to uniform, er and erk, not to distribution='global'")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator, got {type(generator).__name__}")
    model = _unwrap(model)
    modules = _select(model, include, exclude)
    if not modules:
        raise ValueError(f"{fn}: no Linear/Conv1d/Conv2d layer to sparsify (include={include!r}, exclude={exclude!r})")
    shapes = [tuple(m.weight.shape) for m in modules.values()]
    dense = [dense_first and i == 0 for i in range(len(modules))]
    scored = _check_scores(fn, scores, modules) if scores is not None else None

    if distribution == "global":
        total = int(round((1.0 - sparsity) * sum(math.prod(s) for s in shapes)))
        flat = torch.cat([scored[name].reshape(-1).cpu() for name in modules])
        keep = _top_mask(flat, total)
        masks, start = {}, 0
        for name, shape in zip(modules, shapes, strict=True):
            size = math.prod(shape)
            masks[name] = keep[start : start + size].view(shape)
            start += size
    else:
        counts = layer_nnz(shapes, sparsity, distribution, dense=dense)
        gen = generator if generator is not None else torch.default_generator
        masks = {
            name: _top_mask(scored[name].cpu(), count) if scored is not None else _random_mask(shape, count, gen, "cpu")
            for (name, shape), count in zip(zip(modules, shapes, strict=True), counts, strict=True)
        }

    if not isinstance(rescale, bool):
        raise TypeError(f"{fn}: rescale must be a bool, got {rescale!r}")
    for name, module in modules.items():
        mask = masks[name].to(module.weight.device)
        nnz = int(mask.sum())
        if rescale and nnz:
            with torch.no_grad():
                module.weight.mul_(math.sqrt(mask.numel() / nnz))
        if layout == "compressed" and type(module) is nn.Linear:
            _set_submodule(model, name, SparseLinear.from_dense(module, mask=mask))
        else:
            make_masked(module, mask)
    chosen = {f"{name}.weight" for name in modules}
    report = sparsity_report(model)
    return SparsityReport(tuple(r for r in report.layers if r.name in chosen))


def snip_scores(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """SNIP's connection saliency |dL/dw ⊙ w| of every eligible dense weight, from one loss evaluation.

    Call it on the dense model at initialisation, then keep the top (1 - s) globally with
    ``sparsify(model, s, distribution="global", scores=...)`` and train with :class:`SNIP` (fixed masks).
    The model's gradients are left as they were.

    Args:
        model: a dense model (Linear/Conv1d/Conv2d weights).
        loss_fn: called as ``loss_fn(model)``; returns the scalar loss on one batch.
        include, exclude: as in :func:`sparsify`.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
        >>> scores = sparsekern.snip_scores(model, lambda m: nn.functional.cross_entropy(m(x), y))
        >>> report = sparsekern.sparsify(model, 0.9, distribution="global", scores=scores)
    """
    fn = "snip_scores"
    if not callable(loss_fn):
        raise TypeError(f"{fn}: loss_fn must be callable as loss_fn(model) -> scalar loss, got {loss_fn!r}")
    modules = _select(_unwrap(model), include, exclude)
    if not modules:
        raise ValueError(f"{fn}: no Linear/Conv1d/Conv2d layer found")
    weights = [m.weight for m in modules.values()]
    loss = loss_fn(model)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"{fn}: loss_fn must return a scalar tensor, got {loss!r}")
    grads = torch.autograd.grad(loss, weights)
    return {f"{name}.weight": (g * w).detach().abs() for name, g, w in zip(modules, grads, weights, strict=True)}


def compress(model: nn.Module) -> SparsityReport:
    """Replace every masked ``nn.Linear`` (``sparsify(layout="masked")``, IMP's default) by a
    :class:`~sparsekern.nn.SparseLinear` holding its weights at the mask, in place; masked conv layers stay.

    For a model trained with masked dense weights that should now run (or keep training) on the sparse kernels.
    Create a new optimizer afterwards: the Linear weights become new ``values`` parameters.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> imp = sparsekern.IMP(model, 0.9)          # trains masked dense weights
        >>> # ... the rounds (see IMP), then:
        >>> report = sparsekern.training.compress(model)  # the winning ticket on SparseLinear layers
        >>> [type(layer).__name__ for layer in model]
        ['SparseLinear', 'ReLU', 'SparseLinear']
    """
    model = _unwrap(model)
    names = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and is_masked(module):
            _set_submodule(model, name, SparseLinear.from_dense(module, mask=module.weight_mask))
            names.append(f"{name}.weight")
    if not names:
        raise ValueError("compress: the model has no masked nn.Linear (sparsify(model, ..., layout='masked') first)")
    return sparsity_report(model)
