"""Linear algebra shared by the solvers: damping, preconditioning, errors, exact masked optimum."""

from __future__ import annotations

import math

import torch

from ..statistics import gram_diagonal


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> tuple[float, float]:
    """(‖XW − XŴ‖², ‖XW‖²) from the Gram matrix: tr(ΔW H ΔWᵀ) and tr(W H Wᵀ), in float64."""
    H64 = H.double()
    delta = (W - W_new).double()
    err = float(((delta @ H64) * delta).sum())
    ref = float(((W.double() @ H64) * W.double()).sum())
    return err, ref


# Rows of a difference multiplied by H at a time in the error report: its temporaries (the difference, its
# product with H, a candidate's rows) stay near 3 × 8 MB instead of stacked copies of the weight and their
# product (800 MB for an FFN layer of a 1B model).
_REPORT_BYTES = 8 << 20


def relative_errors(W: torch.Tensor, candidates: list[torch.Tensor], H: torch.Tensor) -> list[float]:
    """‖XW − XŴ‖² / ‖XW‖² for several Ŵ at once: what the pipeline reports for every layer. A candidate is
    read by blocks of rows (`candidate[a:b]`): a tensor, or anything that makes its rows on demand.

    Float32 products of the differences with H, a block of rows at a time (a float64 product costs twice as
    much and these are reports, not solves); the sums are taken in float64. Each row's product does not
    depend on the rows beside it, so the numbers are those of one product of the whole stack.
    """
    W32, H32 = W.float(), H.float()
    step = max(1, _REPORT_BYTES // (4 * W32.shape[1]))
    sums = []
    for candidate in [None, *candidates]:
        rows = []
        for start in range(0, W32.shape[0], step):
            D = W32[start:start + step]
            if candidate is not None:
                D = D - candidate[start:start + step].float()
            rows.append((D @ H32).mul_(D).sum(1, dtype=torch.float64))  # in place: one fewer temporary
        sums.append(float(torch.cat(rows).sum()))
    return [_ratio(err, sums[0]) for err in sums[1:]]


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
    return zero_dead_weights(W, H), unit_dead_curvature(H)


def zero_dead_weights(W: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """A copy of W with the weights of never-active inputs (zero on H's diagonal) set to zero."""
    W = W.clone()
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    if dead.any():
        W.masked_fill_(dead.unsqueeze(-2), 0.0)
    return W


def unit_dead_curvature(H: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """A copy of H (or H itself, `in_place`) with a 1 on the diagonal of every never-active input."""
    H = H if in_place else H.clone()
    diagonal = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diagonal == 0
    if dead.any():
        diagonal.masked_fill_(dead, 1.0)
    return H


def add_damping(H: torch.Tensor, fraction: float, in_place: bool = False) -> torch.Tensor:
    """H + fraction·mean(diag H)·I (SparseGPT's 1% dampening), per matrix; into H itself with `in_place`."""
    damp = fraction * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    # Bit for bit H + damp·I, without the two n×n temporaries (I and damp·I) that writing it so allocates:
    # off the diagonal H_ij + damp·0, on it H_ii + damp·1. In place, the diagonal is read after H_ii + 0,
    # which changes only the sign of a zero, and (±0) + damp is the same either way.
    zero = (damp * 0.0)[..., None, None]
    damped = H.add_(zero) if in_place else H + zero
    torch.diagonal(damped, dim1=-2, dim2=-1).copy_(torch.diagonal(H, dim1=-2, dim2=-1) + damp[..., None])
    return damped


def input_norms(H: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """‖X_j‖₂ for every input column j, from the Gram diagonal (H, or H's diagonal alone: see base.py)."""
    return torch.sqrt(gram_diagonal(H).clamp_min(0)) + eps


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
