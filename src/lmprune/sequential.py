"""--sequential layer: prune a block's layers group by group in the order the data flows through them.

The groups come from the block's own forward on the first calibration batch, not from layer names: the
order in which the layers' forward hooks fire, with layers fed the very same input tensor (q/k/v,
gate/up) in one group. Each group's Gram matrices are then collected with the earlier groups already
pruned, as SparseGPT's --true-sequential does. A group's pass stops as soon as every layer of the group
has read its input (a private exception raised from the hook), so a Llama block costs about
1 + ½ + ⅔ + 1 block forwards instead of 1.

Fused expert tensors (read by the block tracer, not by hooks) are refused: their reads cannot end a pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import SEQUENTIAL
from .errors import LmpruneError
from .hooks import hooked
from .model import ExpertSlice, PrunableLayer


class GroupDone(Exception):
    """Raised from a hook once every layer of the group being collected has read its input."""


def check_sequential(mode: str, plan: list[list[PrunableLayer]]) -> None:
    if mode not in SEQUENTIAL:
        raise LmpruneError(f"invalid --sequential {mode!r}: choose from {', '.join(SEQUENTIAL)}")
    if mode == "layer":
        fused = next((layer.name for layers in plan for layer in layers if isinstance(layer, ExpertSlice)), None)
        if fused is not None:
            raise LmpruneError(f"--sequential layer cannot order fused expert tensors ({fused}): "
                               "leave out --sequential layer and --best-quality (which sets it) for this model")


def layer_groups(block: nn.Module, layers: list[PrunableLayer], call, hidden: list[torch.Tensor],
                 device: torch.device) -> tuple[list[list[PrunableLayer]], bool]:
    """The block's layers in data-flow groups, and whether a group's pass may stop early.

    Layers that do not run on the first batch (an expert no token was routed to) form a last group.
    A layer that runs twice in one forward (a weight used twice) could be cut off before its second
    read, so then no pass stops early.
    """
    by_module = {id(layer.module): layer for layer in layers}
    order: list[tuple[PrunableLayer, torch.Tensor]] = []

    def hook(module, args, output):
        order.append((by_module[id(module)], args[0]))

    with hooked([(layer.module, hook) for layer in layers]), torch.no_grad():
        call.call(block, 0, hidden[0].to(device), device)
    groups: list[list[PrunableLayer]] = []
    inputs: list[torch.Tensor] = []
    seen: set[str] = set()
    repeated = False
    for layer, x in order:
        if layer.name in seen:
            repeated = True
            continue
        seen.add(layer.name)
        at = next((i for i, y in enumerate(inputs) if y is x), None)
        if at is None:
            groups.append([layer])
            inputs.append(x)
        else:
            groups[at].append(layer)
    unseen = [layer for layer in layers if layer.name not in seen]
    if unseen:
        groups.append(unseen)
    return groups, not repeated


def block_stages(mode: str, step, hidden, device: torch.device) -> tuple[list[list[PrunableLayer]], bool]:
    """The stages the loop prunes a block in, and whether a stage's pass may stop early: with --sequential
    layer the data-flow groups, else all the block's layers at once."""
    if mode == "layer":
        return layer_groups(step.block, step.layers, step.call, hidden, device)
    return [step.layers], False
