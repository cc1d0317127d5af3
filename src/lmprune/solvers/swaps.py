"""Mask refinement by exact-gain 1-swaps (`--refine swaps`, after SparseSwaps 2025).

A layer's error, row by row, is e(w) = (w − w₀)ᵀ G (w − w₀): w₀ the weights the method fitted (the dense
row, or its dense/block target), G = XᵀX the Gram the method used, w the row after pruning. With the
residual r = G (w − w₀), a swap that zeroes kept weight i and gives pruned weight j the value v changes w by
δ = v·e_j − w_i·e_i, so the error changes by exactly

    Δe = 2δᵀr + δᵀGδ = (w_i² G_ii − 2 w_i r_i) + (2 v r_j + v² G_jj) − 2 w_i v G_ij.

Two choices of v:
- "dense": v = w₀_j, the weight comes back at its own value: exact for methods without an update, whose
  kept weights stay at w₀;
- "best": v = (w_i G_ij − r_j) / G_jj minimises Δe over v, so Δe = (w_i² G_ii − 2 w_i r_i) − u² / G_jj with
  u = r_j − w_i G_ij: for methods that update the kept weights, which refit them after the swaps anyway.

Each round takes every row's best swap over all (kept i, pruned j) pairs of the row (unstructured: the row
keeps its count, so the layer's exact sparsity is kept) or of the same N:M group (N:M validity kept), and
applies it where it lowers that row's error. Rows are independent, so all rows swap at once; r is
recomputed from scratch every round (one matrix product), so round-off does not accumulate. A round costs
about out·kept·pruned element operations (all pairs), which dominates the matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SparsityPattern
from .base import SolverResult, UpdateFn
from .linalg import relative_errors

VALUES = ("dense", "best")
# A swap must lower its row's error by more than this share of it: float64 round-off stays far below.
_RELATIVE_TOL = 1e-9
# Entries of the pair grid evaluated at once (float64): rows are processed in chunks of at most this.
_GRID_ENTRIES = 1 << 23


@dataclass(frozen=True)
class SwapSettings:
    # Each round makes at most one swap per row. On stories260K at 70% (bench/RESULTS.md, issue 33), Wanda's
    # perplexity fell most in the first 5 rounds, a little more by 10, and not further by 20.
    swap_rounds: int = 10

    def __post_init__(self) -> None:
        if self.swap_rounds < 1:
            raise ValueError(f"swap_rounds must be at least 1, got {self.swap_rounds}")


def _slots(mask: torch.Tensor, group: int):
    """Per row and group: column indices of the kept weights first, then of the pruned ones, padded.

    Returns (kept [R, g, nk], kept_valid, pruned [R, g, np], pruned_valid), R rows, g groups of `group`."""
    rows = mask.shape[0]
    grouped = mask.reshape(rows, -1, group)
    order = torch.argsort((~grouped).to(torch.int8), dim=-1, stable=True)  # kept first, each in index order
    counts = grouped.sum(-1, keepdim=True)
    offset = torch.arange(0, mask.shape[1], group, device=mask.device)[None, :, None]
    slot = torch.arange(group, device=mask.device)
    nk, first = int(counts.max()), int(counts.min())
    kept = order[..., :nk] + offset
    pruned = order[..., first:] + offset
    return kept, slot[:nk] < counts, pruned, slot[first:] >= counts


def _best_swaps(w, w0, r, G, owner, mask, group: int, value: str):
    """Every row's best swap: (Δe [R], kept column i [R], pruned column j [R]).

    w, w0, r, mask [R, in]; G [E, in, in]; owner [R]: which G each row uses."""
    rows, cols = w.shape
    kept, kept_ok, pruned, pruned_ok = _slots(mask, group)
    groups, nk, np_ = kept.shape[1], kept.shape[2], pruned.shape[2]
    diag = torch.diagonal(G, dim1=-2, dim2=-1)
    inf = torch.tensor(torch.inf, dtype=w.dtype, device=w.device)
    best = torch.empty(rows, dtype=w.dtype, device=w.device)
    best_i = torch.empty(rows, dtype=torch.long, device=w.device)
    best_j = torch.empty(rows, dtype=torch.long, device=w.device)
    chunk = max(1, _GRID_ENTRIES // max(1, groups * nk * np_))
    G_flat = G.reshape(-1)
    for start in range(0, rows, chunk):
        part = slice(start, min(rows, start + chunk))
        n = part.stop - part.start
        K, P, who = kept[part], pruned[part], owner[part]

        def take(x, idx):
            return x[part].gather(1, idx.reshape(n, -1)).reshape(idx.shape)

        wi, ri = take(w, K), take(r, K)
        Gii = diag[who[:, None, None], K]
        a = torch.where(kept_ok[part], wi * wi * Gii - 2 * wi * ri, inf)  # [n, g, nk]: zeroing i alone
        rj, Gjj = take(r, P), diag[who[:, None, None], P]
        Gij = G_flat[who[:, None, None, None] * cols * cols + K[..., :, None] * cols + P[..., None, :]]
        if value == "dense":
            v = take(w0, P)
            # Restoring a weight whose value is 0 would keep a zero: not a swap.
            b = torch.where(pruned_ok[part] & (v != 0), 2 * v * rj + v * v * Gjj, inf)
            delta = a[..., :, None] + b[..., None, :] - 2 * wi[..., :, None] * v[..., None, :] * Gij
        else:
            u = rj[..., None, :] - wi[..., :, None] * Gij
            usable = pruned_ok[part] & (Gjj > 0)  # an input never active in calibration cannot lower the error
            Gjj = torch.where(usable, Gjj, 1.0)[..., None, :]
            delta = torch.where(usable[..., None, :], a[..., :, None] - u * u / Gjj, inf)
        best[part], at = delta.reshape(n, -1).min(1)
        g, rest = at // (nk * np_), at % (nk * np_)
        index = torch.arange(n, device=w.device)
        best_i[part] = K[index, g, rest // np_]
        best_j[part] = P[index, g, rest % np_]
    return best, best_i, best_j


def _restored_value(w, w0, r, G, owner, rows, i, j, value: str):
    """The value pruned weight j takes when kept weight i goes (see the module docstring)."""
    if value == "dense":
        return w0[rows, j]
    Gij, Gjj = G[owner[rows], i, j], G[owner[rows], j, j]
    return (w[rows, i] * Gij - r[rows, j]) / Gjj


def swap_masks(W0: torch.Tensor, G: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
               pattern: SparsityPattern, rounds: int, value: str = "dense"):
    """Greedy rounds of each row's best exact-gain 1-swap; returns (weight, mask, swaps per row).

    W0, weight, mask [out, in] or [E, out, in] (experts), G [in, in] or [E, in, in]. `weight` is zero off
    `mask`. Swaps stay within rows (unstructured) or N:M groups; a row stops when no swap lowers its error.
    Computed in float64; the weight comes back in W0's dtype."""
    if value not in VALUES:
        raise ValueError(f"value must be one of {VALUES}, got {value!r}")
    batched = W0.dim() == 3
    if not batched:
        W0, G, weight, mask = W0[None], G[None], weight[None], mask[None]
    experts, out, cols = W0.shape
    dtype = W0.dtype
    w0 = W0.double().reshape(-1, cols)
    w = torch.where(mask, weight.double(), 0).reshape(-1, cols)
    mask = mask.reshape(-1, cols).clone()
    G = G.double()
    owner = torch.arange(experts, device=W0.device).repeat_interleave(out)
    group = pattern.m if pattern.is_nm else cols
    swaps = torch.zeros(experts * out, dtype=torch.long, device=W0.device)
    rows = torch.arange(experts * out, device=W0.device)
    # A row with nothing pruned (sparsity 0) or nothing kept has no pair to swap.
    for _ in range(rounds if bool(mask.any()) and not bool(mask.all()) else 0):
        d = w - w0
        r = torch.bmm(d.reshape(experts, out, cols), G).reshape(-1, cols)
        error = (d * r).sum(1)
        gain, i, j = _best_swaps(w, w0, r, G, owner, mask, group, value)
        go = gain < -_RELATIVE_TOL * error
        if not go.any():
            break
        at, i, j = rows[go], i[go], j[go]
        v = _restored_value(w, w0, r, G, owner, at, i, j, value)
        w[at, i] = 0
        w[at, j] = v
        mask[at, i] = False
        mask[at, j] = True
        swaps += go
    shape = (experts, out, cols)
    weight, mask, swaps = w.to(dtype).reshape(shape), mask.reshape(shape), swaps.reshape(experts, out)
    return (weight, mask, swaps) if batched else (weight[0], mask[0], swaps[0])


