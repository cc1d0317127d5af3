"""Guards that keep a run from writing a broken model (where it may write: paths.py).

- `require_finite_gram`, `finite_layer_weight`: each layer's inputs and result, before it is written back.
- `verify_sparsity`: after pruning, every layer has the zeros its target asks for, no more than that plus the
  zeros the dense layer had, and under a non-uniform allocation the targets add up to exactly the model's.
- `verify_saved_zeros`: the same zero counts, read back from the tensors written to disk.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch

from .config import SparsityPattern
from .errors import LmpruneError
from .masks import is_nm, prune_count, row_counts
from .tensor_checks import all_finite, count_true, count_zeros

MASKED_FALLBACK = "non-finite update; kept the masked weights"


def require_finite_gram(name: str, H: torch.Tensor | None) -> None:
    """A NaN/Inf in XᵀX (or its diagonal) would make every solver fail (or write NaN) with no word about why."""
    if H is not None and not all_finite(H):
        raise LmpruneError(
            f"layer {name}: its calibration inputs contain NaN/Inf (activations overflowed upstream; "
            "try --dtype float32)"
        )


def finite_layer_weight(name: str, W: torch.Tensor, weight: torch.Tensor,
                        mask: torch.Tensor) -> tuple[torch.Tensor, str | None]:
    """The weight to write back: the solver's if finite, else the masked dense weight if that is finite
    (with the note to record), else an error: a non-finite value is never written into a model."""
    if all_finite(weight):
        return weight, None
    masked = W * mask
    if all_finite(masked):
        return masked, MASKED_FALLBACK
    raise LmpruneError(f"layer {name}: the pruned weights are not finite (NaN/Inf), nor are its masked dense weights")


def pruned_count(out_features: int, in_features: int, pattern: SparsityPattern) -> int:
    """How many weights of an [out, in] layer the pattern prunes (the masks' own rule)."""
    if pattern.is_nm:
        return out_features * (in_features // pattern.m) * (pattern.m - pattern.n)
    if pattern.per_row:
        base, extra = row_counts(out_features, in_features, pattern)
        return out_features * base + extra
    return prune_count(out_features * in_features, pattern.sparsity)


def verify_sparsity(records: list[dict[str, Any]], pattern: SparsityPattern,
                    layers: Mapping[str, Any] | None = None, counts: Mapping[str, int] | None = None,
                    whole_model: bool = True) -> None:
    """Fail loudly if a pruned layer has fewer zeros than its target prunes, or breaks its rows or N:M groups.

    Each record gives "name", "shape" [out, in] and "sparsity". `layers`, when given, maps names to the
    pruned layers (anything with `read_weight(device)` returning the current [out, in] weight, as
    PrunableLayer's does): a layer found there is measured instead of trusting its record, row by row and
    group by group. Fewer zeros than
    the target are never right; more are allowed only up to the zeros the dense layer already had (the
    record's "dense_zeros"): a layer whose kept weights were zeroed (inputs never active in calibration) has
    lost weights the model may need (the pipeline gives such layers a magnitude mask instead).

    `counts` (a non-uniform allocation): each layer's own number of weights to prune, replacing the
    pattern's; they must add up to exactly the pattern's share of all the pruned layers' weights
    (checked when the records are the `whole_model`'s, not one block's).
    """
    if counts is not None and whole_model:
        size = sum(rows * cols for rows, cols in (r["shape"] for r in records))
        allocated = sum(counts[r["name"]] for r in records)
        if allocated != prune_count(size, pattern.sparsity):
            raise LmpruneError(f"the allocation prunes {allocated} of {size} weights, not the "
                               f"{prune_count(size, pattern.sparsity)} that {pattern.describe()} asks for")
    for record in records:
        name, (rows, cols) = record["name"], record["shape"]
        need = counts[name] if counts is not None else pruned_count(rows, cols, pattern)
        layer = (layers or {}).get(name)
        if layer is None:
            zeros = round(record["sparsity"] * rows * cols)
            broken_groups = False
        else:
            zeros, broken_groups = _measure(layer.read_weight(torch.device("cpu")) == 0, need, pattern, counts is not None)
        _check_extra_zeros(record, zeros, need)
        if zeros < need or broken_groups:
            where = "" if zeros < need else (" (not in every group)" if pattern.is_nm else " (not in every row)")
            target = f"{need / (rows * cols):.2%}" if counts is not None else pattern.describe()
            raise LmpruneError(
                f"layer {name} is off its target {target}: {zeros} of {rows * cols} weights are zero, "
                f"{need} should be{where}"
            )


def _measure(zero: torch.Tensor, need: int, pattern: SparsityPattern, allocated: bool) -> tuple[int, bool]:
    """A layer's zeros (bool [out, in]): how many, and whether a row or N:M group has fewer than it must."""
    if pattern.is_nm:
        return count_true(zero), not is_nm(~zero, pattern.n, pattern.m)
    if not pattern.per_row:
        return count_true(zero), False
    rows, cols = zero.shape
    # With an allocation's counts the rows share the layer's own count (a spread pattern).
    base, extra = divmod(need, rows) if allocated else row_counts(rows, cols, pattern)
    row_need = torch.full((rows,), base, device=zero.device)
    row_need[:extra] += 1
    row_zeros = count_true(zero, dim=1)  # their sum is the layer's count: one pass, not two
    return int(row_zeros.sum()), bool((row_zeros < row_need).any())


def _check_extra_zeros(record: dict[str, Any], zeros: int, need: int) -> None:
    dense_zeros = record.get("dense_zeros")
    if dense_zeros is not None and zeros > need + dense_zeros:
        rows, cols = record["shape"]
        raise LmpruneError(f"layer {record['name']} has {zeros} of {rows * cols} weights zero, more than the {need} "
                           f"its target prunes plus the {dense_zeros} the dense layer had: kept weights were zeroed")


def verify_saved_zeros(directory: str, records: list[dict[str, Any]], pattern: SparsityPattern) -> int:
    """Count each pruned layer's zeros in the safetensors files written to `directory`: at least its target,
    at most its target plus the dense layer's zeros. Returns how many layers were found and checked.

    A layer is found under its own name (`….weight`, or one expert's slice of a fused tensor); a checkpoint
    written in another layout (transformers converts some fused experts back to one tensor per expert on
    save) leaves those layers to `verify_sparsity`'s in-memory check. Zero counts do not depend on the
    storage order, so transposed storage needs no care here.
    """
    from safetensors import safe_open

    wanted: dict[str, list[tuple[dict[str, Any], int | None]]] = {}
    for record in records:
        name = record["name"]
        if name.endswith("]"):
            base, expert = name[:-1].rsplit("[", 1)
            wanted.setdefault(base, []).append((record, int(expert)))
        else:
            wanted.setdefault(f"{name}.weight", []).append((record, None))
    checked = 0
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".safetensors")):
        with safe_open(os.path.join(directory, file), framework="pt") as f:
            for key in f.keys():
                for record, expert in wanted.get(key, []):
                    tensor = f.get_tensor(key) if expert is None else f.get_slice(key)[expert:expert + 1]
                    rows, cols = record["shape"]
                    if tensor.numel() != rows * cols:
                        continue  # a same-named tensor of another shape: not this layer's storage
                    need = (round(record["target"] * rows * cols) if "target" in record
                            else pruned_count(rows, cols, pattern))
                    zeros = count_zeros(tensor)
                    if zeros < need:
                        raise LmpruneError(f"layer {record['name']} as saved has {zeros} of {rows * cols} weights "
                                           f"zero, {need} should be")
                    _check_extra_zeros(record, zeros, need)
                    checked += 1
    return checked
