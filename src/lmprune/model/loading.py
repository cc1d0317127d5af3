"""Loading a causal LM and its tokenizer from a local directory, a hub id or an alias."""

from __future__ import annotations

import os

import torch

from ..errors import LmpruneError

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_model(name_or_path: str, dtype: str = "auto", progress: bool = True):
    """Load a causal LM and its tokenizer on the CPU (blocks move to the device one at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..aliases import resolve_model

    # Our own progress bars and messages are enough; transformers' loading bars would bury them.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    path = resolve_model(name_or_path, progress)
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
