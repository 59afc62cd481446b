"""Drop-in layers and model conversions."""

from .semi24 import LayerReport, Semi24Report, sparsify_semi24

__all__ = ["LayerReport", "Semi24Report", "sparsify_semi24"]
