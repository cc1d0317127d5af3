"""Pipeline details on tiny random-init models: Conv1D storage, --skip, embeddings, shared Grams, progress.

Every architecture family is covered by the zoo (test_zoo.py)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import byte_tokenizer, random_text
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, tokenize
from lmprune.masks import is_nm
from lmprune.model import find_blocks, prunable_layers, record_block_calls
from lmprune.pipeline import prune_model
from lmprune.solvers import build_layer_solver

VOCAB = 257  # the byte tokenizer's 256 bytes + eos
IDS = dict(bos_token_id=0, eos_token_id=256, pad_token_id=None)
DECODER = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **IDS)
CONFIGS = {
    "llama": DECODER,
    "mistral": DECODER,
    "qwen2": DECODER,
    "phi3": DECODER,
    "gemma": {**DECODER, "head_dim": 16},
    "gemma2": {**DECODER, "head_dim": 16},
    "phi": DECODER,
    "opt": dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64, **IDS),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, **IDS),
    "gpt_neox": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, **IDS),
    "falcon": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   new_decoder_architecture=True, num_kv_heads=2, **IDS),
    "bloom": dict(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, **IDS),
}


def tiny_model(model_type: str):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **CONFIGS[model_type])
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def token_ids(tokenizer):
    return tokenize(tokenizer, random_text(2000))


def test_nm_pattern_on_gpt2_conv1d(token_ids):
    """Conv1D stores [in, out]; N:M must still run along the input dimension."""
    model = tiny_model("gpt2")
    prune_model(model, calibration_windows(token_ids, 2, 32, 0), build_layer_solver("wanda"),
                SparsityPattern.nm("2:4"), torch.device("cpu"), progress=False)
    _, blocks = find_blocks(model)
    for layer in prunable_layers(blocks[0], "h.0"):
        assert layer.transposed
        assert is_nm(layer.get_weight(torch.device("cpu")) != 0, 2, 4), layer.name


def test_skip_regex_leaves_layers_dense(token_ids):
    model = tiny_model("llama")
    before = model.model.layers[0].mlp.down_proj.weight.clone()
    result = prune_model(model, calibration_windows(token_ids, 2, 32, 0), build_layer_solver("magnitude"),
                         SparsityPattern(0.5), torch.device("cpu"), skip=[r"down_proj"], progress=False)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    assert not any("down_proj" in r["name"] for r in result.layers)
    assert all(r["sparsity"] == 0.5 for r in result.layers)


def test_embeddings_and_lm_head_never_pruned(token_ids):
    model = tiny_model("opt")
    embed = model.get_input_embeddings().weight.clone()
    prune_model(model, calibration_windows(token_ids, 2, 32, 0), build_layer_solver("magnitude"),
                SparsityPattern(0.5), torch.device("cpu"), progress=False)
    assert torch.equal(model.get_input_embeddings().weight, embed)
    assert (model.get_output_embeddings().weight != 0).all()


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_grams_equal_each_layers_own_inputs(model_type, token_ids):
    """Layers fed one tensor share its XᵀX product; every Gram (and input sum) must still be that
    layer's own Σ XᵀX (Σ x, token count)."""
    from lmprune.pipeline import collect_inputs

    model = tiny_model(model_type)
    cpu = torch.device("cpu")
    batches = list(token_ids[:96].reshape(4, 24).split(2))
    blocks_name, blocks = find_blocks(model)
    calls = record_block_calls(model, blocks, batches, cpu, cpu)
    inputs = calls.for_block(0)
    layers = prunable_layers(blocks[0], f"{blocks_name}.0")
    seen: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    handles = [layer.module.register_forward_hook(
        lambda mod, args, out, name=layer.name: seen[name].append(args[0].reshape(-1, args[0].shape[-1])))
        for layer in layers]
    with torch.no_grad():
        for j, h in enumerate(calls.hidden):
            inputs.call(blocks[0], j, h, cpu)
    for handle in handles:
        handle.remove()
    grams = collect_inputs(blocks[0], f"{blocks_name}.0", layers, inputs, calls.hidden, cpu, with_stats=True).inputs
    for layer in layers:
        X = torch.cat(seen[layer.name])
        H, stats = grams[layer.name].gram, grams[layer.name].stats
        assert torch.allclose(H, X.t() @ X, rtol=1e-4, atol=1e-4), layer.name
        assert stats.tokens == X.shape[0] == 96
        assert torch.allclose(stats.mean, X.mean(0), rtol=1e-4, atol=1e-5), layer.name
        assert torch.allclose(stats.variance(H), X.var(0, unbiased=False), rtol=1e-3, atol=1e-5), layer.name
    assert len({id(g.gram) for g in grams.values()}) == len(grams)  # no two layers share storage
    assert len({id(g.stats.total) for g in grams.values()}) == len(grams)
    plain = collect_inputs(blocks[0], f"{blocks_name}.0", layers, inputs, calls.hidden, cpu).inputs
    assert all(g.stats is None and g.tokens == 96 for g in plain.values())
    # A method reading less (statistics.py) gets only that: the diagonal alone, or nothing at all; the
    # diagonal sums are the same whether XᵀX is collected beside them (the error report) or not.
    diagonal = collect_inputs(blocks[0], f"{blocks_name}.0", layers, inputs, calls.hidden, cpu,
                              statistics="diagonal").inputs
    both = collect_inputs(blocks[0], f"{blocks_name}.0", layers, inputs, calls.hidden, cpu, statistics="diagonal",
                          full_gram=True).inputs
    counts = collect_inputs(blocks[0], f"{blocks_name}.0", layers, inputs, calls.hidden, cpu, statistics="none").inputs
    for layer in layers:
        X = torch.cat(seen[layer.name]).double()
        assert diagonal[layer.name].gram is None, layer.name
        assert torch.allclose(diagonal[layer.name].diagonal.double(), (X * X).sum(0), rtol=1e-5, atol=1e-6), layer.name
        assert torch.equal(both[layer.name].diagonal, diagonal[layer.name].diagonal), layer.name
        assert torch.equal(both[layer.name].gram, plain[layer.name].gram), layer.name
        assert counts[layer.name].gram is None and counts[layer.name].diagonal is None, layer.name
        # Nothing read: one batch ran (for the routers) and nothing was counted (collect.py).
        assert counts[layer.name].tokens is None and counts[layer.name].signal is None, layer.name


def test_progress_prints_expected_duration_after_first_block(token_ids, capsys):
    model = tiny_model("llama")
    calibration = calibration_windows(token_ids, nsamples=2, seqlen=32, seed=0)
    prune_model(model, calibration, build_layer_solver("wanda"), SparsityPattern(0.5), torch.device("cpu"),
                layer_errors=True)
    out = capsys.readouterr().out
    assert "block 0 took" in out and "for all 2 blocks" in out
    assert out.count("relative errors:") == 2
    # Wanda reads no XᵀX: without --layer-errors there are no errors to show.
    prune_model(tiny_model("llama"), calibration, build_layer_solver("wanda"), SparsityPattern(0.5), torch.device("cpu"))
    out = capsys.readouterr().out
    assert "block 0 took" in out and "relative errors:" not in out
