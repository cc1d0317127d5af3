"""Every causal-LM model type of the installed transformers, built tiny from its own config (the sweep).

The zoo (zoo.py) hand-tunes 30 families; the sweep takes them all, from transformers' own list
(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), and shrinks each type's default config generically: the sizes
named in SHRINK where the config has them, then every other size-like integer capped by the rules in
CAPS (by name: widths, head sizes, expert counts, windows, vocabularies), and every per-layer list cut to
the tiny depth. OVERRIDES holds the few per-type values that the generic shrink cannot guess.

Each type ends in one outcome: swept (built tiny, its own forward runs) or listed with the reason it is
not (not a decoder-only text model, no tiny config, its own forward rejects the tiny config). The
outcomes are committed in tests/sweep_outcomes.md: `python tests/sweep.py` rewrites it, and
tests/test_sweep.py checks it is current.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from lmprune.errors import LmpruneError
from lmprune.model.loading import require_causal_decoder
from lmprune.model.own_forward import describe

OUTCOMES = Path(__file__).with_name("sweep_outcomes.md")
LAYERS = 4
SEQLEN = 24  # longer than every window the caps leave (8)
VOCAB = 257
EXPERTS = 6  # unlike every other size left, so a router is told by its width
MAX_PARAMETERS = 1_500_000  # a tiny model is far smaller: more means the shrink missed a size
ALL_TYPES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

# Exact values for the sizes most configs share (set only where a config has the key).
SHRINK = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
    n_embd=64, n_layer=LAYERS, n_head=4, n_positions=128, d_model=64, n_layers=LAYERS, n_heads=4, num_layers=LAYERS,
    ffn_dim=96, rotary_dim=16, word_embed_proj_dim=64, sliding_window=8, attention_chunk_size=8,
    num_local_experts=EXPERTS, num_experts=EXPERTS, n_routed_experts=EXPERTS, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=48, first_k_dense_replace=1, n_group=1, num_expert_group=1, topk_group=1,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
    mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=8,
    linear_num_key_heads=2, linear_num_value_heads=4,
    bos_token_id=0, eos_token_id=VOCAB - 1, pad_token_id=VOCAB - 1,
)
# Multi-head latent attention: one key/value head per query head (fewer fail in its own forward), and
# the rotary part's size as the head size its rotary table uses.
MLA = dict(head_dim=8, num_key_value_heads=4)
# Every other integer whose name matches is capped at the value (token ids and flags are never touched).
CAPS = [
    (r"vocab", VOCAB),
    (r"intermediate|ffn|(^|_)d?ff($|_)|dim_ff|d_inner|mlp", 96),
    (r"head_dim|dim_head|head_size|key_dim|value_dim", 16),
    (r"hidden_dim|emb_dim|embed_dim|d_model|n_embd", 64),
    (r"window", 8),
    (r"heads", 4),
    (r"experts|expert_num", EXPERTS),
    (r"^(moe_)?(top_?k|k)$", 2),  # experts per token
    (r"rank", 16),
    (r"position|max_len|max_length|extent", 128),
]
NEVER_CAPPED = re.compile(r"token_id|layers_block_type|_idx$")
# What the generic shrink cannot guess, per type (keep this short).
OVERRIDES: dict[str, dict] = {
    "zaya": dict(num_experts_per_tok=1),  # its router supports top-1 only
    # Mamba-2 mixers: heads × head size must be the expanded width (2 × 64)
    "mamba2": dict(num_heads=8),
    "nemotron_h": dict(mamba_num_heads=8, n_groups=1),
    "falcon_h1": dict(mamba_d_ssm=128),
    "kolibri1_1": dict(index_num_heads=2),  # at most the query heads per key head
    "longcat_flash": dict(qk_head_dim=24),  # nope + rope parts
    "xglm": dict(pad_token_id=1),  # its positions start after the padding id
    # Defaults left unset (None) that the model's code needs
    "dots1": dict(n_shared_experts=1),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"] * 2),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=4),
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2),
}


# Types lmprune refuses, with its one-line error (the sweep checks it is exactly that): their blocks are
# not one list called once per forward, so replaying them block by block would be wrong.
REPLAY = "model_type '{}': lmprune's block-by-block replay does not reproduce the model's own forward ({}): " \
         "this architecture is not supported yet"
REFUSED = {
    "hrm_text": "cannot find the decoder blocks of HrmTextForCausalLM: no list of 32 layers with weights",
    "longcat_flash": "cannot find the decoder blocks of LongcatFlashForCausalLM: no list of 8 layers with weights",
    # The replay guard (src/lmprune/model/replay_guard.py): a looped stack, XLM's attention modules between
    # its FFN blocks, and ZAYA's blocks whose output the replay does not reproduce after the first.
    "dory": REPLAY.format("dory", "each block must be called exactly once per forward; called: block 0 2 times, "
                                  "block 1 2 times, block 2 2 times, block 3 2 times"),
    "xlm": REPLAY.format("xlm", "block 1 differs by 0.99 relative to its largest output, tolerance 0.0001 in float32"),
    "zaya": REPLAY.format("zaya", "block 2 differs by 0.0098 relative to its largest output, tolerance 0.0001 in "
                                  "float32"),
}

# Swept types whose outcome is wrong today: tests/test_sweep.py marks them xfail(strict), so a fix shows.
KNOWN = {
    "deepseek_v4": "found by the sweep: its hash router's gate (blocks 0-2) and the hyper-connection mixing weights "
                   "(attn_hc.fn, ffn_hc.fn) left dense as weights lmprune cannot prune",
}
FOUND = "found by the sweep: "
CANNOT = " left dense as weights lmprune cannot prune"
INKLING = FOUND + "the relative-position bias projection (and Inkling 1's fused 3-D shared experts)" + CANNOT
KNOWN.update({
    "inkling_text": INKLING, "inkling2_text": INKLING, "inkling2_loop_text": INKLING,
    "recurrent_gemma": FOUND + "the RG-LRU's per-head (3-D) gate weights" + CANNOT,
    "zamba": FOUND + "its Mamba mixer's per-head (3-D) x_proj_weight/dt_proj_weight" + CANNOT,
    "hy_v4": FOUND + "its hyper-connection mixing weights (attn_hc.fn, ffn_hc.fn)" + CANNOT,
    "xlnet": FOUND + "its attention's 3-D q/k/v/o/r parameters, multiplied through einsum," + CANNOT,
})


@dataclass(frozen=True)
class Outcome:
    model_type: str
    swept: bool
    reason: str  # why not swept, or lmprune's refusal ("" when swept and pruned)

    def line(self) -> str:
        kind = "not swept" if not self.swept else "refused" if self.reason.startswith("lmprune refuses") \
            else "known failure" if self.reason else "swept"
        return f"| `{self.model_type}` | {kind} | {self.reason} |"


def _capped(key: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or NEVER_CAPPED.search(key):
        return value
    for pattern, cap in CAPS:
        if re.search(pattern, key):
            return min(value, cap)
    return value


def tiny_kwargs(model_type: str) -> dict:
    """The config arguments that shrink `model_type`'s default config (see the module's docstring)."""
    default = CONFIG_MAPPING[model_type]()
    values = default.to_dict()
    depth = getattr(default, "num_hidden_layers", None)
    kwargs = {}
    for key, value in values.items():
        if key in SHRINK:
            kwargs[key] = SHRINK[key]
        elif isinstance(value, list) and depth and len(value) == depth != LAYERS:
            kwargs[key] = value[:LAYERS]  # one entry per layer (layer types, window sizes, ...)
        elif _capped(key, value) != value:
            kwargs[key] = _capped(key, value)
    if "kv_lora_rank" in values:
        kwargs.update(MLA)
    kwargs.update(OVERRIDES.get(model_type, {}))
    return kwargs


def tiny_config(model_type: str):
    config = AutoConfig.for_model(model_type, **tiny_kwargs(model_type))
    config._experts_implementation = "eager"  # the reference the pipeline's own path must reproduce
    return config


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def sample_ids(rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB - 1, (rows, SEQLEN), generator=generator)


def _composite(model_type: str) -> str | None:
    """The text model's type, for a config that holds one beside other modalities."""
    default = CONFIG_MAPPING[model_type]()
    text = default.get_text_config()
    return None if text is default else getattr(text, "model_type", "?")


