"""ADMM weight update and ADMM-Grad (Boža 2024, "Fast and Effective Weight Update for Pruned LLMs").

For a fixed mask M the best kept weights minimise ‖XW − XŴ‖² subject to Ŵ⊙(1−M) = 0. Solving that
exactly needs one linear system per output row (each row has its own support). ADMM splits the
problem into an unconstrained least-squares step that is the *same* linear system for every row and
a projection onto the mask:

    Z ← (Ŵ + U)⊙M          projection onto the mask
    U ← U + Ŵ − Z           scaled dual variable (the running constraint violation)
    Ŵ ← (W·H + ρ(Z − U))·(H + ρI)⁻¹

so (H + ρI) is factored once per layer (Cholesky, then its inverse from the factor) and every
iteration is one matrix product over all rows at once: no per-row work, no Python loop over columns. The result is the feasible iterate
(Ŵ + U)⊙M, exactly zero off the mask. (On the mask U is always zero, since U = (Ŵ + U_old)⊙(1−M);
so (Ŵ + U)⊙M and Ŵ⊙M are the same weights: there is no better "final form" to pick.)

Choices, and why:
- Preconditioning (n_j = ‖X_j‖₂): in the rescaled problem diag(H) = 1, so one ρ and one dampening
  suit every layer whatever its input scale, and |Ŵ + U| is the Wanda score |W_ij|·‖X_j‖, which is
  what ADMM-Grad's masks compare. Inputs never active in calibration (diag H = 0) get zero weight
  and unit curvature, as in SparseGPT, so the system stays positive definite.
- Dampening λ (0.1 of the unit diagonal) regularises towards the dense weights; the objective
  actually minimised is tr(ΔW (H + λI) ΔWᵀ) in the rescaled space (H above includes λI).
- ADMM-Grad picks the mask inside the iterations: during the first `gradual_steps` iterations the
  target sparsity rises along a cubic schedule and the mask keeps the largest |Ŵ + U|, so weights
  that the update makes important can survive (and pruned ones can come back). Later iterations
  keep the final mask and only converge the weights. Counts are exact: ⌊numel·s⌋ per layer (or
  per row). N:M keeps the N largest of every group at all times and prunes the other M − N
  gradually, so the last step lands exactly on the N:M pattern.
- Precision: float32. The rescaled system's eigenvalues lie in [λ + ρ, λ + ρ + ‖H‖], so it is well
  conditioned unless ρ and λ are tiny, and the inverse built from its Cholesky factor carries a
  relative error of about cond·1e-7 (measured 3e-7 at width 2048); ADMM tolerates such inexact
  solves. A Gershgorin bound on the condition number above 1e6, or a failed factorisation, sends
  the layer to float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..config import SparsityPattern
from ..errors import LmpruneError
from ..masks import (cubic_schedule, nm_mask, prune_count, prune_lowest_per_matrix, prune_lowest_per_row,
                     prune_lowest_spread, topk_mask)
from .base import Solver, SolverResult
from .linalg import fix_dead_inputs, precondition

# Above this bound on cond(H + (λ+ρ)I), float32 round-off (~6e-8 relative) is no longer negligible.
_FLOAT32_MAX_COND = 1e6


@dataclass(frozen=True)
class ADMMSettings:
    iterations: int = 20
    rho: float = 1.0  # ADMM penalty, relative to the unit diagonal after preconditioning
    dampening: float = 0.1  # λ added to the unit diagonal after preconditioning
    eps: float = 1e-8  # added to the input norms used for preconditioning
    shrink: str = "dense"  # what λ pulls kept weights towards: "dense" W (paper) or "zero" (ridge)

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {self.iterations}")
        if not (math.isfinite(self.rho) and self.rho > 0):
            raise ValueError(f"rho must be a positive number, got {self.rho}")
        if not (math.isfinite(self.dampening) and self.dampening >= 0):
            raise ValueError(f"dampening must be a non-negative number, got {self.dampening}")
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a non-negative number, got {self.eps}")
        if self.shrink not in ("dense", "zero"):
            raise ValueError(f"shrink must be 'dense' or 'zero', got {self.shrink!r}")


@dataclass(frozen=True)
class ADMMGradSettings(ADMMSettings):
    gradual_steps: int = 15  # iterations over which the mask reaches its final sparsity
    schedule: str = "fast"  # "fast": s·(1 − (1 − t/T)³) (Boža's code); "slow": s·(t/T)³ (his paper)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gradual_steps < 1:
            raise ValueError(f"gradual_steps must be at least 1, got {self.gradual_steps}")
        if self.gradual_steps > self.iterations:
            raise ValueError(
                f"gradual_steps ({self.gradual_steps}) must not exceed iterations ({self.iterations})"
            )
        if self.schedule not in ("fast", "slow"):
            raise ValueError(f"schedule must be 'fast' or 'slow', got {self.schedule!r}")


# --------------------------------------------------------------------------------------------------
# The ADMM core, in the preconditioned space


@dataclass
class _Problem:
    weight: torch.Tensor  # W·n, in the working dtype
    target: torch.Tensor  # (W·n)(H/(n nᵀ) + λI): the constant part of every right-hand side
    inverse: torch.Tensor  # (H/(n nᵀ) + (λ + ρ)I)⁻¹, from its Cholesky factor
    norms: torch.Tensor  # n, float32
    rho: float


def _prepare(W: torch.Tensor, H: torch.Tensor, settings: ADMMSettings) -> _Problem:
    """The preconditioned problem of a batch of layers, W [E, out, in] and H [E, in, in]."""
    W, H = fix_dead_inputs(W.float(), H.float())
    Wn, Hn, norms = precondition(W, H, settings.eps)
    # The right-hand side uses H + λI ("dense": λ pulls kept weights towards W, as in the paper) or
    # H alone ("zero": a ridge penalty pulling them towards 0).
    target = Wn @ Hn if settings.shrink == "zero" else None
    Hn.diagonal(dim1=-2, dim2=-1).add_(settings.dampening)
    inverse = torch.cholesky_inverse(_factor(Hn, settings.rho, settings.dampening))
    dtype = inverse.dtype
    Wn = Wn.to(dtype)
    target = (Wn @ Hn.to(dtype)) if target is None else target.to(dtype)
    return _Problem(Wn, target, inverse, norms, settings.rho)


def _factor(Hd: torch.Tensor, rho: float, dampening: float) -> torch.Tensor:
    """Cholesky factors of Hd + ρI [E, in, in]: float32 when provably well conditioned, else float64
    (for the whole batch: one matrix that needs it sends its batch-mates along)."""
    # Hd − λI is PSD, so λ_min ≥ λ + ρ; Gershgorin bounds λ_max by the largest absolute row sum.
    cond_bound = float(Hd.abs().sum(-1).max() + rho) / (dampening + rho)
    dtypes = [torch.float32, torch.float64] if cond_bound <= _FLOAT32_MAX_COND else [torch.float64]
    for dtype in dtypes:
        A = Hd.to(dtype, copy=True)
        A.diagonal(dim1=-2, dim2=-1).add_(rho)
        L, info = torch.linalg.cholesky_ex(A)
        if bool((info == 0).all()) and bool(torch.isfinite(L.diagonal(dim1=-2, dim2=-1)).all()):
            return L
    raise torch.linalg.LinAlgError("ADMM system H + ρI is not positive definite")


MaskRule = Callable[[int, torch.Tensor], "torch.Tensor | None"]


def _iterate(problem: _Problem, mask: torch.Tensor | None, iterations: int, mask_rule: MaskRule | None = None,
             observe: Callable[[int, torch.Tensor], None] | None = None):
    """Run ADMM; `mask_rule(it, Ŵ + U)` may return a new mask at an iteration (None: keep it).
    `observe(it, Z)`, if given, sees each iteration's feasible iterate (Ŵ + U)⊙M (bench/convergence.py).

    Returns the feasible iterate (Ŵ + U)⊙M in the preconditioned space and the final mask.
    """
    rho = problem.rho
    W_hat = problem.weight.clone()
    U = torch.zeros_like(W_hat)
    zero = torch.zeros((), dtype=W_hat.dtype, device=W_hat.device)
    for it in range(iterations):
        V = W_hat.add_(U)  # Ŵ + U (Ŵ is not needed again: update in place)
        if mask_rule is not None:
            new_mask = mask_rule(it, V)
            if new_mask is not None:
                mask = new_mask
        Z = torch.where(mask, V, zero)
        U = V.sub_(Z)  # U + Ŵ − Z, reusing V's storage
        rhs = Z.sub_(U).mul_(rho).add_(problem.target)  # W·H + ρ(Z − U)
        # Rows share the system, so one product with its inverse solves it for all rows: on CPUs a
        # GEMM runs about twice as fast as the pair of triangular solves it replaces.
        W_hat = rhs @ problem.inverse
        if observe is not None:
            observe(it + 1, torch.where(mask, W_hat + U, zero))
    V = W_hat + U
    return torch.where(mask, V, zero), mask


def _finish(problem: _Problem, Z: torch.Tensor) -> torch.Tensor:
    """Undo the preconditioning; zeros stay exact zeros."""
    return (Z.float() / problem.norms.unsqueeze(-2)).contiguous()


def _info(problem: _Problem, iterations: int) -> dict:
    return {"iterations": iterations, "precision": str(problem.inverse.dtype).removeprefix("torch.")}


# --------------------------------------------------------------------------------------------------
# The three entry points


def update(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, settings: ADMMSettings,
           observe: Callable[[int, torch.Tensor], None] | None = None):
    """Fixed-mask ADMM update: `--update admm` after any `--mask` method. `observe(it, Ŵ)`, if given, sees
    every iteration's feasible weights in the original space (for convergence measurements)."""
    problem = _prepare(W[None], H[None], settings)
    inner = None if observe is None else (lambda it, Z: observe(it, _finish(problem, Z)[0]))
    Z, _ = _iterate(problem, mask.to(torch.bool)[None], settings.iterations, observe=inner)
    return _finish(problem, Z)[0], _info(problem, settings.iterations)


