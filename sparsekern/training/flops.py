"""FLOPs accounting as the RigL paper counts it (Evci et al. 2020, appendix H): forward and training FLOPs of the
weight layers, per layer and in total, as fractions of the same model dense."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn.sparse_linear import SparseLinear
from .drop_grow import as_layer
from .sparsify import _table, _unwrap, is_conv1d, sparse_layers

# How a sparsifier's training step costs, in forward FLOPs f_S (the sparse model) and f_D (the same model dense):
RULES = {
    "dense": "3 f_D per step (forward, and a backward of about twice the forward)",
    "sparse": "3 f_S per step (fixed or randomly regrown masks: static, SNIP, SET, GraSP, SynFlow, IMP rounds)",
    "rigl": "(3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1): a dense gradient every ΔT steps",
    "dense_gradient": "2 f_S + f_D per step: the weight gradient is dense every step (SNFS, STE, SR-STE)",
    "schedule": "3 f_S(t) summed over the sparsifier's own schedule counts_at(t) (GMP)",
}
_COUNTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, SparseLinear)


@dataclass(frozen=True)
class LayerFlops:
    """One weight layer: its forward multiply-adds per sample dense (``numel · positions``) and as trained."""

    name: str  # the weight's name, e.g. "fc1.weight"
    kind: str  # "Linear", "Conv2d", ...
    shape: tuple[int, ...]
    nnz: int  # nonzeros now (numel for a dense layer)
    positions: int  # times each weight is applied per sample: tokens for a Linear, output H·W for a Conv2d
    dense_forward: int  # f_D of the layer: numel · positions
    sparse_forward: int  # f_S of the layer: nnz · positions
    training: float  # training FLOPs per step under the report's rule (multiply-adds per sample)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def inference_fraction(self) -> float:
        return self.sparse_forward / self.dense_forward if self.dense_forward else 1.0

    @property
    def training_fraction(self) -> float:
        return self.training / (3 * self.dense_forward) if self.dense_forward else 1.0


@dataclass(frozen=True)
class FlopsReport:
    """Per-layer and total FLOPs of a model's weight layers (Linear, Conv, SparseLinear, transformers' Conv1D):
    inference = f_S / f_D, training = the rule's cost per step / 3 f_D (``str()`` gives the table).

    Counted as the RigL paper does: one multiply-add per weight nonzero and position; backward ≈ 2x forward; biases,
    norms, activations and pooling are left out. ``positions_known`` is False when no example input was run: every
    weight then counts once per sample (exact for an MLP on flat inputs, not for convolutions or token sequences).
    """

    layers: tuple[LayerFlops, ...]
    rule: str
    delta_t: int | None = None  # the "rigl" rule's ΔT
    positions_known: bool = False

    @property
    def dense_forward(self) -> int:
        return sum(layer.dense_forward for layer in self.layers)

    @property
    def sparse_forward(self) -> int:
        return sum(layer.sparse_forward for layer in self.layers)

    @property
    def training(self) -> float:
        return sum(layer.training for layer in self.layers)

    @property
    def inference_fraction(self) -> float:
        """f_S / f_D over all counted layers (layers left dense count at full cost)."""
        return self.sparse_forward / self.dense_forward

    @property
    def training_fraction(self) -> float:
        """Training FLOPs per step under :attr:`rule` over the dense model's 3 f_D."""
        return self.training / (3 * self.dense_forward)

    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            "formula": RULES[self.rule],
            "delta_t": self.delta_t,
            "positions_known": self.positions_known,
            "dense_forward": self.dense_forward,
            "sparse_forward": self.sparse_forward,
            "training": self.training,
            "inference_fraction": self.inference_fraction,
            "training_fraction": self.training_fraction,
            "layers": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "shape": list(r.shape),
                    "nnz": r.nnz,
                    "positions": r.positions,
                    "dense_forward": r.dense_forward,
                    "sparse_forward": r.sparse_forward,
                    "training": r.training,
                    "inference_fraction": r.inference_fraction,
                    "training_fraction": r.training_fraction,
                }
                for r in self.layers
            ],
        }

    def __str__(self) -> str:
        rows = [("weight", "kind", "shape", "nnz", "positions", "f_D", "inference", "training")]
        for r in self.layers:
            shape, fractions = (
                "x".join(map(str, r.shape)),
                (f"{r.inference_fraction:.4f}", f"{r.training_fraction:.4f}"),
            )
            rows.append((r.name, r.kind, shape, str(r.nnz), str(r.positions), str(r.dense_forward), *fractions))
        rows.append(("total", "", "", "", "", str(self.dense_forward), f"{self.inference_fraction:.4f}",
                     f"{self.training_fraction:.4f}"))  # fmt: skip
        rule = f"{self.rule}: {RULES[self.rule]}" + (f", ΔT={self.delta_t}" if self.delta_t is not None else "")
        note = "" if self.positions_known else " (no example input: every weight counted once per sample)"
        return "\n".join([*_table(rows), f"FLOPs as fractions of dense; training rule {rule}{note}"])


