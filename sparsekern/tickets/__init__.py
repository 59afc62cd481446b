"""Lottery-ticket science: linear interpolation between networks, error barriers and instability analysis."""

from .instability import InstabilityResult, instability
from .interpolate import InterpolationCurve, error_barrier, interpolate, recompute_batch_norm
from .levels import LevelConnectivity, level_connectivity

__all__ = [
    "InstabilityResult",
    "InterpolationCurve",
    "LevelConnectivity",
    "error_barrier",
    "instability",
    "interpolate",
    "level_connectivity",
    "recompute_batch_norm",
]
