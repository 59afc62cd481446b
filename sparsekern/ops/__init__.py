"""Public ops. Each op lives in its own file: registration, fake implementation, public function."""

from . import _library  # noqa: F401  (defines the schemas first)
from ._backend import BACKENDS, BackendUnavailableError
from .ell_sddmm import ell_sddmm
from .ell_spmm import ell_spmm
from .ell_spmm_t import ell_spmm_t
from .outer_topk import outer_topk
from .semi24_compress import semi24_compress
from .semi24_decompress import semi24_decompress
from .semi24_mask import semi24_mask
from .to_semi_structured import to_semi_structured

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ell_sddmm",
    "ell_spmm",
    "ell_spmm_t",
    "outer_topk",
    "semi24_compress",
    "semi24_decompress",
    "semi24_mask",
    "to_semi_structured",
]