def _counted_layers(model: nn.Module) -> dict[str, tuple[nn.Module, int, tuple[int, ...]]]:
    """{weight name: (module, nnz, weight shape)} of every weight layer, sparse or dense, in model order."""
    sparse = {name: as_layer(m) for name, m in sparse_layers(model).items()}
    counted = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            # its fused forward reads the projection weights directly: no hook sees their work
            raise ValueError(
                f"flops_report: {module_name} is a MultiheadAttention, whose projections are not counted; "
                "flops_report counts Linear, Conv and SparseLinear layers (and transformers' Conv1D)"
            )
        name = f"{module_name}.weight" if module_name else "weight"
        if name in sparse:
            counted[name] = (module, sparse[name].count(), tuple(sparse[name].shape))
        elif isinstance(module, _COUNTED) or is_conv1d(module):
            counted[name] = (module, module.weight.numel(), tuple(module.weight.shape))
    if not counted:
        raise ValueError("flops_report: the model has no Linear, Conv or SparseLinear layer to count")
    return counted


def _batch_size(example_input) -> int:
    if isinstance(example_input, torch.Tensor):
        return example_input.shape[0] if example_input.dim() else 1
    values = example_input.values() if isinstance(example_input, dict) else example_input
    for value in values:
        if isinstance(value, torch.Tensor) and value.dim():
            return value.shape[0]
    raise TypeError("flops_report: example_input must be a batched tensor, or a tuple/list/dict holding one")


@torch.no_grad()
def _positions(model: nn.Module, modules: list[nn.Module], example_input) -> dict[int, int]:
    """id(module) -> weight applications per sample: output elements / (output channels · batch), summed over
    every call of the module in one forward pass of ``example_input`` (a module used twice counts twice)."""
    batch = _batch_size(example_input)
    seen: dict[int, int] = {}

    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        channels = module.weight.shape[1] if is_conv1d(module) else (
            module.out_features if isinstance(module, (nn.Linear, SparseLinear)) else module.out_channels
        )  # fmt: skip
        # a conv's output is (N, C_out, *spatial), a Linear's (N, ..., n_out): what is left per sample is positions
        seen[id(module)] = seen.get(id(module), 0) + out.numel() // (channels * batch)

    handles = [m.register_forward_hook(hook) for m in modules]
    training = model.training
    try:
        model.eval()
        if isinstance(example_input, dict):
            model(**example_input)
        elif isinstance(example_input, (tuple, list)):
            model(*example_input)
        else:
            model(example_input)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return seen


def _step_cost(rule: str, f_s: float, f_d: float, delta_t: int | None) -> float:
    """Training FLOPs of one step of a layer with forward costs f_S and f_D under ``rule`` (not "schedule")."""
    if rule == "dense":
        return 3 * f_d
    if rule == "sparse":
        return 3 * f_s
    if rule == "rigl":
        return (3 * f_s * delta_t + 2 * f_s + f_d) / (delta_t + 1)
    return 2 * f_s + f_d  # "dense_gradient"


def _schedule_steps(sparsifier) -> int:
    total = getattr(sparsifier, "total_steps", None)
    if total is None:
        total = getattr(getattr(sparsifier, "schedule", None), "total_steps", None)
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(
            f"flops_report: {type(sparsifier).__name__} has flops_rule 'schedule' but no total_steps (a positive "
            "int) to sum its counts_at(step) over"
        )
    return total


