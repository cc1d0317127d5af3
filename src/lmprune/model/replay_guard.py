"""The replay guard: lmprune's block-by-block replay checked against the model's own forward, before pruning.

The pipeline never runs the model as a whole: it runs block i on block i-1's output with block i's
recorded call (calls.py). That is the model's forward only if the blocks are one chain, each called once,
with nothing the model computes between them. An architecture that breaks this (a module between the
blocks, a looped stack, a block whose output depends on more than its call) would be pruned on wrong
inputs and handed back silently wrong. So one calibration batch runs through the model's own forward,
with hooks that keep each block's output and count its calls, and through the replay; any block called
other than once, or whose replayed output differs, is an error before any weight changes.

The cost is one forward of one batch (plus the replay of that batch). Streamed models (--stream) are not
checked this way: their blocks are not all in memory, and the own forward would read the whole checkpoint
once more; the call count is still checked there, by record_block_calls.
"""

from __future__ import annotations

import torch
from torch import nn

from ..hooks import hooked
from .calls import BlockCalls, replay_unsupported, times_called
from .own_forward import model_forward

# Relative error (largest |replay - own| over the block output's largest |value|) that the replay may show.
# The same block on the same inputs differs only by kernel choices (batched vs. not, fused attention): a few
# units in the last place. 1e-4 is far above float32's (eps 1.2e-7) and far below what a wrong replay gives
# (a missing module or a second call changes the output by the order of the output itself, > 1e-1); in
# half precision the floor is a few eps of the dtype (bfloat16: 3.1e-2, float16: 3.9e-3), still well apart.
FLOAT32_TOLERANCE = 1e-4
EPS_MULTIPLE = 4


def tolerance(dtype: torch.dtype) -> float:
    return max(FLOAT32_TOLERANCE, EPS_MULTIPLE * torch.finfo(dtype).eps) if dtype.is_floating_point \
        else FLOAT32_TOLERANCE


def _hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def own_block_outputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor, device: torch.device,
                      store_device: torch.device, model_type: str) -> list[list[torch.Tensor]]:
    """Every block's outputs (one per call) in the model's own forward on `ids`; each block is moved to
    `device` for its call only (the modules outside the blocks must be there already)."""
    home = next(blocks.parameters()).device
    outputs: list[list[torch.Tensor]] = [[] for _ in blocks]

    def before(module, args):
        module.to(device)

    def after(i):
        def hook(module, args, out):
            outputs[i].append(_hidden(out).detach().to(store_device))
            module.to(home)
        return hook

    with hooked([(block, after(i)) for i, block in enumerate(blocks)], [(block, before) for block in blocks]), \
            torch.no_grad(), model_forward(model_type, "outside its decoder blocks"):
        model(input_ids=ids.to(device), use_cache=False)
    return outputs


def check_replay(model: nn.Module, blocks: nn.ModuleList, calls: BlockCalls, ids: torch.Tensor,
                 device: torch.device, store_device: torch.device) -> None:
    """Raise (one line) unless replaying batch 0 (`ids`) block by block gives every block's own output."""
    outputs = own_block_outputs(model, blocks, ids, device, store_device, calls.model_type)
    wrong = times_called([len(o) for o in outputs])
    if wrong:
        raise replay_unsupported(calls.model_type, wrong)
    home = next(blocks.parameters()).device
    hidden = calls.hidden[0].to(device)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            block.to(device)
            try:
                hidden = calls.for_block(i).call(block, 0, hidden, device)
            finally:
                block.to(home)
            own = outputs[i][0].to(device)
            if hidden.shape != own.shape:
                raise replay_unsupported(calls.model_type, f"block {i} gives shape {tuple(hidden.shape)}, "
                                         f"its own call {tuple(own.shape)}")
            if not bool(torch.isfinite(own).all()):
                # The model's own activations overflowed (or its weights hold NaN): nothing to compare here, and
                # the calibration pass names the first layer whose inputs are not finite (require_finite_gram).
                return
            scale = own.float().abs().max().clamp_min(torch.finfo(torch.float32).tiny)
            error = float((hidden.float() - own.float()).abs().max() / scale)
            limit = tolerance(own.dtype)
            if not error <= limit:  # NaN included
                raise replay_unsupported(calls.model_type, f"block {i} differs by {error:.2g} relative to its "
                                         f"largest output, tolerance {limit:g} in {str(own.dtype).split('.')[-1]}")
