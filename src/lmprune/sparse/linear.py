"""SparseLinear: a pruned Linear or Conv1D that keeps its weight packed in memory.

The portable path unpacks the weight for each call and multiplies exactly as the layer it replaces did
(the same torch op on the same bits), so its outputs are bit-identical to the dense-with-zeros model's.
It saves memory, not time; a compiled batch-1 kernel (kernel.py) takes the calls it can when present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Conv1D
from .packing import PackedWeight


class SparseLinear(nn.Module):
    """y = x Wᵀ + b (nn.Linear) or x W + b (Conv1D, W stored [in, out]) with W held packed."""

    def __init__(self, module: nn.Module, packed: PackedWeight):
        super().__init__()
        weight = module.weight
        if tuple(packed.shape) != tuple(weight.shape):
            raise ValueError(f"packed shape {packed.shape} is not the layer's {tuple(weight.shape)}")
        if packed.dtype != weight.dtype:  # the model was loaded in another dtype: zeros stay zeros
            packed = PackedWeight(**{**packed.__dict__, "values": packed.values.to(weight.dtype),
                                     "dtype": weight.dtype})
        self.conv1d = bool(Conv1D) and isinstance(module, Conv1D)
        self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if self.conv1d else weight.shape
        self.packed = packed
        # Buffers, so that .to() and state_dict() see the packed tensors.
        self.register_buffer("values", packed.values)
        self.register_buffer("positions", packed.positions)
        self.bias = module.bias

    def _weight(self) -> torch.Tensor:
        self.packed.values, self.packed.positions = self.values, self.positions  # after a .to()
        return self.packed.dense().to(self.values.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self._weight()
        if self.conv1d:  # Conv1D.forward's own ops, for the same bits
            size_out = x.size()[:-1] + (self.out_features,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), weight).view(size_out)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        p = self.packed
        layout = f"{p.n}:{p.m}" if p.layout == "nm" else "bitmask"
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={layout}, "
                f"kept={p.values.numel()}, bias={self.bias is not None}")


def replaceable(module: nn.Module) -> bool:
    """Layers whose forward SparseLinear reproduces: nn.Linear itself and Conv1D (not subclasses that may
    multiply differently)."""
    return type(module) is nn.Linear or (bool(Conv1D) and type(module) is Conv1D)


def sparsify(model: nn.Module, packed: dict[str, PackedWeight]) -> int:
    """Replace every layer whose weight `packed` holds (by parameter name) with a SparseLinear; the number
    replaced. Weights of other layers (fused expert tensors) stay dense."""
    replaced = 0
    for name, module in list(model.named_modules()):
        weight = packed.get(f"{name}.weight")
        if weight is None or not replaceable(module):
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, SparseLinear(module, weight))
        replaced += 1
    return replaced
