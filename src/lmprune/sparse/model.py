"""A transformers model from a sparse checkpoint: dense weights rebuilt, or packed layers kept packed."""

from __future__ import annotations

import contextlib
import os

import torch

from ..errors import LmpruneError
from .format import SparseCheckpoint, config_object, dense_config
from .linear import sparsify
from .packing import PackedWeight


def load_sparse_model(path: str, name: str, dtype: torch.dtype | str = "auto", sparse: bool = False):
    """(model, tokenizer). Every packed weight is checked (counts, CRC) before the model is built; the
    model is built by transformers from the rebuilt dense weights, so its own loading conversions (fused
    experts, renamed keys) apply as for the dense checkpoint. With `sparse`, the packed Linear/Conv1D
    layers then become SparseLinear modules and their dense weights are dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.models.auto.auto_factory import _get_model_class
    from transformers.utils import logging as hf_logging

    from ..model.loading import _first_line, _load_tokenizer, require_complete

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    checkpoint = SparseCheckpoint(path)
    config = config_object(dense_config(checkpoint.config, path), path)
    tokenizer = _load_tokenizer(AutoTokenizer, path, name, True)
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedWeight] = {}
    for _, weights in checkpoint.weights():
        for key, weight in weights.items():
            if isinstance(weight, PackedWeight):
                state[key] = weight.dense()
                if sparse:
                    packed[key] = weight
            else:
                state[key] = weight
    model_class = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    try:
        model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                  output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise LmpruneError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    del state
    require_complete(model, info, name)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(path)
    if sparse:
        sparsify(model, packed)
    model.eval()
    return model, tokenizer