@lru_cache(maxsize=None)
def outcome(model_type: str) -> Outcome:
    """Build `model_type` tiny and run its own forward once; say why not where it cannot be swept."""
    def no(reason: str) -> Outcome:
        return Outcome(model_type, False, reason.replace("|", "/"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            require_causal_decoder(CONFIG_MAPPING[model_type](), model_type)
            text = _composite(model_type)
        except LmpruneError as exc:
            return no("not decoder-only: " + str(exc).split(" is ", 1)[1].split(";")[0])
        except Exception as exc:
            return no(f"its default config cannot be built: {describe(exc)}")
        if text is not None:
            return no(f"multimodal (its text model is `{text}`)")
        try:
            config = tiny_config(model_type)
            require_causal_decoder(config, model_type)
        except Exception as exc:
            return no(f"no tiny config: {describe(exc)}")
        try:
            with torch.device("meta"):
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        except Exception as exc:
            return no(f"cannot be built from a tiny config: {describe(exc)}")
        if size > MAX_PARAMETERS:
            return no(f"does not shrink: {size:,} parameters after the generic shrink")
        try:
            model = tiny_model(model_type)
        except Exception as exc:
            return no(f"cannot be built from a tiny config: {describe(exc)}")
        try:
            with torch.no_grad():
                model(input_ids=sample_ids(1), use_cache=False)
        except Exception as exc:
            return no(f"its own forward rejects the tiny config: {describe(exc)}")
    refusal = REFUSED.get(model_type)
    return Outcome(model_type, True, f"lmprune refuses it: {refusal}" if refusal else KNOWN.get(model_type, ""))


def swept_types() -> list[str]:
    return [t for t in ALL_TYPES if outcome(t).swept]


def outcomes_table() -> str:
    import transformers

    outcomes = [outcome(t) for t in ALL_TYPES]
    swept = sum(o.swept for o in outcomes)
    return "\n".join([
        "# Sweep outcomes (generated by `python tests/sweep.py`; tests/test_sweep.py checks it is current)",
        "",
        f"transformers {transformers.__version__}: {len(outcomes)} causal-LM model types, {swept} swept "
        "(built tiny; replay and pruning checked by tests/test_sweep.py; `refused`: lmprune refuses it with "
        "the error shown, and the sweep checks it does; `known failure`: marked xfail(strict) with the reason), "
        "the others listed with the reason.",
        "",
        "| model type | outcome | reason |",
        "|---|---|---|",
        *(o.line() for o in outcomes),
        "",
    ])


if __name__ == "__main__":
    OUTCOMES.write_text(outcomes_table())
    print(f"wrote {OUTCOMES}", file=sys.stderr)
