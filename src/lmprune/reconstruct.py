"""--reconstruct block: after a block's layers are pruned, fit its kept weights to the dense block's output.

Layer-wise solves fit each layer's own (linear) output. Here the whole pruned block, through its attention
softmax and activations, is fitted to the dense block's output on the calibration tokens: minimise
‖B_p(X_p) − B_d(X_d)‖² over the pruned layers' kept weights with Adam, X_p the pruned model's inputs to the
block, B_d(X_d) the dense block's output (the dense stream that --dense-targets carries). The masks are held
fixed exactly: a pruned weight's gradient is zeroed and every step re-applies the mask, so zeros stay zeros
bit for bit and the sparsity pattern (N:M included) is the layer-wise one.

Each Adam step takes `batch` calibration windows, rounded to whole recorded batches, drawn without
replacement from a generator seeded by (seed, block index): the run is deterministic given the seed, and a
resumed run replays it bit for bit. Under torchrun every rank draws the same batch indices, computes the
gradient on the ones it holds, and the gradients are all-reduced (`all_reduce`), so every rank takes the same
step. The weights are float32 master copies; the block runs in its own dtype (the forward reads them cast).

Safety: the output error on all calibration tokens is measured before and after; if the fit made it worse,
or any gradient became NaN/Inf, the block keeps its layer-wise weights (the record says why).
Memory: the block, float32 masters of its pruned weights with Adam's two moments and gradients, and one
recorded batch's activations at a time (gradients are accumulated batch by batch).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Callable

import torch
from torch import nn

from .config import ReconstructSettings
from .errors import LmpruneError
from .levers import Lever
from .model import ExpertSlice, PrunableLayer
from .model.calls import BlockCall

class BlockReconstruction(Lever):
    """--reconstruct block as a lever of the block loop: at the end of each pruned block (after the layer
    solves and any block refinement, before propagation) the dense stream moves on first, and its outputs are
    the targets of the fit; every rank ends with rank 0's weights. `prune_model` runs `check_reconstruct` before
the levers are built, so that its refusal comes before the dense stream's. The record goes into the report's `blocks`,
    which a streamed run saves with the block, so a resumed run replays it with the block's saved weights."""

    def __init__(self, settings: ReconstructSettings, dense, ranks, batch_indices: list[int], total_batches: int):
        self.settings, self.dense, self.ranks = settings, dense, ranks
        self.batch_indices, self.total_batches = batch_indices, total_batches

    def begin(self, run):
        self.run = run

    def refine(self, step):
        from .model.devices import device_clock

        run = self.run
        tick = device_clock(run.device)
        targets = self.dense.advance_early(step)
        solved = {r["name"] for r in run.result.layers[step.first_record:] if "fallback" not in r}
        fitted = [layer for layer in step.layers if layer.name in solved]  # a magnitude fallback keeps its weights
        record = reconstruct_block(step.block, fitted, step.call, run.hidden.tensors, targets, self.settings,
                                   run.device, step.index, self.batch_indices, self.total_batches,
                                   lambda sums: self.ranks.all_reduce_sum(sums, "summing reconstruction gradients"))
        # The reduced gradients are the same bits on every rank; the copy makes identical weights a fact.
        self.ranks.broadcast_tensors([layer.stored() for layer in fitted], 0, "sharing the reconstructed block")
        run.result.blocks.append({"block": step.index, "reconstruct": record})
        run.timings["reconstruct"] = run.timings.get("reconstruct", 0.0) + device_clock(run.device) - tick


def check_reconstruct(plan: list[list[PrunableLayer]]) -> None:
    """Fused expert tensors are refused: the dense stream cannot run their blocks' dense copies' hooks (as for
    --dense-targets), and one expert's slice of a 3-D tensor is not a parameter to optimise on its own."""
    fused = next((layer.name for layers in plan for layer in layers if isinstance(layer, ExpertSlice)), None)
    if fused is not None:
        raise LmpruneError(f"--reconstruct block cannot optimise fused expert tensors ({fused}) yet: leave it out "
                           "for this model")


def reconstruct_block(block: nn.Module, layers: list[PrunableLayer], call: BlockCall, inputs: list[torch.Tensor],
                      targets: list[torch.Tensor], settings: ReconstructSettings, device: torch.device,
                      block_index: int = 0, batch_ids: list[int] | None = None, total_batches: int | None = None,
                      all_reduce: Callable[[list[torch.Tensor]], None] | None = None) -> dict[str, Any]:
    """Optimise the kept weights of `layers` (in `block`, on `device`) so that the block maps `inputs[j]` to
    `targets[j]`; masks (the zeros of each weight now) held fixed exactly. Writes the result into the layers.

    `batch_ids`: the global index of each local batch, `total_batches` the count over all ranks (one process:
    0..len−1); `all_reduce` sums float32/float64 tensors over the ranks in place. Returns the report's record.
    """
    problem = _Problem(block, layers, call, inputs, targets, device, all_reduce or (lambda tensors: None))
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:  # only the masters take gradients: no .grad is left on the model's own parameters
        p.requires_grad_(False)
    try:
        return _fit(problem, settings, block_index,
                    list(range(len(inputs))) if batch_ids is None else batch_ids,
                    len(inputs) if total_batches is None else total_batches)
    finally:
        for p in frozen:
            p.requires_grad_(True)


