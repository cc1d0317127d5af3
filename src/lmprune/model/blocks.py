"""Finding the decoder stack, and moving what lies outside it between devices."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LmpruneError


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack: the ModuleList with one entry per hidden layer, whatever classes it mixes.

    Found by position, not by class, so hybrid stacks (Mamba, linear-attention, MoE and dense blocks in
    one list) are one stack. Several candidates (a vision tower beside the text decoder) are decided by
    size: the decoder is the list holding the most parameters.
    """
    n_layers = getattr(text_config(model), "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers):
            size = sum(p.numel() for p in module.parameters())
            if size:
                candidates.append((size, name, module))
    if not candidates:
        raise LmpruneError(f"cannot find the decoder blocks of {type(model).__name__}: no list of "
                           f"{n_layers if n_layers is not None else 'decoder'} layers with weights")
    _, name, blocks = max(candidates, key=lambda c: c[0])
    return name, blocks


def move_outside_blocks(model: nn.Module, blocks_name: str, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside the blocks to `device`, keeping ties."""
    inside = blocks_name + "."
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(inside):
            continue
        for param in module._parameters.values():
            if param is not None and param.device != device:
                param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
