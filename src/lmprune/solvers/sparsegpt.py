"""SparseGPT (Frantar & Alistarh 2023): OBS updates column block by column block.

Columns are processed left to right; pruning column i's weights moves their error onto the columns
to its right through the inverse Hessian's Cholesky factor. The mask is chosen adaptively inside each
block of columns from w²/[H⁻¹]²_ii, on weights that already absorbed earlier updates; N:M groups are
chosen when the sweep reaches them. With a fixed mask the same sweep is a fast approximate update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import SparsityPattern
from ..masks import nm_mask, prune_count, prune_lowest_per_matrix, prune_lowest_per_row, row_counts
from .base import Solver, SolverResult
from .linalg import add_damping, unit_dead_curvature, zero_dead_weights

# H⁻¹'s factor made in XᵀX's own memory (`solve_taking`): a function giving XᵀX again for a float64 retry.
Reload = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class SparseGPTSettings:
    blocksize: int = 128
    dampening: float = 0.01  # fraction of mean(diag H) added to the diagonal

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise ValueError("blocksize must be positive")
        if not 0 <= self.dampening < 1:
            raise ValueError("dampening must be in [0, 1)")


def _transpose_in_place(M: torch.Tensor, tile: int = 256) -> None:
    """M[e] ← M[e]ᵀ for a batch of square matrices, tile by tile (one tile of scratch, not a copy of M)."""
    n = M.shape[-1]
    for i in range(0, n, tile):
        rows = slice(i, i + tile)
        for j in range(i, n, tile):
            cols = slice(j, j + tile)
            upper = M[:, rows, cols].clone()
            if i != j:
                M[:, rows, cols] = M[:, cols, rows].mT
            M[:, cols, rows] = upper.mT


def _factor_in_place(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite a contiguous batch of damped H [E, n, n] with the upper Cholesky factors of H⁻¹, row-major.

    The same LAPACK calls, in the same order, as `cholesky_ex` → `cholesky_inverse` → `cholesky_ex(upper)`
    on fresh tensors, so the same bits, but in H's own memory: LAPACK works in column-major order, and
    A = H.mT is a column-major view of H's memory, so no step copies. Returns the two steps' `info`
    (nonzero: not factorised).
    """
    # A is to hold H's values: H is not always symmetric to the bit (a GEMM may round XᵀX's halves apart).
    _transpose_in_place(H)
    A = H.mT
    info = torch.empty(H.shape[0], dtype=torch.int32, device=H.device)
    torch.linalg.cholesky_ex(A, out=(A, info))
    if bool((info != 0).any()):  # their factors are discarded by the caller; cholesky_inverse refuses a zero pivot
        A[info != 0] = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    torch.cholesky_inverse(A, out=A)
    info_upper = torch.empty_like(info)
    torch.linalg.cholesky_ex(A, upper=True, out=(A, info_upper))
    _transpose_in_place(H)  # H held U column-major (H = Uᵀ); the sweep reads rows of U
    return info, info_upper


