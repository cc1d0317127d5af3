"""The one interface every solver implements: pure tensor functions, no knowledge of models.

    solve(W, H, pattern, settings)  -> SolverResult   (chooses a mask and updates the kept weights)
    update(W, H, mask, settings)    -> (W', info)     (updates the kept weights for a fixed mask)

W is a float32 [out, in] weight, H = XᵀX the float32 [in, in] Gram matrix of the layer's inputs summed
over calibration tokens (its scale does not matter: every solver is invariant to it), and the mask is
bool, True where a weight is kept. A method may offer either or both: `--mask A --update B` takes A's
mask and B's update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import SparsityPattern


@dataclass
class SolverResult:
    weight: torch.Tensor  # float32 [out, in], exactly zero where the mask is False
    mask: torch.Tensor  # bool [out, in], True = kept
    info: dict[str, Any] = field(default_factory=dict)  # per-layer facts for the report


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
