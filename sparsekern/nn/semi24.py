"""Convert the ``nn.Linear`` layers of a model to 2:4 semi-structured weights, with a report of every layer."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _semi24
from ..ops.to_semi_structured import to_semi_structured


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    converted: bool
    reason: str  # why it was skipped, or how it was converted


@dataclass
class Semi24Report:
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def converted(self) -> list[LayerReport]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list[LayerReport]:
        return [layer for layer in self.layers if not layer.converted]

    def __str__(self) -> str:
        rows = [("layer", "shape", "dtype", "device", "result")]
        rows += [
            (
                r.name,
                "x".join(map(str, r.shape)),
                r.dtype,
                r.device,
                f"converted ({r.reason})" if r.converted else f"skipped: {r.reason}",
            )
            for r in self.layers
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4] for row in rows
        ]
        lines.append(f"{len(self.converted)} converted, {len(self.skipped)} skipped")
        return "\n".join(lines)


def _patterns(fn: str, name: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        value = tuple(value)
        if all(isinstance(v, str) for v in value):
            return value
    raise TypeError(f"{fn}: {name} must be a glob pattern or a list of glob patterns over module names, got {value!r}")


def _skip_reason(weight: torch.Tensor, prune: bool) -> str | None:
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        return "already a 2:4 semi-structured tensor"
    if weight.dtype not in _semi24.FORMATS:
        return f"dtype {str(weight.dtype).replace('torch.', '')} has no 2:4 format (fp16, bf16, int8, fp32)"
    shape_error = _semi24.shape_error("sparsify_semi24", "the weight", tuple(weight.shape), weight.dtype)
    if shape_error:
        return shape_error.split(": ", 1)[1]
    if not prune:
        first_bad = _semi24.first_bad_group(weight.detach())
        if first_bad >= 0:
            message = _semi24.not_sparse_message("sparsify_semi24", tuple(weight.shape), weight.dtype, first_bad)
            return message.split(": ", 1)[1].split(" (prune first")[0] + " (pass prune=True to prune it)"
    return None


def sparsify_semi24(
    model: nn.Module,
    *,
    include=None,
    exclude=None,
    prune: bool = False,
    with_transpose: bool = False,
    format: str = "cutlass",
) -> Semi24Report:
    """Replace the weight of every eligible ``nn.Linear`` in ``model`` by a 2:4 semi-structured tensor, in place.

    A layer is eligible when its name matches ``include`` (default: all) and not ``exclude``, its weight has
    a 2:4 dtype (fp16, bf16, int8; fp32 as 1:2) and a shape torch's CUTLASS kernels accept, and the weight is
    already 2:4 sparse or ``prune=True``. Every ``nn.Linear`` appears in the report, converted or skipped with
    its reason; nothing is skipped silently. On CUDA the converted model runs ``F.linear`` on sparse tensor
    cores; on the CPU torch has no 2:4 matmul, so a converted model is for storage and export only.

    Args:
        model: the model to convert in place.
        include, exclude: a glob pattern or list of glob patterns over module names (``"encoder.*.fc1"``).
        prune: prune each weight to 2:4 by magnitude first (:func:`sparsekern.semi24_mask`).
        with_transpose, format: passed to :func:`sparsekern.to_semi_structured`.

    Returns:
        A :class:`Semi24Report`; ``print(report)`` shows a table.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).half()
        >>> report = sparsekern.nn.sparsify_semi24(model, prune=True)
        >>> [layer.converted for layer in report.layers]
        [True, False]
    """
    fn = "sparsify_semi24"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    include_p = _patterns(fn, "include", include)
    exclude_p = _patterns(fn, "exclude", exclude)
    report = Semi24Report()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        entry = LayerReport(
            name, tuple(weight.shape), str(weight.dtype).replace("torch.", ""), str(weight.device), False, ""
        )
        report.layers.append(entry)
        if include_p is not None and not any(fnmatch.fnmatchcase(name, p) for p in include_p):
            entry.reason = "not matched by include"
        elif exclude_p is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude_p):
            entry.reason = "matched by exclude"
        elif (reason := _skip_reason(weight, prune)) is not None:
            entry.reason = reason
        else:
            sparse = to_semi_structured(weight, prune=prune, with_transpose=with_transpose, format=format)
            module.weight = nn.Parameter(sparse, requires_grad=weight.requires_grad)
            entry.converted = True
            entry.reason = f"{format}{', pruned' if prune else ''}{', with transpose' if with_transpose else ''}"
    return report
