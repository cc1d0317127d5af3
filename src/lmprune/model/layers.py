"""Prunable layers: each seen as an [out, in] weight, whatever its storage."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style layers store the weight transposed: [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = ()


@dataclass
class PrunableLayer:
    """A Linear-like layer inside a block, seen as a [out, in] weight whatever its storage."""

    name: str  # full name in the model, e.g. "model.layers.3.mlp.down_proj"
    module: nn.Module

    @property
    def transposed(self) -> bool:
        return bool(Conv1D) and isinstance(self.module, Conv1D)

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self.transposed else 1]

    @property
    def out_features(self) -> int:
        return self.module.weight.shape[1 if self.transposed else 0]

    def get_weight(self, device: torch.device) -> torch.Tensor:
        """float32 [out, in] copy on `device`."""
        weight = self.module.weight.detach()
        weight = weight.t() if self.transposed else weight
        return weight.to(device=device, dtype=torch.float32, copy=True)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Write back an [out, in] weight in the layer's own dtype and device."""
        param = self.module.weight
        weight = weight.t() if self.transposed else weight
        param.data.copy_(weight.to(device=param.device, dtype=param.dtype))


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def prunable_layers(block: nn.Module, prefix: str, skip: list[str] | None = None) -> list[PrunableLayer]:
    """The block's Linear layers in forward-definition order, minus those matching a --skip regex."""
    patterns = [re.compile(s) for s in skip or []]
    layers = []
    for name, module in block.named_modules():
        full = f"{prefix}.{name}"
        if is_prunable(module) and not any(p.search(full) for p in patterns):
            layers.append(PrunableLayer(full, module))
    return layers
