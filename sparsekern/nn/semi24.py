"""Convert the ``nn.Linear`` layers of a model to 2:4 semi-structured weights, with a report of every layer."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .. import _semi24
from ..ops.semi24_decompress import semi24_decompress
from ..ops.to_semi_structured import prune_semi24, to_semi_structured

# torch.load(weights_only=True) refuses tensor subclasses it has not been told about; torch's own 2:4 classes
# rebuild from plain tensors, so a state_dict of a converted model loads safely once they are allowed. Their op
# table is filled by the first constructor call, which unpickling skips: fill it now, or a loaded tensor
# supports no op at all (not even load_state_dict).
_SEMI24_CLASSES = (torch.sparse.SparseSemiStructuredTensorCUTLASS, torch.sparse.SparseSemiStructuredTensorCUSPARSELT)
torch.serialization.add_safe_globals(list(_SEMI24_CLASSES))
for _cls in _SEMI24_CLASSES:
    _cls._load_dispatch_table()

ON_CPU = ("skip", "dense", "compressed")


@dataclass
class Semi24LayerReport:
    name: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    converted: bool
    reason: str  # why it was skipped, or how it was converted
    layout: str | None = None  # converted: "semi-structured", or "dense" (on_cpu="dense")


@dataclass
class Semi24Report:
    layers: list[Semi24LayerReport] = field(default_factory=list)

    @property
    def converted(self) -> list[Semi24LayerReport]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list[Semi24LayerReport]:
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


def _fused_readers(model: nn.Module) -> dict[int, str]:
    """The Linear layers whose weight a fused torch kernel reads as a dense tensor, by id, with the reason."""
    readers = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            readers[id(module.out_proj)] = (
                f"out_proj of nn.MultiheadAttention {name!r}: torch's attention reads its weight itself "
                "(F.multi_head_attention_forward, _native_multi_head_attention), which cannot take a 2:4 tensor"
            )
        elif isinstance(module, nn.TransformerEncoderLayer):
            for child in ("linear1", "linear2"):
                readers[id(getattr(module, child))] = (
                    f"{child} of nn.TransformerEncoderLayer {name!r}: torch's fused encoder fast path "
                    "(_transformer_encoder_layer_fwd, taken in eval mode) cannot take a 2:4 tensor"
                )
    return readers


def _skip_reason(
    module: nn.Linear, readers: dict[int, str], prune: bool, with_transpose: bool, on_cpu: str
) -> str | None:
    weight = module.weight
    if id(module) in readers:
        return readers[id(module)]
    if isinstance(module, NonDynamicallyQuantizableLinear):  # an attention out_proj outside its MHA
        return "an attention output projection (NonDynamicallyQuantizableLinear): torch's attention reads it dense"
    if isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        return "already a 2:4 semi-structured tensor"
    if weight.dtype not in _semi24.FORMATS:
        return f"dtype {str(weight.dtype).replace('torch.', '')} has no 2:4 format (fp16, bf16, int8, fp32)"
    shape_error = _semi24.shape_error("sparsify_semi24", "the weight", tuple(weight.shape), weight.dtype)
    if not shape_error and with_transpose:
        shape_error = _semi24.shape_error(
            "", "its transpose (with_transpose=True)", tuple(weight.shape)[::-1], weight.dtype
        )
    if shape_error:
        return shape_error.split(": ", 1)[1]
    if weight.device.type not in ("cpu", "cuda"):
        return f"on {weight.device}: 2:4 tensors live on the CPU (storage) or CUDA (matmul)"
    if not prune:
        first_bad = _semi24.first_bad_group(weight.detach())
        if first_bad >= 0:
            message = _semi24.not_sparse_message("sparsify_semi24", tuple(weight.shape), weight.dtype, first_bad)
            return message.split(": ", 1)[1].split(" (prune first")[0] + " (pass prune=True to prune it)"
    if weight.device.type == "cpu" and on_cpu == "skip":
        return (
            "on the CPU: the 2:4 matmul needs a CUDA GPU (torch has no CPU kernel for a 2:4 weight); move the "
            "model to CUDA first, or pass on_cpu='dense' to check accuracy with the 2:4-pruned weight kept dense, "
            "or on_cpu='compressed' to store or export the 2:4 tensors"
        )
    return None


def _checked_dense(sparse: torch.sparse.SparseSemiStructuredTensor, pruned: torch.Tensor) -> torch.Tensor:
    """The dense weight a CPU model runs with on_cpu="dense": the 2:4 tensor decompressed, so the CPU computes
    with exactly the values the GPU model holds. (sparsekern's decompress, not torch's to_dense, which rounds
    some fp32 values in torch 2.14.)"""

    def same(a, b):  # equal values (-0.0 comes back as +0.0), NaN where NaN was (a weight given unpruned)
        return bool(((a == b) | (a.isnan() & b.isnan())).all())

    dense = semi24_decompress(sparse.packed, sparse.meta)
    if not same(dense, pruned):
        raise RuntimeError("sparsify_semi24: the compressed weight does not decompress to the pruned weight")
    if sparse.packed_t is not None and not same(semi24_decompress(sparse.packed_t, sparse.meta_t), dense.t()):
        raise RuntimeError("sparsify_semi24: the compressed transpose does not decompress to the pruned weight")
    return dense


def _convert(weight, entry: Semi24LayerReport, prune, with_transpose, format, on_cpu) -> nn.Parameter:
    sparse = to_semi_structured(weight, prune=prune, with_transpose=with_transpose, format=format)
    entry.converted = True
    entry.reason = f"{format}{', pruned' if prune else ''}{', with transpose' if with_transpose else ''}"
    if weight.device.type == "cpu" and on_cpu == "dense":
        pruned = prune_semi24(weight.detach(), with_transpose) if prune else weight.detach()
        entry.layout = "dense"
        entry.reason += "; kept dense on the CPU (the decompressed 2:4 weight): for accuracy, no speed-up"
        return nn.Parameter(_checked_dense(sparse, pruned), requires_grad=weight.requires_grad)
    entry.layout = "semi-structured"
    if weight.device.type == "cpu":
        entry.reason += "; on the CPU for storage/export only: the 2:4 matmul needs a CUDA GPU"
    return nn.Parameter(sparse, requires_grad=weight.requires_grad)


def sparsify_semi24(
    model: nn.Module,
    *,
    include=None,
    exclude=None,
    prune: bool = False,
    with_transpose: bool = False,
    format: str = "cutlass",
    on_cpu: str = "skip",
) -> Semi24Report:
    """Replace the weight of every eligible ``nn.Linear`` in ``model`` by a 2:4 semi-structured tensor, in place.

    A layer is eligible when its name matches ``include`` (default: all) and not ``exclude``, its weight has
    a 2:4 dtype (fp16, bf16, int8; fp32 as 1:2) and a shape torch's CUTLASS kernels accept, the weight is
    already 2:4 sparse or ``prune=True``, and no fused torch kernel reads the weight as a dense tensor (the
    ``out_proj`` of ``nn.MultiheadAttention``, ``linear1``/``linear2`` of ``nn.TransformerEncoderLayer``).
    Every ``nn.Linear`` appears in the report, converted or skipped with its reason; nothing is skipped silently.

    On CUDA the converted model runs ``F.linear`` on sparse tensor cores. On the CPU torch has no 2:4 matmul,
    so ``on_cpu`` says what CPU weights become:

    - ``"skip"`` (default): left as they are, each reported with that reason.
    - ``"dense"``: pruned to 2:4 and compressed as on CUDA, then kept as the dense tensor decompressed from the
      2:4 tensor (checked equal to the pruned weight), so the CPU forward computes what the GPU model would:
      for checking accuracy, no speed-up. The report says ``layout="dense"``.
    - ``"compressed"``: real 2:4 tensors for storage and export (``to_dense()`` and ``state_dict`` work, the
      forward does not; torch cannot move them to CUDA either: load the state_dict into a CUDA model).

    A converted model's ``state_dict`` loads with ``torch.load(..., weights_only=True)`` (importing sparsekern
    allows torch's 2:4 classes); load it with ``model.load_state_dict(state, assign=True)``, since a 2:4
    tensor cannot be copied into a dense parameter.

    Args:
        model: the model to convert in place.
        include, exclude: a glob pattern or list of glob patterns over module names (``"encoder.*.fc1"``).
        prune: prune each weight to 2:4 by magnitude first (:func:`sparsekern.semi24_mask`).
        with_transpose, format: passed to :func:`sparsekern.to_semi_structured`.
        on_cpu: "skip", "dense" or "compressed", as above.

    Returns:
        A :class:`Semi24Report`; ``print(report)`` shows a table.

    Raises:
        TypeError / ValueError: a bad argument (named in the message); the model is then unchanged.

    Example::

        >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).half()
        >>> report = sparsekern.nn.sparsify_semi24(model, prune=True, on_cpu="dense")
        >>> [(layer.converted, layer.layout) for layer in report.layers]
        [(True, 'dense'), (False, None)]
        >>> report.layers[1].reason
        'the weight has 10 rows, but float16 2:4 tensors need a positive multiple of 32 rows (shape (10, 32))'
        >>> model(torch.randn(4, 64, dtype=torch.float16)).shape  # runs on the CPU
        torch.Size([4, 10])
    """
    fn = "sparsify_semi24"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    include_p = _patterns(fn, "include", include)
    exclude_p = _patterns(fn, "exclude", exclude)
    if on_cpu not in ON_CPU:
        raise ValueError(f"{fn}: on_cpu must be one of {ON_CPU}, got {on_cpu!r}")
    readers = _fused_readers(model)
    report = Semi24Report()
    staged = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        entry = Semi24LayerReport(
            name, tuple(weight.shape), str(weight.dtype).replace("torch.", ""), str(weight.device), False, ""
        )
        report.layers.append(entry)
        if include_p is not None and not any(fnmatch.fnmatchcase(name, p) for p in include_p):
            entry.reason = "not matched by include"
        elif exclude_p is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude_p):
            entry.reason = "matched by exclude"
        elif (reason := _skip_reason(module, readers, prune, with_transpose, on_cpu)) is not None:
            entry.reason = reason
        else:
            staged.append((module, _convert(weight, entry, prune, with_transpose, format, on_cpu)))
    # Assigned only once every layer converted, so an error (a NaN weight, say) leaves the model unchanged.
    for module, new_weight in staged:
        module.weight = new_weight
    return report