def refine_batch(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, results: list[SolverResult],
                 settings: SwapSettings, update: UpdateFn | None = None, update_settings=None) -> list[SolverResult]:
    """`--refine swaps` on E layers W [E, out, in], H [E, in, in] that a method solved into `results`.

    Without an update (kept weights at their own values) the swaps use v = w₀ and the result is W ⊙ mask′.
    With one, the swaps use the best v and the update then refits the kept weights on the new mask. Each
    layer keeps the lowest-error of its candidates (the method's result, the swapped weights, the refit),
    so refinement never raises a layer's error, even under an approximate update."""
    mask = torch.stack([result.mask for result in results])
    start = torch.stack([result.weight for result in results]) if update else W * mask
    weight, new_mask, swaps = swap_masks(W, H, start, mask, pattern, settings.swap_rounds,
                                         "best" if update else "dense")
    refined = []
    for e, result in enumerate(results):
        count = int(swaps[e].sum())
        info = {**result.info, "swaps": count}
        if count == 0:
            refined.append(SolverResult(result.weight, result.mask, info))
            continue
        candidates = [(result.weight, result.mask, {}), (weight[e] * new_mask[e], new_mask[e], {})]
        if update is not None:
            refit, refit_info = update(W[e], H[e], new_mask[e], update_settings)
            candidates.append((refit * new_mask[e], new_mask[e], refit_info))
        errors = relative_errors(W[e], [c[0] for c in candidates], H[e])
        pick = min(range(len(candidates)), key=lambda k: errors[k])
        chosen, chosen_mask, extra = candidates[pick]
        # "swaps": 0 where the method's own result stayed the best (an update that cannot use the new mask)
        info.update(extra, swaps=count if pick else 0, swap_error_before=errors[0], swap_error_after=errors[pick])
        refined.append(SolverResult(chosen, chosen_mask, info))
    return refined


def refine(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, result: SolverResult,
           settings: SwapSettings, update: UpdateFn | None = None, update_settings=None) -> SolverResult:
    return refine_batch(W[None], H[None], pattern, [result], settings, update, update_settings)[0]
