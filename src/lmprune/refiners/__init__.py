"""Block-level methods: they refine a whole block after its layers were pruned one by one.

`Refinement` is the block loop's lever for them (levers.py): it keeps the block's dense weights before the
layer-wise pass and runs the refiner on the pruned block before it is propagated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..config import SparsityPattern
from ..distributed import Ranks, refine_on_main
from ..levers import Lever
from ..model import BlockCall, PrunableLayer, device_clock
from ..solvers import LayerSolver


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


BlockRefiner = Callable[[BlockContext], dict[str, Any]]


class Refinement(Lever):
    """--method sparsellm's block refinement as a lever of the block loop."""

    def __init__(self, refiner: BlockRefiner, layer_solver: LayerSolver, pattern: SparsityPattern, ranks: Ranks,
                 batch_indices: list[int]):
        self.refiner = refiner
        self.layer_solver = layer_solver
        self.pattern = pattern
        self.ranks = ranks
        self.batch_indices = batch_indices
        self.dense: dict[str, torch.Tensor] = {}

    def begin(self, run) -> None:
        self.run = run

    def start_block(self, step) -> None:
        if not step.resumed:
            self.dense = {layer.name: layer.get_weight(torch.device("cpu")) for layer in step.layers}

    def refine(self, step) -> None:
        run = self.run
        tick = device_clock(run.device)
        context = BlockContext(step.index, step.block, step.layers, self.dense, step.call, run.hidden.tensors,
                               run.device, self.pattern, self.layer_solver)
        run.result.blocks.append({"block": step.index,
                                  **refine_on_main(self.ranks, self.refiner, context, self.batch_indices)})
        self.dense = {}
        run.timings["refine"] += device_clock(run.device) - tick
