"""--dense-targets: each layer reconstructs the *dense* model's outputs from the pruned model's inputs.

The usual objective ‖X_p W − X_p Ŵ‖² only keeps a layer faithful to its own (already perturbed) inputs.
Here it is ‖X_d W − X_p Ŵ‖², X_d the dense model's inputs to the same layer on the same tokens, so a
block repairs the error the blocks before it passed on. With H = X_pᵀX_p and C = X_pᵀX_d this is, up to
a constant, ‖X_p (W′ − Ŵ)‖² with W′ = W Cᵀ H⁻¹: the least-squares target seen through the pruned
inputs. Every solver then runs unchanged on (W′, H). Written as W′ = W + W (C − H)ᵀ H⁻¹ with H damped by
1% of its mean diagonal, the correction shrinks towards W (not towards zero) where H is ill-determined,
and W′ = W exactly where the inputs are still the dense ones (the first block).

Block targets (--block-targets, with --sequential layer): the block's last layer (e.g. down_proj) also
repairs the residual stream. A block's output is Y = R + α·O, O that layer's output and R everything
else (the skip path and the earlier sub-layers); with the layer's target O_d + (R_d − R_p)/α the pruned
block's output fits the dense block's output as well as the layer's own inputs allow, instead of
leaving the skip path's error (carried in from earlier blocks and the block's attention) uncorrected.
It needs one more product beside C, E = X_pᵀ(R_d − R_p)/α, and W′ gains H⁻¹E. α is read off the block
itself (`output_scale`): the block's output moves by exactly α·δ when the layer's output moves by δ;
a layer whose output is normalised or reused before it reaches the block's output has no such α and
keeps plain dense targets (the report counts the blocks where it applied).

Cost: the dense model is carried along (a copy of each block and of the hidden states), and the dense
copy of the block runs once more per group of layers, batch by batch beside the pruned block's Gram pass,
which adds C with H (with --sequential layer each pass stops after the group's last layer). Fused expert
tensors are refused (their inputs are read by the tracer, not by hooks).
"""

from __future__ import annotations

import copy

from typing import Any

import torch
from torch import nn

from .collect import BatchReader
from .errors import LmpruneError
from .hidden import HiddenStates
from .hooks import hooked
from .levers import Lever
from .model import ExpertSlice, PrunableLayer
from .sequential import GroupDone

DAMPING = 0.01


def check_dense_targets(plan: list[list[PrunableLayer]]) -> None:
    fused = next((layer.name for layers in plan for layer in layers if isinstance(layer, ExpertSlice)), None)
    if fused is not None:
        raise LmpruneError(f"--dense-targets cannot read fused expert tensors' dense inputs ({fused}): "
                           "leave out --dense-targets and --best-quality (which sets it) for this model")


class DenseStream:
    """The dense model's hidden states beside the pruned model's, one block behind the pruning."""

    def __init__(self, hidden: HiddenStates):
        self.hidden = hidden.clone()
        self.block: nn.Module | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # block targets: (block, layer) outputs

    def start_block(self, block: nn.Module) -> None:
        self.block = copy.deepcopy(block)  # the block's dense weights, before any layer is pruned

    def batch_inputs(self, prefix: str, layers: list[PrunableLayer], call, j: int, device: torch.device,
                     stop_early: bool = False, output_of: str | None = None
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The dense block's inputs to `layers` on batch j: {name: (the input object, its rows in float32)}.

        Read in the same loop as the pruned block's Grams (collect.py), which adds X_pᵀX_d beside X_pᵀX_p:
        the pruned block runs once per batch for both. `stop_early`: the dense forward ends once every
        layer has read its input. `output_of` (block targets): also keep that layer's output and the
        block's, as `self.outputs` (block output, layer output)."""
        inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        layer_output = []

        def keep(name):
            def hook(module, args, output):
                inputs[name] = (args[0], args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32))
                if name == output_of:
                    layer_output.append(output.detach())
                if stop_early and len(inputs) == len(layers):
                    raise GroupDone
            return hook

        taps = [(self.block.get_submodule(layer.name[len(prefix) + 1:]), keep(layer.name)) for layer in layers]
        try:
            with hooked(taps), torch.no_grad():
                block_output = call.call(self.block, j, self.hidden[j].to(device), device)
            if output_of is not None:
                self.outputs = (block_output, layer_output[-1])
        except GroupDone:
            pass
        return inputs

    def finish_block(self, call, device: torch.device) -> None:
        self.hidden.advance(self.block, call, device)
        self.block = None


