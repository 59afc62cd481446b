"""Lottery-ticket science: linear interpolation between networks and their error barriers."""

from .interpolate import InterpolationCurve, error_barrier, interpolate, recompute_batch_norm

__all__ = ["InterpolationCurve", "error_barrier", "interpolate", "recompute_batch_norm"]
