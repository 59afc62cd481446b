"""``sparsekern.export_semi24``: from a sparse-trained model to ``nn.Linear`` layers with real 2:4 weights, in one call.

The path the deployment story needs: train with 2:4 masks (``sparsify(..., structure="2:4")``, SR-STE) or prune an
unstructured model to 2:4, then :func:`export_semi24` validates every group, compresses each eligible layer into a
``torch.sparse.SparseSemiStructuredTensor`` (CUTLASS layout through sparsekern's bit-exact compressor, or cuSPARSELt's
opaque layout through ``torch._cslt_compress`` on CUDA) and says, per layer, what it did and why.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from . import _semi24
from .nn.semi24 import _fused_readers
from .nn.sparse_linear import SparseLinear
from .ops import _backend
from .ops.semi24_decompress import semi24_decompress
from .ops.semi24_mask import group_topk_mask
from .ops.to_semi_structured import to_semi_structured

FORMATS = ("auto", "cutlass", "cusparselt")
EXPORT_DTYPES = (torch.float16, torch.bfloat16, torch.int8)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16)
_INT8_MAX = 127  # symmetric quantization: -128 is never produced, so |q| <= 127 and -q is representable
# Tokens of the activation matrix are padded to a multiple of this for the int8 GPU kernels (torch's dense_min_rows
# and dense_min_cols for int8 are 16 in both the CUTLASS and the cuSPARSELt configs).
_INT8_TOKEN_PAD = 16


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ---------------------------------------------------------------------------------------------------------
# The report


@dataclass
class ExportedLayer:
    """What :func:`export_semi24` did with one layer.

    name: the module's name in the model; kind: "SparseLinear", "Linear (masked)", "Linear", "Conv2d", ...;
    shape: the weight's shape (out_features, in_features); dtype: the weight's dtype before export.
    converted: whether the layer now holds a 2:4 weight; reason: why it was skipped, or how it was converted.
    format: "cutlass" or "cusparselt"; export_dtype: the 2:4 weight's dtype ("float16", "bfloat16", "int8").
    pruned: whether 2:4 pruning removed anything. magnitude_kept: sum |w| of the exported weight (before int8
    quantization) over sum |w| of the layer's masked weight, in float64 (1.0 when nothing was pruned; a layer whose
    weight is all zero counts as 1.0). l1_before / l1_kept: those two sums. nnz_before: nonzeros of the masked
    weight (in the export's float dtype); nnz: nonzeros of the exported 2:4 weight.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    converted: bool = False
    reason: str = ""
    format: str | None = None
    export_dtype: str | None = None
    pruned: bool = False
    magnitude_kept: float | None = None
    l1_before: float | None = None
    l1_kept: float | None = None
    nnz_before: int | None = None
    nnz: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def density(self) -> float | None:
        return None if self.nnz is None else self.nnz / self.numel

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["shape"] = list(self.shape)
        return out


@dataclass
class ExportReport:
    """The per-layer result of :func:`export_semi24`: ``print(report)`` shows a table, ``to_dict()`` gives JSON."""

    layers: list[ExportedLayer] = field(default_factory=list)
    dtype: str | None = None  # the dtype= the export was asked for (None: each layer kept its own)

    @property
    def converted(self) -> list[ExportedLayer]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def skipped(self) -> list[ExportedLayer]:
        return [layer for layer in self.layers if not layer.converted]

    def __getitem__(self, name: str) -> ExportedLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in the export report")

    @property
    def magnitude_kept(self) -> float | None:
        """sum |w| kept over sum |w| before, over all converted layers (None when none was converted)."""
        done = self.converted
        if not done:
            return None
        before = sum(layer.l1_before for layer in done)
        return 1.0 if before == 0 else sum(layer.l1_kept for layer in done) / before

    def to_dict(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "converted": len(self.converted),
            "skipped": len(self.skipped),
            "magnitude_kept": self.magnitude_kept,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def __str__(self) -> str:
        rows = [("layer", "kind", "shape", "dtype", "nnz", "|w| kept", "result")]
        for r in self.layers:
            after = r.export_dtype
            if after is None and self.dtype in ("float16", "bfloat16") and r.dtype in ("float32", "float64"):
                after = self.dtype  # skipped, but cast with the whole model
            dtype = r.dtype if after is None or after == r.dtype else f"{r.dtype}->{after}"
            rows.append(
                (
                    r.name or "(model)",
                    r.kind,
                    "x".join(map(str, r.shape)),
                    dtype,
                    "-" if r.nnz is None else f"{r.nnz} ({r.density:.1%})",
                    "-" if r.magnitude_kept is None else f"{r.magnitude_kept:.2%}",
                    f"converted: {r.reason}" if r.converted else f"skipped: {r.reason}",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row[:6], widths, strict=True)) + "  " + row[6] for row in rows
        ]
        total = self.magnitude_kept
        kept = "" if total is None else f"; {total:.2%} of the converted layers' |w| kept"
        lines.append(f"{len(self.converted)} converted, {len(self.skipped)} skipped{kept}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The int8 layer


class Semi24Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose weight is an int8 2:4 ``SparseSemiStructuredTensor`` with one scale per output row.

    ``y = (q_x @ q_w.T) * x_scale * weight_scale + bias``: the weight is quantized symmetrically per output row
    (``weight_scale[r] = max |w[r]| / 127``, ``q_w = round(w / weight_scale)`` in [-127, 127]) at export; the input
    is quantized the same way per token (each row of ``x.reshape(-1, in_features)``) on every call (dynamic int8
    activations). The output has the input's dtype.

    Kernels (CUDA): with a CUTLASS weight, ``torch._sparse_semi_structured_mm(..., out_dtype=torch.int32)``
    (int8 x int8 -> exact int32 sums, then the scales in float32); with a cuSPARSELt weight,
    ``torch._cslt_sparse_mm(..., out_dtype=torch.bfloat16)`` (the sums rounded to bfloat16 before the scales).
    On the CPU torch has no 2:4 matmul: the forward decompresses the weight and computes the same int32 sums
    exactly (in float64), then applies the scales as the CUTLASS path does: for checking accuracy, not speed.
    """

    def __init__(self, weight, weight_scale: torch.Tensor, bias: torch.Tensor | None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias=False, device="meta")  # no init: the tensors are given
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def _int_weight(self) -> torch.Tensor:
        w = self.weight
        if isinstance(w, torch.sparse.SparseSemiStructuredTensorCUTLASS):
            return semi24_decompress(w.packed, w.meta)
        if isinstance(w, torch.sparse.SparseSemiStructuredTensorCUSPARSELT):
            # W @ I through cuSPARSELt (exact: one product per output); its int8 path wants a column-major dense
            # operand, so the identity goes in transposed (torch's own to_dense passes a row-major one)
            eye = torch.eye(self.in_features, dtype=torch.int8, device=w.packed.device)
            return torch._cslt_sparse_mm(w.packed, eye.t())
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, emulate=False)

    def emulated_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward computed without 2:4 kernels, on any device: the int32 sums exactly (in float64), then the
        same float32 epilogue as the CUTLASS path. What ``forward`` runs on the CPU; on CUDA, the reference the
        CUTLASS path must match."""
        return self._forward(x, emulate=True)

    def _forward(self, x: torch.Tensor, emulate: bool) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"Semi24Int8Linear: x must be a floating-point tensor, got {got}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        x_scale = x2.abs().amax(dim=1, keepdim=True).float() / _INT8_MAX
        x_scale = torch.where(x_scale > 0, x_scale, torch.ones_like(x_scale))
        xq = (x2.float() / x_scale).round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        w = self.weight
        if not emulate and x.device.type == "cuda" and isinstance(w, torch.sparse.SparseSemiStructuredTensor):
            tokens = xq.shape[0]
            pad = (-tokens) % _INT8_TOKEN_PAD
            xt = torch.nn.functional.pad(xq, (0, 0, 0, pad)).t() if pad else xq.t()
            if isinstance(w, torch.sparse.SparseSemiStructuredTensorCUSPARSELT):
                acc = torch._cslt_sparse_mm(w.packed, xt, out_dtype=torch.bfloat16)
            else:
                acc = torch._sparse_semi_structured_mm(w.packed, w.meta, xt, out_dtype=torch.int32)
            acc = acc.t()[:tokens].float()
        else:  # exact: |sum| <= 127 * 127 * in_features is an integer float64 represents exactly
            acc = (xq.double() @ self._int_weight().double().t()).to(torch.int32).float()
        y = acc * self.weight_scale * x_scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the layer computes with: q_w * weight_scale (dense)."""
        return self._int_weight().float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        fmt = getattr(self.weight, "BACKEND", "dense")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int8 2:4 ({fmt}), dynamic int8 activations"
        )


# ---------------------------------------------------------------------------------------------------------
# Planning: everything is checked and computed before the model is touched


@dataclass
class _Plan:
    module: nn.Module
    entry: ExportedLayer
    weight: torch.Tensor  # the dense 2:4 weight to compress (export dtype), contiguous
    bias: torch.Tensor | None
    format: str
    scale: torch.Tensor | None = None  # int8: float32 (out,) per-row weight scales


def _patterns(fn: str, name: str, value) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        value = tuple(value)
        if value and all(isinstance(v, str) for v in value):
            return value
    raise TypeError(
        f"{fn}: {name} must be a glob pattern or a non-empty list of glob patterns over module names, got {value!r}"
    )


def _is_masked(module: nn.Module) -> bool:
    mask = getattr(module, "weight_mask", None)
    weight = getattr(module, "weight", None)
    return (
        isinstance(mask, torch.Tensor)
        and mask.dtype == torch.bool
        and isinstance(weight, torch.Tensor)
        and mask.shape == weight.shape
    )


def _kind(module: nn.Module) -> str | None:
    """The kind named in the report, or None for a module that is no layer to report."""
    if isinstance(module, SparseLinear):
        return "SparseLinear"
    if isinstance(module, Semi24Int8Linear):
        return "Semi24Int8Linear"
    if isinstance(module, nn.Linear):
        return "Linear (masked)" if _is_masked(module) else "Linear"
    if isinstance(module, nn.modules.conv._ConvNd):
        return type(module).__name__
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor):
        return "Conv1D"  # Hugging Face's transposed linear (GPT-2)
    return None


def _masked_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with, zeros off its mask (plain tensor, no grad)."""
    if isinstance(module, SparseLinear):
        return module.dense_weight().detach()
    weight = module.weight.detach()
    if _is_masked(module):
        return torch.where(module.weight_mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
    return weight


def _shape_reason(shape: tuple[int, int], dtype: torch.dtype, fmt: str) -> str | None:
    """Why torch's kernels of format ``fmt`` cannot take a (rows, cols) weight of ``dtype``, or None. cuSPARSELt
    weights must meet the CUTLASS constraints too: to_semi_structured validates every weight with the CUTLASS
    compressor before ``torch._cslt_compress`` packs it."""
    error = _semi24.shape_error("", "the weight", shape, dtype)
    if error is not None or fmt == "cutlass":
        return None if error is None else error.split(": ", 1)[1]
    config = torch.sparse.SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS[dtype]
    for dim, size, need in (("rows", shape[0], config.sparse_min_rows), ("columns", shape[1], config.sparse_min_cols)):
        if size < need or size % need:
            return (
                f"the weight has {size} {dim}, but {_dtype_name(dtype)} cuSPARSELt 2:4 tensors need a positive "
                f"multiple of {need} {dim} (shape {shape})"
            )
    return None


def _resolve_format(fmt: str, device: torch.device) -> str:
    if fmt != "auto":
        return fmt
    if device.type == "cuda" and torch.backends.cusparselt.is_available():
        return "cusparselt"
    return "cutlass"


def _skip_reason(module, name, kind, readers, tied, dtype, fmt) -> str | None:
    weight = None if kind == "SparseLinear" else getattr(module, "weight", None)  # SparseLinear.weight: a dense copy
    if kind == "Semi24Int8Linear" or isinstance(weight, torch.sparse.SparseSemiStructuredTensor):
        return "already a 2:4 semi-structured layer"
    if kind == "Conv1D":
        return (
            "Conv1D (Hugging Face's transposed linear, y = x @ W): its weight is (in, out), so its 2:4 groups run "
            "along the other dimension; convert it to an nn.Linear first"
        )
    if kind not in ("SparseLinear", "Linear", "Linear (masked)"):
        return f"{kind}: torch's 2:4 kernels are matrix products for nn.Linear weights only (no convolution)"
    if id(module) in readers:
        return readers[id(module)]
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return "an attention output projection (NonDynamicallyQuantizableLinear): torch's attention reads it dense"
    if kind != "SparseLinear" and id(module.weight) in tied:
        return f"its weight is shared with {tied[id(module.weight)]} (tied): a 2:4 copy would untie them"
    weight = module.values if kind == "SparseLinear" else module.weight
    if weight.device.type not in ("cpu", "cuda"):
        return f"on {weight.device}: 2:4 tensors live on the CPU (storage, to_dense) or CUDA (matmul)"
    float_dtype = dtype if dtype in _FLOAT_DTYPES else weight.dtype
    if dtype is None and weight.dtype not in _FLOAT_DTYPES:
        return (
            f"dtype {_dtype_name(weight.dtype)}: torch's 2:4 formats are float16, bfloat16 and int8 (float32 is 1:2, "
            "not 2:4); pass dtype=torch.float16, torch.bfloat16 or torch.int8"
        )
    if not float_dtype.is_floating_point:
        return f"dtype {_dtype_name(float_dtype)}: only floating-point layers are exported"
    if fmt == "cusparselt" and weight.device.type != "cuda":
        return f"format='cusparselt' needs the weight on CUDA (torch._cslt_compress), it is on {weight.device}"
    target = dtype if dtype is not None else weight.dtype
    return _shape_reason((module.out_features, module.in_features), target, _resolve_format(fmt, weight.device))


def _tied_weights(model: nn.Module) -> dict[int, str]:
    """id(Parameter) -> the modules holding it, for every Parameter held by more than one module."""
    holders: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            holders.setdefault(id(param), []).append(f"{name}.{pname}" if name else pname)
    return {key: " and ".join(names) for key, names in holders.items() if len(names) > 1}


def _group_counts(weight: torch.Tensor) -> torch.Tensor:
    """Nonzeros of every group of 4 along the rows: uint8 (rows, cols / 4)."""
    return (weight != 0).view(weight.shape[0], -1, 4).sum(-1, dtype=torch.uint8)


def _first_bad(counts: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(row, first column, nonzeros, bad groups) of the first group of 4 holding more than 2 nonzeros, or None."""
    bad = counts > 2
    if not bool(bad.any()):
        return None
    flat = int(bad.flatten().nonzero()[0])
    row, group = divmod(flat, counts.shape[1])
    return row, group * 4, int(counts[row, group]), int(bad.sum())


def _l1(w: torch.Tensor) -> float:
    """sum |w| in float64 (one pass, no float64 copy)."""
    return float(torch.linalg.vector_norm(w, 1, dtype=torch.float64))


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8, scale float32 (rows,)); an all-zero row gets scale 1."""
    w32 = w.float()
    scale = w32.abs().amax(dim=1) / _INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (w32 / scale[:, None]).round().clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)
    return q, scale


def _plan_layer(fn, module, entry, dtype, fmt, prune) -> tuple[_Plan | None, str | None]:
    """The plan of an eligible layer, or (None, error message) for a weight that is not 2:4."""
    dense = _masked_weight(module)
    if not bool(torch.isfinite(dense).all()):
        what = "NaN" if bool(torch.isnan(dense).any()) else "inf"
        return (
            None,
            f"layer {entry.name!r} ({entry.kind} {entry.shape[0]}x{entry.shape[1]}) holds {what}; a 2:4 "
            "export needs finite weights",
        )
    float_dtype = dtype if dtype in _FLOAT_DTYPES else dense.dtype
    # + 0.0 turns -0.0 into +0.0 (IEEE round-to-nearest) and changes nothing else: the zeros of the exported
    # weight are +0.0, as the decompressed 2:4 tensor's are, so the round trip is bit-exact
    w = dense.to(float_dtype) + 0.0
    counts = _group_counts(w)
    entry.nnz_before = int(counts.sum(dtype=torch.int64))
    l1_before = _l1(w)
    bad = _first_bad(counts)
    if bad is not None and not prune:
        row, col, count, n_bad = bad
        return None, (
            f"layer {entry.name!r} ({entry.kind} {entry.shape[0]}x{entry.shape[1]}) is not 2:4 sparse: row {row}, "
            f"columns {col}..{col + 3} hold {count} nonzeros (2:4 keeps at most 2; {n_bad} such group"
            f"{'s' if n_bad > 1 else ''} in this layer); pass prune=True to prune it by magnitude, or "
            f"exclude={entry.name!r} to leave it dense"
        )
    entry.l1_before, entry.l1_kept, entry.nnz = l1_before, l1_before, entry.nnz_before
    if bad is not None:  # keep the 2 largest |w| of every group (ties: lower index), as semi24_mask does
        w = w * group_topk_mask(w, keep=2, group=4)  # finite, no -0.0: the product keeps +0.0 zeros
        entry.pruned = True
        entry.l1_kept, entry.nnz = _l1(w), int(torch.count_nonzero(w))
    entry.magnitude_kept = 1.0 if l1_before == 0 else entry.l1_kept / l1_before
    resolved = _resolve_format(fmt, w.device)
    scale = None
    bias = None if module.bias is None else module.bias.detach().to(float_dtype)
    if dtype == torch.int8:
        w, scale = _quantize_rows(w)
        entry.nnz = int(torch.count_nonzero(w))  # weights below half a step round to 0
    entry.export_dtype = _dtype_name(w.dtype)
    entry.format = resolved
    return _Plan(module, entry, w.contiguous(), bias, resolved, scale), None


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Install ``new`` at every position of ``old`` (a module used in several places gets one new module)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and name:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)


def _new_linear(plan: _Plan, sparse) -> nn.Linear:
    if plan.scale is not None:
        return Semi24Int8Linear(sparse, plan.scale, plan.bias)
    out_features, in_features = plan.weight.shape
    linear = nn.Linear(in_features, out_features, bias=False, device="meta")  # no init, no RNG draw
    linear.weight = nn.Parameter(sparse, requires_grad=False)
    linear.bias = None if plan.bias is None else nn.Parameter(plan.bias, requires_grad=False)
    return linear


def export_semi24(
    model: nn.Module,
    *,
    prune: bool = False,
    dtype: torch.dtype | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    format: str = "auto",
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[nn.Module, ExportReport]:
    """Export a sparse-trained model for 2:4 inference: each eligible linear layer becomes an ``nn.Linear`` whose
    weight is a real ``torch.sparse.SparseSemiStructuredTensor``.

    Layers taken: :class:`~sparsekern.nn.SparseLinear`, masked ``nn.Linear`` (a bool ``weight_mask`` buffer, as
    ``sparsify(layout="masked")`` makes) and plain ``nn.Linear``; each is exported with the weight it computes with
    (zeros off its mask). Every group of 4 consecutive weights along the input dimension must hold at most 2
    nonzeros; with ``prune=True`` a group holding more keeps its 2 largest |w| (ties: lower index,
    :func:`sparsekern.semi24_mask`), and the report says how much of each layer's L1 magnitude was kept.

    Skipped, each with its reason in the report: layers outside ``include`` or inside ``exclude``; convolutions
    (torch's 2:4 kernels are matrix products); a shape torch's kernels refuse (CUTLASS: float16/bfloat16 rows a
    multiple of 32 and columns of 64, int8 16 x 128; cuSPARSELt also needs int8 rows a multiple of 32);
    float32/float64 layers when ``dtype`` is not given (torch's float32 format is 1:2, not 2:4); linear layers
    whose weight a fused torch kernel reads dense (``nn.MultiheadAttention.out_proj``,
    ``nn.TransformerEncoderLayer.linear1/linear2``); tied weights; layers that already hold 2:4 weights.

    Nothing is half-converted: every layer is checked, pruned and compressed before the model is changed, and any
    error leaves the model exactly as it was.

    Args:
        model: the model (an ``nn.Module``; a DistributedDataParallel / DataParallel wrapper is looked through and
            the wrapped model is exported).
        prune: prune groups holding more than 2 nonzeros to 2:4 by magnitude instead of raising.
        dtype: None: each layer keeps its dtype (float16 or bfloat16; float32 layers are skipped, see above).
            ``torch.float16`` / ``torch.bfloat16``: the whole model is cast first (``model.to(dtype)``, as torch's
            2:4 tutorial does with ``.half()``), then exported. ``torch.int8``: the exported layers become
            :class:`Semi24Int8Linear` (int8 2:4 weight with per-row scales, dynamic per-token int8 activations,
            output in the input's dtype); the rest of the model keeps its dtype.
        include, exclude: a glob pattern or list of glob patterns over module names (``"encoder.*.fc1"``).
        format: "cutlass" (sparsekern's compressor, bit-identical to torch's; works on the CPU too),
            "cusparselt" (``torch._cslt_compress``; CUDA weights only) or "auto": cuSPARSELt for CUDA weights when
            torch has it, else CUTLASS.
        backend: the compression backend of :func:`sparsekern.semi24_compress` ("auto", "cpu", "triton", "cuda",
            "reference").
        inplace: change ``model`` itself. By default a deep copy is exported and ``model`` is left as it was.

    Returns:
        ``(exported_model, report)``: the report (:class:`ExportReport`) lists every linear and conv layer,
        converted or skipped with the reason, with nnz and magnitude kept; ``print(report)`` shows a table,
        ``report.to_dict()`` gives plain data.

    The exported weights are plain ``nn.Parameter`` s without grad (inference). On CUDA the layers run on sparse
    tensor cores through ``F.linear``; on the CPU torch has no 2:4 matmul: :func:`decompress_model` gives the model
    with every 2:4 weight decompressed, which computes exactly what the exported tensors hold.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or an argument has the wrong type.
        ValueError: a bad argument value; a pattern matching no layer; a weight holding NaN or inf; without
            ``prune``, a weight that is not 2:4 (the message names the layer, the row and the columns, and counts
            the layer's bad groups).

    Example::

        >>> model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> exported, report = sparsekern.export_semi24(model, prune=True, dtype=torch.float16)
        >>> print(report)
        layer  kind    shape   dtype             nnz           |w| kept  result
        0      Linear  64x128  float32->float16  4096 (50.0%)  70.12%    converted: cutlass float16, pruned to 2:4 ...
        2      Linear  10x64   float32->float16  -             -         skipped: the weight has 10 rows, ...
        1 converted, 1 skipped; 70.12% of the converted layers' |w| kept
        >>> type(exported[0].weight).__name__
        'SparseSemiStructuredTensorCUTLASS'
        >>> y = sparsekern.export.decompress_model(exported)(torch.randn(4, 128, dtype=torch.float16))  # CPU check
    """
    fn = "export_semi24"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    for name, value in (("prune", prune), ("inplace", inplace)):
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{fn}: dtype must be None or a torch.dtype, got {dtype!r}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"{fn}: dtype must be None, torch.float16, torch.bfloat16 or torch.int8, got {dtype}")
    if format not in FORMATS:
        raise ValueError(f"{fn}: format must be one of {FORMATS}, got {format!r}")
    if backend not in _backend.BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {_backend.BACKENDS}, got {backend!r}")
    include_p = _patterns(fn, "include", include)
    exclude_p = _patterns(fn, "exclude", exclude)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module  # the real model: its names, and what is exported (a copy of a wrapper is no model)

    layers = [(name, module, kind) for name, module in model.named_modules() if (kind := _kind(module)) is not None]
    names = [name for name, _, _ in layers]
    for arg, patterns in (("include", include_p), ("exclude", exclude_p)):
        for p in patterns or ():
            if not any(fnmatch.fnmatchcase(name, p) for name in names):
                raise ValueError(f"{fn}: {arg} pattern {p!r} matches no linear or conv layer (layers: {names})")

    readers = _fused_readers(model)
    tied = _tied_weights(model)
    report = ExportReport(dtype=None if dtype is None else _dtype_name(dtype))
    plans: list[_Plan] = []
    errors: list[str] = []
    for name, module, kind in layers:
        weight = module.values if kind == "SparseLinear" else module.weight
        shape = (module.out_features, module.in_features) if kind == "SparseLinear" else tuple(weight.shape)
        entry = ExportedLayer(name, kind, shape, _dtype_name(weight.dtype))
        report.layers.append(entry)
        if include_p is not None and not any(fnmatch.fnmatchcase(name, p) for p in include_p):
            entry.reason = "not matched by include"
        elif exclude_p is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude_p):
            entry.reason = "matched by exclude"
        elif (reason := _skip_reason(module, name, kind, readers, tied, dtype, format)) is not None:
            entry.reason = reason
        else:
            with torch.no_grad():
                plan, error = _plan_layer(fn, module, entry, dtype, format, prune)
            if error is not None:
                errors.append(error)
            else:
                plans.append(plan)
    if errors:
        more = f" ({len(errors) - 1} more layer{'s' if len(errors) > 2 else ''}: see below)" if len(errors) > 1 else ""
        details = "".join(f"\n  {e}" for e in errors[1:])
        raise ValueError(f"{fn}: {errors[0]}{more}; the model is unchanged{details}")

    # Compress every layer before changing anything: an error here also leaves the model as it was.
    sparse = [to_semi_structured(p.weight, format=p.format, backend=backend) for p in plans]
    for plan in plans:
        e = plan.entry
        e.converted = True
        how = f"{e.format} {e.export_dtype}"
        if e.pruned:
            how += f", pruned to 2:4 ({e.magnitude_kept:.2%} of |w| kept)"
        if plan.scale is not None:
            how += ", per-row weight scales, dynamic int8 activations"
        e.reason = how
    if not inplace:
        memo: dict[int, Any] = {}
        target = copy.deepcopy(model, memo)
        plans = [dataclasses.replace(p, module=memo[id(p.module)]) for p in plans]
    else:
        target = model
    if dtype in _FLOAT_DTYPES:
        target.to(dtype)
    for plan, tensor in zip(plans, sparse, strict=True):
        new = _new_linear(plan, tensor)
        if plan.module is target:  # the model is itself one linear layer
            target = new
        else:
            _replace_module(target, plan.module, new)
    return target, report


def decompress_model(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The model with every 2:4 weight (``SparseSemiStructuredTensor``) replaced by its dense decompression.

    For evaluating an exported model on the CPU, where torch has no 2:4 matmul: the dense weights are exactly
    the values the 2:4 tensors hold (CUTLASS through :func:`sparsekern.semi24_decompress`, bit for bit;
    cuSPARSELt through ``to_dense()``), so the model computes what the exported one computes on a GPU up to the
    GPU kernels' rounding. :class:`Semi24Int8Linear` layers are kept: their CPU forward already decompresses.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"decompress_model: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"decompress_model: inplace must be True or False, got {inplace!r}")
    dense: dict[int, nn.Parameter] = {}  # by id of the 2:4 weight; the 2:4 tensors themselves are never copied
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.sparse.SparseSemiStructuredTensor) and id(weight) not in dense:
            if isinstance(module, Semi24Int8Linear):
                dense[id(weight)] = weight  # kept (shared with a copy): its forward decompresses where needed
            elif isinstance(weight, torch.sparse.SparseSemiStructuredTensorCUTLASS):
                dense[id(weight)] = nn.Parameter(semi24_decompress(weight.packed, weight.meta), requires_grad=False)
            else:
                dense[id(weight)] = nn.Parameter(weight.to_dense(), requires_grad=False)
    if not inplace:
        return copy.deepcopy(model, dict(dense))
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if id(weight) in dense and not isinstance(module, Semi24Int8Linear):
            module.weight = dense[id(weight)]
    return model
