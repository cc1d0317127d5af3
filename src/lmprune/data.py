"""Text sources -> token windows, for calibration (random windows) and evaluation (consecutive ones).

A source is a local `.txt` file, a `.jsonl` file with a "text" field per line, or one of the named
datasets (wikitext2, ptb, c4) loaded through `datasets` when the hub is reachable.
"""

from __future__ import annotations

import codecs
import os

import torch

from .errors import LmpruneError
from .jsonl import json_type, jsonl_records

# name -> (dataset path, config, split for calibration, split for evaluation, text field, data_files)
NAMED_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", "test", "text", None),
    "ptb": ("ptb_text_only", "penn_treebank", "train", "test", "sentence", None),
    "c4": (
        "allenai/c4",
        None,
        "train",
        "validation",
        "text",
        {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
    ),
}


def load_text(source: str, role: str = "calibration") -> str:
    """The raw text of a source. `role` picks the split of a named dataset: train for calibration."""
    if source in NAMED_DATASETS and not os.path.exists(source):
        return _load_named(source, role)
    if not os.path.isfile(source):
        names = ", ".join(NAMED_DATASETS)
        raise LmpruneError(f"data not found: {source!r} is neither a file nor a dataset name ({names})")
    with open(source, "rb") as f:
        text = decode_text(f.read(), f"{role} data {source!r}")
    if source.endswith(".jsonl"):
        return _jsonl_text(text.split("\n"), source)
    return text


def decode_text(raw: bytes, what: str) -> str:
    """UTF-8 bytes (a leading byte-order mark dropped) as text with \\n line ends, as text-mode reading
    gives; anything else is refused by name rather than read as garbage or failing with a traceback."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # also the UTF-32 ones
        raise LmpruneError(f"{what} is UTF-16 or UTF-32 text (it starts with a byte-order mark): convert it to UTF-8")
    if b"\0" in raw:  # never in text; in UTF-16 without a byte-order mark, every other byte of ASCII
        raise LmpruneError(f"{what} contains NUL bytes: it is binary, or UTF-16/32 text without a byte-order mark; "
                           "give UTF-8 text")
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        raise LmpruneError(
            f"{what} is not UTF-8 text: byte 0x{raw[offset]:02x} at offset {offset} is invalid "
            "(Latin-1 or another legacy encoding? convert it, e.g. with iconv -t UTF-8)"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _jsonl_text(lines, source: str) -> str:
    texts = []
    for number, record in jsonl_records(lines, source):
        if "text" not in record:
            raise LmpruneError(f"{source}:{number}: expected a JSON object with a \"text\" field")
        text = record["text"]
        if not isinstance(text, str):
            raise LmpruneError(f"{source}:{number}: \"text\" must be a string, not {json_type(text)}")
        texts.append(text)
    return "\n\n".join(texts)


def _load_named(name: str, role: str) -> str:
    path, config, calib_split, eval_split, field, data_files = NAMED_DATASETS[name]
    split = calib_split if role == "calibration" else eval_split
    try:
        import datasets
    except ImportError:
        raise LmpruneError(
            f"dataset {name!r} needs the `datasets` package (pip install 'lmprune[data]'), "
            "or pass a local .txt or .jsonl file instead"
        ) from None
    try:
        if data_files:
            ds = datasets.load_dataset(path, data_files={split: data_files[split]}, split=split)
        else:
            ds = datasets.load_dataset(path, config, split=split)
    except Exception as exc:  # the hub raises many types: connection, missing repo, offline mode
        raise LmpruneError(
            f"cannot load dataset {name!r} from the Hugging Face hub ({type(exc).__name__}); "
            "pass a local .txt or .jsonl file instead"
        ) from None
    return "\n\n".join(ds[field])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D id tensor (no truncation: windows are cut afterwards)."""
    ids = tokenizer(text, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at random starts (SparseGPT/Wanda convention): [n, seqlen]."""
    if ids.numel() <= seqlen:
        raise LmpruneError(
            f"calibration text too short: {ids.numel()} tokens, need more than --seqlen {seqlen} "
            "(give more text or a smaller --seqlen)"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def evaluation_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows covering the text, the tail dropped: [n, seqlen]."""
    count = ids.numel() // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise LmpruneError(f"evaluation text too short: {ids.numel()} tokens, less than one {seqlen}-token window")
    return ids[: count * seqlen].reshape(count, seqlen)


def batched(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return list(windows.split(batch_size))