class _Problem:
    """A block, its pruned layers' float32 master weights and masks, and its calibration inputs and targets."""

    def __init__(self, block, layers, call, inputs, targets, device, reduce):
        self.block, self.layers, self.call, self.inputs, self.targets = block, layers, call, inputs, targets
        self.device, self.reduce = device, reduce
        self.originals = [layer.get_weight(device) for layer in layers]  # float32 [out, in]: the layer-wise result
        self.masks = [w != 0 for w in self.originals]
        self.masters = [w.clone().requires_grad_(True) for w in self.originals]
        self.names = [f"{_relative_name(block, layer)}.weight" for layer in layers]

    def run(self, j: int) -> torch.Tensor:
        """The block's output on batch j, with the masters as its pruned layers' weights (in their dtype)."""
        params = {name: (w.t() if layer.transposed else w).to(layer.stored().dtype)
                  for name, layer, w in zip(self.names, self.layers, self.masters)}
        return self.call.call(_WithWeights(self.block, params), j, self.inputs[j].to(self.device), self.device)

    def error(self) -> tuple[float, float]:
        """(Σ‖B_p(X_p) − Y_d‖², Σ‖Y_d‖²) over all ranks' calibration tokens, summed in float64."""
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for j in range(len(self.inputs)):
                target = self.targets[j].to(self.device).double()
                sums[0] += (self.run(j).double() - target).pow(2).sum()
                sums[1] += target.pow(2).sum()
        self.reduce([sums])
        return float(sums[0]), float(sums[1])

    def write(self, weights: list[torch.Tensor]) -> None:
        for layer, w in zip(self.layers, weights):
            layer.set_weight(w.detach())


def _fit(problem: _Problem, settings: ReconstructSettings, block_index: int, batch_ids: list[int],
         total_batches: int) -> dict[str, Any]:
    local = {g: j for j, g in enumerate(batch_ids)}
    masters, masks = problem.masters, problem.masks
    before, scale = problem.error()
    record: dict[str, Any] = {**asdict(settings), "layers": [layer.name for layer in problem.layers],
                              "error_before": before / max(scale, 1e-30)}
    if not masters or before == 0.0:
        record.update(error_after=record["error_before"], kept="layer-wise", why="nothing to fit")
        return record

    windows = problem.inputs[0].shape[0] if problem.inputs else 1  # per recorded batch (the last may hold fewer)
    per_step = min(total_batches, max(1, round(settings.batch / windows)))
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + block_index)
    optimizer = torch.optim.Adam(masters, lr=settings.lr)
    order: list[int] = []
    failed = None
    for step in range(settings.steps):
        if len(order) < per_step:  # a fresh pass over the batches, in a new order (the same on every rank)
            order += torch.randperm(total_batches, generator=generator).tolist()
        chosen, order = order[:per_step], order[per_step:]
        optimizer.zero_grad(set_to_none=False)
        count = torch.zeros(1, device=problem.device)
        for g in chosen:
            j = local.get(g)
            if j is None:  # another rank holds it
                continue
            target = problem.targets[j].to(problem.device).float()
            (problem.run(j).float() - target).pow(2).sum().backward()
            count += target.numel()
        grads = [w.grad for w in masters]
        flat = torch.cat([g.reshape(-1) for g in grads] + [count])
        problem.reduce([flat])  # one exchange per step: every rank then holds the same sum
        if not bool(torch.isfinite(flat).all()):
            failed = f"a gradient was not finite at step {step}"
            break
        offset = 0
        for g, mask in zip(grads, masks):
            g.copy_(flat[offset:offset + g.numel()].view_as(g) / flat[-1]).mul_(mask)
            offset += g.numel()
        for group in optimizer.param_groups:  # cosine decay to 0: the last steps settle instead of jitter
            group["lr"] = settings.lr * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        optimizer.step()
        with torch.no_grad():
            for w, mask in zip(masters, masks):
                w.mul_(mask)
    del optimizer

    if failed is None:
        problem.write(masters)
        after, _ = problem.error()
        lost = next((layer.name for layer, mask in zip(problem.layers, masks)
                     if int(mask.sum()) != layer.numel() - layer.zeros()), None)
        if not math.isfinite(after):
            failed = "the block's output was not finite"
        elif after > before:
            failed = "the fit raised the block's output error"
        elif lost is not None:  # a kept weight rounded to zero in the layer's dtype (float16 underflow)
            failed = f"kept weights of {lost} round to zero in its dtype"
    if failed is not None:
        problem.write(problem.originals)
        record.update(error_after=record["error_before"], kept="layer-wise", why=failed)
        return record
    record.update(error_after=after / max(scale, 1e-30), kept="reconstructed")
    return record


class _WithWeights(nn.Module):
    """The block run with some of its weights replaced by tensors that carry gradients (torch.func)."""

    def __init__(self, block: nn.Module, params: dict[str, torch.Tensor]):
        super().__init__()
        self.inner, self.params = [block], params  # a list: not registered as a submodule

    def forward(self, *args, **kwargs):
        return torch.func.functional_call(self.inner[0], self.params, args, kwargs, strict=False)


def _relative_name(block: nn.Module, layer: PrunableLayer) -> str:
    for name, module in block.named_modules():
        if module is layer.module:
            return name
    raise LmpruneError(f"internal: {layer.name} is not inside the block being reconstructed")
