"""sparsify(): pick the weights to sparsify, allocate exact per-layer counts, and make the layers sparse."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.sparse_linear import SparseLinear
from .distribution import DISTRIBUTIONS, _check_sparsity, layer_nnz
from .drop_grow import MaskedLayer, as_layer, get_structure, is_masked, set_structure
from .structure import Structure, parse_structure

LAYOUTS = ("sparse", "masked")
# "compressed" was the sparse layout's name until "compress" came to mean 2:4 compression too.
_LAYOUT_ALIASES = {"compressed": "sparse"}


def check_layout(fn: str, layout) -> str:
    """The layout's current name; the old name "compressed" still works, with a FutureWarning."""
    if layout in _LAYOUT_ALIASES:
        new = _LAYOUT_ALIASES[layout]
        warnings.warn(f"{fn}: layout={layout!r} is now called {new!r}", FutureWarning, stacklevel=3)
        return new
    if layout not in LAYOUTS:
        raise ValueError(f"{fn}: layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


# Layers whose weights are sparsified. Norms, embeddings and biases are never touched.
ELIGIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# nn.MultiheadAttention's input projections (in_proj_weight, or q/k/v_proj_weight when kdim/vdim differ). Its fused
# kernels read these Parameters directly, so they are masked in place (a bool ``<name>_mask`` buffer) in either layout.
MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
SUPPORTED = "Linear, Conv1d, Conv2d, transformers' Conv1D, MultiheadAttention's projections"


def is_conv1d(module: nn.Module) -> bool:
    """HF transformers' ``Conv1D`` (GPT-2's transposed linear, y = x @ W + b), recognised without importing
    transformers: class name "Conv1D", a 2-D ``weight`` Parameter of shape (n_in, n_out) and ``nf == n_out``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, nn.Parameter)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    )


def _weight_names(module: nn.Module) -> tuple[str, ...]:
    """The module's own Parameters that sparsify() can sparsify."""
    if isinstance(module, SparseLinear):
        return ()
    if isinstance(module, ELIGIBLE) or is_conv1d(module):
        return ("weight",)
    if isinstance(module, nn.MultiheadAttention):
        return tuple(name for name in MHA_WEIGHTS if isinstance(getattr(module, name, None), nn.Parameter))
    return ()


class MaskedParameter:
    """A masked Parameter other than a module's ``weight`` (MultiheadAttention's ``in_proj_weight``), seen the way
    the training methods see a masked layer: ``weight`` is the Parameter, ``weight_mask`` its ``<name>_mask``
    buffer. What :func:`sparse_layers` returns for such a weight."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name

    @property
    def weight(self):
        return getattr(self.module, self.name)

    @property
    def weight_mask(self):
        return getattr(self.module, f"{self.name}_mask", None)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


@dataclass(frozen=True)
class LayerReport:
    name: str  # the weight's name, e.g. "fc1.weight"
    kind: str  # "Linear", "Conv2d", ...
    shape: tuple[int, ...]
    nnz: int  # entries the mask keeps
    layout: str  # "sparse" (SparseLinear) or "masked"
    zeros: int | None = None  # entries of the weight that are 0 now (measured; None in reports saved before it)
    off_mask: int | None = None  # nonzeros off the mask: > 0 when something stepped the weight without the mask
    structure: str | None = None  # the structure the layer keeps ("fan_in", "2:4", ...), None: unstructured
    ablated: int | None = None  # rows emptied by FanIn(ablation=) (None without ablation)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel

    @property
    def measured_sparsity(self) -> float | None:
        return None if self.zeros is None else self.zeros / self.numel


@dataclass(frozen=True)
class SkippedWeight:
    """A weight matrix (a Parameter of 2 or more dims) that stays dense, and why."""

    name: str
    kind: str  # the class of the module holding it
    shape: tuple[int, ...]
    reason: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and overall sparsity of the sparsified weights, the zeros measured in them, and every weight
    matrix left dense with the reason (``str()`` gives the tables).

    ``sparsity`` counts the masks; ``measured_sparsity`` counts the zeros in the weights as they are. They differ
    when masked weights were stepped by an optimizer without the mask (see :func:`keep_masks`)."""

    layers: tuple[LayerReport, ...]
    skipped: tuple[SkippedWeight, ...] = ()

    @property
    def nnz(self) -> int:
        return sum(layer.nnz for layer in self.layers)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    @property
    def inference_fraction(self) -> float:
        """Forward FLOPs of the sparse layers as a fraction of the same layers dense, Σ nnz·positions / Σ
        numel·positions, with one position per weight (the report does not know a conv's H·W or a sequence's
        tokens), which makes it the density. :func:`flops_report` measures the positions from an example input
        and also counts the layers left dense."""
        return self.nnz / self.numel if self.numel else 1.0

    @property
    def zeros(self) -> int | None:
        counts = [layer.zeros for layer in self.layers]
        return None if None in counts else sum(counts)

    @property
    def measured_sparsity(self) -> float | None:
        zeros = self.zeros
        return None if zeros is None else (zeros / self.numel if self.numel else 0.0)

    @property
    def coverage(self) -> float:
        """The share of all weight-matrix elements (sparse layers + :attr:`skipped`) that the sparse layers hold."""
        total = self.numel + sum(s.numel for s in self.skipped)
        return self.numel / total if total else 0.0

    @classmethod
    def from_rows(cls, layers, skipped=()) -> SparsityReport:
        """Rebuild a report from ``dataclasses.astuple`` rows of its layers and skipped weights (a saved state)."""
        return cls(tuple(LayerReport(*r) for r in layers), tuple(SkippedWeight(*s) for s in skipped))

    def to_dict(self) -> dict:
        return {
            "overall": {
                "nnz": self.nnz,
                "numel": self.numel,
                "sparsity": self.sparsity,
                "zeros": self.zeros,
                "measured_sparsity": self.measured_sparsity,
            },
            "layers": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "shape": list(r.shape),
                    "nnz": r.nnz,
                    "numel": r.numel,
                    "sparsity": r.sparsity,
                    "layout": r.layout,
                    "zeros": r.zeros,
                    "measured_sparsity": r.measured_sparsity,
                    "off_mask": r.off_mask,
                    "structure": r.structure,
                    "ablated": r.ablated,
                }
                for r in self.layers
            ],
            "skipped": [
                {"name": s.name, "kind": s.kind, "shape": list(s.shape), "numel": s.numel, "reason": s.reason}
                for s in self.skipped
            ],
        }

    def __str__(self) -> str:
        def measured(value):
            return "?" if value is None else f"{value:.4f}"

        rows = [("weight", "kind", "shape", "nnz", "sparsity", "measured", "layout")]
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            rows.append(
                (r.name, r.kind, shape, str(r.nnz), f"{r.sparsity:.4f}", measured(r.measured_sparsity), r.layout)
            )
        rows.append(("overall", "", "", str(self.nnz), f"{self.sparsity:.4f}", measured(self.measured_sparsity), ""))
        lines = _table(rows)
        structured = [r for r in self.layers if r.structure is not None]
        if structured:
            lines.append(
                "structure: "
                + ", ".join(
                    f"{r.name} {r.structure}"
                    + (f" ({r.ablated}/{r.shape[0]} rows ablated)" if r.ablated is not None else "")
                    for r in structured
                )
            )
        stray = [r for r in self.layers if r.off_mask]
        if stray:
            lines.append(
                f"warning: {sum(r.off_mask for r in stray)} weights off the mask are nonzero (in "
                f"{', '.join(r.name for r in stray)}): the optimizer stepped masked weights without the mask; step "
                "with a sparsifier (Static, RigL, ...) or call keep_masks(model, optimizer)"
            )
        if self.skipped:
            dense, count = sum(s.numel for s in self.skipped), len(self.skipped)
            lines.append(
                f"left dense: {count} weight {'matrix' if count == 1 else 'matrices'}, {dense} elements "
                f"({1 - self.coverage:.1%} of all weight-matrix elements):"
            )
            table = [("weight", "kind", "shape", "reason")]
            table += [(s.name, s.kind, "x".join(map(str, s.shape)), s.reason) for s in self.skipped]
            lines += ["  " + line for line in _table(table)]
        return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel and DataParallel keep the real model in .module; names are the real model's.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def sparse_layers(model: nn.Module) -> dict[str, nn.Module | MaskedParameter]:
    """{weight name: layer} of every sparse layer: SparseLinear, masked (``weight_mask``) modules, and a
    :class:`MaskedParameter` for each masked MultiheadAttention projection. A module used at several positions is
    listed once, under its first name."""
    model = _unwrap(model)
    layers: dict[str, nn.Module | MaskedParameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear) or is_masked(module):
            layers[_join(name, "weight")] = module
        for param in _weight_names(module):
            view = MaskedParameter(module, param)
            if param != "weight" and is_masked(view):
                layers[_join(name, param)] = view
    return layers


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """id(Parameter) -> its names, one per (module object, attribute) holding it. A module reused at several
    positions holds its Parameters once; a Parameter with two names is tied (two modules share it)."""
    holders: dict[int, dict[tuple[int, str], str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), {}).setdefault((id(module), attr), _join(name, attr))
    return {key: list(names.values()) for key, names in holders.items()}


