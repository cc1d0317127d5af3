"""Block-by-block one-shot pruning: the block loop, which moves data and knows no lever.

    plan -> capture -> for each block: collect, solve, write back, propagate -> verify

Only the current block sits on the compute device; the calibration hidden states (hidden.py) stay where
`store_device` says. Every block is run with its own recorded call (model/calls.py). Collect (collect.py)
sums each layer's Gram matrix XᵀX while the block runs, and finds routers (never pruned) on the way; solve
(solve.py) prunes each layer with its method, or with magnitude where it lacks calibration signal. After a
block's layers are pruned it is re-run, so the next block is calibrated on the pruned model's outputs.

Levers (levers.py) take part at named points of the loop, each in its own module: the stages of
--sequential layer (sequential.py), dense and block targets (dense_targets.py), a non-uniform allocation
(allocation.py), a block refinement such as SparseLLM (refiners/), the ranks of a torchrun
(distributed.py). The block store (model/block_store.py) loads each block before its work and writes it
after; blocks a killed run finished take the same path, with their saved records instead of the solves.
Every ≥2-D block weight not pruned is listed with its reason (dense_reasons.py).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Allocated, Allocation
from .collect import MOE_CALIBRATION, CollectedInputs, LayerInputs, collect_inputs  # noqa: F401 (public seams)
from .config import ReconstructSettings, SparsityPattern
from .dense_reasons import EXPECTED, NO_SIGNAL, DenseReason, reason_for_module
from .dense_targets import DenseTargets
from .distributed import SINGLE, RankShare, Ranks
from .errors import LmpruneError
from .hidden import HiddenStates
from .levers import BlockStep, Lever, Levers
from .reconstruct import BlockReconstruction, check_reconstruct
from .log import logger
from .model import (
    PrunableLayer,
    device_clock,
    find_blocks,
    move_outside_blocks,
    prunable_layers,
    record_block_calls,
    text_config,
)
from .model.replay_guard import check_replay
from .model.block_store import BlockStore, first_of_each_class
from .refiners import BlockContext, BlockRefiner, Refinement  # noqa: F401 (BlockContext: public)
from .safety import verify_sparsity
from .sequential import block_stages, check_sequential
from .solve import LayerSolve, prune_group, solve_groups, statistics_read, write_back  # noqa: F401 (public seams)
from .solvers import LayerSolver, build_layer_solver

log = logger.getChild("pipeline")


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
    levers: list[Lever] = (),
    layer_errors: bool = False,
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

    `store` holds the blocks' weights when the model is streamed (model/block_store.py): it loads each block
    before its work and writes it out after; blocks a killed run finished are only re-run, to rebuild the
    next block's inputs. By default every block is in memory already.

    `levers`: more participants of the block loop (levers.py), after those the options ask for.

    Each layer's collection sums only what its method reads (statistics.py), more where a lever needs XᵀX;
    `layer_errors` collects XᵀX for every method, so that each layer reports its relative error.
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
    if reconstruct is not None:
        check_reconstruct(plan)
    store = store or BlockStore()
    chosen = build_levers(plan, ranks, allocation, pattern, dense_targets, block_targets, sequential, store,
                          dense_stream=reconstruct is not None)
    batches, batch_indices = ranks.shard(calibration, batch_size)
    if refiner is not None:
        chosen.levers.append(Refinement(refiner, layer_solver, pattern, ranks, batch_indices))
    if reconstruct is not None:  # after any block refinement: it fits the block as finally pruned
        dense = next(lever for lever in chosen.levers if isinstance(lever, DenseTargets))
        chosen.levers.append(BlockReconstruction(reconstruct, dense, ranks, batch_indices,
                                                 -(-len(calibration) // batch_size)))
    chosen.levers.extend(levers)
    loop = BlockLoop(model, plan, batches, layer_solver, pattern, device, store_device or device, store, ranks,
                     chosen, sequential, moe_calibration, progress, full_gram=layer_errors or chosen.need_gram())
    result = loop.run()
    report_dense(result, plan, loop, skip or [])
    return result


def build_levers(plan: list[list[PrunableLayer]], ranks: Ranks, allocation: Allocation, pattern: SparsityPattern,
                 dense_targets: bool, block_targets: bool, sequential: str, store: BlockStore,
                 dense_stream: bool = False) -> Levers:
    """The levers the options ask for, in the order they take part at each point (the ranks first), each
    checked on the plan."""
    levers: list[Lever] = []
    if ranks.active:
        levers.append(RankShare(ranks))
    if not allocation.uniform:
        levers.append(Allocated(allocation, pattern, ranks))
    if dense_targets or dense_stream:  # dense_stream: the dense model beside the pruned one, for another lever
        levers.append(DenseTargets(ranks, block_targets, layer_targets=dense_targets))
    levers = Levers(levers)
    levers.check(plan)
    if block_targets and not (dense_targets and sequential == "layer"):
        raise LmpruneError("--block-targets needs --dense-targets and --sequential layer (--best-quality sets all three)")
    if allocation.kind == "owl" and store.streams:
        # OWL's dense pre-pass reads every block before the first is pruned.
        raise LmpruneError("--allocation owl does not combine with --stream yet: use depth or uniform")
    return levers


class BlockLoop:
    """One pruning: the calls captured, then every block collected, solved, written back and propagated."""

    def __init__(self, model, plan, batches, layer_solver, pattern, device, store_device, store, ranks, levers,
                 sequential, moe_calibration, progress, full_gram=True):
        self.model, self.plan, self.batches = model, plan, batches
        self.layer_solver, self.fallback_solver = layer_solver, build_layer_solver("magnitude")
        self.pattern, self.device, self.store_device = pattern, device, store_device
        self.store, self.ranks, self.levers = store, ranks, levers
        self.sequential, self.moe_calibration, self.progress = sequential, moe_calibration, progress
        self.full_gram = full_gram  # XᵀX collected whatever the method reads (statistics.py)
        self.blocks_name, self.blocks = find_blocks(model)
        self.home = next(model.parameters()).device
        self.result = PruneResult()
        self.timings = {"capture": 0.0, "gram_forward": 0.0, "solve": 0.0, "propagate": 0.0, "refine": 0.0}
        self.problems: dict[str, str] = {}
        self.expected_counts: dict[str, int] | None = None  # each layer's prune count, where not uniform

    def run(self) -> PruneResult:
        self.start = device_clock(self.device)
        with _eager_experts(self.model):
            self.capture()
            tick = device_clock(self.device)
            self.levers.begin(self)
            self.timings["allocation"] = device_clock(self.device) - tick
            # Rank 0 owns a streamed run's partial output: it says where a killed run stopped.
            resume_from = self.ranks.broadcast_object(self.store.resume_from, "sharing where the killed run stopped")
            self.bar = tqdm(total=sum(len(p) for p in self.plan), desc="pruning", unit="layer",
                            disable=not self.progress)
            for index, (block, layers) in enumerate(zip(self.blocks, self.plan)):
                step = BlockStep(index, f"{self.blocks_name}.{index}", block, layers, self.calls.for_block(index),
                                 resumed=index < resume_from)
                self.block(step)
            self.bar.close()
            self.ranks.check(what="finishing the last block")
        # Streamed blocks were measured before they were written and freed; their records are checked here.
        verify_sparsity(self.result.layers, self.pattern,
                        {layer.name: layer for layers in self.plan for layer in layers if not layer.stored().is_meta},
                        self.expected_counts)
        self.timings["total"] = device_clock(self.device) - self.start
        self.result.timings = self.timings
        return self.result

    def capture(self) -> None:
        """Every block's call arguments and block 0's inputs, from one forward of the model per batch."""
        device = self.device
        move_outside_blocks(self.model, self.blocks_name, device)
        try:
            with self.store.loaded(first_of_each_class(self.blocks), self.blocks):
                self.calls = record_block_calls(self.model, self.blocks, self.batches, device, self.store_device)
            self.timings["capture"] = device_clock(device) - self.start
            if not self.store.streams:  # every rank checks its own first batch (model/replay_guard.py)
                check_replay(self.model, self.blocks, self.calls, self.batches[0], device, self.store_device)
                self.timings["replay_guard"] = device_clock(device) - self.start - self.timings["capture"]
        finally:
            move_outside_blocks(self.model, self.blocks_name, self.home)
        self.hidden = HiddenStates(self.calls.hidden, self.store_device)
        self.block_tokens = self.ranks.total(self.hidden.tokens())  # batch × sequence positions, all ranks

    def block(self, step: BlockStep) -> None:
        """Load, prune (or, finished by a killed run, replay), propagate, write out."""
        tick = device_clock(self.device)
        self.store.load(step.index, step.block)
        step.first_record, first_block_record = len(self.result.layers), len(self.result.blocks)
        if step.resumed:
            self.replay(step)
        step.block.to(self.device)
        self.levers.start_block(step)
        if not step.resumed:
            self.prune(step)
        propagating = device_clock(self.device)
        self.hidden.advance(step.block, step.call, self.device)
        self.levers.end_block(step)
        step.block.to(self.home)
        if step.resumed:
            self.store.release(step.index, step.block)
            self.bar.update(len(step.layers))
            self.timings["resume"] = self.timings.get("resume", 0.0) + device_clock(self.device) - tick
            return
        self.timings["propagate"] += device_clock(self.device) - propagating
        records = self.result.layers[step.first_record:]
        if self.store.streams:  # measured now: the block is freed once it is written
            verify_sparsity(records, self.pattern, {layer.name: layer for layer in step.layers},
                            self.expected_counts, whole_model=False)
        self.store.save(step.index, step.block, {
            "layers": records, "routers": sorted(step.routers), "selectors": sorted(step.selectors),
            **self.levers.record(step), "problems": step.problems, "blocks": self.result.blocks[first_block_record:]})
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.progress and step.index == 0 and len(self.blocks) > 1:
            # Every block does about the same work, so the first one predicts the whole run.
            first = device_clock(self.device) - self.start
            self.bar.write(f"block 0 took {format_duration(first)}: expect about "
                           f"{format_duration(first * len(self.blocks))} for all {len(self.blocks)} blocks")

    def replay(self, step: BlockStep) -> None:
        """A block a killed run pruned: its report records, as that run made them (rank 0 holds them)."""
        ranks = self.ranks
        records = ranks.broadcast_object(self.store.records(step.index) if ranks.is_main else None,
                                         "sharing a finished block's records")
        self.result.layers.extend(records["layers"])
        self.result.routers.extend(records["routers"])
        self.result.selectors.extend(records.get("selectors", []))
        self.result.blocks.extend(records["blocks"])
        self.problems.update(records["problems"])
        step.routers, step.selectors = set(records["routers"]), set(records.get("selectors", []))
        step.problems = self.problems
        self.levers.replay(step, records)
        self.levers.block_planned(step)

    def prune(self, step: BlockStep) -> None:
        """The block's layers, stage by stage: collect their inputs, solve, write back."""
        stages, stop_early = block_stages(self.sequential, step, self.hidden, self.device)
        retarget = self.levers.retargeting(step)
        for stage_index, stage in enumerate(stages):
            tick = device_clock(self.device)
            self.levers.start_stage(step, stage, stage_index == len(stages) - 1)
            collected = collect_inputs(step.block, step.prefix, stage, step.call, self.hidden, self.device,
                                       self.layer_solver.needs_input_stats, self.moe_calibration, stop_early,
                                       self.levers.reader(step, stage), statistics_read(self.layer_solver),
                                       self.full_gram)
            self.levers.collected(step, stage, collected)
            self.timings["gram_forward"] += device_clock(self.device) - tick
            if stage_index == 0:
                self.plan_block(step, collected)
            self.solve(step, stage, collected, retarget)
            # Freed before the next stage (or block) collects: an FFN down projection's Gram is as large as the
            # block's weights.
            collected = None
        shown = [r for r in self.result.layers[step.first_record:] if "error" in r]
        if self.progress and shown:
            errors = ", ".join(f"{_short(r['name'])} {r['error']:.3g}" for r in shown[:16])
            more = len(shown) - 16
            self.bar.write(f"block {step.index} relative errors: {errors}" + (f", … ({more} more)" if more > 0 else ""))
        self.levers.refine(step)

    def plan_block(self, step: BlockStep, collected: CollectedInputs) -> None:
        """The routers, selectors and unreadable tensors the first collection found: never pruned."""
        routers = set(collected.routers)
        if routers:
            # In a block that routes, a one-output layer is a gate (a shared expert's score per token).
            routers |= {n for layer in step.layers if layer.out_features == 1 for n in layer.param_names()}
        step.routers, step.selectors = routers, collected.selectors - routers
        self.result.routers.extend(sorted(step.routers))
        self.result.selectors.extend(sorted(step.selectors))
        step.problems = collected.problems
        self.problems.update(collected.problems)
        self.levers.block_planned(step)

    def solve(self, step: BlockStep, stage: list[PrunableLayer], collected: CollectedInputs, retarget) -> None:
        batchable = getattr(self.layer_solver, "solve_batch", None) is not None  # any callable may solve layers
        groups = solve_groups(stage, collected.inputs, step.kept, self.block_tokens, batchable)
        groups = self.levers.assign(step, stage, groups)  # the solves this process does
        self.bar.update(len(stage) - sum(len(group) for group in groups))  # routers, unreadable experts, others'
        stage_first = len(self.result.layers)
        for index, group in enumerate(groups):
            groups[index] = None  # its statistics are freed once it is solved: one layer's at a time
            self.bar.set_postfix_str(f"block {step.index}: {_short(group[0].layer.name)}"
                                     + (f" ×{len(group)}" if len(group) > 1 else ""))
            tick = device_clock(self.device)
            records = prune_group(group, self.layer_solver, self.fallback_solver, self.pattern, step.patterns,
                                  self.device, retarget, self.store.spill_dir)
            seconds = device_clock(self.device) - tick
            for record in records:
                record["seconds"] = seconds / len(records)  # a batch's time, shared by its layers
            self.timings["solve"] += seconds
            self.store.solved()
            self.result.layers.extend(records)
            self.bar.update(len(group))
        # Every process holds the stage's pruned weights before the next stage's inputs are read.
        self.result.layers[stage_first:] = self.levers.solved(step, stage, self.result.layers[stage_first:])