def _inverse_cholesky(damped_gram: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Upper Cholesky factors of H⁻¹ for a batch [E, in, in]; float64 for the matrices whose float32
    factorisation fails (not positive definite enough).

    `damped_gram` makes H afresh for each attempt (a tensor this function may overwrite), so that no copy
    of it lives beside the factors: for an FFN's down projection each n×n matrix is as large as the
    block's weights. On the CPU the factors are computed in that one matrix (`_factor_in_place`).
    """
    out = todo = None
    for dtype in (torch.float32, torch.float64):
        H = damped_gram()
        if todo is None:
            todo = torch.ones(H.shape[0], dtype=torch.bool, device=H.device)
        index = todo.nonzero().squeeze(1)
        if len(index) != H.shape[0] or H.dtype != dtype:
            H = H[index].to(dtype)
        if H.device.type == "cpu":
            U = H.contiguous()
            del H
            info, info_upper = _factor_in_place(U)
        else:  # a fresh tensor per step, two n×n at a time: nothing here checks GPU LAPACK with out = input
            L, info = torch.linalg.cholesky_ex(H)
            del H
            if bool((info != 0).any()):
                L[info != 0] = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
            inverse = torch.cholesky_inverse(L)
            del L
            U, info_upper = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            U = U.contiguous()
        ok = (info == 0) & (info_upper == 0)
        if out is None and bool(ok.all()):  # the usual case: all in float32
            return U
        if out is None:
            out = torch.empty_like(U, dtype=torch.float32)  # first pass: every matrix was factorised
        out[index[ok]] = U[ok].to(torch.float32)
        del U
        todo[index[ok]] = False
        if not todo.any():
            return out
    raise torch.linalg.LinAlgError("Gram matrix is not positive definite even after dampening")


def _damped_grams(H: torch.Tensor, dampening: float, reload: Reload | None) -> Callable[[], torch.Tensor]:
    """What `_inverse_cholesky` factorises, made afresh at each call: a copy of H, or with `reload` (the
    caller gave H up) H itself the first time and `reload()`'s copy after that."""
    if reload is None:
        return lambda: add_damping(unit_dead_curvature(H), dampening, in_place=True)
    given = [H]

    def damped() -> torch.Tensor:
        gram = given.pop() if given else reload().float()
        return add_damping(unit_dead_curvature(gram, in_place=True), dampening, in_place=True)

    return damped


def _sweep(W, H, settings, pattern=None, fixed_mask=None, reload: Reload | None = None):
    """One OBS sweep over a batch of independent layers W [E, out, in] with H [E, in, in] (experts of one
    fused tensor: every column step is then one operation for all of them). Either `pattern` (choose the
    mask, per layer or per row of each layer) or `fixed_mask` (keep it) is given. With `reload`, H is this
    sweep's to overwrite: the factor of H⁻¹ takes its memory (for an FFN's down projection H is as large as
    the block's weights)."""
    experts, rows, cols = W.shape
    H = H.float()
    W = zero_dead_weights(W.float(), H)
    damped = _damped_grams(H, settings.dampening, reload)
    del H  # with `reload`, the factor below is H's memory
    U = _inverse_cholesky(damped)
    del damped
    mask = torch.ones_like(W, dtype=torch.bool) if fixed_mask is None else fixed_mask.clone()
    blocksize = settings.blocksize
    nm = pattern is not None and pattern.is_nm
    if nm:  # N:M groups must not straddle blocks
        blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        W1 = W[..., start:end].clone()
        U1 = U[:, start:end, start:end]
        d = torch.diagonal(U1, dim1=-2, dim2=-1)[:, None, :]  # [E, 1, block]
        err1 = torch.zeros_like(W1)
        mask1 = mask[..., start:end]
        if pattern is not None and not nm:
            scores = W1**2 / d**2
            # Per-block counts as differences of floors so the layer total is exactly ⌊numel·s⌋.
            if pattern.spread:
                # Rows prune base or base + 1 in all (row_counts); each row's total split over the blocks
                # the same way, as the fraction (c + ½)/cols, which ⌊cols·s⌋ turns back into c.
                base, extra = row_counts(rows, cols, pattern)
                for row_slice, c in ((slice(extra, None), base), (slice(None, extra), base + 1)):
                    s = (c + 0.5) / cols
                    k = prune_count(end, s) - prune_count(start, s)
                    mask1[..., row_slice, :] = prune_lowest_per_row(scores[..., row_slice, :], k)
            elif pattern.per_row:
                k = prune_count(end, pattern.sparsity) - prune_count(start, pattern.sparsity)
                mask1[:] = prune_lowest_per_row(scores, k)
            else:
                k = prune_count(rows * end, pattern.sparsity) - prune_count(rows * start, pattern.sparsity)
                mask1[:] = prune_lowest_per_matrix(scores, k)
        for i in range(end - start):
            if nm and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                mask1[..., group] = nm_mask(W1[..., group] ** 2 / d[..., group] ** 2, pattern.n, pattern.m)
            w = W1[..., i]
            q = w * mask1[..., i]
            err = (w - q) / d[..., i]
            W1[..., i:] -= err[..., None] * U1[:, None, i, i:]
            W1[..., i] = q
            err1[..., i] = err
        W[..., start:end] = W1
        W[..., end:].baddbmm_(err1, U[:, start:end, end:], alpha=-1)  # W -= err1 @ U…, without a W-sized product
    return W.mul_(mask), mask  # W is this sweep's own copy


def solve(W, H, pattern: SparsityPattern, settings: SparseGPTSettings) -> SolverResult:
    weight, mask = _sweep(W[None], H[None], settings, pattern=pattern)
    return SolverResult(weight[0], mask[0])


def solve_taking(W, H, pattern: SparsityPattern, settings: SparseGPTSettings, reload: Reload) -> SolverResult:
    """`solve`, overwriting H: the caller gives it up, and `reload()` makes it again if a float32
    factorisation fails. The same bits as `solve`."""
    weight, mask = _sweep(W[None], H[None], settings, pattern=pattern, reload=lambda: reload()[None])
    return SolverResult(weight[0], mask[0])


def solve_batch(W, H, pattern: SparsityPattern, settings: SparseGPTSettings) -> list[SolverResult]:
    weight, mask = _sweep(W, H, settings, pattern=pattern)
    return [SolverResult(w, m) for w, m in zip(weight, mask)]


def update(W, H, mask, settings: SparseGPTSettings):
    weight, _ = _sweep(W[None], H[None], settings, fixed_mask=mask[None])
    return weight[0], {}


SOLVERS = [Solver(
    "sparsegpt",
    "OBS column sweep with adaptive block mask (Frantar & Alistarh 2023)",
    settings=SparseGPTSettings,
    solve=solve,
    update=update,
    solve_batch=solve_batch,
    solve_taking=solve_taking,
)]