def flops_report(
    model: nn.Module,
    sparsifier=None,
    *,
    example_input=None,
    rule: str | None = None,
    delta_t: int | None = None,
) -> FlopsReport:
    """Inference and training FLOPs of a model's weight layers, per layer and in total, as fractions of the same
    model dense, counted the way the RigL paper does (appendix H).

    The forward cost of a layer is ``nnz · positions`` multiply-adds per sample (f_S; f_D with every weight), where
    positions are the times each weight is applied per sample: 1 for a Linear on flat inputs, the tokens for a
    Linear on sequences, the output H·W for a Conv2d. They are measured by forward hooks on one forward pass of
    ``example_input`` (in eval mode, without gradients; the model is left as it was); without it every weight
    counts once (so convolutions need an example input to be counted right). Backward costs about twice the
    forward, so a dense step costs 3 f_D; a sparse method's step costs what its sparsifier's ``flops_rule`` says:

    - "sparse": 3 f_S (static, SNIP, SET, GraSP, SynFlow, IMP rounds);
    - "rigl": (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1): a dense gradient every ΔT steps (``sparsifier.schedule.delta_t``);
    - "dense_gradient": 2 f_S + f_D (SNFS's dense momentum, STE's dense weight gradient);
    - "schedule": 3 f_S(t) averaged over steps 1..``total_steps`` of the sparsifier's ``counts_at(t)`` (GMP);
    - "dense": 3 f_D.

    Layers left dense (not sparsified) count at full cost in f_S too. Only the weights of Linear, Conv1d/2d/3d,
    SparseLinear and transformers' Conv1D layers are counted (the paper's figures are these layers'): not biases,
    norms, activations, or recurrent layers.

    Args:
        model: the model (a DDP wrapper is looked through): sparsified or dense.
        sparsifier: the model's :class:`Sparsifier`; its ``flops_rule`` picks the training rule.
        example_input: a batch the model takes (a tensor, a tuple/list of positional inputs or a dict of keyword
            inputs; the batch is the first tensor's first dimension).
        rule, delta_t: the training rule without a sparsifier (default: "sparse" for a model with sparse layers,
            "dense" otherwise), and ΔT for "rigl".

    Returns:
        a :class:`FlopsReport`: ``inference_fraction``, ``training_fraction``, per-layer ``layers``, ``to_dict()``,
        ``print`` for the table.

    Raises:
        ValueError: no layer to count, a MultiheadAttention in the model, an unknown rule,
            a rule or ΔT together with a sparsifier, "rigl" without a positive int ΔT, "schedule" without a
            sparsifier that has ``counts_at`` and ``total_steps``.
        TypeError: a sparsifier that is not one, an example input with no batched tensor.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> report = sparsekern.sparsify(model, 0.9, distribution="uniform")
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> rigl = sparsekern.RigL(model, optimizer, total_steps=1000, delta_t=100)
        >>> flops = sparsekern.flops_report(model, rigl)
        >>> round(flops.inference_fraction, 4), round(flops.training_fraction, 4)
        (0.1, 0.1029)
    """
    from .sparsifier import Sparsifier

    fn = "flops_report"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    model = _unwrap(model)
    if sparsifier is not None:
        if not isinstance(sparsifier, Sparsifier):
            raise TypeError(f"{fn}: sparsifier must be a sparsekern Sparsifier, got {type(sparsifier).__name__}")
        if rule is not None or delta_t is not None:
            raise ValueError(f"{fn}: rule and delta_t come from the sparsifier; pass them only without one")
        rule = sparsifier.flops_rule
        if rule not in RULES:
            raise ValueError(
                f"{fn}: {type(sparsifier).__name__} declares no valid flops_rule (one of {tuple(RULES)}), got {rule!r}"
            )
        if rule == "rigl":
            delta_t = sparsifier.schedule.delta_t
    elif rule is None:
        rule = "sparse" if sparse_layers(model) else "dense"
    if rule not in RULES:
        raise ValueError(f"{fn}: rule must be one of {tuple(RULES)}, got {rule!r}")
    if rule == "rigl" and (isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1):
        raise ValueError(f"{fn}: the 'rigl' rule needs delta_t, a positive int, got {delta_t!r}")
    if rule != "rigl" and delta_t is not None:
        raise ValueError(f"{fn}: delta_t applies to the 'rigl' rule only, not {rule!r}")
    if rule == "schedule" and not callable(getattr(sparsifier, "counts_at", None)):
        raise ValueError(f"{fn}: the 'schedule' rule needs a sparsifier with counts_at(step) -> {{layer: nnz}}")

    counted = _counted_layers(model)
    positions = (
        _positions(model, [m for m, _, _ in counted.values()], example_input) if example_input is not None else {}
    )
    per_step = {}
    if rule == "schedule":
        steps = _schedule_steps(sparsifier)
        totals = dict.fromkeys(counted, 0)
        for t in range(1, steps + 1):
            counts = sparsifier.counts_at(t)
            for name, (_, nnz, _) in counted.items():
                totals[name] += counts.get(name, nnz)
        per_step = {name: total / steps for name, total in totals.items()}
    rows = []
    for name, (module, nnz, shape) in counted.items():
        # a module the example input never reached does no work; without an input each weight counts once
        pos = positions.get(id(module), 0) if example_input is not None else 1
        f_d, f_s = math.prod(shape) * pos, nnz * pos
        cost = 3 * per_step[name] * pos if rule == "schedule" else _step_cost(rule, f_s, f_d, delta_t)
        kind = "Linear" if isinstance(module, SparseLinear) else type(module).__name__
        rows.append(LayerFlops(name, kind, shape, nnz, pos, f_d, f_s, cost))
    report = FlopsReport(tuple(rows), rule, delta_t, example_input is not None)
    if report.dense_forward == 0:
        raise ValueError(f"{fn}: the example input reached no counted layer")
    return report
