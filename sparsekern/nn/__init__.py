"""Drop-in layers and model conversions."""

from .semi24 import Semi24LayerReport, Semi24Report, sparsify_semi24
from .sparse_linear import SparseLinear, TopologyUpdate

__all__ = ["Semi24LayerReport", "Semi24Report", "SparseLinear", "TopologyUpdate", "sparsify_semi24"]
