"""sparsekern: fast, exact sparse training and 2:4 inference kernels for PyTorch.

Importing sparsekern never initialises CUDA. Triton kernels are defined on first use, so
``TRITON_INTERPRET=1`` may be set any time before the first ``backend="triton"`` call.
"""

from . import _extension, nn, tickets  # noqa: F401  (_extension loads the compiled kernels)
from ._csr import CSRIndex
from .ops import (
    BACKENDS,
    BackendUnavailableError,
    outer_topk,
    semi24_compress,
    semi24_decompress,
    semi24_mask,
    to_semi_structured,
)
from .training import (
    GMP,
    IMP,
    SET,
    SNFS,
    SNIP,
    SRSTE,
    STE,
    FanIn,
    GraSP,
    RigL,
    Static,
    SynFlow,
    Ticket,
    drop_and_grow,
    flops_report,
    grasp_scores,
    small_dense,
    snip_scores,
    sparsify,
    sparsity_report,
    synflow_scores,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CSRIndex",
    "FanIn",
    "GMP",
    "GraSP",
    "IMP",
    "RigL",
    "SET",
    "SNFS",
    "SNIP",
    "SRSTE",
    "STE",
    "Static",
    "SynFlow",
    "Ticket",
    "drop_and_grow",
    "flops_report",
    "grasp_scores",
    "nn",
    "outer_topk",
    "semi24_compress",
    "semi24_decompress",
    "semi24_mask",
    "small_dense",
    "snip_scores",
    "sparsify",
    "sparsity_report",
    "synflow_scores",
    "tickets",
    "to_semi_structured",
]
