"""The named points of the block loop (pipeline.py) at which levers take part, and what they see there.

A lever is a participant with its own state, in its own module: dense and block targets
(dense_targets.py), a non-uniform allocation (allocation.py), the SparseLLM block refinement
(refiners/), the ranks of a torchrun (distributed.py). The loop calls every lever's method at each point,
in the order the levers were given; a method a lever does not define does nothing. Adding a lever is a new
module with its class plus its place in `pipeline.build_levers` (or `prune_model(levers=[...])`), never an
edit of the loop: dense targets (dense_targets.py) live entirely in their module this way.

Points, in the order a block meets them:
  check(plan)                      before any work: refuse what the lever cannot do on this model
  begin(run)                       the calls are captured, no block is pruned yet
  start_block(step)                the block is loaded and on the compute device (also a finished one)
  replay(step, records)            a block a killed run finished: its saved records are back
  block_planned(step)              the block's routers, selectors and unreadable tensors are known
  start_stage(step, stage, last)   a group of layers is about to be collected
  reader(step, stage)              a BatchReader that reads that collection pass too (collect.py), or None
  collected(step, stage, inputs)   the stage's statistics are summed
  assign(step, stage, groups)      the solves this process does
  retarget(step, solve, W)         the weight a layer's method fits (each solve)
  solved(step, stage, records)     the stage's layers are written back; returns the stage's records
  refine(step)                     every layer of the block is pruned, before it is propagated
  end_block(step)                  the block's outputs are the next block's inputs
  record(step)                     what the store keeps for a resumed run (dict entries)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import SparsityPattern
from .model import BlockCall, PrunableLayer


@dataclass
class BlockStep:
    """One block's pass through the loop: what every point sees about the block."""

    index: int
    prefix: str  # the block's module name, e.g. model.layers.3
    block: nn.Module
    layers: list[PrunableLayer]
    call: BlockCall
    resumed: bool  # finished by a killed run: only propagated
    routers: set[str] = field(default_factory=set)
    selectors: set[str] = field(default_factory=set)
    problems: dict[str, str] = field(default_factory=dict)  # unreadable fused tensors
    patterns: dict[str, SparsityPattern] = field(default_factory=dict)  # a layer's own target (allocation)
    first_record: int = 0  # where the block's layer records start in the result

    @property
    def kept(self) -> set[str]:
        """Weights never pruned: the routers and selectors."""
        return self.routers | self.selectors


class Lever:
    """A participant of the block loop; see the module docstring for the points."""

    # Whether the lever reads each layer's whole XᵀX at the solve (LayerSolve.inputs.gram), whatever the
    # method reads (statistics.py).
    needs_gram = False

    def check(self, plan: list[list[PrunableLayer]]) -> None: ...

    def begin(self, run) -> None: ...

    def start_block(self, step: BlockStep) -> None: ...

    def replay(self, step: BlockStep, records: dict[str, Any]) -> None: ...

    def block_planned(self, step: BlockStep) -> None: ...

    def start_stage(self, step: BlockStep, stage: list[PrunableLayer], last: bool) -> None: ...

    def reader(self, step: BlockStep, stage: list[PrunableLayer]):
        return None

    def collected(self, step: BlockStep, stage: list[PrunableLayer], collected) -> None: ...

    def assign(self, step: BlockStep, stage: list[PrunableLayer], groups: list[list]) -> list[list]:
        return groups

    def retarget(self, step: BlockStep, solve, W: torch.Tensor) -> torch.Tensor:
        return W

    def solved(self, step: BlockStep, stage: list[PrunableLayer], records: list[dict]) -> list[dict]:
        return records

    def refine(self, step: BlockStep) -> None: ...

    def end_block(self, step: BlockStep) -> None: ...

    def record(self, step: BlockStep) -> dict[str, Any]:
        return {}


class Levers:
    """The levers of one run, called together at each point."""

    def __init__(self, levers: list[Lever]):
        self.levers = levers

    def __getattr__(self, point: str):
        """Every lever's `point`, in order (the points that return nothing)."""
        if point.startswith("_") or not hasattr(Lever, point):
            raise AttributeError(f"the block loop has no point {point!r}")
        methods = [getattr(lever, point) for lever in self.levers if _defines(lever, point)]

        def call(*args):
            for method in methods:
                method(*args)

        return call

    def need_gram(self) -> bool:
        return any(lever.needs_gram for lever in self.levers)

    def reader(self, step: BlockStep, stage: list[PrunableLayer]):
        readers = [r for lever in self.levers if (r := lever.reader(step, stage)) is not None]
        if len(readers) > 1:
            raise NotImplementedError("one batch reader per pass")
        return readers[0] if readers else None

    def assign(self, step: BlockStep, stage: list[PrunableLayer], groups: list[list]) -> list[list]:
        for lever in self.levers:
            groups = lever.assign(step, stage, groups)
        return groups

    def retargeting(self, step: BlockStep):
        """The solve point: each lever's retarget in turn, or None when no lever changes targets."""
        changing = [lever for lever in self.levers if _defines(lever, "retarget")]
        if not changing:
            return None

        def retarget(solve, W):
            for lever in changing:
                W = lever.retarget(step, solve, W)
            return W

        return retarget

    def solved(self, step: BlockStep, stage: list[PrunableLayer], records: list[dict]) -> list[dict]:
        for lever in self.levers:
            records = lever.solved(step, stage, records)
        return records

    def record(self, step: BlockStep) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for lever in self.levers:
            out.update(lever.record(step))
        return out


def _defines(lever: Lever, point: str) -> bool:
    return getattr(type(lever), point) is not getattr(Lever, point)