def _dense_weights(model: nn.Module, sparse: set[int], holders: dict[int, list[str]], unchosen: str):
    """A :class:`SkippedWeight` for every weight matrix not in ``sparse`` (ids of Parameters), once each."""
    seen, skipped = set(sparse), []
    for module_name, module in model.named_modules():
        for attr, param in module._parameters.items():
            if param is None or param.dim() < 2 or id(param) in seen:
                continue
            seen.add(id(param))
            name, kind, names = _join(module_name, attr), type(module).__name__, holders[id(param)]
            if len(names) > 1:
                others = ", ".join(n for n in names if n != name)
                reason = f"tied: the same Parameter as {others}; left dense and tied"
            elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                reason = "embedding: never sparsified"
            elif attr in _weight_names(module):
                reason = unchosen
            elif isinstance(module, nn.RNNBase):
                reason = f"{kind} weights: recurrent layers are not supported"
            else:
                reason = f"{kind}.{attr} is not the weight of a supported layer ({SUPPORTED})"
            skipped.append(SkippedWeight(name, kind, tuple(param.shape), reason))
    return tuple(skipped)


def _layer_report(name: str, layer) -> LayerReport:
    module = layer.module.module if isinstance(layer.module, MaskedParameter) else layer.module
    kind = "Linear" if isinstance(module, SparseLinear) else type(module).__name__
    structure = layer.structure
    ablated = None
    if structure is not None and getattr(structure, "ablation", None) is not None:
        rows = torch.bincount(layer.active() // layer.rows[1], minlength=layer.rows[0])
        ablated = int((rows == 0).sum())
    tail = (None if structure is None else structure.name, ablated)
    if isinstance(layer, MaskedLayer):
        weight, mask = layer.param.detach(), layer.module.weight_mask
        zeros, off_mask = int((weight == 0).sum()), int(((weight != 0) & ~mask).sum())
        return LayerReport(name, kind, tuple(layer.shape), layer.count(), "masked", zeros, off_mask, *tail)
    zeros = layer.numel - layer.count() + int((layer.param.detach() == 0).sum())
    return LayerReport(name, kind, tuple(layer.shape), layer.count(), "sparse", zeros, 0, *tail)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """The :class:`SparsityReport` of a model as it is now: its sparse layers (mask counts and measured zeros) and
    every weight matrix left dense, with the reason (embeddings, tied weights, unsupported layers, ...)."""
    return _report(_unwrap(model), "supported, not sparsified")


def _report(model: nn.Module, unchosen: str) -> SparsityReport:
    layers = {name: as_layer(module) for name, module in sparse_layers(model).items()}
    sparse = {id(layer.param) for layer in layers.values()}
    skipped = _dense_weights(model, sparse, _holders(model), unchosen)
    return SparsityReport(tuple(_layer_report(name, layer) for name, layer in layers.items()), skipped)


def _patterns(fn: str, name: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    value = tuple(value)
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{fn}: {name} must be a module-name pattern or a list of them (fnmatch), got {value!r}")
    return value


def _select(fn: str, model: nn.Module, include, exclude) -> dict[str, tuple[nn.Module, str]]:
    """{weight name: (module, Parameter name)} of the dense weights to sparsify, in model order. Tied Parameters
    (held by two modules, e.g. a language model's head and its embedding) are left out: they stay dense and tied."""
    include, exclude = _patterns(fn, "include", include), _patterns(fn, "exclude", exclude)
    holders = _holders(model)
    matched, chosen = [], {}
    for name, module in model.named_modules():
        params = [p for p in _weight_names(module) if not is_masked(MaskedParameter(module, p))]
        if not params:
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        matched.append(name)
        for param in params:
            if len(holders[id(getattr(module, param))]) == 1:
                chosen[_join(name, param)] = (module, param)
    for pattern in include or ():
        if not any(fnmatch.fnmatchcase(name, pattern) for name in matched):
            raise ValueError(f"{fn}: include pattern {pattern!r} matches no layer it can sparsify ({SUPPORTED})")
    return chosen


def _structured_masks(fn, structure, targets, shapes, counts, dense, scored, generator, distribution, sparsity):
    """The masks of a structured sparsify and each layer's bound structure (None for a layer kept dense)."""
    masks, bound = {}, {}
    gen = generator if generator is not None else torch.default_generator
    for (key, (module, _)), shape, nnz, keep_dense in zip(targets.items(), shapes, counts, dense, strict=True):
        if keep_dense:
            masks[key], bound[key] = torch.ones(shape, dtype=torch.bool), None
            continue
        if is_conv1d(module):
            raise ValueError(
                f"{fn}: layer {key!r} is a transformers Conv1D, whose weight is (n_in, n_out): structure= does not "
                "support it (exclude= it)"
            )
        numel = math.prod(shape)
        rows = (shape[0], numel // shape[0])
        structure.check_shape(fn, key, rows)
        count = structure.count(rows, nnz)
        if ":" in structure.name and abs(count - nnz) > 1:
            raise ValueError(
                f"{fn}: structure {structure.name!r} keeps a density of {count / numel:.4g} in every layer, but layer "
                f"{key!r} was given sparsity {1 - nnz / numel:.4g} (sparsity={sparsity}, distribution="
                f"{distribution!r}): pass sparsity=1 - N/M ({1 - count / numel:.4g}) with distribution='uniform'"
            )
        scores = scored[key].cpu().reshape(rows) if scored is not None else torch.rand(rows, generator=gen)
        masks[key] = structure.initial(scores, count).reshape(shape)
        bound[key] = structure.bind(rows, count) if hasattr(structure, "bind") else structure
    return masks, _last_not_ablated(bound)


def _last_not_ablated(bound: dict) -> dict:
    """The model's last structured layer (its outputs: a classifier's logits) is never ablated, as in SRigL's
    reference code."""
    last = [key for key, s in bound.items() if s is not None]
    if last and getattr(bound[last[-1]], "ablation", None) is not None:
        own = bound[last[-1]]
        bound = {**bound, last[-1]: type(own)(own.k, ablation=None, budget=own.budget)}
    return bound


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


def _check_scores(fn: str, scores, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if not isinstance(scores, dict):
        raise TypeError(f"{fn}: scores must be a dict {{weight name: tensor}}, got {type(scores).__name__}")
    out = {}
    for key, weight in weights.items():
        if key not in scores:
            raise ValueError(f"{fn}: scores has no entry for {key!r} (it has {sorted(scores)})")
        s = scores[key]
        if not isinstance(s, torch.Tensor) or s.shape != weight.shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{fn}: scores[{key!r}] must have the weight's shape {tuple(weight.shape)}, got {got}")
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"{fn}: scores[{key!r}] holds inf or NaN")
        out[key] = s.detach().to(torch.float64)
    return out


def make_masked(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Mask a module's dense Parameter ``name`` in place: zero it off ``mask`` and keep ``mask`` as the bool buffer
    ``<name>_mask`` (``weight_mask``; saved in the state_dict). A sparsifier's ``step()`` (or :func:`keep_masks`)
    keeps the zeros: it zeros the gradient off the mask before the optimizer step and re-applies the mask after."""
    weight = getattr(module, name)
    mask = mask.to(device=weight.device, dtype=torch.bool)
    with torch.no_grad():
        weight.mul_(mask)
    buffer = f"{name}_mask"
    if buffer in module._buffers:
        module._buffers[buffer].copy_(mask)
    else:
        module.register_buffer(buffer, mask.clone())


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Install ``new`` at every position of ``old`` (a module reused in several places gets one new module)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and name:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _to_sparse_linear(linear: nn.Linear, mask: torch.Tensor) -> SparseLinear:
    # SparseLinear's constructor draws an initialisation that from_dense overwrites: keep the caller's RNG as it was.
    device = linear.weight.device
    gpu = [device] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=gpu, device_type=device.type if gpu else "cuda"):
        return SparseLinear.from_dense(linear, mask=mask)


def sparsify(
    model: nn.Module,
    sparsity: float,
    *,
    distribution: str = "erk",
    layout: str = "sparse",
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    dense_first: bool = False,
    scores: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    rescale: bool = False,
    structure: str | Structure | None = None,
    transposable: bool = False,
) -> SparsityReport:
    """Make a model's weight matrices sparse with exact per-layer nonzero counts.

    Sparsified: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, HF transformers' ``Conv1D`` (GPT-2's transposed
    linear; recognised by :func:`is_conv1d`: class name "Conv1D", weight (n_in, n_out), ``nf == n_out``) and the
    input projections of ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``; its
    ``out_proj`` is a Linear). Never: norms, biases, embeddings, and tied weights: a Parameter held by two
    modules (``b.weight = a.weight``, a language model's head tied to its embedding) stays dense and tied. A
    module used at several positions is sparsified once and the same new module is installed at all of them.
    The report lists every weight matrix left dense with the reason (``report.skipped``).

    Counts come from the layer-wise distribution (:func:`layer_nnz`): "uniform", "er" or "erk" (the default,
    RigL's; with the capacity loop), or "global" with ``scores`` (one top-k over all layers, as SNIP does). Which
    positions are kept: uniformly at random (``generator``), or with ``scores`` the largest scores per layer
    (ties: lower flat index).

    Layouts:
        "sparse": each ``nn.Linear`` is replaced by a :class:`~sparsekern.nn.SparseLinear` holding the
            kept weights (only the nonzeros are stored and trained; create the optimizer afterwards). The other
            layers (conv, Conv1D, MultiheadAttention, whose code reads the dense weight) are masked.
        "masked": the dense weights stay; each is zeroed off its mask and gets a bool ``<name>_mask`` buffer
            (``weight_mask``). A sparsifier's ``step()`` (``Static`` for a fixed mask) keeps the masked entries at
            zero; with a plain ``optimizer.step()`` loop (HF Trainer) call :func:`keep_masks` once.

    Args:
        model: the model, changed in place (a DDP/DataParallel wrapper is looked through).
        sparsity: target fraction of zeros over the chosen weights, in [0, 1).
        include, exclude: fnmatch patterns of module names (``"encoder.*"``) to restrict the choice.
        dense_first: keep the first chosen layer dense and out of the sparsity budget, as google-research/rigl's
            first-layer-dense option: the other layers get the counts of ``exclude=`` that layer, so together they
            have the target sparsity (the model as a whole a little less).
        scores: {weight name ("fc1.weight", "attn.in_proj_weight"): tensor of the weight's shape}: keep the
            highest-scoring positions.
        generator: for the random positions (default: torch's global generator). When given, torch's global RNG
            is left untouched.
        rescale: multiply each layer's kept weights by sqrt(numel / nnz), so its outputs start with the variance
            the dense initialisation gives (a sparsity-aware initialisation; without it, deep very sparse
            networks start with vanishing signals).
        structure: None (default: unstructured masks), "fan_in" (constant fan-in: every output row keeps the same
            count k = round(layer budget / n_out), clamped to [1, n_in]; ``FanIn(ablation=gamma)`` adds SRigL's
            neuron ablation) or "N:M" ("2:4": every group of M along the input keeps N; the sparsity must then be
            1 - N/M with ``distribution="uniform"``). A conv weight is constrained as its (out, in * kernel) view.
            Each layer remembers its structure (``weight_structure``), so RigL, SET and :func:`drop_and_grow` keep
            it at every update; the kept positions are the structure's largest scores (random: uniform draws from
            ``generator``). A layer kept dense by ``dense_first`` stays dense and unstructured.
        transposable: with an N:M structure, keep every M x M tile N:M along rows and columns too (so W.T is
            N:M), as ``semi24_mask(transposable=True)``.

    Returns:
        the :class:`SparsityReport` of the weights sparsified now, and every weight matrix left dense
        (``print`` it for the tables).

    Raises:
        ValueError: bad sparsity, distribution, layout, patterns that match nothing, no eligible layer, scores
            missing a layer or of the wrong shape, "global" without scores; a structure that is not None, "fan_in"
            or "N:M", a layer whose shape the structure refuses (named), an N:M structure with a sparsity other than
            1 - N/M (the layer named), transformers' Conv1D with a structure.
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
    layout = check_layout(fn, layout)
    if distribution == "global" and scores is None:
        raise ValueError(f"{fn}: distribution='global' needs scores= (a global top-k by score, e.g. SNIP's)")
    if distribution == "global" and dense_first:
        raise ValueError(f"{fn}: dense_first applies to uniform, er and erk, not to distribution='global'")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(rescale, bool):
        raise TypeError(f"{fn}: rescale must be a bool, got {rescale!r}")
    structure = parse_structure(fn, structure, transposable)
    model = _unwrap(model)
    targets = _select(fn, model, include, exclude)
    if not targets:
        left = "; ".join(f"{s.name}: {s.reason}" for s in _report(model, "not selected").skipped)
        raise ValueError(
            f"{fn}: no layer to sparsify ({SUPPORTED}; include={include!r}, exclude={exclude!r}); left dense: "
            f"{left or 'nothing'}"
        )
    weights = {key: getattr(module, param) for key, (module, param) in targets.items()}
    shapes = [tuple(w.shape) for w in weights.values()]
    dense = [dense_first and i == 0 for i in range(len(targets))]
    scored = _check_scores(fn, scores, weights) if scores is not None else None

    if distribution == "global":
        total = int(round((1.0 - sparsity) * sum(math.prod(s) for s in shapes)))
        flat = torch.cat([scored[key].reshape(-1).cpu() for key in targets])
        keep = _top_mask(flat, total)
        masks, start = {}, 0
        for key, shape in zip(targets, shapes, strict=True):
            size = math.prod(shape)
            masks[key] = keep[start : start + size].view(shape)
            start += size
    if structure is not None:
        counts = (
            [int(masks[key].sum()) for key in targets]
            if distribution == "global"
            else layer_nnz(shapes, sparsity, distribution, dense=dense)
        )
        masks, bound = _structured_masks(
            fn, structure, targets, shapes, counts, dense, scored, generator, distribution, sparsity
        )
    elif distribution == "global":
        pass
    else:
        counts = layer_nnz(shapes, sparsity, distribution, dense=dense)
        gen = generator if generator is not None else torch.default_generator
        masks = {
            key: _top_mask(scored[key].cpu(), count) if scored is not None else _random_mask(shape, count, gen, "cpu")
            for (key, shape), count in zip(zip(targets, shapes, strict=True), counts, strict=True)
        }

    for key, (module, param) in targets.items():
        weight = weights[key]
        mask = masks[key].to(weight.device)
        nnz = int(mask.sum())
        if rescale and nnz:
            with torch.no_grad():
                weight.mul_(math.sqrt(mask.numel() / nnz))
        if layout == "sparse" and type(module) is nn.Linear:
            new = _to_sparse_linear(module, mask)
            _replace(model, module, new)
            if structure is not None:
                set_structure(new, bound[key])
        else:
            make_masked(module, mask, param)
            if structure is not None:
                set_structure(module if param == "weight" else MaskedParameter(module, param), bound[key])
    report = _report(model, "not selected by include/exclude")
    return SparsityReport(tuple(r for r in report.layers if r.name in targets), report.skipped)


def keep_masks(model: nn.Module, optimizer: torch.optim.Optimizer) -> MaskHooks:
    """Keep the masks of a model's masked layers under a plain ``optimizer.step()`` loop (HF ``Trainer``, Lightning,
    your own loop) instead of stepping through a sparsifier.

    Registers two hooks on ``optimizer``: before each step the gradients off the masks are zeroed (so momentum and
    Adam moments stay 0 there), after it the masks are re-applied to the weights: the same as ``Static.step()``.
    Masks that a sparsifier or IMP changes later are followed. SparseLinear layers need no hook: they store only
    their nonzeros.

    Args:
        model: the model with masked layers (``sparsify(..., layout="masked")``, conv and Conv1D layers, masked
            MultiheadAttention projections).
        optimizer: the optimizer that trains them.

    Returns:
        a handle; ``handle.remove()`` takes the hooks off.

    Raises:
        ValueError: no masked layer of the model is trained by ``optimizer``.
        TypeError: arguments of the wrong type.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> report = sparsekern.sparsify(model, 0.9, layout="masked")
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        >>> handle = sparsekern.training.keep_masks(model, optimizer)  # HF: Trainer(..., optimizers=(optimizer, None))
        >>> for _ in range(3):                                          # a plain loop
        ...     model(torch.randn(8, 64)).square().mean().backward()
        ...     optimizer.step()
        ...     optimizer.zero_grad()
        >>> report = sparsekern.sparsity_report(model)
        >>> round(report.measured_sparsity, 4), sum(layer.off_mask for layer in report.layers)
        (0.9, 0)
    """
    fn = "keep_masks"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    layers = [as_layer(m) for m in sparse_layers(model).values()]
    layers = [layer for layer in layers if isinstance(layer, MaskedLayer) and id(layer.param) in trained]
    if not layers:
        raise ValueError(
            f"{fn}: no masked layer of the model is trained by this optimizer (sparsify(model, ..., "
            "layout='masked') first, and create the optimizer from its parameters; SparseLinear layers need no hook)"
        )

    def before(optimizer, args, kwargs):
        for layer in layers:
            layer.mask_gradient()

    def after(optimizer, args, kwargs):
        for layer in layers:
            layer.apply_mask()

    return MaskHooks((optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)))


class MaskHooks:
    """The handle :func:`keep_masks` returns: ``remove()`` takes its optimizer hooks off."""

    def __init__(self, handles):
        self._handles = tuple(handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def snip_scores(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """SNIP's connection saliency |dL/dw ⊙ w| of every weight :func:`sparsify` would sparsify, from one loss
    evaluation.

    Call it on the dense model at initialisation, then keep the top (1 - s) globally with
    ``sparsify(model, s, distribution="global", scores=...)`` and train with :class:`SNIP` (fixed masks).
    The model's gradients are left as they were.

    Args:
        model: a dense model.
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
    targets = _select(fn, _unwrap(model), include, exclude)
    if not targets:
        raise ValueError(f"{fn}: no weight to score ({SUPPORTED})")
    weights = [getattr(module, param) for module, param in targets.values()]
    loss = loss_fn(model)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"{fn}: loss_fn must return a scalar tensor, got {loss!r}")
    grads = torch.autograd.grad(loss, weights)
    return {key: (g * w).detach().abs() for key, g, w in zip(targets, grads, weights, strict=True)}


def to_sparse_linear(model: nn.Module) -> SparsityReport:
    """Replace every masked ``nn.Linear`` (``sparsify(layout="masked")``, IMP's default) by a
    :class:`~sparsekern.nn.SparseLinear` holding its weights at the mask, in place (at every position of a module
    used in several places); the other masked layers stay.

    For a model trained with masked dense weights that should now run (or keep training) on the sparse kernels.
    Create a new optimizer afterwards: the Linear weights become new ``values`` parameters.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> imp = sparsekern.IMP(model, 0.9)          # trains masked dense weights
        >>> # ... the rounds (see IMP), then:
        >>> report = sparsekern.training.to_sparse_linear(model)  # the winning ticket on SparseLinear layers
        >>> [type(layer).__name__ for layer in model]
        ['SparseLinear', 'ReLU', 'SparseLinear']
    """
    model = _unwrap(model)
    linears = [m for m in sparse_layers(model).values() if type(m) is nn.Linear]
    if not linears:
        raise ValueError(
            "to_sparse_linear: the model has no masked nn.Linear (sparsify(model, ..., layout='masked') first)"
        )
    for module in linears:
        new = _to_sparse_linear(module, module.weight_mask)
        set_structure(new, get_structure(module))  # a structured layer stays structured
        _replace(model, module, new)
    return sparsity_report(model)


def compress(model: nn.Module) -> SparsityReport:
    """Deprecated name of :func:`to_sparse_linear` ("compress" now means 2:4 compression only)."""
    warnings.warn("sparsekern.training.compress is now called to_sparse_linear", FutureWarning, stacklevel=2)
    return to_sparse_linear(model)
