"""Sparse training methods: sparsify(), layer-wise densities, RigL, SET, SNIP, static masks and IMP (DESIGN §4)."""

from .distribution import DISTRIBUTIONS, layer_nnz
from .drop_grow import DropGrowPlan, drop_and_grow
from .imp import IMP, IMPRound
from .prune_init import GraSP, SynFlow, grasp_scores, synflow_scores
from .schedule import UpdateSchedule
from .snfs import SNFS
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
from .ste import SRSTE, STE, nm_mask

__all__ = [
    "DISTRIBUTIONS",
    "IMP",
    "IMPRound",
    "LAYOUTS",
    "SET",
    "SNFS",
    "SNIP",
    "SRSTE",
    "STE",
    "DropGrowPlan",
    "GraSP",
    "RigL",
    "Sparsifier",
    "SparsityReport",
    "Static",
    "SynFlow",
    "UpdateSchedule",
    "compress",
    "drop_and_grow",
    "grasp_scores",
    "keep_masks",
    "layer_nnz",
    "nm_mask",
    "snip_scores",
    "sparsify",
    "sparsity_report",
    "synflow_scores",
    "to_sparse_linear",
]
