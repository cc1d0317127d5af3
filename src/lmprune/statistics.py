"""What a method reads of a layer's inputs, and the running sums the collect step keeps of it.

Levels, from least to most (a method declares one: solvers/base.py, `Solver.statistics`):
  "none"      token counts only (magnitude);
  "diagonal"  Σ x_j² per input, the diagonal of XᵀX (Wanda's norms, DSnoT's variances);
  "gram"      XᵀX whole (every method that updates weights, and the per-layer error report).
A full Gram of an FFN's down projection is 8192² floats and its product per batch the largest cost of a
collection pass, so a method reading its diagonal does not pay for it.
"""

from __future__ import annotations

import torch

STATISTICS = ("none", "diagonal", "gram")


def sums_kept(statistics: str, full_gram: bool) -> tuple[str, ...]:
    """The running sums a collection keeps for a method reading `statistics`: XᵀX ("gram") where the method,
    the error report or a lever reads it (`full_gram`), the diagonal alone ("diagonal") where the method reads
    that. A method reading the diagonal always gets the same diagonal sums, whatever else is collected."""
    return tuple(kind for kind, wanted in (("gram", statistics == "gram" or full_gram),
                                           ("diagonal", statistics == "diagonal")) if wanted)


def zero_sum(width: int, kind: str, device) -> torch.Tensor:
    """A zero running sum for `width` inputs: XᵀX [width, width] ("gram") or its diagonal [width]."""
    return torch.zeros(width, width, device=device) if kind == "gram" else torch.zeros(width, device=device)


# A batch's XᵀX larger than this is never formed whole: it would be a temporary as large as the running sum
# it is added to (268 MB for an 8192-wide input). `add_batch` then adds it a block of rows at a time.
PRODUCT_BYTES = 64 << 20


def batch_sum(flat: torch.Tensor, kind: str) -> torch.Tensor | None:
    """What one batch's float32 inputs [tokens, width] add to a `zero_sum` of that kind; None for an XᵀX
    above PRODUCT_BYTES (each reader's `add_batch` forms it in blocks instead, so an input several layers
    read, such as q/k/v's, multiplies once per reader: a fifth more work in a 70B model's pass)."""
    if kind != "gram":
        return flat.square().sum(0)
    return flat.t() @ flat if 4 * flat.shape[1] ** 2 <= PRODUCT_BYTES else None


def add_batch(total: torch.Tensor, flat: torch.Tensor, kind: str, product: torch.Tensor | None) -> None:
    """total += one batch's sum: its `batch_sum` where that was formed, else XᵀX PRODUCT_BYTES / 4 of rows
    at a time.
    A row of a matrix product does not depend on the rows computed beside it (with the BLAS torch ships,
    bit for bit: tests/test_statistics.py), so the sums are the same either way."""
    if product is not None:
        total.add_(product)
        return
    width = flat.shape[1]
    step = max(1, PRODUCT_BYTES // 4 // (4 * width))
    for start in range(0, width, step):
        total[start:start + step].add_(flat[:, start:start + step].t() @ flat)


def gram_diagonal(H: torch.Tensor) -> torch.Tensor:
    """diag(XᵀX) of every matrix of H [..., in, in], or H itself where it holds the diagonal alone (1-D)."""
    return H if H.dim() == 1 else torch.diagonal(H, dim1=-2, dim2=-1)
