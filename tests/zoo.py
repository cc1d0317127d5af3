"""Tiny random-init configs of the decoder architectures transformers offers (the architecture zoo).

Sizes are the smallest that keep each family's structure: several blocks of each layer type, sliding
windows and attention chunks shorter than the test sequences, a few experts with top-2 routing, and
hybrid stacks mixing Mamba and attention blocks.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 257  # the byte tokenizer's 256 bytes + eos
SEQLEN = 24  # longer than every sliding window and attention chunk below
WINDOW = 8
ALTERNATING = ["sliding_attention", "full_attention"] * 2

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
              bos_token_id=0, eos_token_id=256, pad_token_id=256)
MOE = dict(num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MAMBA2 = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8)

SPECIFIC = {
    "llama": {}, "qwen3": {}, "phi3": {}, "phi": {}, "gemma": {}, "olmo2": {}, "smollm3": {},
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(sliding_window=WINDOW, use_sliding_window=True, max_window_layers=2),
    "gemma2": dict(sliding_window=WINDOW, layer_types=ALTERNATING),
    "gemma3_text": dict(sliding_window=WINDOW, layer_types=ALTERNATING),
    "cohere2": dict(sliding_window=WINDOW, layer_types=ALTERNATING),
    "olmo3": dict(sliding_window=WINDOW, layer_types=ALTERNATING),
    "ministral": dict(sliding_window=WINDOW, layer_types=ALTERNATING),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64),
    "gpt2": dict(n_embd=64, n_layer=4, n_head=4, n_positions=128),
    "gpt_neox": {},
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, head_dim=None),
    "bloom": dict(n_layer=4, n_head=4),
    "mixtral": {}, "qwen3_moe": {}, "olmoe": {}, "granitemoe": {}, "phimoe": {},
    "qwen2_moe": dict(shared_expert_intermediate_size=48, decoder_sparse_step=1),
    "deepseek_v3": dict(n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_group=2, topk_group=1,
                        head_dim=8, num_key_value_heads=4),
    "gpt_oss": dict(sliding_window=WINDOW, layer_types=ALTERNATING),
    "llama4_text": dict(attention_chunk_size=WINDOW, interleave_moe_layer_step=1, intermediate_size_mlp=96,
                        no_rope_layers=[1, 1, 1, 0]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=8),
    "bamba": dict(attn_layer_indices=[1, 3], **MAMBA2),
    "falcon_h1": dict(mamba_d_ssm=128, **MAMBA2),
}
MODEL_TYPES = sorted(SPECIFIC)
MOE_TYPES = ["deepseek_v3", "gpt_oss", "granitemoe", "jamba", "llama4_text", "mixtral", "olmoe", "phimoe",
             "qwen2_moe", "qwen3_moe"]


def tiny_config(model_type: str):
    kwargs = {**COMMON, **MOE, **SPECIFIC[model_type]}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    config = AutoConfig.for_model(model_type, **kwargs)
    config._experts_implementation = "eager"  # the reference the pipeline's own path must reproduce
    return config


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()
