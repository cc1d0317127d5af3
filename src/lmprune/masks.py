"""Masks from scores: top-k per layer, per row, or N:M; and sparsity schedules.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Every function keeps
the highest scores and prunes exactly the requested count; ties are broken deterministically: among
equal scores the lower index is pruned first. Scores may carry leading batch dimensions ([experts,
out, in]): "per layer" then means per matrix, "per row" per row of every matrix.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .config import SparsityPattern
from .tensor_checks import all_finite, count_true


def prune_count(total: int, sparsity: float) -> int:
    """How many of `total` weights a sparsity prunes: floor, as in ⌊numel/2⌋ at 50%."""
    return int(math.floor(total * sparsity + 1e-9))


def _lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k lowest entries along the last dim, stable for ties."""
    return torch.sort(scores, dim=-1, stable=True).indices[..., :k]


# Above this many entries a whole-tensor selection first brackets the k-th value from a sample.
_BRACKET_MIN = 1 << 16
_SAMPLE = 1 << 14


def _kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a 1-D tensor, exactly; shape [1].

    torch.kthvalue over a whole layer is one slow pass; instead a strided sample of 16k entries
    brackets the k-th value, and kthvalue runs only on the few entries inside the bracket. A bracket
    that misses (possible only for odd distributions) falls back to the full selection.
    """
    n = flat.numel()
    if n >= _BRACKET_MIN:
        sample = flat[:: n // _SAMPLE]
        m = sample.numel()
        rank = k * m / n
        margin = 4.0 * math.sqrt(m) + 8  # the sample rank's spread is at most √m / 2
        lo = torch.kthvalue(sample, max(1, int(rank - margin))).values
        hi = torch.kthvalue(sample, min(m, int(rank + margin) + 1)).values
        below = count_true(flat < lo)
        inside = flat[(flat >= lo) & (flat <= hi)]
        if below < k <= below + inside.numel():
            return torch.kthvalue(inside, k - below).values.reshape(1)
    return torch.kthvalue(flat, k).values.reshape(1)


# Rows of a CPU selection handed to one numpy call (8 MB of float32 scores: its scratch copy stays small).
_ROW_BLOCK_BYTES = 8 << 20


def kth_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of every row of a 2-D tensor, [rows, 1]: torch.kthvalue's values.

    On the CPU, numpy's introselect (`np.partition`) on blocks of rows, one block per torch thread at a
    time: 2× faster than torch.kthvalue on one thread and 3× on two (an [8192 × 2048] layer: 264 against
    529 ms, 128 against 437 ms), which does not spread over threads. A selection is exact, so the values
    are the same. Other devices, dtypes numpy lacks, and scores with NaN (whose order differs) use torch.
    """
    rows, cols = scores.shape
    if (scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64) or rows * cols < 1 << 16
            or not all_finite(scores)):
        return torch.kthvalue(scores, k, dim=-1, keepdim=True).values
    values = scores.detach().numpy()
    out = np.empty((rows, 1), dtype=values.dtype)
    step = max(1, _ROW_BLOCK_BYTES // (values.itemsize * cols))

    def select(start: int) -> None:  # numpy releases the GIL inside the partition
        out[start:start + step, 0] = np.partition(values[start:start + step], k - 1, axis=1)[:, k - 1]

    starts = range(0, rows, step)
    threads = min(torch.get_num_threads(), len(starts))
    if threads <= 1:
        for start in starts:
            select(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(select, starts))
    return torch.from_numpy(out)


def _prune_lowest_rows(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask pruning the k lowest entries of every row of a 2-D tensor.

    A selection (kthvalue, O(n)) instead of a sort: masks are re-chosen every iteration by the
    gradual and L0 solvers, where a full sort of a large layer dominated the solve time. Among
    entries equal to the k-th value, the lowest indices are pruned, as a stable sort would.
    """
    if k <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if k >= scores.shape[-1]:
        return torch.zeros_like(scores, dtype=torch.bool)
    if scores.shape[-1] >= _BRACKET_MIN:  # one long row per matrix (a whole layer, or each of a batch)
        threshold = torch.cat([_kth_smallest(row, k) for row in scores]).reshape(-1, 1)
    else:
        threshold = kth_per_row(scores, k)
    keep = scores > threshold
    if count_true(keep) == scores.numel() - k * scores.shape[0]:
        return keep  # no ties at the threshold to break (the usual case for real-valued scores)
    # Only rows whose k-th value is tied keep fewer than cols − k: break their ties alone (a layer of random
    # weights has a few such rows; a cumulative sum over every row cost 124 ms on 16.8 M entries).
    tied = (count_true(keep, dim=-1) != scores.shape[-1] - k).nonzero().squeeze(1)
    rows, at = scores[tied], threshold[tied]
    below = rows < at
    ties = rows == at
    missing = k - count_true(below, dim=-1)[:, None]
    keep[tied] = ~(below | (ties & (ties.cumsum(-1) <= missing)))
    return keep


def prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest entries of the whole tensor."""
    return _prune_lowest_rows(scores.reshape(1, -1), k).reshape(scores.shape)


def prune_lowest_per_matrix(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest entries of every matrix (the last two dims); of the whole tensor if 2-D."""
    matrices = scores.reshape(-1, scores.shape[-2] * scores.shape[-1])
    return _prune_lowest_rows(matrices, k).reshape(scores.shape)


def prune_lowest_per_row(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest entries of every row."""
    return _prune_lowest_rows(scores.reshape(-1, scores.shape[-1]), k).reshape(scores.shape)


def row_counts(rows: int, cols: int, pattern: SparsityPattern) -> tuple[int, int]:
    """A per-row pattern's counts for a [rows, cols] matrix: every row prunes `base`, the first `extra` one more."""
    if pattern.spread:
        return divmod(prune_count(rows * cols, pattern.sparsity), rows)
    return prune_count(cols, pattern.sparsity), 0


def prune_lowest_spread(scores: torch.Tensor, base: int, extra: int) -> torch.Tensor:
    """Prune the `base` lowest entries of every row, and one more in the first `extra` rows of every matrix."""
    mask = prune_lowest_per_row(scores, base)
    if extra:
        mask[..., :extra, :] = prune_lowest_per_row(scores[..., :extra, :], base + 1)
    return mask


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest `sparsity` fraction of every matrix (of the whole tensor if it is not one)."""
    if scores.dim() < 2:
        return prune_lowest(scores, prune_count(scores.numel(), sparsity))
    return prune_lowest_per_matrix(scores, prune_count(scores.shape[-2] * scores.shape[-1], sparsity))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the lowest `sparsity` fraction of every row."""
    return prune_lowest_per_row(scores, prune_count(scores.shape[-1], sparsity))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive entries of each row."""
    cols = scores.shape[-1]
    groups = scores.reshape(-1, cols // m, m)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, _lowest(groups, m - n), False)
    return mask.reshape(scores.shape)


def topk_mask(scores: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """The mask a pattern allows that keeps the highest scores."""
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    if pattern.per_row:
        return prune_lowest_spread(scores, *row_counts(*scores.shape[-2:], pattern))
    return layer_mask(scores, pattern.sparsity)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of m consecutive inputs of every row keeps at most n weights."""
    rows, cols = mask.shape
    if cols % m:
        return False
    return bool((mask.reshape(rows, cols // m, m).sum(-1) <= n).all())


def cubic_schedule(step: int, steps: int, final: float, kind: str = "fast") -> float:
    """Sparsity after `step` of `steps` gradual steps, reaching `final` at the last.

    "fast" is Zhu & Gupta's s_f·(1 − (1 − t/T)³), pruning most at the start (Boža's code);
    "slow" is s_f·(t/T)³, the form written in Boža's paper.
    """
    t = min(max(step / steps, 0.0), 1.0)
    if kind == "fast":
        return final * (1.0 - (1.0 - t) ** 3)
    if kind == "slow":
        return final * t**3
    raise ValueError(f"unknown schedule {kind!r}: expected 'fast' or 'slow'")
