"""Prunable layers: each seen as an [out, in] weight, whatever its storage.

Two kinds of storage exist today:
- a Linear-like module (nn.Linear and its subclasses, GPT-2's Conv1D that stores [in, out]);
- one expert's slice of a fused 3-D expert tensor ([experts, out, in] or, transposed, [experts, in, out]),
  as transformers 5 stores MoE experts and calls them through F.linear / matmul on `param[e]`.
A new kind of storage needs one more view here and nothing else.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..tensor_checks import count_zeros

try:  # GPT-2 style layers store the weight transposed: [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = ()

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


class PrunableLayer:
    """An [out, in] weight inside a block. `module` is what forward hooks attach to."""

    name: str  # full name in the model, e.g. "model.layers.3.mlp.down_proj"
    module: nn.Module

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        weight = self.stored()
        return (weight.shape[1], weight.shape[0]) if self.transposed else (weight.shape[0], weight.shape[1])

    transposed: bool = False

    def stored(self) -> torch.Tensor:
        """The weight as stored (a view), before any transposition."""
        raise NotImplementedError

    def get_weight(self, device: torch.device) -> torch.Tensor:
        """float32 [out, in] copy on `device`."""
        weight = self.stored().detach()
        weight = weight.t() if self.transposed else weight
        return weight.to(device=device, dtype=torch.float32, copy=True)

    def read_weight(self, device: torch.device) -> torch.Tensor:
        """float32 [out, in] on `device`, for reading only: the stored tensor itself where it is one already
        (no copy of a large layer beside it), else `get_weight`'s copy."""
        weight = self.stored().detach()
        if not self.transposed and weight.dtype == torch.float32 and weight.device == torch.device(device):
            return weight
        return self.get_weight(device)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Write back an [out, in] weight in the layer's own dtype and device."""
        stored = self.stored()
        weight = weight.t() if self.transposed else weight
        with torch.no_grad():
            stored.copy_(weight.to(device=stored.device, dtype=stored.dtype))

    def zeros(self) -> int:
        return count_zeros(self.stored())

    def numel(self) -> int:
        return self.stored().numel()

    def parameters(self) -> list[tuple[nn.Parameter, int | None]]:
        """The stored parameters this layer covers: (parameter, expert index or None for all of it)."""
        raise NotImplementedError

    def param_names(self) -> list[str]:
        """Full names of those parameters in the model."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, out={self.out_features}, in={self.in_features})"


class LinearLayer(PrunableLayer):
    """nn.Linear (or a subclass), or Conv1D, whose weight is stored [in, out]."""

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.transposed = bool(Conv1D) and isinstance(module, Conv1D)

    def stored(self) -> torch.Tensor:
        return self.module.weight.data

    def parameters(self):
        return [(self.module.weight, None)]

    def param_names(self):
        return [f"{self.name}.weight"]


class ExpertSlice(PrunableLayer):
    """Expert `expert` of a fused [experts, …] parameter; `transposed` when stored [in, out].

    The storage order is first guessed from the experts module (transformers marks transposed ones) and
    then confirmed from how the model really multiplies by the slice (see pipeline's expert tap).
    """

    def __init__(self, name: str, module: nn.Module, param_name: str, expert: int, transposed: bool):
        self.name = name
        self.module = module  # the experts module owning the fused parameter
        self.param_name = param_name
        self.expert = expert
        self.transposed = transposed

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.module, self.param_name)

    def stored(self) -> torch.Tensor:
        return self.param.data[self.expert]

    def parameters(self):
        return [(self.param, self.expert)]

    def param_names(self):
        return [self.name.rsplit("[", 1)[0]]


def is_prunable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def expert_count(module: nn.Module, config=None) -> int | None:
    for source in (module, config):
        for key in EXPERT_COUNT_KEYS:
            value = getattr(source, key, None)
            if isinstance(value, int) and value > 1:
                return value
    return None


def fused_expert_params(module: nn.Module, config=None) -> list[tuple[str, nn.Parameter, int]]:
    """(name, parameter, experts) of the module's own 3-D expert tensors: leading dim = its expert count."""
    experts = expert_count(module, config)
    if experts is None:
        return []
    return [(name, p, experts) for name, p in module.named_parameters(recurse=False)
            if p.dim() == 3 and p.shape[0] == experts and "bias" not in name]


def _guess_transposed(module: nn.Module) -> bool:
    # transformers marks experts stored [in, out]; shapes alone cannot tell (gate_up and down mirror each
    # other), so unmarked ones are taken as [out, in] until the model's own multiplication says otherwise.
    flag = getattr(module, "is_transposed", None)
    return flag if isinstance(flag, bool) else False


def prunable_layers(block: nn.Module, prefix: str, skip: list[str] | None = None, config=None) -> list[PrunableLayer]:
    """The block's Linear layers and expert slices in definition order, minus those matching --skip."""
    patterns = [re.compile(s) for s in skip or []]
    layers: list[PrunableLayer] = []
    for name, module in block.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if is_prunable(module):
            candidates = [LinearLayer(full, module)]
        else:
            candidates = [
                ExpertSlice(f"{full}.{pname}[{e}]", module, pname, e, _guess_transposed(module))
                for pname, param, experts in fused_expert_params(module, config) for e in range(experts)
            ]
        layers.extend(layer for layer in candidates if not any(p.search(layer.name) for p in patterns))
    return layers
