"""Magnitude pruning: drop the smallest |W|, no update."""

from __future__ import annotations

import torch

from ..config import SparsityPattern
from ..masks import topk_mask
from .base import NoSettings, Solver, SolverResult


def solve(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: NoSettings) -> SolverResult:
    mask = topk_mask(W.abs(), pattern)
    return SolverResult(W * mask, mask)


SOLVERS = [Solver("magnitude", "smallest |W| pruned, kept weights unchanged", solve=solve, statistics="none")]