class DenseReader(BatchReader):
    """One collection pass with dense targets: X_pᵀX_d per hooked layer, and the block-target term."""

    keeps_rows = True

    def __init__(self, stream: DenseStream, target: tuple[str, float] | None):
        self.stream = stream
        self.target = target  # (layer, α) with block targets
        self.runs_whole = target is not None  # the block's output is needed
        self.crosses: dict[str, torch.Tensor] = {}
        self.block_crosses: dict[str, torch.Tensor] = {}
        self.dense_inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.products: dict[tuple[int, int], tuple] = {}  # (id(X_p), id(X_d)) -> (X_p, X_d, X_pᵀX_d) this call
        self.target_reads: dict[str, torch.Tensor] = {}  # the target layer's float32 input rows and output

    def begin(self, prefix, layers, call, device, stop_early):
        self.pass_args = (prefix, layers, call, device, stop_early)
        self.crosses = {layer.name: torch.zeros(layer.in_features, layer.in_features, device=device)
                        for layer in layers}
        if self.target is not None:
            layer = next(layer for layer in layers if layer.name == self.target[0])
            self.block_crosses[layer.name] = torch.zeros(layer.in_features, layer.out_features, device=device)

    def before_batch(self, j):
        prefix, layers, call, device, stop_early = self.pass_args
        self.dense_inputs = self.stream.batch_inputs(prefix, layers, call, j, device, stop_early,
                                                     self.target[0] if self.target is not None else None)

    def read(self, name, x, rows, output):
        dense_x, dense_flat = self.dense_inputs[name]
        key = (id(x), id(dense_x))
        cross = self.products.get(key)
        if cross is None or cross[0] is not x or cross[1] is not dense_x:
            cross = self.products[key] = (x, dense_x, rows.t() @ dense_flat)
        self.crosses[name].add_(cross[2])
        if name in self.block_crosses:
            self.target_reads.update(rows=rows, output=output.detach())

    def after_batch(self, j, output):
        if self.target is not None:
            name, alpha = self.target
            width = output.shape[-1]  # rows of tokens: a layer may see them flattened (OPT)
            dense_output, dense_layer_output = self.stream.outputs
            residual_d = (dense_output.float().reshape(-1, width) / alpha
                          - dense_layer_output.float().reshape(-1, width))
            residual_p = (output.float().reshape(-1, width) / alpha
                          - self.target_reads["output"].float().reshape(-1, width))
            self.block_crosses[name].add_(self.target_reads["rows"].t() @ (residual_d - residual_p))
            self.target_reads.clear()
        self.products.clear()


class DenseTargets(Lever):
    """--dense-targets (and --block-targets): the lever that carries the dense model beside the pruned one."""

    def __init__(self, ranks, block_targets: bool = False, layer_targets: bool = True):
        self.ranks = ranks
        self.block_targets = block_targets
        self.layer_targets = layer_targets  # False: only the dense stream, for a lever that reads it (reconstruct.py)
        self.advanced = False  # the stream already took this block's dense outputs (advance_early)
        self.stream: DenseStream | None = None
        self.target: tuple[str, float] | None = None  # this stage's (layer, α) with block targets
        self.entry: dict[str, Any] | None = None  # the block's block-target report entry
        self.reading: DenseReader | None = None

    @property
    def needs_gram(self) -> bool:
        return self.layer_targets  # a layer's dense target is solved from its XᵀX (dense_target)

    def check(self, plan):
        check_dense_targets(plan)

    def begin(self, run):
        self.run = run
        self.stream = DenseStream(run.hidden)

    def start_block(self, step):
        self.entry = None
        if step.resumed:  # the dense stream passes through the block's dense weights, not the pruned ones
            dense = copy.deepcopy(step.block)
            self.run.store.load_original(step.index, dense)
            self.stream.block = dense.to(self.run.device)
        else:
            self.stream.start_block(step.block)

    def replay(self, step, records):
        if records.get("block_target"):
            note_block_target(self.run.result, records["block_target"])

    def start_stage(self, step, stage, last):
        self.target = None
        if self.block_targets and last:
            self.target, self.entry = self._block_target(step, stage)

    def reader(self, step, stage):
        if not self.layer_targets:
            return None
        self.reading = DenseReader(self.stream, self.target)
        return self.reading

    def collected(self, step, stage, collected):
        reading = self.reading
        if reading is not None and reading.crosses:
            self.ranks.all_reduce_sum(list(reading.crosses.values()) + list(reading.block_crosses.values()),
                                      "summing dense-target cross products")

    def retarget(self, step, solve, W):
        if self.reading is None:
            return W
        name = solve.layer.name
        cross = self.reading.crosses.get(name)
        if cross is None:
            return W
        return dense_target(W, solve.inputs.gram, cross, self.reading.block_crosses.get(name))

    def advance_early(self, step) -> list:
        """The dense block's outputs, before the pruned block propagates (the targets of a block fit)."""
        self.stream.finish_block(step.call, self.run.device)
        self.advanced = True
        return self.stream.hidden.tensors

    def end_block(self, step):
        if not self.advanced:
            self.stream.finish_block(step.call, self.run.device)
        self.advanced = False
        self.reading = None

    def record(self, step):
        return {"block_target": self.entry}

    def _block_target(self, step, stage) -> tuple[tuple[str, float] | None, dict[str, Any]]:
        """(the layer, α) if the block's last stage is one hooked layer whose output reaches the block's output
        by a fixed scale α (read by rank 0 and shared), else None; and the block's report entry."""
        layer = stage[0]
        if len(stage) != 1 or isinstance(layer, ExpertSlice):
            found = None, f"its last group is {len(stage)} layers, not one" if len(stage) != 1 else "fused experts"
        else:
            found = (output_scale(step.block, layer, step.call, self.run.hidden[0], self.run.device)
                     if self.ranks.is_main else None)
        alpha, why = self.ranks.broadcast_object(found, "sharing the block's output scale")
        entry = ({"block": step.index, "layer": layer.name, "scale": alpha} if alpha is not None
                 else {"block": step.index, "why": why})
        note_block_target(self.run.result, entry)
        return ((layer.name, alpha) if alpha is not None else None), entry


