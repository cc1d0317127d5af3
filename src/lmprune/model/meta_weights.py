"""A model built with its parameters on the meta device (no memory), its weights then put in place by name.

The streamed loader (loading.py) and the packed sparse loader (sparse/model.py) both build a model this
way and fill it from safetensors shards one part at a time, so no whole dense copy ever exists.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LmpruneError


def empty_model(config, dtype: torch.dtype):
    """The causal LM of `config`, its parameters on meta; buffers (rotary tables, masks) built for real,
    as from_pretrained builds them."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def config_dtype(config) -> torch.dtype | None:
    """The dtype a config names (`dtype` or the older `torch_dtype`), or None."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def tied_weights(model: nn.Module) -> dict[str, str]:
    """tied weight name -> the name it shares its tensor with (e.g. lm_head.weight -> embed_tokens.weight)."""
    from .blocks import text_config

    if not any(getattr(config, "tie_word_embeddings", False) for config in (model.config, text_config(model))):
        return {}
    keys = getattr(model, "get_expanded_tied_weights_keys", None)
    tied = keys() if callable(keys) else getattr(model, "_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}


def tie_unloaded(model: nn.Module, tied: dict[str, str], loaded: set[str]) -> None:
    """Tie each tied weight the checkpoint did not provide, as from_pretrained ties it: one tensor, two names."""
    for target, source in tied.items():
        if target not in loaded:
            owner, attr = owner_of(model, target)
            owner._parameters[attr] = model.get_parameter(source)


def is_persistent(model: nn.Module, name: str) -> bool:
    """A parameter, or a buffer saved in the state dict (rotary tables, for one, are not)."""
    owner, attr = owner_of(model, name)
    return attr in owner._parameters or attr not in getattr(owner, "_non_persistent_buffers_set", set())


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(the submodule holding tensor `name`, its attribute name there)."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def assign_weights(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put each tensor in place of the meta parameter (or buffer) of that name, in that slot's dtype."""
    for name, tensor in tensors.items():
        owner, attr = owner_of(root, name)
        current = owner._parameters.get(attr)
        if current is not None:
            if tuple(tensor.shape) != tuple(current.shape):
                raise LmpruneError(f"weight {name} has shape {list(tensor.shape)} in the checkpoint, "
                                   f"the model expects {list(current.shape)}")
            owner._parameters[attr] = nn.Parameter(tensor.to(current.dtype), requires_grad=current.requires_grad)
        else:
            buffer = owner._buffers[attr]
            owner._buffers[attr] = tensor.to(buffer.dtype) if buffer is not None else tensor


def unload_weights(module: nn.Module) -> None:
    """Put every loaded parameter of `module` back on meta, freeing its memory."""
    for sub in module.modules():
        for attr, param in sub._parameters.items():
            if param is not None and not param.is_meta:
                sub._parameters[attr] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                     requires_grad=param.requires_grad)
