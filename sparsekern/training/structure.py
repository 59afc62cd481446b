"""Mask structures that sparse training keeps exactly: constant fan-in and N:M.

A :class:`Structure` constrains the bool mask (n_out, n_in) of one weight matrix (a Linear's weight; a conv
weight flattened to (out_channels, in_channels * kernel)). Every operation is row-local: it reads and returns
whole rows, in blocks of ``row_block`` rows (1 for constant fan-in and N:M; 4 for transposable N:M tiles), so a
layer can be updated a block of rows at a time and the scores of a gradient-driven grow never exist for the
whole layer at once.

The implementations live in ``structure_fan_in.py`` and ``structure_nm.py``; :func:`parse_structure` turns the
``structure=`` argument of ``sparsify`` and the sparsifiers into one.
"""

from __future__ import annotations

import abc

import torch


class Structure(abc.ABC):
    """A constraint on a weight's mask, kept exactly by the initial mask and by every drop-and-grow update."""

    name: str  # as given to structure= ("fan_in", "2:4", "2:4T" for the transposable variant)
    row_block: int = 1  # rows an operation must see together

    @abc.abstractmethod
    def check_shape(self, fn: str, layer: str, shape: tuple[int, int]) -> None:
        """Raise ValueError (naming ``fn`` and the ``layer``) when a (n_out, n_in) weight cannot carry it."""

    @abc.abstractmethod
    def count(self, shape: tuple[int, int], nnz: int) -> int:
        """The nonzero count this structure gives a layer whose distribution asked for ``nnz``."""

    @abc.abstractmethod
    def initial(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        """The bool mask (n_out, n_in) of ``count`` nonzeros that keeps the largest ``scores`` the structure allows
        (ties: the lower flat index). A random initial mask passes uniform random scores."""

    @abc.abstractmethod
    def drop(self, mask: torch.Tensor, keys: torch.Tensor, fraction: float) -> torch.Tensor:
        """Of a block of rows' mask (R, n_in), the connections to drop (bool (R, n_in), a subset of ``mask``):
        about ``fraction`` of the active ones, the smallest ``keys`` (|w|; read only at ``mask``) in each row or
        group, so that :meth:`grow` can restore the structure."""

    @abc.abstractmethod
    def grow(self, kept: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The positions to grow (bool (R, n_in), disjoint from ``kept``) so that ``kept | grown`` has the
        structure again and the rows hold the counts they held before the drop: the largest ``scores`` (|dL/dW|
        for RigL, uniform random draws for SET) among the positions not kept, ties to the lower index."""

    @abc.abstractmethod
    def violation(self, mask: torch.Tensor, count: int | None = None) -> str | None:
        """None when the mask (n_out, n_in) has the structure (and, if given, ``count`` nonzeros); otherwise the
        first fault, naming the row and the columns (or group) at fault."""

    def __repr__(self) -> str:
        return f"Structure({self.name!r})"


def parse_structure(fn: str, structure, transposable: bool = False) -> Structure | None:
    """``structure=`` as given to sparsify and the sparsifiers: None (unstructured), "fan_in", or "N:M" ("2:4",
    "1:4", ...), with ``transposable=True`` only for N:M. A :class:`Structure` passes through."""
    if structure is None:
        if transposable:
            raise ValueError(f"{fn}: transposable=True needs an N:M structure (structure='2:4'), got None")
        return None
    if isinstance(structure, Structure):
        return structure
    if structure == "fan_in":
        if transposable:
            raise ValueError(f"{fn}: transposable=True applies to N:M structures, not 'fan_in'")
        from .structure_fan_in import FanIn

        return FanIn()
    if isinstance(structure, str) and ":" in structure:
        from .structure_nm import NM

        n, _, m = structure.partition(":")
        if not (n.isdigit() and m.isdigit()):
            raise ValueError(f"{fn}: structure must be None, 'fan_in' or 'N:M' such as '2:4', got {structure!r}")
        return NM(int(n), int(m), transposable=transposable)
    raise ValueError(f"{fn}: structure must be None, 'fan_in' or 'N:M' such as '2:4', got {structure!r}")
