"""Linear algebra shared by the solvers: damping, preconditioning, errors, exact masked optimum."""

from __future__ import annotations

import math

import torch


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(‖XW − XŴ‖², ‖XW‖²) from the Gram matrix: tr(ΔW H ΔWᵀ) and tr(W H Wᵀ), in float64."""
    H64 = H.double()
    delta = (W - W_new).double()
    err = float(((delta @ H64) * delta).sum())
    ref = float(((W.double() @ H64) * W.double()).sum())
    return err, ref


def relative_errors(W: torch.Tensor, candidates: list[torch.Tensor], H: torch.Tensor) -> list[float]:
    """‖XW − XŴ‖² / ‖XW‖² for several Ŵ at once: what the pipeline reports for every layer.

    One float32 product of the stacked differences with H (a float64 one costs twice as much and
    these are reports, not solves); the sums are taken in float64.
    """
    rows = W.shape[0]
    W32 = W.float()
    stacked = torch.cat([W32, *[W32 - c.float() for c in candidates]])
    # In place: one fewer temporary as large as `stacked` (600 MB for a 2048 × 8192 layer's three).
    quad = (stacked @ H.float()).mul_(stacked).sum(1, dtype=torch.float64).split(rows)  # no float64 copy
    reference = float(quad[0].sum())
    return [_ratio(float(q.sum()), reference) for q in quad[1:]]


def relative_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    err, ref = reconstruction_error(W, W_new, H)
    return _ratio(err, ref)


def _ratio(err: float, ref: float) -> float:
    """err / ref; 0 when both are 0 (a layer whose inputs are all zero loses nothing), NaN when a term is
    not finite or ref alone is 0, so a broken layer never reads as a perfect one."""
    if not (math.isfinite(err) and math.isfinite(ref)) or ref < 0:
        return math.nan
    if ref == 0:
        return 0.0 if err == 0 else math.nan
    return err / ref


def fix_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that were never active carry no information: zero their weights, give them unit curvature.

    Returns copies; without this H is singular and every factorisation fails. Batched: W [..., out, in]
    with H [..., in, in].
    """
    H = H.clone()
    W = W.clone()
    diagonal = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diagonal == 0
    if dead.any():
        diagonal.masked_fill_(dead, 1.0)
        W.masked_fill_(dead.unsqueeze(-2), 0.0)
    return W, H


def add_damping(H: torch.Tensor, fraction: float) -> torch.Tensor:
    """H + fraction·mean(diag H)·I (SparseGPT's 1% dampening), per matrix."""
    damp = fraction * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    # Bit for bit H + damp·I, without the two n×n temporaries (I and damp·I) that writing it so allocates:
    # off the diagonal H_ij + damp·0, on it H_ii + damp·1.
    damped = H + (damp * 0.0)[..., None, None]
    torch.diagonal(damped, dim1=-2, dim2=-1).copy_(torch.diagonal(H, dim1=-2, dim2=-1) + damp[..., None])
    return damped


def input_norms(H: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """‖X_j‖₂ for every input column j, from the Gram diagonal."""
    return torch.sqrt(torch.diagonal(H, dim1=-2, dim2=-1).clamp_min(0)) + eps


def precondition(W: torch.Tensor, H: torch.Tensor, eps: float = 1e-8):
    """Rescale so diag(H) becomes 1 and |W| the Wanda score: W·n, H/(n nᵀ). Undo with W'/n."""
    norms = input_norms(H, eps)
    return W * norms.unsqueeze(-2), H / norms.unsqueeze(-1) / norms.unsqueeze(-2), norms


def exact_masked_optimum(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The exact minimiser of tr((W−Ŵ) H (W−Ŵ)ᵀ) with Ŵ zero off the mask.

    Each row i solves its normal equations on its support S: H_SS ŵ_S = (H wᵢ)_S. One solve per row,
    in float64: a reference for tests and small layers, not a fast path.
    """
    H64 = H.double()
    target = W.double() @ H64
    out = torch.zeros_like(W, dtype=torch.float64)
    for i in range(W.shape[0]):
        support = mask[i].nonzero().squeeze(1)
        if support.numel():
            out[i, support] = torch.linalg.solve(H64[support][:, support], target[i, support])
    return out.to(W.dtype)
