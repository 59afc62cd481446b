"""Backend selection shared by every op: ``backend="auto" | "cpu" | "triton" | "cuda" | "reference"``.

``auto`` picks the C++ kernel for CPU tensors and Triton for CUDA tensors. When it cannot (the extension is not
built, Triton is missing), it falls back to the plain-PyTorch reference and warns once with the reason; an
explicitly requested backend that cannot run raises :class:`BackendUnavailableError` saying why.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .. import _extension

BACKENDS = ("auto", "cpu", "triton", "cuda", "reference")

_warned: set[str] = set()


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call here (the message says why)."""


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)  # the caller of the public function


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device`` here, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend takes CPU tensors, got a tensor on {device}"
        if not _extension.available():
            return _extension.unavailable_reason
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend takes CUDA tensors, got a tensor on {device}"
        if not _extension.available():
            return _extension.unavailable_reason
        if not _extension.with_cuda():
            return "sparsekern._C was built without its CUDA sources (no CUDA toolkit or no CUDA torch at build time)"
        return None
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            if triton_interpret():
                return None
            return (
                "Triton kernels need a CUDA tensor; for CPU tensors set TRITON_INTERPRET=1 before importing "
                "sparsekern to run them in the Triton interpreter"
            )
        return f"Triton kernels do not run on {device}"
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve(op: str, device: torch.device, backend: str) -> str:
    """The concrete backend that runs ``op`` on ``device``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = unavailable_reason(backend, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend={backend!r} is not available: {reason}")
        return backend
    preferred = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}.get(device.type, ())
    reasons = []
    for candidate in preferred:
        reason = unavailable_reason(candidate, device)
        if reason is None:
            return candidate
        reasons.append(f"{candidate}: {reason}")
    why = "; ".join(reasons) if reasons else f"no compiled kernel for {device.type} tensors"
    warn_once(f"sparsekern.{op}: using the plain-PyTorch reference ({why})")
    return "reference"


def resolve_tensor(fn: str, x: torch.Tensor, backend: str) -> str:
    """The backend that runs ``fn`` on ``x`` (its device and dtype): float64 has no kernel, so it always runs the
    reference (asking for a kernel raises)."""
    if x.dtype == torch.float64:
        if backend not in ("auto", "reference"):
            resolve(fn, x.device, backend)  # still reports an unknown or unavailable backend first
            raise BackendUnavailableError(f"{fn}: backend={backend!r} has no float64 kernel; use 'reference'")
        return "reference"
    return resolve(fn, x.device, backend)
