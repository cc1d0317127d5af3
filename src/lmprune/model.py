"""Model plumbing, generic over decoder-only HF models: load, find blocks and prunable layers, capture
the first block's inputs, and move modules between devices.

Nothing here knows an architecture by name. Blocks are the ModuleList holding one module per hidden
layer; prunable layers are the nn.Linear (and GPT-2's Conv1D) inside a block; block inputs are taken
by intercepting the real call to the first block, with every positional and keyword argument the
model passes, so new transformers versions (new kwargs, rotary embeddings computed outside the
block) keep working.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import LmpruneError

try:  # GPT-2 style layers store the weight transposed: [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always has it today
    Conv1D = ()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LmpruneError(f"invalid --device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmpruneError(f"--device {name}: CUDA is not available on this machine (use cpu or auto)")
    return device


def describe_device(device: torch.device) -> str:
    """"cpu", or e.g. "cuda (NVIDIA H100 80GB HBM3)": reports and benchmarks say what hardware ran."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def device_clock(device: torch.device) -> float:
    """Wall time once the device's queued kernels have finished, so a timed phase is charged its own GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(name_or_path: str, dtype: str = "auto"):
    """Load a causal LM and its tokenizer on the CPU (blocks move to the device one at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .aliases import resolve_model

    # Our own progress bars and messages are enough; transformers' loading bars would bury them.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    path = resolve_model(name_or_path)
    if _looks_local(path) and not os.path.isdir(path):
        raise LmpruneError(f"model not found: {path!r} is not a directory (give a local checkpoint or a hub id)")
    if dtype not in DTYPES:
        raise LmpruneError(f"invalid --dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], low_cpu_mem_usage=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as exc:  # missing files, unreachable hub, unknown repo id
        raise LmpruneError(f"cannot load model {name_or_path!r}: {_first_line(exc)}") from None
    model.eval()
    return model, tokenizer


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything with a path-like start or more slashes is local.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: one same-class module per hidden layer, the largest such list."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (n_layers is None or len(module) == n_layers):
                size = sum(p.numel() for p in module.parameters())
                candidates.append((size, name, module))
    if not candidates:
        raise LmpruneError(f"cannot find the decoder blocks of {type(model).__name__}")
    _, name, blocks = max(candidates, key=lambda c: c[0])
    return name, blocks


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
