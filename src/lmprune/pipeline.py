"""Block-by-block one-shot pruning: capture -> Gram -> solve -> write back -> re-run block.

Only the current block sits on the compute device. Calibration activations stay where
`store_device` says (CPU by default off-GPU). Each layer's Gram matrix XᵀX is a running float32 sum
filled by forward hooks: activations are never stored per layer. After a block's layers are pruned,
the block is re-run so the next block is calibrated on the outputs of the pruned model, not the dense
one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import SparsityPattern
from .errors import LmpruneError
from .model import (
    BlockInputs,
    PrunableLayer,
    capture_block_inputs,
    device_clock,
    find_blocks,
    move_outside_blocks,
    prunable_layers,
)
from .solvers import InputStats, LayerSolver
from .solvers.linalg import relative_errors


def plan_layers(model: nn.Module, pattern: SparsityPattern, skip: list[str]) -> list[list[PrunableLayer]]:
    """The layers to prune, per block; fails before any work if the pattern does not fit one of them."""
    blocks_name, blocks = find_blocks(model)
    plan = [prunable_layers(block, f"{blocks_name}.{i}", skip) for i, block in enumerate(blocks)]
    if not any(plan):
        raise LmpruneError("no prunable layers left (check --skip)")
    for layers in plan:
        for layer in layers:
            pattern.check_width(layer.in_features, layer.name)
    return plan


@dataclass
class BlockContext:
    """What a block-level refinement (e.g. SparseLLM) sees after the block's layers were pruned."""

    index: int
    block: nn.Module
    layers: list[PrunableLayer]
    dense_weights: dict[str, torch.Tensor]  # float32 [out, in] copies of the weights before pruning
    inputs: BlockInputs
    hidden: list[torch.Tensor]  # the block's inputs, one tensor per batch (on the store device)
    device: torch.device
    pattern: SparsityPattern
    layer_solver: LayerSolver

    def forward(self) -> list[torch.Tensor]:
        """Run the block (current weights) on every calibration batch; returns outputs on the device."""
        with torch.no_grad():
            return [self.inputs.call(self.block, j, h.to(self.device), self.device) for j, h in enumerate(self.hidden)]


BlockRefiner = Callable[[BlockContext], dict[str, Any]]


