"""Argument checks shared by the public functions: messages name the argument, what was expected and what came."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def all_finite(t: torch.Tensor) -> bool:
    """No inf or NaN in ``t``: one float64 sum (a single pass, no bool temporary; inf and NaN propagate)."""
    return t.numel() == 0 or math.isfinite(float(t.sum(dtype=torch.float64)))


def check_tensor(
    fn: str,
    name: str,
    value,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{fn}: {name} must have dtype {names}; got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous (call .contiguous() first)")
    return value


def check_same_device(fn: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{fn}: tensors must be on one device, got {listed}")