def _results(problem: _Problem, Z: torch.Tensor, mask: torch.Tensor, iterations: int) -> list[SolverResult]:
    weights = _finish(problem, Z)
    return [SolverResult(w, m, _info(problem, iterations)) for w, m in zip(weights, mask)]


def batch_admm1(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: ADMMSettings):
    """ADMM1 on a batch: the Wanda mask (|W·n| in the preconditioned space), then the ADMM update."""
    problem = _prepare(W, H, settings)
    mask = topk_mask(problem.weight.abs(), pattern)
    Z, mask = _iterate(problem, mask, settings.iterations)
    return _results(problem, Z, mask, settings.iterations)


def solve_admm1(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: ADMMSettings) -> SolverResult:
    return batch_admm1(W[None], H[None], pattern, settings)[0]


def _gradual_rule(pattern: SparsityPattern, settings: ADMMGradSettings, shape) -> MaskRule:
    """The mask for each of the first `gradual_steps` iterations, from the scores |Ŵ + U|."""
    rows, cols = shape[-2:]
    steps, kind = settings.gradual_steps, settings.schedule

    if pattern.is_nm:
        n, m = pattern.n, pattern.m
        # Only entries outside each group's top n are candidates; their pruned share goes 0 → 1.
        candidates = cols // m * (m - n) if pattern.per_row else rows * (cols // m) * (m - n)

        def rule(it: int, V: torch.Tensor):
            if it >= steps:
                return None
            scores = V.abs()
            protected = nm_mask(scores, n, m)
            scores = scores.masked_fill(protected, math.inf)
            k = prune_count(candidates, cubic_schedule(it + 1, steps, 1.0, kind))
            if pattern.per_row:
                return prune_lowest_per_row(scores, k)
            return prune_lowest_per_matrix(scores, k)

        return rule

    # A spread per-row pattern schedules the matrix's total and spreads each step's count over the rows.
    total = cols if pattern.per_row and not pattern.spread else rows * cols

    def rule(it: int, V: torch.Tensor):
        if it >= steps:
            return None
        k = prune_count(total, cubic_schedule(it + 1, steps, pattern.sparsity, kind))
        if pattern.spread:
            return prune_lowest_spread(V.abs(), *divmod(k, rows))
        if pattern.per_row:
            return prune_lowest_per_row(V.abs(), k)
        return prune_lowest_per_matrix(V.abs(), k)

    return rule


