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
    total_nll, total_tokens = 0.0, 0
    try:
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    finally:
        model.to(home)
    return math.exp(total_nll / total_tokens)


def evaluate_perplexity(model, tokenizer, source: str, seqlen: int, max_windows: int | None,
                        device: torch.device, batch_size: int = 1, progress: bool = True) -> dict:
    """Perplexity of `model` on a text source; returns the numbers the report stores."""
    windows = evaluation_windows(tokenize(tokenizer, load_text(source, role="evaluation")), seqlen, max_windows)
    ppl = perplexity(model, windows, device, batch_size, progress)
    return {"data": source, "seqlen": seqlen, "windows": int(windows.shape[0]), "perplexity": ppl}
