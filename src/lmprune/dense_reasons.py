"""Why a block weight was kept dense: the closed list every ≥2-D block weight that is not pruned falls under.

A run prunes every ≥2-D weight of its blocks (biases aside) or names it here, in the report's `kept_dense`
and in the summary line. The sweep over architectures checks that each weight it finds dense carries one of
these reasons, and that `OTHER` is not among them for the models it knows.
"""

from __future__ import annotations

from enum import Enum

from torch import nn


class DenseReason(str, Enum):
    """The kinds of block weights lmprune keeps dense (the value is what the report and summary say)."""

    ROUTER = "router"  # its output chooses the experts tokens go to (or it is a shared expert's one-output gate)
    SELECTOR = "selector"  # its output chooses tokens (a sparse-attention indexer, Doge's dynamic mask): never a router
    SKIPPED = "skipped"  # excluded with --skip
    UNREADABLE_EXPERTS = "unreadable experts"  # a fused expert tensor multiplied in a way lmprune cannot read
    CONVOLUTION = "convolution"  # a convolution's kernel (Mamba's depthwise conv1d): not an [out, in] product
    STATE = "state parameter"  # a raw ≥2-D parameter of a module's own arithmetic (an SSM's A_log)
    EMBEDDING = "embedding"  # a lookup table inside a block: no product with the hidden states
    OTHER = "other"  # none of the above: a weight lmprune cannot prune, named with its module's class

    def plural(self, count: int) -> str:
        word = self.value
        if count == 1 or word in ("skipped", "unreadable experts", "other"):
            return f"{count} {word}"
        return f"{count} {word}s"


# How the fallback note of a layer starts when too little calibration signal reached it to determine an update
# (pipeline._solve_groups): it is pruned by magnitude, kept weights unchanged, not kept dense.
NO_SIGNAL = "no calibration signal"

# Reasons that are part of a run's design, not a gap: they are reported but not warned about.
EXPECTED = frozenset({DenseReason.ROUTER, DenseReason.SELECTOR, DenseReason.SKIPPED})


def reason_for_module(module: nn.Module) -> DenseReason:
    """The reason a ≥2-D weight that no pruned layer covers is kept dense, from the module that owns it."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return DenseReason.CONVOLUTION
    if isinstance(module, nn.Embedding):
        return DenseReason.EMBEDDING
    # A state-space mixer (Mamba and its kin) owns its A matrix as a raw parameter next to its convolution.
    if any(isinstance(child, nn.Conv1d) for child in module.children()):
        return DenseReason.STATE
    return DenseReason.OTHER
