"""Sparsity allocation across blocks: uniform, OWL (outlier-weighted) or rising linearly with depth.

Each rule gives one sparsity per block whose mean, weighted by the block's prunable parameters, is the
target. `SparsityBudget` turns those fractions into an exact number of weights to prune per layer, so
that the model's total is exactly ⌊target × prunable parameters⌋ (the masks' own rounding rule):

- a block prunes round(Σ_{b'≤b} s_b'·P_b') minus what the blocks before it pruned (the rounding carries
  forward instead of accumulating), and the last block closes the sum at ⌊s·P⌋;
- inside a block the count is split over its layers in proportion to their sizes by largest remainder
  (ties to the earlier layer), so every layer of a block has the block's sparsity within one weight.

A layer's count k of n weights is handed to the solvers as the fraction (k + ½)/n, which every mask
rule (⌊n·s⌋) turns back into exactly k, whatever the floating-point error of k/n.

Per-row masks (Wanda's, DSnoT's) take a layer's count as a "spread" pattern: every row prunes ⌊k/rows⌋
and the first k mod rows rows one more, so the count stays exact while rows differ by at most one weight.
N:M patterns stay uniform (their sparsity is fixed per group) and are refused with a non-uniform allocation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Allocation, SparsityPattern  # noqa: F401  (Allocation: re-exported)
from .collect import fused_name
from .errors import LmpruneError
from .hidden import HiddenStates
from .hooks import hooked
from .levers import Lever
from .masks import prune_count
from .model import ExpertSlice
from .solve import is_router


def _centred(target: float, offsets: list[float], sizes: list[int]) -> list[float]:
    """target + offset − (size-weighted mean offset): the weighted mean is exactly the target."""
    total = sum(sizes)
    mean = sum(o * n for o, n in zip(offsets, sizes)) / total if total else 0.0
    out = [target + o - mean for o in offsets]
    low, high = min(out), max(out)
    if low < 0 or high >= 1:
        raise LmpruneError(f"the allocation asks for block sparsities from {low:.3f} to {high:.3f} around "
                           f"{target:.3f}, outside [0, 1): choose a smaller --owl-lambda or --depth-slope")
    return out


def depth_sparsities(target: float, sizes: list[int], slope: float) -> list[float]:
    """Linear in the block index, `slope` from the first block to the last, size-weighted mean = target."""
    count = len(sizes)
    positions = [i / (count - 1) if count > 1 else 0.0 for i in range(count)]
    return _centred(target, [slope * t for t in positions], sizes)


def owl_sparsities(target: float, sizes: list[int], ratios: list[float], lam: float) -> list[float]:
    """OWL: a block's outlier ratio, min-max scaled into [0, 2λ], lowers its sparsity; centred on the target."""
    low, high = min(ratios), max(ratios)
    scaled = [(r - low) / (high - low) * 2 * lam if high > low else 0.0 for r in ratios]
    return _centred(target, [-v for v in scaled], sizes)


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of the Wanda scores |W|·‖X‖ (all of a block's layers together) above m × their mean."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def dense_outlier_ratios(blocks: nn.ModuleList, plan: list, block_calls, hidden: HiddenStates,
                         device: torch.device, m: float, progress_write=None,
                         all_reduce_sum=None) -> list[float]:
    """One forward of the dense model, block by block, reading only each input column's Σx² (diag XᵀX).

    OWL needs every block's ratio before the first block is pruned, so these come from the dense model
    (as in the OWL paper), not from the pruned one the Grams see. Layers read by forward hooks
    (nn.Linear-like); fused expert slices have no hook and do not count towards their block's ratio.
    """
    home = next(blocks[0].parameters()).device
    hidden = hidden.copy()  # the pruning pass starts from these same inputs
    ratios = []
    for index, (block, layers) in enumerate(zip(blocks, plan)):
        block.to(device)
        linear = [layer for layer in layers if not isinstance(layer, ExpertSlice) and layer.out_features > 1]
        squares = {layer.name: torch.zeros(layer.in_features, device=device) for layer in linear}

        def make_hook(name: str, squares=squares):
            def hook(module, args, output):
                x = args[0].detach()
                squares[name].add_(x.reshape(-1, x.shape[-1]).to(torch.float32).square().sum(0))
            return hook

        with hooked([(layer.module, make_hook(layer.name)) for layer in linear]):
            hidden.advance(block, block_calls.for_block(index), device)
        if all_reduce_sum is not None:  # several processes: each holds its own windows' Σx²
            all_reduce_sum(list(squares.values()))
        scores = [layer.get_weight(device).abs() * squares[layer.name].sqrt() for layer in linear]
        ratios.append(outlier_ratio(scores, m) if scores else 0.0)
        block.to(home)
    return ratios


