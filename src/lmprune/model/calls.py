"""Each block's own call: the arguments the model passes to every block, recorded once and replayed.

Models that mix layer types (`config.layer_types`: sliding, chunked and full attention, Mamba and
attention blocks) give each block its own mask and, in some, its own rotary table. So the arguments are
recorded for *every* block, in one pass where each block is replaced by a recorder that hands its input
back unchanged (no block and no lm_head is computed: the pass stops where the lm_head would start, so a
block the model calls again after the last one, a looped stack, is seen and refused). The
arguments never depend on the hidden states flowing between blocks, only on the token ids, so passing
the input through is enough. Arguments equal across blocks or batches are stored once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import LmpruneError
from ..hooks import hooked
from .own_forward import model_forward


class _Recorded(Exception):
    """Raised where the lm_head would start: everything after it is not needed."""


def replay_unsupported(model_type: str, detail: str) -> LmpruneError:
    """The one error for a model whose block-by-block replay would not be its own forward."""
    return LmpruneError(f"model_type '{model_type}': lmprune's block-by-block replay does not reproduce the model's "
                        f"own forward ({detail}): this architecture is not supported yet")


def times_called(counts: list[int]) -> str | None:
    """What is wrong with per-block call counts of one forward pass (None: every block called exactly once)."""
    wrong = [(i, n) for i, n in enumerate(counts) if n != 1]
    if not wrong:
        return None
    shown = ", ".join(f"block {i} {n} times" for i, n in wrong[:5])
    return f"each block must be called exactly once per forward; called: {shown}" + (", ..." if len(wrong) > 5 else "")


@dataclass
class BlockCalls:
    """Block 0's input hidden states per batch, and every block's other arguments per batch."""

    hidden: list[torch.Tensor]  # block 0's input, one [batch, seq, hidden] tensor per forward call
    call_args: list[tuple[tuple, dict]]  # distinct (args without the hidden states, kwargs)
    call_index: list[list[int]]  # [block][batch] -> index into call_args
    returns_tuple: dict[type, int]  # block class -> length of the tuple it returns (absent: a tensor)
    extras: dict[type, tuple] = field(default_factory=dict)  # block class -> what it returns after the states
    model_type: str = "unknown"  # names the model when its own forward fails

    def for_block(self, index: int) -> "BlockCall":
        return BlockCall(self, index)


@dataclass
class BlockCall:
    """One block's calls: `call(block, batch, hidden, device)` runs it as the model would."""

    calls: BlockCalls
    index: int

    def arguments(self, batch: int, device: torch.device | None = None) -> tuple[tuple, dict]:
        """Batch `batch`'s (args without the hidden states, kwargs), moved to `device` if given."""
        recorded = self.calls.call_args[self.calls.call_index[self.index][batch]]
        return recorded if device is None else _to_device(recorded, device)

    def call(self, block: nn.Module, batch: int, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Run `block` with batch `batch`'s arguments and `hidden` as its hidden states; return hidden states."""
        args, kwargs = self.arguments(batch)
        with model_forward(self.calls.model_type, _inside(block)):
            out = block(hidden, *_to_device(args, device), **_to_device(kwargs, device))
        return out[0] if isinstance(out, (tuple, list)) else out


def _inside(block: nn.Module) -> str:
    return f"inside a {type(block).__name__} block"


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
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and not hasattr(a, "__dict__") and a == b


_CACHE_KEYS = ("past_key_values", "past_key_value", "layer_past", "cache_params")


def _is_cache(obj: Any) -> bool:
    return type(obj).__name__.endswith("Cache")


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, the other positional args, kwargs) with caches dropped: blocks re-run without one."""
    if args:
        hidden, rest = args[0], tuple(args[1:])
    elif "hidden_states" in kwargs:
        kwargs = dict(kwargs)
        hidden, rest = kwargs.pop("hidden_states"), ()
    else:
        raise LmpruneError("a decoder block was called without hidden states as its first argument")
    kwargs = {k: (None if k in _CACHE_KEYS or _is_cache(v) else v) for k, v in kwargs.items()}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    rest = tuple(None if _is_cache(a) else a for a in rest)
    return hidden, rest, kwargs


def record_block_calls(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: list[torch.Tensor],
    device: torch.device,
    store_device: torch.device,
) -> BlockCalls:
    """Run each batch of token ids through the model's stack of recorders; return every block's call.

    Only the modules outside the blocks (embeddings, rotary tables) need to be on `device`. What a block
    returns (a tensor or a tuple) is learnt by running the real block once per block class, on the first
    batch, so the model's code between blocks sees what it expects.
    """
    hidden: list[torch.Tensor] = []
    call_args: list[tuple[tuple, dict]] = []
    call_index: list[list[int]] = [[] for _ in blocks]
    returns_tuple: dict[type, int] = {}
    learnt: dict[type, Any] = {}  # block class -> extra outputs after the hidden states (or None: a tensor)
    model_type = str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)

    def intern(call: tuple[tuple, dict]) -> int:
        # Newest first: consecutive blocks of one type usually share the very same objects.
        for j in range(len(call_args) - 1, -1, -1):
            if _same(call_args[j], call):
                return j
        call_args.append(call)
        return len(call_args) - 1

    def make_recorder(index: int, block: nn.Module):
        original = block.forward

        def recorder(*args, **kwargs):
            state, rest, kept = _split_call(args, kwargs)
            if index == 0:
                hidden.append(state.detach().to(store_device))
            call_index[index].append(intern((rest, kept)))
            kind = type(block)
            if kind not in learnt:
                with torch.no_grad():
                    block.to(device)
                    try:
                        with model_forward(model_type, _inside(block)):
                            out = original(*args, **kwargs)
                    finally:
                        block.to(home)
                learnt[kind] = tuple(out[1:]) if isinstance(out, (tuple, list)) else None
                if learnt[kind] is not None:
                    returns_tuple[kind] = 1 + len(learnt[kind])
            extra = learnt[kind]
            return state if extra is None else (state, *extra)

        return recorder

    def stop(*_):
        raise _Recorded

    home = next(blocks.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    stopper = [(head, stop)] if isinstance(head, nn.Module) else []
    with _forwards_replaced(blocks, make_recorder), hooked(before=stopper):
        with torch.no_grad():
            for ids in batches:
                seen = [len(c) for c in call_index]
                try:
                    with model_forward(model_type, "outside its decoder blocks"):
                        model(input_ids=ids.to(device), use_cache=False)
                except _Recorded:
                    pass
                wrong = times_called([len(c) - seen[i] for i, c in enumerate(call_index)])
                if wrong:
                    raise replay_unsupported(model_type, wrong)
    return BlockCalls(hidden, call_args, call_index, returns_tuple,
                      {kind: extra for kind, extra in learnt.items() if extra is not None}, model_type)


def run_after_blocks(model: nn.Module, blocks: nn.ModuleList, calls: BlockCalls, ids: torch.Tensor,
                     final: torch.Tensor) -> Any:
    """The model's own forward on `ids` with `final` as its last block's output: what it computes after the
    blocks (final norm, lm_head, logit soft-capping, ...) without computing any block. Every block hands
    `final` back, in the form the recorder learnt, so the model's code between blocks sees what it expects."""
    def make_constant(index: int, block: nn.Module):
        extra = calls.extras.get(type(block))
        return lambda *args, **kwargs: final if extra is None else (final, *extra)

    with _forwards_replaced(blocks, make_constant):
        return model(input_ids=ids, use_cache=False)


@contextlib.contextmanager
def _forwards_replaced(blocks: nn.ModuleList, make: Callable[[int, nn.Module], Callable]):
    """Each block's forward replaced by `make(index, block)`; its own forward (an accelerate hook's wrapper
    included) restored after."""
    own = [block.__dict__.get("forward") for block in blocks]
    for i, block in enumerate(blocks):
        block.forward = make(i, block)
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward  # the replacement shadowed the class's forward
            else:
                block.forward = forward
