"""--dense-targets: each layer reconstructs the *dense* model's outputs from the pruned model's inputs.

The usual objective ‖X_p W − X_p Ŵ‖² only keeps a layer faithful to its own (already perturbed) inputs.
Here it is ‖X_d W − X_p Ŵ‖², X_d the dense model's inputs to the same layer on the same tokens, so a
block repairs the error the blocks before it passed on. With H = X_pᵀX_p and C = X_pᵀX_d this is, up to
a constant, ‖X_p (W′ − Ŵ)‖² with W′ = W Cᵀ H⁻¹: the least-squares target seen through the pruned
inputs. Every solver then runs unchanged on (W′, H). Written as W′ = W + W (C − H)ᵀ H⁻¹ with H damped by
1% of its mean diagonal, the correction shrinks towards W (not towards zero) where H is ill-determined,
and W′ = W exactly where the inputs are still the dense ones (the first block).

Cost: the dense model is carried along (a copy of each block and of the hidden states) and every block
runs twice more per group (dense and pruned, for C; with --sequential layer each pass stops after the
group's last layer). Fused expert tensors are refused (their inputs are
read by the tracer, not by hooks).
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

    def cross_products(self, block: nn.Module, prefix: str, layers: list[PrunableLayer], call,
                       hidden: list[torch.Tensor], device: torch.device,
                       stop_early: bool = False) -> dict[str, torch.Tensor]:
        """C = X_pᵀX_d per layer: X_p from the current block on the pruned stream, X_d from the dense copy.

        `stop_early`: each forward ends once every layer of `layers` has read its input (as in
        --sequential layer; only where no layer runs twice in a forward)."""
        crosses = {layer.name: torch.zeros(layer.in_features, layer.in_features, device=device) for layer in layers}
        dense_inputs: dict[str, torch.Tensor] = {}
        done: set[str] = set()

        def keep(name):
            def hook(module, args, output):
                dense_inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                if stop_early and len(dense_inputs) == len(crosses):
                    raise GroupDone
            return hook

        def add(name):
            def hook(module, args, output):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                crosses[name].add_(x.t() @ dense_inputs[name])
                done.add(name)
                if stop_early and len(done) == len(crosses):
                    raise GroupDone
            return hook

        handles = []
        for layer in layers:
            relative = layer.name[len(prefix) + 1:]
            handles.append(self.block.get_submodule(relative).register_forward_hook(keep(layer.name)))
            handles.append(layer.module.register_forward_hook(add(layer.name)))
        try:
            with torch.no_grad():
                for j, (h, d) in enumerate(zip(hidden, self.hidden)):
                    for module, x in ((self.block, d), (block, h)):
                        try:
                            call.call(module, j, x.to(device), device)
                        except GroupDone:
                            pass
                    dense_inputs.clear()
                    done.clear()
        finally:
            for handle in handles:
                handle.remove()
        return crosses

    def finish_block(self, call, device: torch.device) -> None:
        with torch.no_grad():
            for j, d in enumerate(self.hidden):
                self.hidden[j] = call.call(self.block, j, d.to(device), device).to(d.device)
        self.block = None


def dense_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """W′ = W + W (C − H)ᵀ H⁻¹ (H damped): the weight whose outputs on X_p best match X_d W."""
    damped = H + DAMPING * H.diagonal().mean() * torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    return W + torch.linalg.solve(damped, (C - H) @ W.t()).t()
