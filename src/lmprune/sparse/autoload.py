"""Opt-in: transformers' AutoModelForCausalLM.from_pretrained reads packed checkpoints too.

transformers 5 has a public extension point for a new model_type (AutoConfig.register,
AutoModelForCausalLM.register). The class registered for `lmprune_sparse` only loads: its
from_pretrained returns the model the checkpoint holds (an ordinary LlamaForCausalLM, ...) through
lmprune.load_model. Its quantizer registration does not fit: transformers skips an unknown
quant_method with a warning and loads random weights, so it cannot be what makes an unaware loader
refuse, and a quantizer would have to hook transformers' internal weight conversions.

Not done on `import lmprune`: importing transformers (and torch) takes seconds, which every `lmprune`
command, `--help` included, would then pay.
"""

from __future__ import annotations

import torch

from .format import MODEL_TYPE
from .packing import dtype_name

# Loading options that would change the model lmprune.load_model builds: refused, never ignored.
_UNSUPPORTED = ("device_map", "quantization_config", "load_in_8bit", "load_in_4bit", "tp_plan", "gguf_file")


def register_transformers() -> None:
    """After this, AutoModelForCausalLM.from_pretrained(DIR) loads a packed checkpoint (`sparse=True`
    keeps its layers packed, as lmprune.load_model does); AutoConfig reads its config."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

    class SparseCheckpointConfig(PreTrainedConfig):
        model_type = MODEL_TYPE

    class SparseCheckpointLoader(PreTrainedModel):
        config_class = SparseCheckpointConfig

        @classmethod
        def from_pretrained(cls, path, *args, dtype="auto", torch_dtype=None, sparse: bool = False, **kwargs):
            from .. import load_model

            refused = [key for key in _UNSUPPORTED if kwargs.get(key) is not None]
            if refused or args:
                raise TypeError(f"an {MODEL_TYPE} checkpoint loads on the CPU with dtype and sparse only; "
                                f"got {', '.join(refused) or 'positional model arguments'}")
            dtype = torch_dtype if dtype == "auto" and torch_dtype is not None else dtype
            return load_model(str(path), dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype, sparse)

    AutoConfig.register(MODEL_TYPE, SparseCheckpointConfig, exist_ok=True)
    AutoModelForCausalLM.register(SparseCheckpointConfig, SparseCheckpointLoader, exist_ok=True)
