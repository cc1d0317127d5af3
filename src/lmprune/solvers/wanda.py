"""Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂, compared within each output row; no update."""

from __future__ import annotations

import torch

from ..config import SparsityPattern
from ..masks import topk_mask
from .base import NoSettings, Solver, SolverResult
from .linalg import input_norms


def scores(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    return W.abs() * input_norms(H)[None, :]


def solve(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: NoSettings) -> SolverResult:
    mask = topk_mask(scores(W, H), pattern)
    return SolverResult(W * mask, mask)


SOLVERS = [Solver(
    "wanda", "|W|·‖X‖ per output row, kept weights unchanged", solve=solve, per_row_default=True,
    statistics="diagonal",
)]