def note_block_target(result, entry: dict[str, Any]) -> None:
    """Add a block's entry to the report: the layers that took block targets (with α where not 1), or why not."""
    info = result.block_targets
    if entry.get("scale") is None:
        info.setdefault("not_applied", {})[str(entry["block"])] = entry["why"]
        return
    info.setdefault("layers", []).append(entry["layer"])
    if entry["scale"] != 1.0:
        info.setdefault("scales", {})[entry["layer"]] = entry["scale"]


def dense_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, E: torch.Tensor | None = None) -> torch.Tensor:
    """W′ = W + W (C − H)ᵀ H⁻¹ (H damped): the weight whose outputs on X_p best match X_d W;
    with block targets E = X_pᵀ(R_d − R_p)/α [in, out], plus (H⁻¹E)ᵀ: the outputs also take up R_d − R_p."""
    damped = H + DAMPING * H.diagonal().mean() * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    W = W + torch.linalg.solve(damped, (C - H) @ W.t()).t()
    if E is not None:
        W = W + torch.linalg.solve(damped, E).t()
    return W


# The block's output change may differ from α·δ by this share of ‖α·δ‖ (rounding in half precision).
_SCALE_TOLERANCE = 0.02


def output_scale(block: nn.Module, layer: PrunableLayer, call, hidden: torch.Tensor, device: torch.device
                 ) -> tuple[float | None, str]:
    """α if the block's output moves by exactly α·δ whenever `layer`'s output moves by δ, else None; and why not.

    Read on one batch with two random δ, one at the scale of the layer's output and one at the scale of
    the block's output (three forwards): a norm after the layer can look linear on outputs far below its
    ε, never at both scales. α = 1 for a layer added straight into the residual stream."""
    with torch.no_grad():
        base = call.call(block, 0, hidden.to(device), device).float()
        fits = []
        for size in ("layer", "block"):
            generator = torch.Generator().manual_seed(len(fits))
            seen: dict[str, torch.Tensor] = {}

            def nudge(module, args, output):
                if "delta" in seen:  # read twice in one forward: its output is not simply added
                    seen["twice"] = output
                    return output
                scale = (output.detach().float() if size == "layer" else base).std().clamp_min(1e-3).cpu()
                seen["delta"] = delta = (torch.randn(output.shape, generator=generator) * scale).to(output)
                return output + delta

            with hooked([(layer.module, nudge)]):
                out = call.call(block, 0, hidden.to(device), device).float()
            if "twice" in seen:
                return None, f"{layer.name} runs twice in one forward"
            delta = seen.get("delta")
            if delta is None or delta.numel() != base.numel() or delta.shape[-1] != base.shape[-1]:
                return None, f"{layer.name}'s output is not shaped like the block's output"
            delta, change = delta.float().reshape(-1), (out - base).reshape(-1)
            alpha = float(change @ delta / (delta @ delta))
            fits.append((alpha, float((change - alpha * delta).norm() / delta.norm())))
    (alpha, miss), (other, other_miss) = fits
    if (not abs(alpha) > 1e-6 or max(miss, other_miss) > _SCALE_TOLERANCE * abs(alpha)
            or abs(other - alpha) > _SCALE_TOLERANCE * abs(alpha)):
        return None, f"{layer.name}'s output does not reach the block's output by a fixed scale (normalised after it?)"
    if abs(alpha - 1.0) < 1e-3:
        alpha = 1.0  # a plain residual add, up to rounding
    return alpha, ""
