"""Each block's own call: the arguments the model passes to a block, recorded once and replayed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import LmpruneError


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass once the first block's inputs are in hand."""


@dataclass
class BlockInputs:
    """The first block's calls: hidden states per batch, plus the other arguments, shared when equal."""

    hidden: list[torch.Tensor]  # one [batch, seq, hidden] tensor per forward call
    call_args: list[tuple[tuple, dict]]  # distinct (args without hidden states, kwargs)
    call_index: list[int]  # which call_args each batch uses

    def call(self, block: nn.Module, i: int, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Run `block` on batch i's arguments with `hidden` as its hidden states; return hidden states."""
        args, kwargs = self.call_args[self.call_index[i]]
        args = _to_device(args, device)
        kwargs = _to_device(kwargs, device)
        out = block(hidden, *args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and not hasattr(a, "__dict__") and a == b)


_CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past")


def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    device: torch.device,
    store_device: torch.device,
) -> BlockInputs:
    """Run each batch of token ids through the model up to the first block and record its call.

    Only the modules outside the blocks (embeddings, rotary tables) need to be on `device`.
    """
    hidden: list[torch.Tensor] = []
    call_args: list[tuple[tuple, dict]] = []
    call_index: list[int] = []

    def hook(module, args, kwargs):
        if args:
            state, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            state, rest = kwargs.pop("hidden_states"), ()
        # A cache object would grow across calls; the blocks are always re-run without one.
        kwargs = {k: (None if k in _CACHE_KEYS else v) for k, v in kwargs.items()}
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        rest = tuple(None if _is_cache(a) else a for a in rest)
        hidden.append(state.detach().to(store_device))
        for j, known in enumerate(call_args):
            if _same(known, (rest, kwargs)):
                call_index.append(j)
                break
        else:
            call_args.append((rest, kwargs))
            call_index.append(len(call_args) - 1)
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids.to(device), use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    if len(hidden) != len(batches):
        raise LmpruneError("could not capture the first block's inputs: the model never called it")
    return BlockInputs(hidden, call_args, call_index)


def _is_cache(obj: Any) -> bool:
    return type(obj).__name__.endswith("Cache")
