"""Sparse training methods: sparsify(), layer-wise densities, RigL, SET, SNIP, static masks, GMP and IMP (DESIGN §4)."""

from .distribution import DISTRIBUTIONS, layer_nnz
from .drop_grow import DropGrowPlan, drop_and_grow
from .gmp import GMP, GMPSchedule
from .imp import IMP, IMPRound
from .schedule import UpdateSchedule
from .sparsifier import SET, SNIP, RigL, Sparsifier, Static
from .sparsify import (
    LAYOUTS,
    SparsityReport,
    compress,
    keep_masks,
    snip_scores,
    sparsify,
    sparsity_report,
    to_sparse_linear,
)

__all__ = [
    "DISTRIBUTIONS",
    "GMP",
    "IMP",
    "IMPRound",
    "LAYOUTS",
    "SET",
    "SNIP",
    "DropGrowPlan",
    "GMPSchedule",
    "RigL",
    "Sparsifier",
    "SparsityReport",
    "Static",
    "UpdateSchedule",
    "compress",
    "drop_and_grow",
    "keep_masks",
    "layer_nnz",
    "snip_scores",
    "sparsify",
    "sparsity_report",
    "to_sparse_linear",
]
