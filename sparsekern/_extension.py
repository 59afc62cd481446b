"""Loads the compiled extension ``sparsekern._C`` if it was built, and remembers why not otherwise.

``SPARSEKERN_DISABLE_EXTENSION=1`` (read at import) leaves it unloaded even when built, so the whole test suite
can run against the plain-PyTorch reference fallbacks.
"""

from __future__ import annotations

import contextlib
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
        "cpu_isa": cpu_isa(),
        "cpu_isa_supported": _C.cpu_isa_supported(),
    }


ISAS = ("avx512", "avx2", "baseline")  # widest first


def cpu_isa() -> str:
    """The instruction set the C++ CPU kernels run now: "avx512", "avx2" or "baseline" (also "none" without the
    extension). With ``SPARSEKERN_CPU_ISA`` naming one this CPU lacks, the text of the error every op raises."""
    if _C is None:
        return "none"
    try:
        return _C.cpu_isa()
    except ValueError as exc:
        return f"refused: {exc}"


def available_isas() -> list[str]:
    """The instruction sets this CPU can run, widest first (each can be forced with :func:`use_cpu_isa`)."""
    if _C is None:
        return []
    widest = _C.cpu_isa_supported()
    return list(ISAS[ISAS.index(widest) :])


def set_cpu_isa(name: str | None) -> None:
    """Runs every later CPU kernel call of this process on ``name`` ("avx512", "avx2", "baseline"; None: the
    widest this CPU supports), as ``SPARSEKERN_CPU_ISA`` does at start-up.

    Raises:
        ValueError: ``name`` is not one of those, or this CPU lacks it (nothing changes then).
        RuntimeError: the extension is not loaded.
    """
    if _C is None:
        raise RuntimeError(f"set_cpu_isa: the C++ extension is not loaded ({unavailable_reason})")
    if name is not None and name not in ISAS:
        raise ValueError(f"set_cpu_isa: name must be one of {', '.join(ISAS)} or None, got {name!r}")
    _C.set_cpu_isa(name or "")


@contextlib.contextmanager
def use_cpu_isa(name: str | None):
    """A context in which the CPU kernels run ``name`` (see :func:`set_cpu_isa`); the previous choice is restored
    on exit. Not thread-safe: the choice is process-wide.

    Example::

        >>> with sparsekern._extension.use_cpu_isa("baseline"):  # doctest: +SKIP
        ...     y = sparsekern.sparse_linear(x, values, index)     # the portable kernels
    """
    before = _C.cpu_isa() if _C is not None else None
    set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(before)
