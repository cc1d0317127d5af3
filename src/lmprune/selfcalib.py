"""Calibration text written by the model itself (`--calib self`): no dataset needed.

Sequences are sampled at temperature 1 from the model's own start token, in batches, with the KV cache
on the compute device. Williams et al. ("Self-calibration for language model quantization and
pruning", 2025) find such text competitive with real calibration data; bench/RESULTS.md measures it.
"""

from __future__ import annotations

import inspect
import time

import torch
from tqdm.auto import tqdm

from .errors import LmpruneError

SELF = "self"
DEFAULT_GENERATION_BATCH = 16  # sequences sampled together: KV cache memory grows with batch × seqlen


def start_token(model, tokenizer) -> int:
    """The id every sample starts from: BOS, else EOS (GPT-2 style models begin documents after it)."""
    for attr in ("bos_token_id", "eos_token_id"):
        for source in (tokenizer, getattr(model, "generation_config", None), model.config):
            value = _first_id(getattr(source, attr, None))
            if value is not None:
                return value
    raise LmpruneError("--calib self needs a BOS or EOS token to start from; this model has neither "
                       "(give a calibration text file with --calib)")


def stop_tokens(model, tokenizer) -> list[int]:
    """Every id that would end a document: suppressed so each sample runs its full length."""
    ids = set()
    for source in (tokenizer, getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        ids.update([value] if isinstance(value, int) else (value or []))
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def _first_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return value if isinstance(value, int) and value >= 0 else None


def self_calibration(model, tokenizer, nsamples: int, seqlen: int, seed: int, device: torch.device,
                     batch_size: int = DEFAULT_GENERATION_BATCH, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """Sample `nsamples` windows of exactly `seqlen` tokens from the model: ([nsamples, seqlen] ids on the
    CPU, facts for the report). Window i starts with the start token; the rest is sampled at temperature 1.

    Same seed, batch size and device give the same tokens. The whole model sits on `device` meanwhile
    (generation needs every block at each step) and goes back to where it was afterwards.
    """
    if nsamples < 1 or seqlen < 2:
        raise LmpruneError(f"--calib self needs --nsamples ≥ 1 and --seqlen ≥ 2, got {nsamples} and {seqlen}")
    if batch_size < 1:
        raise LmpruneError(f"generation batch size must be at least 1, got {batch_size}")
    first = start_token(model, tokenizer)
    stops = stop_tokens(model, tokenizer)
    # Output rows past the tokenizer's vocabulary (padding for matmul sizes) are never real text.
    vocab = len(tokenizer)
    home = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = []
    tick = time.perf_counter()
    bar = tqdm(total=nsamples * seqlen, desc="generating calibration", unit="tok", unit_scale=True,
               disable=not progress)
    try:
        model.to(device)
        for begin in range(0, nsamples, batch_size):
            rows = min(batch_size, nsamples - begin)
            samples.append(_sample(model, first, stops, vocab, rows, seqlen, generator, device, bar).cpu())
    except torch.cuda.OutOfMemoryError:
        raise LmpruneError(f"out of memory generating calibration on {device}: lower --gen-batch-size "
                           f"(now {batch_size}) or give a calibration text file with --calib") from None
    finally:
        model.to(home)
        bar.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    seconds = time.perf_counter() - tick
    info = {"start_token": first, "suppressed_tokens": stops, "batch_size": batch_size, "temperature": 1.0,
            "seconds": seconds}
    return torch.cat(samples), info


@torch.no_grad()
def _sample(model, first: int, stops: list[int], vocab: int, rows: int, seqlen: int, generator: torch.Generator,
            device: torch.device, bar) -> torch.Tensor:
    tokens = torch.full((rows, seqlen), first, dtype=torch.long, device=device)
    cache = None
    # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns); accept both.
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for position in range(1, seqlen):
        # With the cache, each step feeds only the newest token; no padding, so no attention mask needed.
        step = tokens[:, position - 1 : position] if cache is not None else tokens[:, :position]
        out = model(input_ids=step, use_cache=True, **{key: cache})
        cache = getattr(out, key)
        logits = out.logits[:, -1, :].float()
        if stops:
            logits[:, stops] = float("-inf")
        logits[:, vocab:] = float("-inf")
        probs = torch.softmax(logits, dim=-1)
        tokens[:, position] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        bar.update(rows if position > 1 else 2 * rows)  # the start token counts too
    return tokens
