"""The calibration hidden states between blocks, and where they live.

One tensor per calibration batch, kept on the store device (the CPU when activations are offloaded, else
the compute device); a block runs on each batch moved to the compute device, and its outputs replace the
inputs one batch at a time, so a block's inputs and outputs are never all held at once.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def block_outputs(block: nn.Module, call, tensors, device: torch.device) -> Iterator[torch.Tensor]:
    """The block's output on each batch of `tensors` (with its own recorded call), on the compute device."""
    with torch.no_grad():
        for j, h in enumerate(tensors):
            yield call.call(block, j, h.to(device), device)


class HiddenStates:
    """A block's inputs, one tensor per calibration batch, on `device` (the store device)."""

    def __init__(self, tensors: list[torch.Tensor], device: torch.device):
        self.tensors = tensors  # owned: advancing replaces its entries, so the inputs before are freed
        self.device = device

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.tensors)

    def __getitem__(self, j: int) -> torch.Tensor:
        return self.tensors[j]

    def copy(self) -> "HiddenStates":
        """Another holder of the very same tensors (advancing one leaves the other as it was)."""
        return HiddenStates(list(self.tensors), self.device)

    def clone(self) -> "HiddenStates":
        """A holder of copies of the tensors."""
        return HiddenStates([h.clone() for h in self.tensors], self.device)

    def tokens(self) -> int:
        """Batch × sequence positions over all batches."""
        return sum(h.shape[:2].numel() for h in self.tensors)

    def advance(self, block: nn.Module, call, device: torch.device) -> None:
        """Replace the inputs by the block's outputs: what the next block reads."""
        for j, out in enumerate(block_outputs(block, call, self.tensors, device)):
            self.tensors[j] = out.to(self.device)
