"""Public ops. Each op lives in its own file: registration, fake implementation, public function."""

from . import _library  # noqa: F401  (defines the schemas first)
from ._backend import BACKENDS, BackendUnavailableError
from .outer_topk import outer_topk
from .semi24_compress import semi24_compress
from .semi24_decompress import semi24_decompress
from .semi24_mask import semi24_mask
from .to_semi_structured import to_semi_structured

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "outer_topk",
    "semi24_compress",
    "semi24_decompress",
    "semi24_mask",
    "to_semi_structured",
]
