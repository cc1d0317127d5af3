"""Wanda (Sun et al. 2023): score |W_ij|·‖X_j‖₂, compared within each output row; no update."""

from __future__ import annotations

import torch

from ..config import SparsityPattern
from ..masks import topk_mask
from .base import NoSettings, Solver, SolverResult
from .linalg import input_norms


def scores(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    return W.abs().mul_(input_norms(H)[None, :])  # one fresh tensor, not two: |W|·‖X‖ as written out


def solve(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: NoSettings) -> SolverResult:
    score = scores(W, H)
    mask = topk_mask(score, pattern)
    # W * mask, made in the scores' memory (dead now): no fresh layer-sized tensor to fault in, and a same-dtype
    # multiply (twice as fast as one promoting the bool mask). mask·W is W·mask bit for bit, −0.0 included.
    weight = score.copy_(mask).mul_(W) if score.dtype == W.dtype and score.shape == W.shape else W * mask
    return SolverResult(weight, mask)


SOLVERS = [Solver(
    "wanda", "|W|·‖X‖ per output row, kept weights unchanged", solve=solve, per_row_default=True,
    statistics="diagonal",
)]