def batch_grad(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: ADMMGradSettings):
    """ADMM-Grad on a batch: the mask grows inside the ADMM iterations along a cubic schedule."""
    if pattern.is_nm and W.shape[-1] % pattern.m:
        raise LmpruneError(f"{pattern.describe()} needs an input width divisible by {pattern.m}, got {W.shape[-1]}")
    problem = _prepare(W, H, settings)
    rule = _gradual_rule(pattern, settings, W.shape)
    Z, mask = _iterate(problem, None, settings.iterations, rule)
    return _results(problem, Z, mask, settings.iterations)


def solve_grad(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: ADMMGradSettings) -> SolverResult:
    return batch_grad(W[None], H[None], pattern, settings)[0]


SOLVERS = [
    Solver(
        "admm",
        "ADMM weight update for a given mask (Boža 2024); use as --update admm",
        settings=ADMMSettings,
        update=update,
    ),
    Solver(
        "admm1",
        "Wanda mask, then ADMM weight update (Boža 2024)",
        settings=ADMMSettings,
        solve=solve_admm1,
        per_row_default=True,
        solve_batch=batch_admm1,
        refit_with="admm",
    ),
    Solver(
        "admm-grad",
        "mask grown gradually inside ADMM iterations, cubic schedule (Boža 2024)",
        settings=ADMMGradSettings,
        solve=solve_grad,
        solve_batch=batch_grad,
        refit_with="admm",
    ),
]
