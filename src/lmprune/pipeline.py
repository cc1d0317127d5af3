"""Block-by-block one-shot pruning: record calls -> Gram -> solve -> write back -> re-run block.

Only the current block sits on the compute device. Calibration activations stay where
`store_device` says (CPU by default off-GPU). Each layer's Gram matrix XᵀX is a running float32 sum
filled while the block runs: activations are never stored per layer. Every block is run with its own
recorded call (its own mask and rotary table). An expert's Gram matrix sums exactly the tokens the
model routes to it, read off the block's own products (model/tracing.py); routers (whose top-k dispatches
tokens to experts) and selectors (whose top-k chooses tokens) are found the same way and never pruned.
A layer without calibration signal gets a magnitude mask. After a block's layers are pruned, the block is
re-run so the next block is calibrated on the outputs of the pruned model, not the dense one. Every ≥2-D
block weight not pruned is listed with its reason (dense_reasons.py); unexpected ones also in a warning.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import SparsityPattern
from .distributed import SINGLE, Ranks, assign_layers, merge_collected, own_groups, refine_on_main, share_solved
from .errors import LmpruneError
from .model import (
    BlockCall,
    ExpertSlice,
    PrunableLayer,
    device_clock,
    expert_count,
    find_blocks,
    move_outside_blocks,
    prunable_layers,
    record_block_calls,
    text_config,
)
from .model.replay_guard import check_replay
from .model.streaming import BlockStore, first_of_each_class
from .model.tracing import BlockTracer
from .dense_reasons import EXPECTED, NO_SIGNAL, DenseReason, reason_for_module
from .allocation import Allocation, SparsityBudget, dense_outlier_ratios, depth_sparsities, owl_sparsities
from .sequential import GroupDone, check_sequential, layer_groups
from .dense_targets import DenseStream, check_dense_targets, dense_target, output_scale
from .reconstruct import ReconstructSettings, check_reconstruct, reconstruct_block
from .masks import topk_mask
from .safety import finite_layer_weight, pruned_count, require_finite_gram, verify_sparsity
from .solvers import InputStats, LayerSolver, SolverResult, build_layer_solver
from .solvers.linalg import relative_errors

MOE_CALIBRATION = ("routed", "all")


def plan_layers(model: nn.Module, pattern: SparsityPattern, skip: list[str]) -> list[list[PrunableLayer]]:
    """The layers to prune, per block; fails before any work if the pattern does not fit one of them."""
    blocks_name, blocks = find_blocks(model)
    config = text_config(model)
    plan = [prunable_layers(block, f"{blocks_name}.{i}", skip, config) for i, block in enumerate(blocks)]
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
    inputs: BlockCall
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
    routers: list[str] = field(default_factory=list)  # weights whose selection dispatches tokens to experts
    selectors: list[str] = field(default_factory=list)  # weights whose selection chooses tokens (indexers)
    kept_dense: list[dict[str, Any]] = field(default_factory=list)  # every ≥2-D block weight not pruned, and why
    unpruned: list[dict[str, Any]] = field(default_factory=list)  # those kept dense for an unexpected reason
    block_weights: int = 0  # all ≥2-D block weights but biases: what the headline's sparsity is a share of
    allocation: dict[str, Any] = field(default_factory=lambda: {"kind": "uniform"})  # block sparsities and why
    # --block-targets: which layer took each block's output as its target, and the blocks where none could
    block_targets: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerInputs:
    """What the solve of one layer needs: its Gram matrix, input statistics and token count."""

    gram: torch.Tensor
    stats: InputStats | None
    tokens: int
    # Tokens whose input row was not all zero (zero rows add nothing to the Gram): what determines an update.
    signal: int | None = None

    def __post_init__(self):
        if self.signal is None:
            self.signal = self.tokens


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
    moe_calibration: str = "routed",
    ranks: Ranks = SINGLE,
    store: BlockStore | None = None,
    allocation: Allocation | None = None,
    sequential: str = "none",
    dense_targets: bool = False,
    block_targets: bool = False,
    reconstruct: ReconstructSettings | None = None,
) -> PruneResult:
    """Prune every block of `model` in place with `layer_solver`; returns per-layer facts and timings.

    `moe_calibration`: "routed" calibrates each expert on the tokens the router sends it; "all" sends
    every calibration token through every expert (the model's own routing still decides what the next
    block sees). `allocation` spreads the target over the blocks (allocation.py); `sequential` "layer"
    prunes a block's layers group by group in data-flow order (sequential.py). `dense_targets`: each
    layer reconstructs the dense model's outputs from the pruned inputs (dense_targets.py); `block_targets`
    (with both): a block's last layer also fits the dense block's output (dense_targets.py). `reconstruct`:
    each pruned block's kept weights are then fitted to the dense block's output (reconstruct.py).

    `ranks` (several processes, see distributed.py): each runs its share of the calibration batches,
    the Gram sums are all-reduced, each solves its share of the layers, and all end with the same model.

    `store` holds the blocks' weights when the model is streamed (model/streaming.py): it loads each block
    before its work and writes it out after; blocks a killed run finished are only re-run, to rebuild the
    next block's inputs. By default every block is in memory already.
    """
    if moe_calibration not in MOE_CALIBRATION:
        raise LmpruneError(f"invalid MoE calibration {moe_calibration!r}: choose from {', '.join(MOE_CALIBRATION)}")
    plan = plan_layers(model, pattern, skip or [])
    allocation = allocation or Allocation()
    allocation.check(pattern)
    if refiner is not None and not allocation.uniform:
        # A block refiner (SparseLLM) re-prunes its layers to the one pattern it is given.
        raise LmpruneError(f"--allocation {allocation.kind} does not combine with a block refinement (sparsellm) yet")
    check_sequential(sequential, plan)
    if dense_targets:
        check_dense_targets(plan)
    if reconstruct is not None:
        check_reconstruct(plan)
    if block_targets and not (dense_targets and sequential == "layer"):
        raise LmpruneError("--block-targets needs --dense-targets and --sequential layer (--best-quality sets all three)")
    blocks_name, blocks = find_blocks(model)
    store_device = store_device or device
    store = store or BlockStore()
    if allocation.kind == "owl" and store.streams:
        # OWL's dense pre-pass reads every block before the first is pruned.
        raise LmpruneError("--allocation owl does not combine with --stream yet: use depth or uniform")
    home = next(model.parameters()).device
    result = PruneResult()
    timings = {"capture": 0.0, "gram_forward": 0.0, "solve": 0.0, "propagate": 0.0, "refine": 0.0}
    start = device_clock(device)

    with _eager_experts(model):
        batches, batch_indices = ranks.shard(calibration, batch_size)
        move_outside_blocks(model, blocks_name, device)
        try:
            with store.loaded(first_of_each_class(blocks), blocks):
                calls = record_block_calls(model, blocks, batches, device, store_device)
            timings["capture"] = device_clock(device) - start
            if not store.streams:  # every rank checks its own first batch (model/replay_guard.py)
                check_replay(model, blocks, calls, batches[0], device, store_device)
                timings["replay_guard"] = device_clock(device) - start - timings["capture"]
        finally:
            move_outside_blocks(model, blocks_name, home)
        hidden = calls.hidden
        block_tokens = ranks.total(sum(h.shape[:2].numel() for h in hidden))  # batch × sequence positions
        fallback_solver = build_layer_solver("magnitude")
        problems: dict[str, str] = {}
        budget = _allocate(allocation, pattern, blocks, plan, calls, hidden, device, result, ranks)
        dense_stream = DenseStream(hidden) if dense_targets or reconstruct else None
        layer_targets = dense_stream if dense_targets else None  # --reconstruct alone: the stream, not the layers'
        timings["allocation"] = device_clock(device) - start - timings["capture"] - timings.get("replay_guard", 0.0)

        # Rank 0 owns a streamed run's partial output: it says where a killed run stopped.
        resume_from = ranks.broadcast_object(store.resume_from, "sharing where the killed run stopped")
        bar = tqdm(total=sum(len(p) for p in plan), desc="pruning", unit="layer", disable=not progress)
        for index, (block, layers) in enumerate(zip(blocks, plan)):
            block_call = calls.for_block(index)
            if index < resume_from:  # pruned by a killed run: only its outputs are needed
                tick = device_clock(device)
                if dense_stream is not None:  # the dense stream passes through the block's dense weights
                    store.load_original(index, block)
                    block.to(device)
                    dense_stream.start_block(block)
                    dense_stream.finish_block(block_call, device)
                    block.to(home)
                store.load(index, block)
                records = ranks.broadcast_object(store.records(index) if ranks.is_main else None,
                                                 "sharing a finished block's records")
                _replay_block(records, result, problems)
                # The allocation's budget carries its rounding from block to block: it takes this block's
                # share again, as the run that pruned it did, so the later blocks get the very same counts.
                kept = set(records["routers"]) | set(records.get("selectors", []))
                _block_patterns(budget, index, layers, kept, problems, plan)
                # The other ranks read the dense block: the pruned one is in rank 0's partial output.
                ranks.broadcast_tensors(list(block.parameters()) + list(block.buffers()), 0,
                                        "sharing a finished block")
                block.to(device)
                with torch.no_grad():
                    for j, h in enumerate(hidden):
                        hidden[j] = block_call.call(block, j, h.to(device), device).to(store_device)
                block.to(home)
                store.release(index, block)
                bar.update(len(layers))
                timings["resume"] = timings.get("resume", 0.0) + device_clock(device) - tick
                continue
            store.load(index, block)
            block.to(device)
            tick = device_clock(device)
            if dense_stream is not None:
                dense_stream.start_block(block)
            stages, stop_early = [layers], False
            if sequential == "layer":
                stages, stop_early = layer_groups(block, layers, block_call, hidden, device)
            target, block_entry = None, None
            if block_targets and len(stages) == 1:  # one group: its pass is also the last
                target, block_entry = _block_target(ranks, block, index, stages[0], block_call, hidden, device, result)
            collected = _collect_grams(block, f"{blocks_name}.{index}", stages[0], block_call, hidden, device,
                                       layer_solver.needs_input_stats, moe_calibration, stop_early, layer_targets,
                                       target)
            merge_collected(ranks, collected, stages[0])
            timings["gram_forward"] += device_clock(device) - tick
            routers = set(collected.routers)
            if routers:
                # In a block that routes, a one-output layer is a gate (a shared expert's score per token).
                routers |= {n for layer in layers if layer.out_features == 1 for n in layer.param_names()}
            selectors = collected.selectors - routers
            result.routers.extend(sorted(routers))
            result.selectors.extend(sorted(selectors))
            kept = routers | selectors  # never pruned
            problems.update(collected.problems)
            first_block_record = len(result.blocks)
            patterns = _block_patterns(budget, index, layers, kept, problems, plan)

            dense = {layer.name: layer.get_weight(torch.device("cpu")) for layer in layers} if refiner else {}
            first_record = len(result.layers)
            batchable = getattr(layer_solver, "solve_batch", None) is not None  # any callable may solve layers
            for stage_index, stage in enumerate(stages):
                if stage_index:  # --sequential layer: this stage's inputs, with the earlier stages pruned
                    tick = device_clock(device)
                    target = None
                    if block_targets and stage_index == len(stages) - 1:
                        target, block_entry = _block_target(ranks, block, index, stage, block_call, hidden, device,
                                                            result)
                    collected = _collect_grams(block, f"{blocks_name}.{index}", stage, block_call, hidden, device,
                                               layer_solver.needs_input_stats, moe_calibration, stop_early,
                                               layer_targets, target)
                    merge_collected(ranks, collected, stage)
                    timings["gram_forward"] += device_clock(device) - tick
                crosses = collected.crosses
                if crosses:
                    ranks.all_reduce_sum(list(crosses.values()) + list(collected.block_crosses.values()),
                                         "summing dense-target cross products")
                groups = _solve_groups(stage, collected.inputs, kept, block_tokens, batchable)
                owners = assign_layers(ranks, stage)
                groups = own_groups(ranks, owners, groups)  # the solves this process does
                bar.update(len(stage) - sum(len(group) for group in groups))  # routers, unreadable experts, others'
                stage_first = len(result.layers)
                for group in groups:
                    bar.set_postfix_str(f"block {index}: {_short(group[0].layer.name)}"
                                        + (f" ×{len(group)}" if len(group) > 1 else ""))
                    tick = device_clock(device)
                    records = _prune_group(group, layer_solver, fallback_solver, pattern, patterns, crosses, device,
                                           collected.block_crosses)
                    seconds = device_clock(device) - tick
                    for record in records:
                        record["seconds"] = seconds / len(records)  # a batch's time, shared by its layers
                        if budget is not None:
                            record["target"] = budget.counts[record["name"]] / math.prod(record["shape"])
                    timings["solve"] += seconds
                    result.layers.extend(records)
                    bar.update(len(group))
                # Every process holds the stage's pruned weights before the next stage's inputs are read.
                result.layers[stage_first:] = share_solved(ranks, stage, owners, result.layers[stage_first:])

            if progress and len(result.layers) > first_record:
                errors = ", ".join(f"{_short(r['name'])} {r['error']:.3g}" for r in result.layers[first_record:][:16])
                more = len(result.layers) - first_record - 16
                bar.write(f"block {index} relative errors: {errors}" + (f", … ({more} more)" if more > 0 else ""))

            if refiner is not None:
                tick = device_clock(device)
                context = BlockContext(index, block, layers, dense, block_call, hidden, device, pattern, layer_solver)
                result.blocks.append({"block": index, **refine_on_main(ranks, refiner, context, batch_indices)})
                timings["refine"] += device_clock(device) - tick

            if reconstruct is not None:  # the dense stream moves on first: its outputs are the targets
                tick = device_clock(device)
                dense_stream.finish_block(block_call, device)
                result.blocks.append({"block": index, "reconstruct": _reconstruct(
                    ranks, block, layers, result.layers[first_record:], block_call, hidden, dense_stream.hidden,
                    reconstruct, device, index, batch_indices, -(-len(calibration) // batch_size))})
                timings["reconstruct"] = timings.get("reconstruct", 0.0) + device_clock(device) - tick

            tick = device_clock(device)
            with torch.no_grad():
                for j, h in enumerate(hidden):
                    hidden[j] = block_call.call(block, j, h.to(device), device).to(store_device)
            if dense_stream is not None and reconstruct is None:
                dense_stream.finish_block(block_call, device)
            timings["propagate"] += device_clock(device) - tick
            block.to(home)
            if store.streams:  # measured now: the block is freed once it is written
                verify_sparsity(result.layers[first_record:], pattern, {layer.name: layer for layer in layers},
                                budget.counts if budget is not None else None, whole_model=False)
            store.save(index, block, {"layers": result.layers[first_record:], "routers": sorted(routers),
                                      "selectors": sorted(selectors),
                                      "block_target": block_entry,
                                      "problems": collected.problems, "blocks": result.blocks[first_block_record:]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if progress and index == 0 and len(blocks) > 1:
                # Every block does about the same work, so the first one predicts the whole run.
                first = device_clock(device) - start
                bar.write(f"block 0 took {format_duration(first)}: expect about {format_duration(first * len(blocks))} "
                          f"for all {len(blocks)} blocks")
        bar.close()
        ranks.check(what="finishing the last block")

    # Streamed blocks were measured before they were written and freed; their records are checked here.
    verify_sparsity(result.layers, pattern,
                    {layer.name: layer for layers in plan for layer in layers if not layer.stored().is_meta},
                    budget.counts if budget is not None else None)
    pruned = {r["name"] for r in result.layers}
    result.kept_dense, result.block_weights = kept_dense_weights(blocks_name, blocks, plan, pruned, set(result.routers),
                                                                 set(result.selectors), skip or [], problems)
    result.unpruned = [entry for entry in result.kept_dense if DenseReason(entry["kind"]) not in EXPECTED]
    no_signal = [r for r in result.layers if r.get("fallback", "").startswith(NO_SIGNAL)]
    if no_signal and ranks.is_main:
        shown = ", ".join(f"{r['name']} ({r['tokens']} tokens)" for r in no_signal[:6])
        more = f" and {len(no_signal) - 6} more (see the report)" if len(no_signal) > 6 else ""
        print(f"lmprune: warning: {len(no_signal)} layer(s) without calibration signal got a magnitude mask, kept "
              f"weights unchanged: {shown}{more}", file=sys.stderr)
    missed = result.block_targets.get("not_applied", {})
    if missed and ranks.is_main:
        first = next(iter(missed.items()))
        print(f"lmprune: warning: block targets did not apply in {len(missed)} block(s), which kept plain dense "
              f"targets (block {first[0]}: {first[1]}; all in the report)", file=sys.stderr)
    if result.unpruned and ranks.is_main:
        shown = ", ".join(f"{u['name']} ({u['reason']})" for u in result.unpruned[:6])
        more = f" and {len(result.unpruned) - 6} more (see the report)" if len(result.unpruned) > 6 else ""
        print(f"lmprune: warning: {len(result.unpruned)} block weight(s) left dense: {shown}{more}", file=sys.stderr)
    timings["total"] = device_clock(device) - start
    result.timings = timings
    return result


def _reconstruct(ranks: Ranks, block: nn.Module, layers: list[PrunableLayer], records: list[dict[str, Any]],
                 call: BlockCall, hidden, targets, settings: ReconstructSettings, device: torch.device, index: int,
                 batch_indices: list[int], total_batches: int) -> dict[str, Any]:
    """--reconstruct block on the block's layers the method pruned (a layer given the magnitude fallback keeps
    its weights, as its record says); every rank ends with rank 0's weights."""
    solved = {r["name"] for r in records if "fallback" not in r}
    fitted = [layer for layer in layers if layer.name in solved]
    record = reconstruct_block(block, fitted, call, hidden, targets, settings, device, index, batch_indices,
                               total_batches, lambda sums: ranks.all_reduce_sum(sums, "summing reconstruction gradients"))
    # The reduced gradients are the same bits on every rank; the copy makes identical weights a fact.
    ranks.broadcast_tensors([layer.stored() for layer in fitted], 0, "sharing the reconstructed block")
    return record


