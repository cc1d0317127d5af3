"""--dense-targets: each layer reconstructs the *dense* model's outputs from the pruned model's inputs.

The usual objective ‖X_p W − X_p Ŵ‖² only keeps a layer faithful to its own (already perturbed) inputs.
Here it is ‖X_d W − X_p Ŵ‖², X_d the dense model's inputs to the same layer on the same tokens, so a
block repairs the error the blocks before it passed on. With H = X_pᵀX_p and C = X_pᵀX_d this is, up to
a constant, ‖X_p (W′ − Ŵ)‖² with W′ = W Cᵀ H⁻¹: the least-squares target seen through the pruned
inputs. Every solver then runs unchanged on (W′, H). Written as W′ = W + W (C − H)ᵀ H⁻¹ with H damped by
1% of its mean diagonal, the correction shrinks towards W (not towards zero) where H is ill-determined,
and W′ = W exactly where the inputs are still the dense ones (the first block).

Cost: the dense model is carried along (a copy of each block and of the hidden states), and the dense
copy of the block runs once more per group of layers, batch by batch beside the pruned block's Gram pass,
which adds C with H (with --sequential layer each pass stops after the group's last layer). Fused expert
tensors are refused (their inputs are read by the tracer, not by hooks).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import LmpruneError
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

    def __init__(self, hidden: list[torch.Tensor]):
        self.hidden = [h.clone() for h in hidden]
        self.block: nn.Module | None = None

    def start_block(self, block: nn.Module) -> None:
        self.block = copy.deepcopy(block)  # the block's dense weights, before any layer is pruned

    def batch_inputs(self, prefix: str, layers: list[PrunableLayer], call, j: int, device: torch.device,
                     stop_early: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The dense block's inputs to `layers` on batch j: {name: (the input object, its rows in float32)}.

        Read in the same loop as the pruned block's Grams (pipeline._collect_grams), which adds X_pᵀX_d
        beside X_pᵀX_p: the pruned block runs once per batch for both. `stop_early`: the dense forward ends
        once every layer has read its input."""
        inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(name):
            def hook(module, args, output):
                inputs[name] = (args[0], args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32))
                if stop_early and len(inputs) == len(layers):
                    raise GroupDone
            return hook

        handles = [self.block.get_submodule(layer.name[len(prefix) + 1:]).register_forward_hook(keep(layer.name))
                   for layer in layers]
        try:
            with torch.no_grad():
                call.call(self.block, j, self.hidden[j].to(device), device)
        except GroupDone:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return inputs

    def finish_block(self, call, device: torch.device) -> None:
        with torch.no_grad():
            for j, d in enumerate(self.hidden):
                self.hidden[j] = call.call(self.block, j, d.to(device), device).to(d.device)
        self.block = None


def dense_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """W′ = W + W (C − H)ᵀ H⁻¹ (H damped): the weight whose outputs on X_p best match X_d W."""
    damped = H + DAMPING * H.diagonal().mean() * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    return W + torch.linalg.solve(damped, (C - H) @ W.t()).t()