def report_dense(result: PruneResult, plan, loop: BlockLoop, skip: list[str]) -> None:
    """Every block weight not pruned, and why; warnings for what the user did not ask for."""
    pruned = {r["name"] for r in result.layers}
    result.kept_dense, result.block_weights = kept_dense_weights(loop.blocks_name, loop.blocks, plan, pruned,
                                                                 set(result.routers), set(result.selectors), skip,
                                                                 loop.problems)
    result.unpruned = [entry for entry in result.kept_dense if DenseReason(entry["kind"]) not in EXPECTED]
    no_signal = [r for r in result.layers if r.get("fallback", "").startswith(NO_SIGNAL)]
    if no_signal:
        shown = ", ".join(f"{r['name']} ({r['tokens']} tokens)" for r in no_signal[:6])
        more = f" and {len(no_signal) - 6} more (see the report)" if len(no_signal) > 6 else ""
        log.warning(f"warning: {len(no_signal)} layer(s) without calibration signal got a magnitude mask, "
                    f"kept weights unchanged: {shown}{more}")
    missed = result.block_targets.get("not_applied", {})
    if missed:
        first = next(iter(missed.items()))
        log.warning(f"warning: block targets did not apply in {len(missed)} block(s), which kept plain "
                    f"dense targets (block {first[0]}: {first[1]}; all in the report)")
    if result.unpruned:
        shown = ", ".join(f"{u['name']} ({u['reason']})" for u in result.unpruned[:6])
        more = f" and {len(result.unpruned) - 6} more (see the report)" if len(result.unpruned) > 6 else ""
        log.warning(f"warning: {len(result.unpruned)} block weight(s) left dense: {shown}{more}")


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def format_duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


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