def _replay_block(records: dict[str, Any], result: PruneResult, problems: dict[str, str]) -> None:
    """A finished block's report records, as the run that pruned it made them."""
    result.layers.extend(records["layers"])
    result.routers.extend(records["routers"])
    result.selectors.extend(records.get("selectors", []))
    result.blocks.extend(records["blocks"])
    problems.update(records["problems"])
    if records.get("block_target"):
        _note_block_target(result, records["block_target"])


def _block_patterns(budget: SparsityBudget | None, index: int, layers: list[PrunableLayer], kept: set[str],
                    problems: dict[str, str], plan: list[list[PrunableLayer]]) -> dict[str, SparsityPattern]:
    """Each pruned layer's own pattern in block `index` under a non-uniform allocation (none: uniform).

    Routers, selectors (`kept`) and unreadable expert tensors are not pruned and take no share."""
    if budget is None:
        return {}
    pruned_here = [layer for layer in layers if not _is_router(layer, kept)
                   and not (isinstance(layer, ExpertSlice) and _fused_name(layer) in problems)]
    return budget.layer_patterns(index, pruned_here, last=index == max(i for i, p in enumerate(plan) if p))


def _allocate(allocation: Allocation, pattern: SparsityPattern, blocks, plan, calls, hidden, device,
              result: PruneResult, ranks: Ranks = SINGLE) -> SparsityBudget | None:
    """Block sparsities for a non-uniform allocation (OWL: one dense forward first), as an exact budget."""
    if allocation.uniform:
        return None
    sizes = [sum(layer.numel() for layer in layers) for layers in plan]
    info = allocation.settings()
    if allocation.kind == "owl":
        ratios = dense_outlier_ratios(blocks, plan, calls, hidden, device, allocation.owl_m,
                                      all_reduce_sum=lambda sums: ranks.all_reduce_sum(sums, "summing OWL's input norms"))
        sparsities = owl_sparsities(pattern.sparsity, sizes, ratios, allocation.owl_lambda)
        info["outlier_ratios"] = ratios
    else:
        info["depth_slope"] = allocation.slope_for(pattern.sparsity)
        sparsities = depth_sparsities(pattern.sparsity, sizes, info["depth_slope"])
    info["block_sparsities"] = sparsities
    result.allocation = info
    return SparsityBudget(pattern.sparsity, sparsities, per_row=pattern.per_row)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def format_duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def _is_router(layer: PrunableLayer, routers: set[str]) -> bool:
    return any(name in routers for name in layer.param_names())


