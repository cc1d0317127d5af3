"""Perplexity over consecutive windows, and a bridge to lm-eval's zero-shot tasks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import evaluation_windows, load_text, tokenize
from .errors import LmpruneError


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


def evaluate_tasks(model, tokenizer, tasks: list[str], device: torch.device, batch_size: int = 1,
                   limit: int | None = None) -> dict:
    """Zero-shot accuracy through lm-eval (its tasks download their data from the hub)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise LmpruneError("zero-shot tasks need lm-eval: pip install 'lmprune[eval]'") from None
    model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit)
    except Exception as exc:
        raise LmpruneError(f"lm-eval failed on {', '.join(tasks)}: {type(exc).__name__}: {exc}") from None
    return {task: metrics for task, metrics in results["results"].items()}
