"""Loads the compiled extension ``sparsekern._C`` if it was built, and remembers why not otherwise.

``SPARSEKERN_DISABLE_EXTENSION=1`` (read at import) leaves it unloaded even when built, so the whole test suite
can run against the plain-PyTorch reference fallbacks.
"""

from __future__ import annotations

import os

import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)

_C = None
unavailable_reason: str | None = None

if os.environ.get("SPARSEKERN_DISABLE_EXTENSION", "").strip().lower() in ("1", "true", "yes", "on"):
    unavailable_reason = "switched off by SPARSEKERN_DISABLE_EXTENSION"
else:
    try:
        from . import _C  # type: ignore[no-redef]  # registers the C++ kernels with the dispatcher
    except ImportError as exc:
        unavailable_reason = f"sparsekern._C is not built or failed to load ({exc})"


def available() -> bool:
    return _C is not None


def with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA sources."""
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def build_info() -> dict:
    if _C is None:
        return {"loaded": False, "reason": unavailable_reason}
    return {
        "loaded": True,
        "path": _C.__file__,
        "with_cuda": bool(_C.with_cuda),
        "cuda_version": _C.cuda_version or None,
        "cuda_archs": _C.cuda_archs.replace("_", ";"),
        "cpu_isa": _C.cpu_isa(),
    }
