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

    A is symmetric positive (semi)definite [in, in], B and X are [rows, in], mask bool [rows, in]; or a
    batch of such problems ([E, in, in] and [E, rows, in]).
    Every row is an independent CG on A restricted to its support; all rows advance together with
    one [rows, in] × [in, in] product per step. The preconditioner is diag(A). Rows stop moving once
    their preconditioned residual is below rtol² of the start (or is zero); the loop ends when all do.
    """
    M = mask.to(A.dtype)
    X = torch.zeros_like(B) if X0 is None else X0.to(A.dtype) * M
    if iterations == 0 or not mask.any():
        return X
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    dinv = torch.where(diag > 0, 1.0 / diag, torch.ones_like(diag)).unsqueeze(-2)
    R = (B - X @ A) * M
    Z = R * dinv
    P = Z.clone()
    rz = (R * Z).sum(-1)
    stop = rz.clamp_min(0) * rtol**2
    for _ in range(iterations):
        AP = P @ A
        pAp = (P * AP).sum(-1)
        alpha = torch.where(pAp > 0, rz / torch.where(pAp > 0, pAp, 1.0), 0.0)
        X.add_(alpha[..., None] * P)
        R.sub_(alpha[..., None] * (AP * M))
        Z = R * dinv
        rz_new = (R * Z).sum(-1)
        if bool((rz_new <= stop).all()):
            break
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        P = Z + beta[..., None] * P
        rz = rz_new
    return X * M


class _ShiftedInverse:
    """Applies (G + ρI)⁻¹ to rows for any ρ from one eigendecomposition G = Q diag(L) Qᵀ.

    Batched: G [E, in, in] and one ρ per matrix. Forming the inverse costs in³ per new ρ and then
    rows·in² per use; applying it through the eigenbasis costs 2·rows·in² per use. With ρ changing
    every `reuse` iterations the cheaper one is picked once per layer.
    """

    def __init__(self, G: torch.Tensor, rows: int, reuse: int):
        L, Q = torch.linalg.eigh(G.double())
        self.L = L.clamp_min(0).float()
        self.Q = Q.float()
        self.explicit = G.shape[-1] < reuse * rows
        self.rho = None
        self.inverse = None

    def keep(self, index: torch.Tensor) -> None:
        """Drop the matrices not in `index` (finished layers of a batch)."""
        self.L, self.Q = self.L[index], self.Q[index]
        if self.inverse is not None:
            self.inverse = self.inverse[index]

    def set_rho(self, rho: torch.Tensor) -> None:
        """ρ per matrix, float32 [E]."""
        self.rho = rho[:, None, None]
        if self.explicit:
            self.inverse = (self.Q / (self.L[:, None, :] + self.rho)) @ self.Q.transpose(-1, -2)

    def __call__(self, R: torch.Tensor) -> torch.Tensor:
        if self.explicit:
            return R @ self.inverse
        return ((R @ self.Q) / (self.L[:, None, :] + self.rho)) @ self.Q.transpose(-1, -2)


def _admm(Wn: torch.Tensor, G: torch.Tensor, pattern: SparsityPattern, settings: AlpsSettings):
    """The ADMM phase on a batch of normalised W [E, out, in] and G = H + λ₂I [E, in, in].

    Every layer of the batch follows exactly its own run (its own ρ, support checks and stop); a layer
    that stops leaves the batch, so the others go on without it. Returns (primal iterates, masks,
    iterations, final ρ), one each per layer.
    """
    project = lambda Z: topk_mask(Z.abs(), pattern)  # noqa: E731
    count = Wn.shape[0]
    target = Wn @ G  # the constant part of the Ŵ-update's right-hand side
    mask = project(Wn)
    k = mask.sum((-2, -1)).clamp_min(1).double()
    D = Wn * mask
    V = torch.zeros_like(Wn)
    rho = torch.full((count,), settings.rho0, dtype=torch.float64)  # grown in float64, as a Python float would
    solver = _ShiftedInverse(G, Wn.shape[-2], settings.check_interval)
    solver.set_rho(rho.to(Wn.dtype))
    checked = mask
    W = Wn
    live = torch.arange(count)  # the batch's layers still iterating
    growth = torch.tensor([settings.growth_low, settings.growth_mid, settings.growth_high], dtype=torch.float64)
    out_W, out_mask = torch.empty_like(Wn), torch.empty_like(mask)
    out_iterations, out_rho = [0] * count, [0.0] * count

    def finish(which: torch.Tensor, it: int) -> None:
        out_W[live[which]] = W[which]
        out_mask[live[which]] = mask[which]
        for j in live[which].tolist():
            out_iterations[j] = it
        for j, r in zip(live[which].tolist(), rho[which].tolist()):
            out_rho[j] = r

    for it in range(1, settings.max_iterations + 1):
        rho32 = rho.to(Wn.dtype)[:, None, None]
        W = solver(target - V + rho32 * D)
        Z = W + V / rho32
        mask = project(Z)
        D = Z * mask
        V.add_(rho32 * (W - D))
        if it % settings.check_interval == 0:
            change = (mask ^ checked).sum((-2, -1)).double() / k
            checked = mask
            done = (change < settings.tolerance) if it >= settings.min_iterations else torch.zeros_like(change, dtype=torch.bool)
            if done.any():
                finish(done, it)
                if done.all():
                    break
                stay = ~done
                live, target, D, V, W, mask, checked, k, rho, change = (
                    t[stay] for t in (live, target, D, V, W, mask, checked, k, rho, change))
                solver.keep(stay.nonzero().squeeze(1))
            factor = growth[(change > settings.change_mid).long() + (change > settings.change_high).long()]
            new_rho = torch.clamp_max(rho * factor, _RHO_MAX)
            if bool((new_rho != rho).any()):  # V is the (unscaled) multiplier: it stays as ρ changes
                rho = new_rho
                solver.set_rho(rho.to(Wn.dtype))
        if it == settings.max_iterations:
            finish(torch.ones(len(live), dtype=torch.bool), it)
    return out_W, out_mask, out_iterations, out_rho


def _normalise(W: torch.Tensor, H: torch.Tensor, lambda2: float):
    W, H = fix_dead_inputs(W.float(), H.float())
    Wn, Hn, norms = precondition(W, H)
    damp = lambda2 * torch.diagonal(Hn, dim1=-2, dim2=-1).mean(-1)
    G = Hn + damp[..., None, None] * torch.eye(Hn.shape[-1], dtype=Hn.dtype, device=Hn.device)
    return Wn, G, norms


def solve_batch(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: AlpsSettings) -> list[SolverResult]:
    """ALPS on a batch of layers of one shape, W [E, out, in] and H [E, in, in]."""
    W0 = W.float()
    if pattern.is_nm and W0.shape[-1] % pattern.m:
        raise ValueError(f"input width {W0.shape[-1]} is not a multiple of M={pattern.m}")
    if pattern.target_sparsity == 0 or (not pattern.is_nm and topk_mask(W0.abs(), pattern).all()):
        mask = torch.ones_like(W0[0], dtype=torch.bool)
        return [SolverResult(w.clone(), mask, {"iterations": 0}) for w in W0]
    Wn, G, norms = _normalise(W0, H, settings.lambda2)
    Z, mask, iterations, rho = _admm(Wn, G, pattern, settings)
    scale = norms.unsqueeze(-2)
    before = (Z * mask) / scale
    Zn = masked_pcg(G, Wn @ G, mask, X0=Z, iterations=settings.pcg_iterations)
    weight = (Zn / scale) * mask
    results = []
    for j in range(W0.shape[0]):
        error_before, error_after = relative_errors(W0[j], [before[j], weight[j]], H[j])
        info = {"iterations": iterations[j], "rho": rho[j], "error_before_pcg": error_before,
                "error_after_pcg": error_after}
        results.append(SolverResult(weight[j], mask[j], info))
    return results


def solve(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: AlpsSettings) -> SolverResult:
    return solve_batch(W[None], H[None], pattern, settings)[0]


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
    solve_batch=solve_batch,
)]
