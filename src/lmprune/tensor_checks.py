"""Exact facts about large tensors in one pass, without the slow reductions they are usually written with.

On the CPU `bool_tensor.sum()` widens every element to int64 and `isfinite(t).all()` writes a bool copy
first: 60–70 ms each on a 16.8 M-weight layer, one thread, against 3–4 ms for `count_nonzero` of a bool
tensor and `aminmax` (NaN propagates to both ends, ±inf reaches one). A prune checks every layer several
times, so these are most of what its checks cost.
"""

from __future__ import annotations

import math

import torch


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or ±inf in t (integer tensors always are)."""
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return True
    if t.is_complex():
        return bool(torch.isfinite(t).all())
    low, high = torch.aminmax(t.detach())
    return math.isfinite(float(low)) and math.isfinite(float(high))


def count_true(mask: torch.Tensor, dim: int | None = None):
    """How many entries of a bool tensor are True: an int, or a tensor of counts along `dim`."""
    if dim is None:
        return int(torch.count_nonzero(mask))
    if mask.dtype == torch.bool and mask.shape[dim] < 2**31:
        # Bytes summed into int32: twice as fast as count_nonzero along a dim (19 against 10 ms on 16.8 M).
        return mask.view(torch.uint8).sum(dim, dtype=torch.int32)
    return torch.count_nonzero(mask, dim=dim)


def count_zeros(t: torch.Tensor) -> int:
    """How many entries of t are zero (±0)."""
    return count_true(t == 0)
