"""A transformers model from a sparse checkpoint: dense weights rebuilt, or packed layers kept packed."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from ..errors import LmpruneError
from .format import SparseCheckpoint, config_object, dense_config
from .linear import sparsify
from .packing import PackedWeight, as_dense


def load_sparse_model(path: str, name: str, dtype: torch.dtype | str = "auto", sparse: bool = False):
    """(model, tokenizer). Every packed weight is checked (counts, CRC) as it is read.

    Dense (`sparse` False): transformers builds the model from the rebuilt dense weights, so its own
    loading conversions (fused experts, renamed keys) apply as for the dense checkpoint. With `sparse`,
    the packed Linear/Conv1D layers are SparseLinear modules; for a model transformers loads without
    conversions they are made straight from the packed tensors, shard by shard, so no dense copy of them
    ever exists; otherwise (MoE checkpoints whose experts transformers fuses) they replace the dense
    layers after a dense load, whose peak holds the whole dense model once.

    Packed weights that are no Linear/Conv1D layer's own weight in memory stay dense there, and one line
    on stderr says so: transformers 5 fuses every MoE's routed experts into 3-D tensors that its expert
    modules index and multiply themselves (eager loop, grouped or batched matmuls), which a layer swap
    cannot reach."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from ..model.loading import load_tokenizer, require_finite_weights
    from ..model.layout import converted_on_load

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    checkpoint = SparseCheckpoint(path)
    config = config_object(dense_config(checkpoint.config, path), path)
    tokenizer = load_tokenizer(path, name, True)
    if sparse and not converted_on_load(config):
        model, dense = _packed_model(checkpoint, config, dtype, name)
    else:
        model, dense = _dense_model(checkpoint, config, dtype, name, sparse)
    if dense:
        print(f"lmprune: {len(dense)} packed weight(s) stay dense in memory (e.g. {dense[0]}): the model "
              "multiplies them itself (fused expert tensors), not through a Linear or Conv1D layer the sparse "
              "path replaces", file=sys.stderr)
    require_finite_weights(model, f"model {name!r}")
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(path)
    model.eval()
    from ..model.memory import return_freed_memory

    return_freed_memory()  # the shards' dense reads and the conversions' temporaries: not the model's memory
    return model, tokenizer


def _dense_model(checkpoint: SparseCheckpoint, config, dtype, name: str, sparse: bool):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    from ..model.loading import first_line, require_complete

    state: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedWeight] = {}
    for _, weights in checkpoint.weights():
        for key, weight in weights.items():
            state[key] = as_dense(weight)
            if sparse and isinstance(weight, PackedWeight):
                packed[key] = weight
    model_class = _get_model_class(config, AutoModelForCausalLM._model_mapping)
    try:
        model, info = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype,
                                                  output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise LmpruneError(f"cannot load model {name!r}: {first_line(exc)}") from None
    del state
    require_complete(model, info, name)
    replaced = sparsify(model, packed) if sparse else set()
    return model, sorted(set(packed) - replaced)


def _packed_model(checkpoint: SparseCheckpoint, config, dtype, name: str):
    from ..model.meta_weights import (assign_weights, config_dtype, empty_model, is_persistent, tie_unloaded,
                                      tied_weights)

    model = empty_model(config, dtype if isinstance(dtype, torch.dtype) else (config_dtype(config) or torch.float32))
    expected = model.state_dict(keep_vars=True)
    loaded: set[str] = set()
    dense: list[str] = []  # packed weights of no replaceable layer
    for shard, weights in checkpoint.weights():
        unknown = [key for key in weights if key not in expected]
        if unknown:
            raise LmpruneError(f"{checkpoint.path}: {shard} holds {unknown[0]}, which "
                               f"{type(model).__name__} has no place for")
        packed = {k: w for k, w in weights.items() if isinstance(w, PackedWeight)}
        replaced = sparsify(model, packed)
        dense += sorted(set(packed) - replaced)
        assign_weights(model, {k: as_dense(w) for k, w in weights.items() if k not in replaced})
        loaded.update(weights)
    tied = tied_weights(model)
    tie_unloaded(model, tied, loaded)
    missing = [k for k in expected if k not in loaded and k not in tied and is_persistent(model, k)]
    if missing:
        raise LmpruneError(f"{name}: the checkpoint lacks {len(missing)} weight(s) of {type(model).__name__} "
                           f"(e.g. {missing[0]})")
    return model, sorted(dense)
