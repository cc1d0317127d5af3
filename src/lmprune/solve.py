"""The solve step: a block's layers grouped for their solver, pruned, checked and written back.

A group is one layer, or the experts of one fused tensor solved in batches when the solver can. A layer
without enough calibration signal gets the magnitude mask instead of the method (see `solve_groups`). What
is written back is checked first (safety.py): never NaN/Inf, never more zeros than the target allows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .collect import LayerInputs, fused_name
from .config import SparsityPattern
from .dense_reasons import NO_SIGNAL
from .errors import LmpruneError
from .masks import topk_mask
from .model import ExpertSlice, PrunableLayer
from .safety import finite_layer_weight, pruned_count, require_finite_gram
from .solvers import LayerSolver, SolverResult
from .solvers.linalg import relative_errors
from .spill import SpilledTensor
from .tensor_checks import count_zeros


def statistics_read(solver) -> str:
    """What a layer solver reads of a layer's inputs (statistics.py); XᵀX for any callable that does not say."""
    return getattr(solver, "statistics", "gram")


def is_router(layer: PrunableLayer, routers: set[str]) -> bool:
    return any(name in routers for name in layer.param_names())


@dataclass
class LayerSolve:
    """One layer's solve: its inputs, and why the magnitude fallback replaces the method (if it does)."""

    layer: PrunableLayer
    inputs: LayerInputs
    fallback: str | None


def solve_groups(layers: list[PrunableLayer], inputs: dict[str, LayerInputs], routers: set[str],
                 block_tokens: int, batchable: bool) -> list[list[LayerSolve]]:
    """The block's solves in order, the experts of one fused tensor grouped when the solver can batch them.

    Routers and layers without inputs (unreadable expert tensors, reported later) are left out.
    """
    groups: list[list[LayerSolve]] = []
    batches: dict[str, list[LayerSolve]] = {}
    for layer in layers:
        got = inputs.pop(layer.name, None)
        if is_router(layer, routers) or got is None:
            continue  # routers stay dense; unreadable expert tensors are reported by unpruned_weights
        fallback = None
        # Signal is counted only where the method reads its inputs (collect.py): one that does not needs none.
        if got.signal is not None and got.signal < block_tokens and got.signal < layer.in_features:
            # Without calibration signal a Gram matrix cannot determine an update, and a zero one would let
            # a solver delete the layer (its every input looks dead). Signal = the tokens whose input row is
            # not all zero: an expert's routed tokens, a dense layer's tokens minus those a closed gate or
            # dead inputs zeroed. Too few = fewer than the layer's inputs (XᵀX then has a null space, so
            # some directions of the update are free) *and* fewer than the block saw: a layer reached by
            # every calibration token is determined as well as the calibration set allows (dampening
            # handles a small --nsamples, as always). Magnitude needs no data and keeps the weights it keeps.
            what = "expert" if isinstance(layer, ExpertSlice) else "layer"
            fallback = (f"{NO_SIGNAL}: the {what} saw {got.signal} calibration tokens with a nonzero input, for "
                        f"{layer.in_features} inputs: magnitude mask, kept weights unchanged")
        solve = LayerSolve(layer, got, fallback)
        if batchable and fallback is None and isinstance(layer, ExpertSlice):
            fused = fused_name(layer)
            if fused not in batches:
                batches[fused] = []
                groups.append(batches[fused])
            batches[fused].append(solve)
        else:
            groups.append([solve])
    return groups


# Stacked weights, Grams and the solvers' working copies of one batch stay under this (bytes): big
# enough that a GPU runs few, large kernels, small enough beside the Grams a block already holds.
_BATCH_BYTES = 1 << 30


# A lever's change of a layer's target before its method solves it (dense targets: W′ from X_pᵀX_d).
Retarget = Callable[[LayerSolve, torch.Tensor], torch.Tensor]


