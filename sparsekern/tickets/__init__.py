"""Lottery-ticket science: linear interpolation between networks, error barriers and instability analysis."""

from .instability import InstabilityResult, instability
from .interpolate import InterpolationCurve, error_barrier, interpolate, recompute_batch_norm

__all__ = [
    "InstabilityResult",
    "InterpolationCurve",
    "error_barrier",
    "instability",
    "interpolate",
    "recompute_batch_norm",
]
