"""Reference weight updates for a fixed mask: the exact optimum, and gradient descent (Adam).

Both minimise the masked least-squares objective every update method targets,

    f(Ŵ) = tr((W − Ŵ) H (W − Ŵ)ᵀ)   with Ŵ zero off the mask,

and exist to measure the fast updates (SparseGPT's, ADMM's) against: `exact` is the optimum itself,
`gd` is the baseline Boža (2024) compares ADMM with. Use them as `--mask X --update exact|gd`.

- `exact`: each row i solves its normal equations on its support S, H_SS ŵ_S = (H wᵢ)_S, by a
  Cholesky factor of H_SS, in float64. Rows of one support size are solved as a batch, a bounded
  number at a time. The work is out·k³/3 and the batch memory k²·8 bytes a row (k kept inputs a row),
  so large layers are refused up front rather than run for hours.
- `gd`: Adam on f from the masked weights, projected onto the mask after every step (the pruned
  weights never move). The objective is taken in the preconditioned space every other solver works
  in (diag H = 1, see linalg.precondition), so one learning rate suits layers of any input scale; the
  learning rate is in units of the weights' root mean square, for the same reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import LmpruneError
from .base import Solver
from .linalg import fix_dead_inputs, precondition


@dataclass(frozen=True)
class ExactSettings:
    dampening: float = 0.0  # added to diag H as a fraction of its mean: 0 is the exact optimum of f itself
    max_work: float = 2e11  # refuse a layer whose out·k³/3 exceeds this (≈ a minute or more on a CPU)
    chunk_bytes: int = 1 << 28  # float64 sub-Grams gathered at once (256 MiB)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.dampening) and self.dampening >= 0):
            raise ValueError(f"dampening must be a non-negative number, got {self.dampening}")
        if not self.max_work > 0:
            raise ValueError(f"max_work must be positive, got {self.max_work}")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be at least 1, got {self.chunk_bytes}")


@dataclass(frozen=True)
class GDSettings:
    iterations: int = 200
    lr: float = 0.01  # Adam's step, relative to the RMS of the preconditioned weights
    beta1: float = 0.9
    beta2: float = 0.999

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {value}")


def exact_work(mask: torch.Tensor) -> float:
    """Floating-point work of the row-by-row Cholesky solves: Σ_rows k³/3."""
    kept = mask.sum(-1).double()
    return float((kept**3).sum() / 3)


def exact_update(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, settings: ExactSettings):
    """The exact masked least-squares optimum, row by row (float64 Cholesky of each row's kept sub-Gram)."""
    work = exact_work(mask)
    if work > settings.max_work:
        rows, cols = W.shape
        raise LmpruneError(
            f"--update exact: a [{rows}, {cols}] layer needs {work:.2g} flops of row-by-row solves, over its limit "
            f"{settings.max_work:.2g}; it is a reference for small and medium layers (raise --opt max_work=... "
            "to run it anyway, or --skip the layer)"
        )
    W64, H64 = fix_dead_inputs(W.double(), H.double())  # dead inputs: weight 0, any value is optimal
    if settings.dampening:
        H64.diagonal().add_(settings.dampening * float(H64.diagonal().mean()))
    target = W64 @ H64
    out = torch.zeros_like(W64)
    mask = mask.to(torch.bool)
    kept = mask.sum(1)
    for k in kept.unique().tolist():
        if k == 0:
            continue
        rows = (kept == k).nonzero().squeeze(1)
        per_chunk = max(1, settings.chunk_bytes // (8 * k * k))
        for chunk in rows.split(per_chunk):
            support = mask[chunk].nonzero()[:, 1].view(len(chunk), k)  # each row's kept columns, ascending
            sub = H64[support.unsqueeze(-1), support.unsqueeze(-2)]  # [rows, k, k]
            rhs = target[chunk.unsqueeze(-1), support].unsqueeze(-1)  # [rows, k, 1]
            factor, info = torch.linalg.cholesky_ex(sub)
            if bool((info != 0).any()):
                raise LmpruneError(
                    "--update exact: a row's kept inputs are linearly dependent on the calibration tokens (their "
                    "sub-Gram is singular), so the optimum is not unique; add --opt dampening=0.01"
                )
            solution = torch.cholesky_solve(rhs, factor).squeeze(-1)
            out[chunk.unsqueeze(-1), support] = solution
    return out.float(), {"kept_per_row": [int(kept.min()), int(kept.max())]}


def gd_update(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, settings: GDSettings,
              observe: Callable[[int, torch.Tensor], None] | None = None):
    """Adam on the masked least-squares objective, from the masked weights, projected after every step.
    `observe(step, Ŵ)`, if given, sees the weights after every step (for convergence measurements)."""
    W32, H32 = fix_dead_inputs(W.float(), H.float())
    Wn, Hn, norms = precondition(W32, H32)
    mask = mask.to(torch.bool)
    step = settings.lr * float(Wn.pow(2).mean().sqrt().clamp_min(1e-12))
    b1, b2, eps = settings.beta1, settings.beta2, 1e-12
    x = Wn * mask
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    for t in range(1, settings.iterations + 1):
        grad = 2 * ((x - Wn) @ Hn)  # ∇ tr((x − W) H (x − W)ᵀ)
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        x = (x - step * m_hat / (v_hat.sqrt() + eps)) * mask  # projection onto the mask
        if observe is not None:
            observe(t, x / norms)
    return (x / norms).contiguous(), {"iterations": settings.iterations, "lr": settings.lr}


SOLVERS = [
    Solver(
        "exact",
        "exact masked least-squares optimum, row by row (a reference for small layers); use as --update exact",
        settings=ExactSettings,
        update=exact_update,
    ),
    Solver(
        "gd",
        "Adam on the masked least-squares objective (the ADMM paper's gradient-descent baseline); --update gd",
        settings=GDSettings,
        update=gd_update,
    ),
]