class SparsityBudget:
    """Exact per-layer prune counts from block sparsities (see the module docstring for the rounding)."""

    def __init__(self, target: float, block_sparsities: list[float], per_row: bool = False):
        self.target = target
        self.per_row = per_row  # the method's masks are per row: hand out spread per-row patterns
        self.block_sparsities = block_sparsities
        self.ideal = 0.0  # Σ s_b·P_b over the blocks seen so far
        self.size = 0  # P of the blocks seen so far
        self.allocated = 0  # weights the blocks seen so far were told to prune
        self.counts: dict[str, int] = {}

    def layer_patterns(self, index: int, layers: list, last: bool) -> dict[str, SparsityPattern]:
        """The pattern of each of block `index`'s layers (all the block prunes); `last`: the final block."""
        sizes = [layer.numel() for layer in layers]
        block_size = sum(sizes)
        self.ideal += self.block_sparsities[index] * block_size
        self.size += block_size
        cumulative = prune_count(self.size, self.target) if last else round(self.ideal)
        count = min(max(cumulative - self.allocated, 0), block_size)
        counts = _split(count, sizes)
        self.allocated += sum(counts)
        patterns = {}
        for layer, k, n in zip(layers, counts, sizes):
            k = min(k, n - 1)  # a layer always keeps one weight (sparsity < 1)
            self.counts[layer.name] = k
            patterns[layer.name] = SparsityPattern((k + 0.5) / n, per_row=self.per_row, spread=self.per_row)
        return patterns

    @property
    def expected_total(self) -> int:
        return prune_count(self.size, self.target)


def _split(count: int, sizes: list[int]) -> list[int]:
    """`count` split in proportion to `sizes` by largest remainder (ties to the earlier entry)."""
    total = sum(sizes)
    if not total:
        return [0] * len(sizes)
    out = [count * n // total for n in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (-(count * sizes[i] % total), i))
    for i in order[: count - sum(out)]:
        out[i] += 1
    return out


class Allocated(Lever):
    """A non-uniform --allocation as a lever: block sparsities at the start, each layer's pattern per block."""

    def __init__(self, allocation: Allocation, pattern: SparsityPattern, ranks):
        self.allocation = allocation
        self.pattern = pattern
        self.ranks = ranks
        self.budget: SparsityBudget | None = None

    def begin(self, run) -> None:
        """Block sparsities (OWL: one dense forward first), as an exact budget."""
        allocation, pattern = self.allocation, self.pattern
        self.plan = run.plan
        sizes = [sum(layer.numel() for layer in layers) for layers in run.plan]
        info = allocation.settings()
        if allocation.kind == "owl":
            ratios = dense_outlier_ratios(run.blocks, run.plan, run.calls, run.hidden, run.device, allocation.owl_m,
                                          all_reduce_sum=lambda sums: self.ranks.all_reduce_sum(
                                              sums, "summing OWL's input norms"))
            sparsities = owl_sparsities(pattern.sparsity, sizes, ratios, allocation.owl_lambda)
            info["outlier_ratios"] = ratios
        else:
            info["depth_slope"] = allocation.slope_for(pattern.sparsity)
            sparsities = depth_sparsities(pattern.sparsity, sizes, info["depth_slope"])
        info["block_sparsities"] = sparsities
        run.result.allocation = info
        self.budget = SparsityBudget(pattern.sparsity, sparsities, per_row=pattern.per_row)
        run.expected_counts = self.budget.counts

    def block_planned(self, step) -> None:
        """Each pruned layer's own pattern in the block. Routers, selectors and unreadable expert tensors are
        not pruned and take no share. A resumed block takes its share again, as the run that pruned it did,
        so that the budget's rounding carries on to the later blocks with the very same counts."""
        pruned_here = [layer for layer in step.layers if not is_router(layer, step.kept)
                       and not (isinstance(layer, ExpertSlice) and fused_name(layer) in step.problems)]
        last = step.index == max(i for i, p in enumerate(self.plan) if p)
        step.patterns = self.budget.layer_patterns(step.index, pruned_here, last=last)

    def solved(self, step, stage, records):
        for record in records:
            record["target"] = self.budget.counts[record["name"]] / math.prod(record["shape"])
        return records
