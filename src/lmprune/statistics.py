"""What a method reads of a layer's inputs, and the running sums the collect step keeps of it.

Levels, from least to most (a method declares one: solvers/base.py, `Solver.statistics`):
  "none"      token counts only (magnitude);
  "diagonal"  Σ x_j² per input, the diagonal of XᵀX (Wanda's norms, DSnoT's variances);
  "gram"      XᵀX whole (every method that updates weights, and the per-layer error report).
A full Gram of an FFN's down projection is 8192² floats and its product per batch the largest cost of a
collection pass, so a method reading its diagonal does not pay for it.
"""

from __future__ import annotations

import torch

STATISTICS = ("none", "diagonal", "gram")


def sums_kept(statistics: str, full_gram: bool) -> tuple[str, ...]:
    """The running sums a collection keeps for a method reading `statistics`: XᵀX ("gram") where the method,
    the error report or a lever reads it (`full_gram`), the diagonal alone ("diagonal") where the method reads
    that. A method reading the diagonal always gets the same diagonal sums, whatever else is collected."""
    return tuple(kind for kind, wanted in (("gram", statistics == "gram" or full_gram),
                                           ("diagonal", statistics == "diagonal")) if wanted)


def zero_sum(width: int, kind: str, device) -> torch.Tensor:
    """A zero running sum for `width` inputs: XᵀX [width, width] ("gram") or its diagonal [width]."""
    return torch.zeros(width, width, device=device) if kind == "gram" else torch.zeros(width, device=device)


def batch_sum(flat: torch.Tensor, kind: str) -> torch.Tensor:
    """What one batch's float32 inputs [tokens, width] add to a `zero_sum` of that kind."""
    return flat.t() @ flat if kind == "gram" else flat.square().sum(0)


def gram_diagonal(H: torch.Tensor) -> torch.Tensor:
    """diag(XᵀX) of every matrix of H [..., in, in], or H itself where it holds the diagonal alone (1-D)."""
    return H if H.dim() == 1 else torch.diagonal(H, dim1=-2, dim2=-1)
