"""The one interface every solver implements: pure tensor functions, no knowledge of models.

    solve(W, H, pattern, settings)  -> SolverResult   (chooses a mask and updates the kept weights)
    update(W, H, mask, settings)    -> (W', info)     (updates the kept weights for a fixed mask)
    solve(W, H, pattern, settings, stats)             (solvers that declare needs_input_stats)
    solve_batch(W, H, pattern, settings) -> [SolverResult]   (optional: W [E, out, in], H [E, in, in])

W is a float32 [out, in] weight, H = XᵀX the float32 [in, in] Gram matrix of the layer's inputs summed
over calibration tokens (its scale does not matter: every solver is invariant to it), and the mask is
bool, True where a weight is kept. A method may offer either or both: `--mask A --update B` takes A's
mask and B's update.

`solve_batch` solves E independent layers of one shape at once (the experts of a fused MoE tensor): the
same result as E calls of `solve` up to float summation order, in far fewer (batched) operations.

A few methods (DSnoT) also need the inputs' mean, which H does not carry: they declare
`needs_input_stats` and get an InputStats, summed by the pipeline over the same tokens as H.

Each method declares the `statistics` of its inputs it reads (statistics.py), and the pipeline collects
only those: "gram" (XᵀX, the default), "diagonal" (H is then the 1-D diagonal of XᵀX alone, what Wanda's
norms and DSnoT's variances read) or "none" (H is None: magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import SparsityPattern
from ..statistics import STATISTICS, gram_diagonal


@dataclass
class SolverResult:
    weight: torch.Tensor  # float32 [out, in], exactly zero where the mask is False
    mask: torch.Tensor  # bool [out, in], True = kept
    info: dict[str, Any] = field(default_factory=dict)  # per-layer facts for the report


@dataclass(frozen=True)
class InputStats:
    """First moments of a layer's inputs, over the calibration tokens its Gram matrix H sums over."""

    total: torch.Tensor  # float32 [in]: Σ x over the tokens
    tokens: int

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens

    def variance(self, H: torch.Tensor) -> torch.Tensor:
        """Per-feature variance E[x²] − E[x]², in float64: the difference cancels when the mean is large."""
        mean = self.total.double() / self.tokens
        return (gram_diagonal(H).double() / self.tokens - mean**2).clamp_min(0).to(self.total.dtype)


SolveFn = Callable[[torch.Tensor, torch.Tensor, SparsityPattern, Any], SolverResult]
UpdateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], "tuple[torch.Tensor, dict]"]


@dataclass(frozen=True)
class NoSettings:
    """For solvers without options."""


@dataclass(frozen=True)
class Solver:
    name: str
    description: str
    settings: type = NoSettings
    solve: SolveFn | None = None
    update: UpdateFn | None = None
    # Mask granularity when the user does not choose: Wanda compares weights within a row.
    per_row_default: bool = False
    needs_input_stats: bool = False  # solve() takes an InputStats as a fifth argument
    solve_batch: Callable[..., list[SolverResult]] | None = None
    # The update solver (by name) that this solver's own solve ends with, where it has no `update` itself:
    # what `--refine` applies again on the refined mask (admm1 and admm-grad refit with admm).
    refit_with: str | None = None
    statistics: str = "gram"  # what of the inputs solve() reads: "none", "diagonal" (H is 1-D) or "gram"
    # solve() allowed to overwrite XᵀX, (W, H, pattern, settings, reload) → SolverResult, the same bits;
    # reload() gives XᵀX again. Where memory is short the caller hands XᵀX over instead of keeping it.
    solve_taking: Callable[..., SolverResult] | None = None

    def __post_init__(self):
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {STATISTICS}, got {self.statistics!r}")
