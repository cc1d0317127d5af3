"""Loading a causal LM and its tokenizer from a local directory, a hub id or an alias.

Two ways: `load_model` reads every weight into memory (transformers' from_pretrained);
`load_streamed_model` (--stream) builds the model on the meta device and reads only the parts outside
the decoder blocks, the blocks being read one at a time later (model/block_store.py).

Every check that can run before the weights are read does: the model must be a decoder-only causal
LM, its safetensors files whole, its tokenizer present. After loading, no weight may be missing
(transformers would fill it with random values) or non-finite.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import LmpruneError
from ..tensor_checks import all_finite

DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Files one of which every tokenizer transformers can load comes with (fast, sentencepiece, BPE, WordPiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.tiktoken", "tiktoken.model")


def load_model(name_or_path: str, dtype: str = "auto", progress: bool = True, sparse: bool = False):
    """Load a causal LM and its tokenizer on the CPU (blocks move to the device one at a time).

    A sparse checkpoint (lmprune pack) is read too: its weights rebuilt dense, or with `sparse` its packed
    Linear layers kept packed as SparseLinear modules (for inference)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ..aliases import resolve_model

    # Our own progress bars and messages are enough; transformers' loading bars would bury them.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    local_model_dir(name_or_path)  # "not found" before an alias is fetched
    if dtype not in DTYPES:
        raise LmpruneError(f"invalid --dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    path = resolve_model(name_or_path, progress)
    local = os.path.isdir(path)
    if local and os.path.isfile(os.path.join(path, "config.json")):
        from ..sparse.format import is_sparse_checkpoint

        if is_sparse_checkpoint(path):
            from ..sparse.model import load_sparse_model

            return load_sparse_model(path, name_or_path, DTYPES[dtype], sparse)
    if local:
        check_safetensors_files(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:  # missing or broken config.json, unknown model_type
        raise LmpruneError(f"cannot load model {name_or_path!r}: {first_line(exc)}") from None
    require_causal_decoder(config, name_or_path)
    tokenizer = load_tokenizer(path, name_or_path, local)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=DTYPES[dtype], low_cpu_mem_usage=True, output_loading_info=True
        )
    # Unreachable hub, unknown repo, damaged weights (safetensors' own error is not an OSError).
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise LmpruneError(f"cannot load model {name_or_path!r}: {first_line(exc)}") from None
    require_complete(model, info, name_or_path)
    model.eval()
    return model, tokenizer


def load_streamed_model(path: str, name: str, dtype: str = "auto"):
    """(model with meta blocks, tokenizer, shards): like load_model, without reading any block's weights."""
    from transformers import AutoConfig, GenerationConfig
    from transformers.utils import logging as hf_logging

    from .blocks import find_blocks
    from .layout import CheckpointLayout
    from .meta_weights import assign_weights, config_dtype, empty_model, is_persistent, tie_unloaded, tied_weights
    from .shards import INDEX_NAME, SINGLE_NAME, CheckpointShards

    hf_logging.set_verbosity_error()
    if dtype not in DTYPES:
        raise LmpruneError(f"invalid --dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if not os.path.isdir(path):
        raise LmpruneError(f"--stream needs a local checkpoint directory, not {name!r}")
    shards = CheckpointShards(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise LmpruneError(f"cannot load model {name!r}: {first_line(exc)}") from None
    require_causal_decoder(config, name)
    tokenizer = load_tokenizer(path, name, True)
    model = empty_model(config, DTYPES[dtype] if dtype != "auto" else (config_dtype(config) or torch.float32))
    model.eval()
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(path)

    blocks_name, _ = find_blocks(model)
    expected = model.state_dict(keep_vars=True)
    tied = tied_weights(model)
    layout = CheckpointLayout(model, shards.weight_map)  # names as from_pretrained converts them
    provided = set(layout.targets(list(layout.groups)))
    missing = [k for k in expected if k not in provided and k not in tied and is_persistent(model, k)]
    if missing:
        where = "in its index" if os.path.isfile(os.path.join(path, INDEX_NAME)) else f"in {SINGLE_NAME}"
        raise LmpruneError(
            f"{name}: {len(missing)} weight(s) of {type(model).__name__} are not {where} (e.g. {missing[0]}), "
            "under their own names or any that transformers converts while loading: a damaged index?")
    inside = blocks_name + "."
    outside = [g for g in layout.groups if not g.startswith(inside)]
    assign_weights(model, layout.to_model(outside, shards.read))
    tie_unloaded(model, tied, provided)
    require_finite_weights(_OutsideBlocks(model, inside), f"model {name!r}")
    return model, tokenizer, shards


class _OutsideBlocks:
    """named_parameters() of the loaded (non-meta) part of a model, for the finiteness check."""

    def __init__(self, model: nn.Module, inside: str):
        self.model, self.inside = model, inside

    def named_parameters(self):
        return ((n, p) for n, p in self.model.named_parameters() if not n.startswith(self.inside))


def require_complete(model, info: dict, name: str) -> None:
    """No weight left at its random initialisation, none non-finite."""
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise LmpruneError(
            f"{name}: the checkpoint lacks {len(missing)} weight(s) of {type(model).__name__} "
            f"(e.g. {missing[0]}) that would be initialised at random: is it a causal LM checkpoint?"
        )
    require_finite_weights(model, f"model {name!r}")


def local_model_dir(name_or_path: str) -> str | None:
    """The directory the model is (or an alias will be) read from, without downloading anything;
    None for a hub id. A local-looking path that is not a directory is an error."""
    from ..aliases import ALIASES, model_dir

    if name_or_path in ALIASES and not os.path.isdir(name_or_path):
        return str(model_dir(name_or_path))
    if _looks_local(name_or_path):
        if not os.path.isdir(name_or_path):
            raise LmpruneError(
                f"model not found: {name_or_path!r} is not a directory (give a local checkpoint or a hub id)"
            )
        return name_or_path
    return None


def require_causal_decoder(config, name: str) -> None:
    """Refuse, from its config alone, a model that is not a decoder-only causal LM.

    transformers offers a causal-LM class for some encoders (BertLMHeadModel, ...): it would run them
    with bidirectional attention unless the config says `is_decoder: true`, and add a random LM head.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    architectures = list(getattr(config, "architectures", None) or [])
    what = f"{architectures[0] if architectures else 'the model'} (model_type {model_type!r})"
    if getattr(config, "is_encoder_decoder", False):
        reason = "an encoder-decoder model"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind = "an encoder" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "not a language model"
        reason = f"{kind}, with no causal-LM form in transformers"
    elif hasattr(config, "is_decoder") and not config.is_decoder and (
        model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
        or (architectures and MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type] not in architectures)
    ):
        reason = "an encoder (bidirectional attention: its config has is_decoder false)"
    else:
        return
    raise LmpruneError(f"{name}: {what} is {reason}; lmprune prunes decoder-only causal LMs only")


def check_safetensors_files(path: str) -> None:
    """Every *.safetensors file in `path` is as long as its header says: a truncated copy is named
    here, not by a deserialisation error from inside transformers."""
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        if entry.name.endswith(".safetensors") and entry.is_file():
            check_safetensors_file(entry.path)


def check_safetensors_file(path: str) -> None:
    """One safetensors file's header parses and its data is all there (a cheap read of the header)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise ValueError
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise LmpruneError(f"{path} is not a valid safetensors file (damaged or truncated)") from None
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise LmpruneError(f"{path} is truncated: {size} bytes, its header describes {expected}")


def require_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Fail, naming the tensor, if any parameter holds NaN or Inf."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and not all_finite(param):
            bad = int((~torch.isfinite(param)).sum())
            raise LmpruneError(
                f"{what}: weight {name} has {bad} NaN/Inf value(s) of {param.numel()}; "
                "a model with non-finite weights cannot be pruned"
            )


def load_tokenizer(path: str, name: str, local: bool):
    """The checkpoint's tokenizer; a missing one is named as such."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError, TypeError) as exc:
        # Without tokenizer files transformers falls back to converting a slow tokenizer and complains
        # about sentencepiece: say what is really missing.
        if local and not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
            raise LmpruneError(
                f"{name}: no tokenizer files in the checkpoint (none of {', '.join(_TOKENIZER_FILES[:3])}, ...): "
                "copy the tokenizer of the original model beside its weights"
            ) from None
        raise LmpruneError(f"cannot load the tokenizer of {name!r}: {first_line(exc)}") from None


def _looks_local(path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything with a path-like start or more slashes is local.
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or os.path.exists(path)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error, told in one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