@contextlib.contextmanager
def _eager_experts(model: nn.Module):
    """Run experts with transformers' reference (eager) implementation while pruning.

    Its per-expert products are what the expert tap reads; the fused kernels (grouped_mm, …) compute the
    same function in one opaque call. Restored afterwards, so the saved config is the user's.
    """
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    changed = []
    for config in configs.values():
        current = getattr(config, "_experts_implementation", None)
        if current not in (None, "eager"):
            changed.append((config, current))
            config._experts_implementation = "eager"
    try:
        yield
    finally:
        for config, value in changed:
            config._experts_implementation = value


@dataclass
class CollectedInputs:
    inputs: dict[str, LayerInputs]
    routers: set[str]
    problems: dict[str, str]  # fused tensor name -> why it could not be read (not pruned)
    crosses: dict[str, torch.Tensor] = field(default_factory=dict)  # --dense-targets: X_pᵀX_d per hooked layer
    block_crosses: dict[str, torch.Tensor] = field(default_factory=dict)  # --block-targets: X_pᵀ(R_d − R_p)
    selectors: set[str] = field(default_factory=set)  # weights whose selection chooses tokens, not experts


def _collect_grams(block: nn.Module, prefix: str, layers: list[PrunableLayer], call: BlockCall, hidden,
                   device, with_stats: bool = False, moe_calibration: str = "routed",
                   stop_early: bool = False, dense: DenseStream | None = None,
                   block_target: tuple[str, float] | None = None) -> CollectedInputs:
    """Run the block on every batch, adding each layer's XᵀX (float32) to a running sum, and, `with_stats`,
    the sum of its inputs (for solvers that need the mean). Also finds the block's routers (first batch).

    Linear layers are read by forward hooks. Layers fed the very same tensor in a call (q/k/v, gate/up)
    share its product: it is computed once per batch and added to each of their sums. Checked per call,
    so it is exact for any model. Expert slices of fused tensors are read by the block tracer.
    `stop_early` (hooked layers only): after the first batch, which runs whole to find the routers, a
    batch's forward ends once every hooked layer has read its input.
    `dense` (--dense-targets): each batch first runs the block's dense copy on the dense stream, and each
    hooked layer also adds X_pᵀX_d, with X_p the very input its Gram reads.
    `block_target` (name, α) (--block-targets): that layer also adds X_pᵀ(R_d − R_p), R = Y/α − O from the
    block's output Y and the layer's output O, dense and pruned; its passes then run whole.
    """
    linear = [layer for layer in layers if not isinstance(layer, ExpertSlice)]
    experts = [layer for layer in layers if isinstance(layer, ExpertSlice)]
    grams = {layer.name: torch.zeros(layer.in_features, layer.in_features, device=device) for layer in linear}
    totals = {layer.name: torch.zeros(layer.in_features, device=device) for layer in linear} if with_stats else {}
    tokens = dict.fromkeys(grams, 0)
    signal = dict.fromkeys(grams, 0)  # tokens whose input row is not all zero
    products: dict[int, tuple] = {}  # id(input) -> (input, XᵀX, Σx, token count, float32 rows if dense) this call
    fired: set[str] = set()  # hooked layers that read their input this call
    batch = [0]
    crosses = {name: torch.zeros_like(gram) for name, gram in grams.items()} if dense is not None else {}
    dense_inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    cross_products: dict[tuple[int, int], tuple] = {}  # (id(X_p), id(X_d)) -> (X_p, X_d, X_pᵀX_d) this call
    block_crosses, target_reads = {}, {}  # target_reads: the target layer's float32 input rows and output, this call
    if block_target is not None:
        target_layer = next(layer for layer in linear if layer.name == block_target[0])
        block_crosses[target_layer.name] = torch.zeros(target_layer.in_features, target_layer.out_features,
                                                       device=device)
        stop_early = False  # the block's output is needed

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0]  # the caller's object itself: a detached view would be a new one per layer
            seen = products.get(id(x))
            if seen is None or seen[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                total = flat.sum(0) if with_stats else None
                seen = products[id(x)] = (x, flat.t() @ flat, total, flat.shape[0], flat if dense is not None else None,
                                          int(flat.ne(0).any(1).sum()))
            grams[name].add_(seen[1])
            if dense is not None:
                dense_x, dense_flat = dense_inputs[name]
                key = (id(x), id(dense_x))
                cross = cross_products.get(key)
                if cross is None or cross[0] is not x or cross[1] is not dense_x:
                    cross = cross_products[key] = (x, dense_x, seen[4].t() @ dense_flat)
                crosses[name].add_(cross[2])
            if name in block_crosses:
                target_reads.update(rows=seen[4], output=output.detach())
            tokens[name] += seen[3]
            if with_stats:
                totals[name].add_(seen[2])
            fired.add(name)
            signal[name] += seen[5]
            if stop_early and batch[0] > 0 and len(fired) == len(grams):
                raise GroupDone

        return hook

    fused_modules = {id(layer.module): layer.module for layer in experts}
    fused = {_fused_name(layer): layer.param for layer in experts}
    params = {f"{prefix}.{name}": p for name, p in block.named_parameters() if p.dim() >= 2}
    # A router chooses experts: a block without any (no expert tensor, no module counting experts, no list
    # of modules such as Linear experts) has none.
    routes = bool(experts) or any(expert_count(m) or (isinstance(m, nn.ModuleList) and len(m) > 1)
                                  for m in block.modules())
    tracer = BlockTracer(fused, params, device, with_stats, routes)
    tracer.collect_experts = moe_calibration == "routed"
    handles = [layer.module.register_forward_hook(make_hook(layer.name)) for layer in linear]
    if moe_calibration == "all":
        handles += [m.register_forward_pre_hook(_all_experts_hook(tracer), with_kwargs=True)
                    for m in fused_modules.values()]
    try:
        with torch.no_grad():
            for j, h in enumerate(hidden):
                # The tracer costs Python work on every torch call: it watches only the first batch (routers)
                # and, in blocks with fused experts, every batch (their Grams).
                watched = j == 0 or bool(fused)
                if j == 0:
                    tracer.start_router_trace()
                batch[0] = j
                if dense is not None:
                    dense_inputs = dense.batch_inputs(prefix, linear, call, j, device, stop_early,
                                                      block_target[0] if block_target is not None else None)
                try:
                    with tracer if watched else contextlib.nullcontext():
                        output = call.call(block, j, h.to(device), device)
                except GroupDone:
                    pass
                if block_target is not None:
                    name, alpha = block_target
                    width = output.shape[-1]  # rows of tokens: a layer may see them flattened (OPT)
                    dense_output, dense_layer_output = dense.outputs
                    residual_d = (dense_output.float().reshape(-1, width) / alpha
                                  - dense_layer_output.float().reshape(-1, width))
                    residual_p = output.float().reshape(-1, width) / alpha - target_reads["output"].float().reshape(-1, width)
                    block_crosses[name].add_(target_reads["rows"].t() @ (residual_d - residual_p))
                    target_reads.clear()
                if j == 0:
                    tracer.stop_router_trace()
                products.clear()
                fired.clear()
                cross_products.clear()
    finally:
        for handle in handles:
            handle.remove()

    inputs = {name: LayerInputs(H, InputStats(totals[name], tokens[name]) if with_stats else None, tokens[name],
                                signal[name])
              for name, H in grams.items()}
    problems = {}
    for layer in experts:
        seen = tracer.fused[_fused_name(layer)]
        if seen.transposed is None and not seen.problem:
            # Not one product of any of its experts was read: its use is unknown, so it cannot be pruned.
            seen.problem = "never multiplied by its experts' inputs in a way lmprune can read"
        if seen.problem:
            problems[seen.name] = seen.problem
            continue
        if seen.transposed is not None:
            layer.transposed = seen.transposed  # the model's own product decides the storage order
        sums = seen.sums.pop(layer.expert, None)
        if sums is None:
            width = layer.in_features
            inputs[layer.name] = LayerInputs(torch.zeros(width, width, device=device),
                                             InputStats(torch.zeros(width, device=device), 0) if with_stats else None, 0)
        else:
            inputs[layer.name] = LayerInputs(sums.gram, InputStats(sums.total, sums.tokens) if with_stats else None,
                                             sums.tokens)
    return CollectedInputs(inputs, tracer.routers, problems, crosses, block_crosses, tracer.selectors)


def _block_target(ranks, block: nn.Module, index: int, stage: list[PrunableLayer], call: BlockCall, hidden,
                  device: torch.device, result: PruneResult) -> tuple[tuple[str, float] | None, dict[str, Any]]:
    """--block-targets: (the layer, α) if the block's last stage is one hooked layer whose output reaches the
    block's output by a fixed scale α (read by rank 0 and shared), else None; and the block's report entry."""
    layer = stage[0]
    if len(stage) != 1 or isinstance(layer, ExpertSlice):
        found = None, f"its last group is {len(stage)} layers, not one" if len(stage) != 1 else "fused experts"
    else:
        found = output_scale(block, layer, call, hidden[0], device) if ranks.is_main else None
    alpha, why = ranks.broadcast_object(found, "sharing the block's output scale")
    entry = {"block": index, "layer": layer.name, "scale": alpha} if alpha is not None else {"block": index, "why": why}
    _note_block_target(result, entry)
    return ((layer.name, alpha) if alpha is not None else None), entry


def _note_block_target(result: PruneResult, entry: dict[str, Any]) -> None:
    """Add a block's entry to the report: the layers that took block targets (with α where not 1), or why not."""
    info = result.block_targets
    if entry.get("scale") is None:
        info.setdefault("not_applied", {})[str(entry["block"])] = entry["why"]
        return
    info.setdefault("layers", []).append(entry["layer"])
    if entry["scale"] != 1.0:
        info.setdefault("scales", {})[entry["layer"]] = entry["scale"]


def _fused_name(layer: ExpertSlice) -> str:
    return layer.name.rsplit("[", 1)[0]


def _all_experts_hook(tracer: BlockTracer):
    """--moe-calibration all: before the experts run on their routed tokens, run every token through every
    expert once, with the tracer collecting; the routed call that follows is not collected."""

    def hook(module, args, kwargs):
        params = list(args) + list(kwargs.values())
        if len(params) < 3 or not (isinstance(params[1], torch.Tensor) and not params[1].is_floating_point()):
            raise LmpruneError(
                f"--moe-calibration all needs experts called as (hidden states, top-k indices, top-k weights); "
                f"{type(module).__name__} is not: use --moe-calibration routed")
        x, index, weights = params[0], params[1], params[2]
        tokens = x.reshape(-1, x.shape[-1]).shape[0]
        count = module_experts(module)
        every = torch.arange(count, device=index.device).expand(tokens, count).contiguous()
        ones = torch.ones(tokens, count, dtype=weights.dtype, device=weights.device)
        tracer.collect_experts = True
        try:
            module.forward(x, every, ones)
        finally:
            tracer.collect_experts = False

    return hook


def module_experts(module: nn.Module) -> int:
    count = expert_count(module)
    if count is None:
        raise LmpruneError(f"cannot tell how many experts {type(module).__name__} holds")
    return count


def kept_dense_weights(blocks_name: str, blocks: nn.ModuleList, plan: list[list[PrunableLayer]], pruned: set[str],
                       routers: set[str], selectors: set[str], skip: list[str],
                       problems: dict[str, str]) -> tuple[list[dict[str, Any]], int]:
    """Every ≥2-D block weight (or the experts of one) no pruned layer covers, each with its reason from the
    closed list (dense_reasons.py); and the number of all ≥2-D block weights.

    Biases (fused ones are 2-D) are never pruned, and counted nowhere.
    """
    patterns = [re.compile(s) for s in skip]
    covered: dict[int, set] = {}
    skipped: dict[int, set] = {}
    planned = {layer.name for layers in plan for layer in layers}
    for layers in plan:
        for layer in layers:
            for param, expert in layer.parameters():
                target = covered if layer.name in pruned else skipped
                target.setdefault(id(param), set()).add(expert)
    out, total = [], 0
    for index, block in enumerate(blocks):
        for name, p in block.named_parameters():
            full = f"{blocks_name}.{index}.{name}"
            if p.dim() < 2 or "bias" in name.rsplit(".", 1)[-1]:
                continue
            total += p.numel()
            done = covered.get(id(p), set())
            if None in done:
                continue
            kept = p.numel() if p.dim() < 3 or not done else p.numel() // p.shape[0] * (p.shape[0] - len(done))
            if kept == 0:
                continue
            owner = full.rsplit(".", 1)[0]
            if full in routers:
                kind = DenseReason.ROUTER
                reason = ("a one-output gate in a block that routes (a shared expert's)" if p.shape[0] == 1
                          else "its top-k chooses the experts tokens go to")
            elif full in selectors:
                kind, reason = DenseReason.SELECTOR, "its top-k chooses tokens, not experts"
            elif any(pt.search(owner) or pt.search(full) for pt in patterns):
                kind, reason = DenseReason.SKIPPED, "--skip"
            elif full in problems:
                kind, reason = DenseReason.UNREADABLE_EXPERTS, f"expert tensor {problems[full]}"
            elif id(p) in skipped or owner in planned:
                kind, reason = DenseReason.OTHER, "not pruned"
            else:
                module = _owner(block, name)
                kind = reason_for_module(module)
                reason = f"a {p.dim()}-D {type(module).__name__} weight lmprune cannot prune"
            out.append({"name": full, "shape": list(p.shape), "weights": kept, "kind": kind.value, "reason": reason})
    return out, total


def _owner(block: nn.Module, param_name: str) -> nn.Module:
    path = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return block.get_submodule(path) if path else block


@dataclass
class _Solve:
    """One layer's solve: its inputs, and why the magnitude fallback replaces the method (if it does)."""

    layer: PrunableLayer
    inputs: LayerInputs
    fallback: str | None


def _solve_groups(layers: list[PrunableLayer], inputs: dict[str, LayerInputs], routers: set[str],
                  block_tokens: int, batchable: bool) -> list[list[_Solve]]:
    """The block's solves in order, the experts of one fused tensor grouped when the solver can batch them.

    Routers and layers without inputs (unreadable expert tensors, reported later) are left out.
    """
    groups: list[list[_Solve]] = []
    batches: dict[str, list[_Solve]] = {}
    for layer in layers:
        got = inputs.pop(layer.name, None)
        if _is_router(layer, routers) or got is None:
            continue  # routers stay dense; unreadable expert tensors are reported by unpruned_weights
        fallback = None
        if got.signal < block_tokens and got.signal < layer.in_features:
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
        solve = _Solve(layer, got, fallback)
        if batchable and fallback is None and isinstance(layer, ExpertSlice):
            fused = _fused_name(layer)
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


def _prune_group(group: list[_Solve], layer_solver: LayerSolver, fallback_solver: LayerSolver,
                 pattern: SparsityPattern, patterns: dict[str, SparsityPattern], crosses: dict[str, torch.Tensor],
                 device: torch.device, block_crosses: dict[str, torch.Tensor] | None = None) -> list[dict[str, Any]]:
    """Prune the layers of a group (one layer, or experts of one fused tensor solved in batches).

    `patterns`: each layer's own target where an allocation gives one; `crosses` (--dense-targets): X_pᵀX_d,
    so the solver fits W′, the dense outputs seen through the pruned inputs; `block_crosses`
    (--block-targets): the block's output term of its last layer.
    """
    targets = {patterns.get(solve.layer.name, pattern) for solve in group}
    if len(group) > 1 and (len(targets) > 1 or any(solve.layer.name in crosses for solve in group)):
        # An allocation can give the experts of one tensor different counts: one pattern per batch only.
        return [record for solve in group
                for record in _prune_group([solve], layer_solver, fallback_solver, pattern, patterns, crosses, device,
                                           block_crosses)]
    pattern = targets.pop()
    if len(group) == 1:
        solve = group[0]
        solver = fallback_solver if solve.fallback else layer_solver
        W = solve.layer.get_weight(device)
        require_finite_gram(solve.layer.name, solve.inputs.gram)
        cross = crosses.get(solve.layer.name) if solver is layer_solver else None
        if cross is not None:
            W = dense_target(W, solve.inputs.gram, cross, (block_crosses or {}).get(solve.layer.name))
        record = _write_back(solve.layer, W, solve.inputs, solver(W, solve.inputs.gram, pattern, solve.inputs.stats),
                             pattern)
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
        records += [_write_back(solve.layer, W[j], solve.inputs, solved[j], pattern) for j, solve in enumerate(batch)]
    return records


def _write_back(layer: PrunableLayer, W: torch.Tensor, inputs: LayerInputs, solved: SolverResult,
                pattern: SparsityPattern) -> dict[str, Any]:
    """Check a layer's solved weights, write them into the model and describe the layer for the report."""
    H = inputs.gram
    weight, mask = solved.weight, solved.mask
    dense_zeros = layer.zeros()
    record: dict[str, Any] = {"name": layer.name, "shape": [layer.out_features, layer.in_features],
                              "dense_zeros": dense_zeros}
    weight, fallback = finite_layer_weight(layer.name, W, weight, mask)  # never NaN/Inf into a model
    allowed = pruned_count(layer.out_features, layer.in_features, pattern) + dense_zeros
    extra = int((weight.to(layer.stored().dtype) == 0).sum()) - allowed  # zeros as the layer will store them
    if extra > 0:
        # More zeros than the target prunes and the dense layer had: inputs never active in calibration
        # (their weights zeroed) or kept weights rounded to zero. Those weights may matter on other text.
        W = layer.get_weight(W.device)
        mask = topk_mask(W.abs(), pattern)
        weight = W * mask
        fallback = (f"the method left {extra} more zeros than the target and the dense zeros (inputs never "
                    "active in calibration): magnitude mask, kept weights unchanged")
    if fallback:
        record["fallback"] = fallback
    error_masked, error = relative_errors(W, [W * mask, weight], H)
    layer.set_weight(weight)
    record.update(
        tokens=inputs.tokens,
        sparsity=layer.zeros() / layer.numel(),
        error=error,
        error_masked=error_masked,
        **({"info": solved.info} if solved.info else {}),
    )
    return record
