"""Perplexity over consecutive windows (zero-shot tasks through lm-eval: zeroshot.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import evaluation_windows, load_text, tokenize


@torch.no_grad()
def perplexity(
    model,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """exp(mean next-token NLL) over every predicted token of every window (Wanda/SparseGPT convention)."""
    home = next(model.parameters()).device
    model.to(device)
    nll = []
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            nll.append(_batch_nll(model(input_ids=batch, use_cache=False).logits, batch))
    finally:
        model.to(home)
    return _perplexity(nll, windows)


@torch.no_grad()
def streamed_perplexity(model, store, windows: torch.Tensor, device: torch.device, batch_size: int = 1,
                        progress: bool = True) -> float:
    """perplexity() of a model whose blocks `store` reads from disk one at a time (model/block_store.py): every
    batch of windows through block 0, then through block 1, ..., then through the model's own head.

    The same operations on the same batches as perplexity() on the model in memory: the same number, bit
    for bit, on the same device. Memory: the parts outside the blocks, one block, and every window's
    hidden states (windows × seqlen × hidden values, on `device`)."""
    from .model import find_blocks, move_outside_blocks, record_block_calls
    from .model.calls import run_after_blocks
    from .model.block_store import first_of_each_class

    blocks_name, blocks = find_blocks(model)
    batches = list(windows.split(batch_size))
    home = next(p for n, p in model.named_parameters() if not n.startswith(blocks_name + ".")).device
    move_outside_blocks(model, blocks_name, device)
    try:
        with store.loaded(first_of_each_class(blocks), blocks):
            calls = record_block_calls(model, blocks, batches, device, device)
        hidden = calls.hidden
        for index, block in enumerate(tqdm(blocks, desc="perplexity", unit="block", disable=not progress)):
            store.load(index, block)
            block.to(device)
            try:
                call = calls.for_block(index)
                for j, states in enumerate(hidden):
                    hidden[j] = call.call(block, j, states, device)
            finally:
                block.to(home)
                store.release(index, block)
        nll = []
        for j, batch in enumerate(batches):
            batch = batch.to(device)
            nll.append(_batch_nll(run_after_blocks(model, blocks, calls, batch, hidden[j]).logits, batch))
    finally:
        move_outside_blocks(model, blocks_name, home)
    return _perplexity(nll, windows)


def _batch_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed NLL of each window's next tokens."""
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1),
                                 reduction="sum"))


def _perplexity(nll: list[float], windows: torch.Tensor) -> float:
    return math.exp(sum(nll) / windows[:, 1:].numel())  # summed in batch order, whichever path computed them


def evaluate_perplexity(model, tokenizer, source: str, seqlen: int, max_windows: int | None,
                        device: torch.device, batch_size: int = 1, progress: bool = True, store=None) -> dict:
    """Perplexity of `model` on a text source; returns the numbers the report stores. With `store` (a
    streamed model's blocks), the blocks are read from disk one at a time."""
    windows = evaluation_windows(tokenize(tokenizer, load_text(source, role="evaluation")), seqlen, max_windows)
    ppl = (perplexity(model, windows, device, batch_size, progress) if store is None
           else streamed_perplexity(model, store, windows, device, batch_size, progress))
    return {"data": source, "seqlen": seqlen, "windows": int(windows.shape[0]), "perplexity": ppl}
