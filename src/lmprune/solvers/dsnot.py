"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): training-free prune-and-grow on an initial
mask (Wanda's by default) that drives each output's *expected* reconstruction error towards zero.

For output row i the expected error is e_i = Σ_j (W_ij − Ŵ_ij)·E[x_j]: the mean of the dense output
minus that of the pruned one. Every cycle swaps one pair of weights in each row that is still active,
so row counts (and N:M groups) never change:
- grow the pruned weight that cuts e_i most per unit of input variance: the largest
  sign(e_i)·W_ij·E[x_j] / Var[x_j]^p;
- prune the kept weight that adds least: among kept weights whose W_ij·E[x_j] has the sign opposite
  to e_i, the one the initial score ranks lowest (N:M: the lowest-scored originally kept weight in
  the grown weight's group, so the group keeps N).
A row stops when |e_i| ≤ threshold, after `cycles` swaps, or when no candidate of the right sign is
left. Weights are moved between kept and pruned, never changed: add `--update` to fit the kept ones.

The input mean is not in the Gram matrix, so this solver declares `needs_input_stats` and the
pipeline sums the inputs beside H; of H it reads the diagonal alone (initial scores, variances). Where this differs from the authors' code (zyxxmu/DSnoT):
- the variance is pooled over all calibration tokens (theirs averages per-sample variances);
- the threshold is per token (theirs is per 2048-token sample: their default 0.1 is about our 5e-5);
- a row whose candidate list runs out stops (theirs would then take candidates of the wrong sign);
- every layer is refined (their script leaves MLP layers at the initial mask by default);
- a swap that would flip the sign of e_i or grow |e_i| is refused and ends the row (`same_sign`, on by
  default; their script accepts both). Unchecked, one swap can overshoot and leave |e_i| larger than
  before (and under N:M the pruned weight may even add to e_i); on SmolLM2 that made DSnoT far worse
  than Wanda (78.7 vs 60.4 at 50%, 2357 vs 920 at 70%), checked it is better (60.0 and 624): see
  bench/RESULTS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SparsityPattern
from ..masks import topk_mask
from . import wanda
from .base import InputStats, Solver, SolverResult

INITIAL_SCORES = {
    "wanda": wanda.scores,
    "magnitude": lambda W, H: W.abs(),
}


@dataclass(frozen=True)
class DSnoTSettings:
    init: str = "wanda"  # initial mask and pruning order: wanda | magnitude
    cycles: int = 50  # at most this many swaps per row
    threshold: float = 5e-5  # a row stops once |expected output error| per token is this small
    variance_power: float = 1.0  # growing score W·E[x] / Var[x]^power
    same_sign: bool = True  # accept a swap only if it shrinks |e_i| and keeps its sign

    def __post_init__(self) -> None:
        if self.init not in INITIAL_SCORES:
            raise ValueError(f"init must be one of {', '.join(INITIAL_SCORES)}, got {self.init!r}")
        if self.cycles < 0:
            raise ValueError(f"cycles must be non-negative, got {self.cycles}")
        if not self.threshold >= 0:
            raise ValueError(f"threshold must be non-negative, got {self.threshold}")
        if not self.variance_power >= 0:
            raise ValueError(f"variance_power must be non-negative, got {self.variance_power}")


def _candidates(lists: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each (keys, valid) pair, per row the columns of the k lowest keys among valid entries (lowest
    first) and how many exist; stacked as [rows, len(lists), k] and [rows, len(lists)]."""
    columns = [torch.topk(keys.masked_fill(~valid, float("inf")), k, dim=1, largest=False, sorted=True).indices
               for keys, valid in lists]
    counts = [valid.sum(1).clamp(max=k) for _, valid in lists]
    return torch.stack(columns, 1), torch.stack(counts, 1)


def solve(W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern, settings: DSnoTSettings,
          stats: InputStats) -> SolverResult:
    scores = INITIAL_SCORES[settings.init](W, H)
    mask = topk_mask(scores, pattern)
    mean = stats.mean.to(W)
    contribution = W * mean[None, :]  # each weight's share of its output's mean
    error = (contribution * ~mask).sum(1, dtype=torch.float64)
    before = float(error.norm())
    if settings.cycles == 0 or mask.all() or not mask.any():
        return SolverResult(W * mask, mask, {"swaps": 0, "expected_error_ratio": 1.0})

    rows = torch.arange(W.shape[0], device=W.device)
    k = min(settings.cycles, W.shape[1])
    variance = stats.variance(H).to(W)
    # A constant feature has no variance: floor it so its key stays finite and ordered.
    variance = variance.clamp_min(max(float(variance.max()) * 1e-10, torch.finfo(torch.float32).tiny))
    grow_key = contribution / variance[None, :] ** settings.variance_power
    pruned = ~mask
    # Lists per sign, index 0 = negative contribution, 1 = positive: growing cuts e_i, so it takes the
    # sign of e_i (largest magnitude first); pruning adds to e_i, so it takes the other sign.
    grow_cols, grow_count = _candidates([(grow_key, pruned & (grow_key < 0)), (-grow_key, pruned & (grow_key > 0))], k)
    if pattern.is_nm:
        never_grown = mask.clone()  # only originally kept weights may be pruned: groups keep N
    else:
        prune_cols, prune_count = _candidates(
            [(scores, mask & (contribution < 0)), (scores, mask & (contribution > 0))], k)
    grow_at = torch.zeros_like(grow_count)
    prune_at = torch.zeros_like(grow_count)

    active = error.abs() > settings.threshold
    swaps = torch.zeros_like(rows)
    for _ in range(settings.cycles):
        if not bool(active.any()):
            break
        up = (error > 0).long()  # 1: e_i > 0, grow a positive contribution, prune a negative one
        at = grow_at[rows, up]
        ok = active & (at < grow_count[rows, up])
        grown = grow_cols[rows, up, at.clamp(max=k - 1)]
        if pattern.is_nm:
            group = (grown // pattern.m)[:, None] * pattern.m + torch.arange(pattern.m, device=W.device)
            group_scores = scores.gather(1, group).masked_fill(~never_grown.gather(1, group), float("inf"))
            lowest = group_scores.argmin(1)
            ok &= torch.isfinite(group_scores[rows, lowest])
            dropped = group[rows, lowest]
        else:
            side = 1 - up
            at_prune = prune_at[rows, side]
            ok &= at_prune < prune_count[rows, side]
            dropped = prune_cols[rows, side, at_prune.clamp(max=k - 1)]
        after = error + contribution[rows, dropped].double() - contribution[rows, grown].double()
        if settings.same_sign:
            ok &= (torch.sign(after) == torch.sign(error)) & (after.abs() < error.abs())
        if not bool(ok.any()):
            break
        r = rows[ok]
        mask[r, grown[ok]] = True
        mask[r, dropped[ok]] = False
        error = torch.where(ok, after, error)
        grow_at[r, up[ok]] += 1
        if pattern.is_nm:
            never_grown[r, dropped[ok]] = False
        else:
            prune_at[r, side[ok]] += 1
        swaps += ok.long()
        active = ok & (error.abs() > settings.threshold)

    ratio = float(error.norm()) / before if before > 0 else 1.0
    return SolverResult(W * mask, mask, {"swaps": int(swaps.sum()), "expected_error_ratio": ratio})


SOLVERS = [Solver(
    "dsnot", "prune-and-grow on Wanda's mask towards zero expected output error, kept weights unchanged",
    settings=DSnoTSettings, solve=solve, per_row_default=True, needs_input_stats=True, statistics="diagonal",
)]