@dataclass
class PruneResult:
    layers: list[dict[str, Any]] = field(default_factory=list)
    blocks: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def prune_model(
    model: nn.Module,
    calibration: torch.Tensor,
    layer_solver: LayerSolver,
    pattern: SparsityPattern,
    device: torch.device,
    skip: list[str] | None = None,
    batch_size: int = 1,
    store_device: torch.device | None = None,
    refiner: BlockRefiner | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune every block of `model` in place with `layer_solver`; returns per-layer facts and timings."""
    plan = plan_layers(model, pattern, skip or [])
    blocks_name, blocks = find_blocks(model)
    store_device = store_device or device
    home = next(model.parameters()).device
    result = PruneResult()
    timings = {"capture": 0.0, "gram_forward": 0.0, "solve": 0.0, "propagate": 0.0, "refine": 0.0}
    start = device_clock(device)

    move_outside_blocks(model, blocks_name, device)
    try:
        inputs = capture_block_inputs(model, blocks, list(calibration.split(batch_size)), device, store_device)
    finally:
        move_outside_blocks(model, blocks_name, home)
    hidden = inputs.hidden
    timings["capture"] = device_clock(device) - start

    bar = tqdm(total=sum(len(p) for p in plan), desc="pruning", unit="layer", disable=not progress)
    for index, (block, layers) in enumerate(zip(blocks, plan)):
        block.to(device)
        tick = device_clock(device)
        grams = _collect_grams(block, layers, inputs, hidden, device, layer_solver.needs_input_stats)
        timings["gram_forward"] += device_clock(device) - tick

        dense = {layer.name: layer.get_weight(torch.device("cpu")) for layer in layers} if refiner else {}
        first_record = len(result.layers)
        for layer in layers:
            bar.set_postfix_str(f"block {index}: {layer.name.rsplit('.', 1)[-1]}")
            tick = device_clock(device)
            record = _prune_layer(layer, *grams.pop(layer.name), layer_solver, pattern, device)
            record["seconds"] = device_clock(device) - tick
            timings["solve"] += record["seconds"]
            result.layers.append(record)
            bar.update()

        if progress and layers:
            errors = ", ".join(f"{r['name'].rsplit('.', 1)[-1]} {r['error']:.3g}" for r in result.layers[first_record:])
            bar.write(f"block {index} relative errors: {errors}")

        if refiner is not None:
            tick = device_clock(device)
            context = BlockContext(index, block, layers, dense, inputs, hidden, device, pattern, layer_solver)
            result.blocks.append({"block": index, **refiner(context)})
            timings["refine"] += device_clock(device) - tick

        tick = device_clock(device)
        with torch.no_grad():
            for j, h in enumerate(hidden):
                hidden[j] = inputs.call(block, j, h.to(device), device).to(store_device)
        timings["propagate"] += device_clock(device) - tick
        block.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if progress and index == 0 and len(blocks) > 1:
            # Every block does the same work, so the first one predicts the whole run.
            first = device_clock(device) - start
            bar.write(f"block 0 took {_duration(first)}: expect about {_duration(first * len(blocks))} "
                      f"for all {len(blocks)} blocks")
    bar.close()
    timings["total"] = device_clock(device) - start
    result.timings = timings
    return result


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _collect_grams(block, layers, inputs: BlockInputs, hidden, device,
                   with_stats: bool = False) -> dict[str, tuple[torch.Tensor, InputStats | None]]:
    """Run the block on every batch with hooks adding each layer's XᵀX (float32) to a running sum,
    and, `with_stats`, the sum of its inputs and their count (for solvers that need the mean).

    Layers fed the very same tensor in a call (q/k/v, gate/up) share its product: it is computed
    once per batch and added to each of their sums. Checked per call, so it is exact for any model.
    """
    grams = {layer.name: torch.zeros(layer.in_features, layer.in_features, device=device) for layer in layers}
    totals = {layer.name: torch.zeros(layer.in_features, device=device) for layer in layers} if with_stats else {}
    tokens = dict.fromkeys(grams, 0)
    products: dict[int, tuple] = {}  # id(input) -> (input, XᵀX, Σx, token count) this call

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0]  # the caller's object itself: a detached view would be a new one per layer
            seen = products.get(id(x))
            if seen is None or seen[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                total = flat.sum(0) if with_stats else None
                seen = products[id(x)] = (x, flat.t() @ flat, total, flat.shape[0])
            grams[name].add_(seen[1])
            tokens[name] += seen[3]
            if with_stats:
                totals[name].add_(seen[2])

        return hook

    handles = [layer.module.register_forward_hook(make_hook(layer.name)) for layer in layers]
    try:
        with torch.no_grad():
            for j, h in enumerate(hidden):
                inputs.call(block, j, h.to(device), device)
                products.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: (H, InputStats(totals[name], tokens[name]) if with_stats else None) for name, H in grams.items()}


def _prune_layer(layer: PrunableLayer, H: torch.Tensor, stats: InputStats | None, layer_solver: LayerSolver,
                 pattern: SparsityPattern, device: torch.device) -> dict[str, Any]:
    W = layer.get_weight(device)
    solved = layer_solver(W, H, pattern, stats)
    weight, mask = solved.weight, solved.mask
    record: dict[str, Any] = {"name": layer.name, "shape": [layer.out_features, layer.in_features]}
    if not torch.isfinite(weight).all():
        # Never write NaN/Inf into a model: fall back to the mask without the update.
        weight = W * mask
        record["fallback"] = "non-finite update; kept the masked weights"
    error_masked, error = relative_errors(W, [W * mask, weight], H)
    layer.set_weight(weight)
    stored = layer.module.weight
    record.update(
        sparsity=float((stored == 0).sum()) / stored.numel(),
        error=error,
        error_masked=error_masked,
        **({"info": solved.info} if solved.info else {}),
    )
    return record