def prune_group(group: list[LayerSolve], layer_solver: LayerSolver, fallback_solver: LayerSolver,
                pattern: SparsityPattern, patterns: dict[str, SparsityPattern], device: torch.device,
                retarget: Retarget | None = None, spill_dir: str | None = None) -> list[dict[str, Any]]:
    """Prune the layers of a group (one layer, or experts of one fused tensor solved in batches).

    `patterns`: each layer's own target where an allocation gives one; `retarget`: the weight the method
    fits instead of the layer's own (not for the magnitude fallback). `spill_dir`: where memory is short
    (a streamed run), a solver that can overwrite XᵀX gets it, parked there for the error report meanwhile.
    """
    targets = {patterns.get(solve.layer.name, pattern) for solve in group}
    if len(group) > 1 and (len(targets) > 1 or retarget is not None):
        # An allocation can give the experts of one tensor different counts: one pattern per batch only.
        return [record for solve in group
                for record in prune_group([solve], layer_solver, fallback_solver, pattern, patterns, device, retarget,
                                          spill_dir)]
    pattern = targets.pop()
    if len(group) == 1:
        solve = group[0]
        solver = fallback_solver if solve.fallback else layer_solver
        W = solve.layer.read_weight(device)  # solvers never write into their W
        require_finite_gram(solve.layer.name, solve.inputs.gram)
        require_finite_gram(solve.layer.name, solve.inputs.diagonal)
        if retarget is not None and solver is layer_solver:
            W = retarget(solve, W)
        H = solve.inputs.for_method(statistics_read(solver))
        if (spill_dir is not None and solver is layer_solver and solver.takes_gram and H is solve.inputs.gram
                and H.device.type == "cpu"):
            del H
            solved = _solve_taking_gram(solver, W, solve.inputs, pattern, spill_dir)
        else:
            solved = solver(W, H, pattern, solve.inputs.stats)
            del H
        record = write_back(solve.layer, W, solve.inputs, solved, pattern)
        if solve.fallback:
            record["fallback"] = solve.fallback
        return [record]
    layer = group[0].layer
    # W, H and a few working copies of each, in float32.
    per_layer = 4 * 4 * (layer.out_features * layer.in_features + layer.in_features**2)
    size = max(1, _BATCH_BYTES // per_layer)
    records = []
    for start in range(0, len(group), size):
        batch = group[start:start + size]
        for solve in batch:
            require_finite_gram(solve.layer.name, solve.inputs.gram)
        W = torch.stack([solve.layer.get_weight(device) for solve in batch])
        H = torch.stack([solve.inputs.gram for solve in batch])
        solved = layer_solver.solve_batch(W, H, pattern)
        del H
        records += [write_back(solve.layer, W[j], solve.inputs, solved[j], pattern) for j, solve in enumerate(batch)]
    return records


def _solve_taking_gram(solver: LayerSolver, W: torch.Tensor, inputs: LayerInputs, pattern: SparsityPattern,
                       spill_dir: str) -> SolverResult:
    """Solve, the solver overwriting XᵀX while a copy waits on disk; `inputs.gram` is that copy again after.

    The factor SparseGPT makes of XᵀX then takes XᵀX's memory instead of an n×n matrix beside it.
    """
    try:
        parked = SpilledTensor(inputs.gram, spill_dir)
    except OSError:  # no room to park it (the block's own write will say so): a copy, as in memory
        return solver(W, inputs.gram, pattern, inputs.stats)
    with parked:
        H, inputs.gram = inputs.gram, None  # the solver's alone now: LayerInputs sums are never shared
        solved = solver.solve_taking(W, H, pattern, parked.load)
        del H  # the factor's memory, freed before XᵀX is read back
        try:
            inputs.gram = parked.load()
        except OSError as exc:
            raise LmpruneError(f"cannot read back XᵀX parked in {spill_dir!r}: {exc.strerror or exc}") from None
    return solved


class _MaskedRows:
    """W * mask, a block of rows at a time as `relative_errors` reads it: no W-sized product (the same bits)."""

    def __init__(self, W: torch.Tensor, mask: torch.Tensor):
        self.W, self.mask = W, mask

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return self.W[rows] * self.mask[rows]


def write_back(layer: PrunableLayer, W: torch.Tensor, inputs: LayerInputs, solved: SolverResult,
                pattern: SparsityPattern) -> dict[str, Any]:
    """Check a layer's solved weights, write them into the model and describe the layer for the report.

    The relative errors ‖XW − XŴ‖² / ‖XW‖² (method, and its mask alone) are reported where XᵀX was
    collected; a method that reads less (statistics.py) gets no error fields unless the run asks for them.
    """
    weight, mask = solved.weight, solved.mask
    dense_zeros = layer.zeros()
    record: dict[str, Any] = {"name": layer.name, "shape": [layer.out_features, layer.in_features],
                              "dense_zeros": dense_zeros}
    weight, fallback = finite_layer_weight(layer.name, W, weight, mask)  # never NaN/Inf into a model
    allowed = pruned_count(layer.out_features, layer.in_features, pattern) + dense_zeros
    # Zeros as the layer will store them (set_weight casts to its dtype): also the record's sparsity.
    zeros = count_zeros(weight.to(layer.stored().dtype))
    extra = zeros - allowed
    if extra > 0:
        # More zeros than the target prunes and the dense layer had: inputs never active in calibration
        # (their weights zeroed) or kept weights rounded to zero. Those weights may matter on other text.
        W = layer.get_weight(W.device)
        mask = topk_mask(W.abs(), pattern)
        weight = W * mask
        zeros = count_zeros(weight.to(layer.stored().dtype))
        fallback = (f"the method left {extra} more zeros than the target and the dense zeros (inputs never "
                    "active in calibration): magnitude mask, kept weights unchanged")
    if fallback:
        record["fallback"] = fallback
    errors = {}
    if inputs.gram is not None:
        error_masked, error = relative_errors(W, [_MaskedRows(W, mask), weight], inputs.gram)
        errors = {"error": error, "error_masked": error_masked}
    layer.set_weight(weight)
    record.update(tokens=inputs.tokens, sparsity=zeros / layer.numel(), **errors,
                  **({"info": solved.info} if solved.info else {}))
    return record
