"""ALPS (Meng, Behdin, Wang & Mazumder, NeurIPS 2024): ADMM on the L0 constraint, then PCG on the support.

The layer problem, in the diagonally normalised coordinates shared with ADMM (W·n, H/(n nᵀ), so that
diag(H) = 1 and |W| is the Wanda score), is

    min_Ŵ  tr((Ŵ − W) H (Ŵ − W)ᵀ) + λ₂‖Ŵ − W‖²   s.t. Ŵ has at most k non-zeros (or is N:M),

with λ₂ = lambda2 · mean(diag H). Writing G = H + λ₂I, it is split as Ŵ = D with a scaled dual V:

    Ŵ ← (W G − V + ρD)(G + ρI)⁻¹        (rows; G is symmetric)
    D ← P_k(Ŵ + V/ρ)                     (keep the k largest |·|: per layer, per row or per N:M group)
    V ← V + ρ(Ŵ − D)

ρ starts small and grows as the support settles: every `check_interval` iterations the number of
entries that entered or left D's support, s, is compared with k and ρ is multiplied by 1.3, 1.2 or
1.1; the loop stops once s/k < `tolerance` after `min_iterations`, or at `max_iterations`. H is
eigendecomposed once (float64), so a new ρ costs matrix products, never a refactorisation.

The ADMM support is then polished: with every row's support fixed, min tr((Ŵ − W) G (Ŵ − W)ᵀ) is
solved by a diagonally preconditioned conjugate gradient run on all rows at once (masked residuals),
which is also this module's fixed-mask `update` (`--update alps`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SparsityPattern
from ..masks import topk_mask
from .base import Solver, SolverResult
from .linalg import fix_dead_inputs, precondition, relative_errors

_RHO_MAX = 1e6  # beyond this (G + ρI)⁻¹ ≈ I/ρ and Ŵ is pinned to D: growing further changes nothing


@dataclass(frozen=True)
class AlpsSettings:
    rho0: float = 0.1  # initial ADMM penalty (H is normalised to unit diagonal)
    growth_high: float = 1.3  # ρ factor when the support changed by more than change_high·k
    growth_mid: float = 1.2  # ... by more than change_mid·k
    growth_low: float = 1.1  # ... otherwise
    change_high: float = 0.1
    change_mid: float = 0.005
    tolerance: float = 3e-4  # stop when support change / k falls below this (after min_iterations)
    check_interval: int = 3  # iterations between support checks and ρ updates
    min_iterations: int = 30
    max_iterations: int = 300
    pcg_iterations: int = 10  # conjugate-gradient steps on the final support (0: none)
    lambda2: float = 0.01  # ridge weight λ₂ as a fraction of mean(diag H)

    def __post_init__(self) -> None:
        if not self.rho0 > 0:
            raise ValueError(f"rho0 must be positive, got {self.rho0}")
        for name in ("growth_high", "growth_mid", "growth_low"):
            if not getattr(self, name) >= 1.0:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.change_mid <= self.change_high:
            raise ValueError("need 0 < change_mid <= change_high")
        if not self.tolerance >= 0:
            raise ValueError(f"tolerance must be non-negative, got {self.tolerance}")
        if self.check_interval < 1:
            raise ValueError(f"check_interval must be at least 1, got {self.check_interval}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be at least 1, got {self.max_iterations}")
        if not 0 <= self.min_iterations <= self.max_iterations:
            raise ValueError("need 0 <= min_iterations <= max_iterations")
        if self.pcg_iterations < 0:
            raise ValueError(f"pcg_iterations must be non-negative, got {self.pcg_iterations}")
        if not self.lambda2 >= 0:
            raise ValueError(f"lambda2 must be non-negative, got {self.lambda2}")


def masked_pcg(
    A: torch.Tensor,
    B: torch.Tensor,
    mask: torch.Tensor,
    X0: torch.Tensor | None = None,
    iterations: int = 10,
    rtol: float = 1e-6,
) -> torch.Tensor:
    """Solve (X A)_S = B_S row by row, X zero off each row's support S, by batched PCG.

    A is symmetric positive (semi)definite [in, in], B and X are [rows, in], mask bool [rows, in].
    Every row is an independent CG on A restricted to its support; all rows advance together with
    one [rows, in] × [in, in] product per step. The preconditioner is diag(A). Rows stop moving once
    their preconditioned residual is below rtol² of the start (or is zero); the loop ends when all do.
    """
    M = mask.to(A.dtype)
    X = torch.zeros_like(B) if X0 is None else X0.to(A.dtype) * M
    if iterations == 0 or not mask.any():
        return X
    diag = torch.diagonal(A)
    dinv = torch.where(diag > 0, 1.0 / diag, torch.ones_like(diag))[None, :]
    R = (B - X @ A) * M
    Z = R * dinv
    P = Z.clone()
    rz = (R * Z).sum(1)
    stop = rz.clamp_min(0) * rtol**2
    for _ in range(iterations):
        AP = P @ A
        pAp = (P * AP).sum(1)
        alpha = torch.where(pAp > 0, rz / torch.where(pAp > 0, pAp, 1.0), 0.0)
        X.add_(alpha[:, None] * P)
        R.sub_(alpha[:, None] * (AP * M))
        Z = R * dinv
        rz_new = (R * Z).sum(1)
        if bool((rz_new <= stop).all()):
            break
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        P = Z + beta[:, None] * P
        rz = rz_new
    return X * M


class _ShiftedInverse:
    """Applies (G + ρI)⁻¹ to rows for any ρ from one eigendecomposition G = Q diag(L) Qᵀ.

    Forming the inverse costs in³ per new ρ and then rows·in² per use; applying it through the
    eigenbasis costs 2·rows·in² per use. With ρ changing every `reuse` iterations the cheaper one is
    picked once per layer.
    """

    def __init__(self, G: torch.Tensor, rows: int, reuse: int):
        L, Q = torch.linalg.eigh(G.double())
        self.L = L.clamp_min(0).float()
        self.Q = Q.float()
        self.explicit = G.shape[0] < reuse * rows
        self.rho = None
        self.inverse = None

    def set_rho(self, rho: float) -> None:
        self.rho = rho
        if self.explicit:
            self.inverse = (self.Q / (self.L + rho)[None, :]) @ self.Q.T

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        if self.explicit:
            return R @ self.inverse
        return ((R @ self.Q) / (self.L + self.rho)[None, :]) @ self.Q.T


def _admm(Wn: torch.Tensor, G: torch.Tensor, pattern: SparsityPattern, settings: AlpsSettings):
    """The ADMM phase on normalised W and G = H + λ₂I: returns (primal iterate, mask, iterations, ρ)."""
    project = lambda Z: topk_mask(Z.abs(), pattern)  # noqa: E731
    target = Wn @ G  # the constant part of the Ŵ-update's right-hand side
    mask = project(Wn)
    k = max(int(mask.sum()), 1)
    D = Wn * mask
    V = torch.zeros_like(Wn)
    rho = settings.rho0
    solver = _ShiftedInverse(G, Wn.shape[0], settings.check_interval)
    solver.set_rho(rho)
    checked = mask
    W = Wn
    iterations = 0
    for it in range(1, settings.max_iterations + 1):
        iterations = it
        W = solver(target - V + rho * D)
        Z = W + V / rho
        mask = project(Z)
        D = Z * mask
        V.add_(rho * (W - D))
        if it % settings.check_interval == 0:
            change = int((mask ^ checked).sum()) / k
            checked = mask
            if it >= settings.min_iterations and change < settings.tolerance:
                break
            if change > settings.change_high:
                factor = settings.growth_high
            elif change > settings.change_mid:
                factor = settings.growth_mid
            else:
                factor = settings.growth_low
            new_rho = min(rho * factor, _RHO_MAX)
            if new_rho != rho:  # V is the (unscaled) multiplier: it stays as ρ changes
                rho = new_rho
                solver.set_rho(rho)
    return W, mask, iterations, rho


def _normalise(W: torch.Tensor, H: torch.Tensor, lambda2: float):
    W, H = fix_dead_inputs(W.float(), H.float())
    Wn, Hn, norms = precondition(W, H)
    damp = lambda2 * float(torch.diagonal(Hn).mean())
    G = Hn + damp * torch.eye(Hn.shape[0], dtype=Hn.dtype, device=Hn.device)
    return Wn, G, norms


def solve(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: AlpsSettings) -> SolverResult:
    W0 = W.float()
    if pattern.is_nm and W0.shape[1] % pattern.m:
        raise ValueError(f"input width {W0.shape[1]} is not a multiple of M={pattern.m}")
    if pattern.target_sparsity == 0 or (not pattern.is_nm and topk_mask(W0.abs(), pattern).all()):
        mask = torch.ones_like(W0, dtype=torch.bool)
        return SolverResult(W0.clone(), mask, {"iterations": 0})
    Wn, G, norms = _normalise(W0, H, settings.lambda2)
    Z, mask, iterations, rho = _admm(Wn, G, pattern, settings)
    before = (Z * mask) / norms[None, :]
    Zn = masked_pcg(G, Wn @ G, mask, X0=Z, iterations=settings.pcg_iterations)
    weight = (Zn / norms[None, :]) * mask
    error_before, error_after = relative_errors(W0, [before, weight], H)
    info = {"iterations": iterations, "rho": rho, "error_before_pcg": error_before, "error_after_pcg": error_after}
    return SolverResult(weight, mask, info)


def update(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, settings: AlpsSettings):
    """Fixed-mask update: PCG on each row's support, starting from the masked weights."""
    W0 = W.float()
    Wn, G, norms = _normalise(W0, H, settings.lambda2)
    Zn = masked_pcg(G, Wn @ G, mask, X0=Wn, iterations=settings.pcg_iterations)
    weight = (Zn / norms[None, :]) * mask
    error_before, error_after = relative_errors(W0, [W0 * mask, weight], H)
    info = {"error_before_pcg": error_before, "error_after_pcg": error_after}
    return weight, info


SOLVERS = [Solver(
    "alps",
    "ADMM on the L0 constraint with a growing penalty, then PCG on the support (Meng et al. 2024)",
    settings=AlpsSettings,
    solve=solve,
    update=update,
)]
