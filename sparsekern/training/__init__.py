"""Sparse training methods (DESIGN §4): sparsify() and layer-wise densities; static, SNIP, GraSP, SynFlow (fixed
masks); SET, RigL, SNFS (drop and grow); GMP and IMP (pruning); STE and SR-STE (learned masks)."""

from .distribution import DISTRIBUTIONS, layer_nnz
from .drop_grow import DropGrowPlan, drop_and_grow
from .flops import FlopsReport, LayerFlops, flops_report
from .gmp import GMP, GMPSchedule
from .imp import IMP, IMPRound, Ticket
from .prune_init import GraSP, SynFlow, grasp_scores, synflow_scores
from .schedule import UpdateSchedule
from .small_dense import small_dense
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
from .structure import Structure, parse_structure
from .structure_fan_in import FanIn
from .structure_nm import NM

__all__ = [
    "DISTRIBUTIONS",
    "GMP",
    "IMP",
    "IMPRound",
    "LAYOUTS",
    "NM",
    "SET",
    "SNFS",
    "SNIP",
    "SRSTE",
    "STE",
    "DropGrowPlan",
    "FanIn",
    "FlopsReport",
    "LayerFlops",
    "GraSP",
    "GMPSchedule",
    "RigL",
    "Sparsifier",
    "SparsityReport",
    "Static",
    "Structure",
    "SynFlow",
    "Ticket",
    "UpdateSchedule",
    "compress",
    "drop_and_grow",
    "flops_report",
    "grasp_scores",
    "keep_masks",
    "layer_nnz",
    "nm_mask",
    "parse_structure",
    "snip_scores",
    "sparsify",
    "small_dense",
    "sparsity_report",
    "synflow_scores",
    "to_sparse_linear",
]
