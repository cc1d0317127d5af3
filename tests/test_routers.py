"""Routers by what they route, selectors, layers without calibration signal, and the headline.

A weight is a router only when its top-k's indices dispatch tokens to experts; an elementwise min/max in an
activation (Apertus' xIELU) makes none. Token choice (a sparse-attention indexer) makes a selector. A layer
whose inputs are all zero gets a magnitude mask with its kept weights unchanged, and no layer leaves with more
zeros than its target plus the zeros it had, on the saved tensors too.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import byte_tokenizer, prune_args, random_text, run_cli
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, tokenize
from lmprune.dense_reasons import NO_SIGNAL, DenseReason
from lmprune.errors import LmpruneError
from lmprune.masks import topk_mask
from lmprune.model import find_blocks, prunable_layers, record_block_calls, text_config
from lmprune.pipeline import collect_inputs, prune_model
from lmprune.report import format_report, headline, summarize_layers
from lmprune.safety import verify_saved_zeros
from lmprune.solvers import build_layer_solver
from zoo import COMMON, MODEL_TYPES, MOE, MOE_TYPES, tiny_model

CPU = torch.device("cpu")
DENSE_TYPES = [t for t in MODEL_TYPES if t not in MOE_TYPES and t not in ("jamba",)]


@pytest.fixture(scope="module")
def token_ids():
    return tokenize(byte_tokenizer(), random_text(4000))


def built(model_type: str, seed: int = 0, **extra):
    config = AutoConfig.for_model(model_type, **{**COMMON, **MOE, **extra})
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def prune(model, token_ids, method="sparsegpt", sparsity=0.5):
    return prune_model(model, calibration_windows(token_ids, nsamples=4, seqlen=32, seed=0), build_layer_solver(method),
                       SparsityPattern(sparsity), CPU, batch_size=4, progress=False)


def test_apertus_up_proj_is_pruned_to_the_target(token_ids):
    """xIELU's elementwise min(x, eps) is no selection: up_proj is an ordinary layer."""
    model = built("apertus")
    result = prune(model, token_ids)
    assert result.routers == [] and result.selectors == [] and result.kept_dense == []
    ups = [r for r in result.layers if r["name"].endswith("mlp.up_proj")]
    assert len(ups) == 4
    for record in ups:
        weight = model.get_submodule(record["name"]).weight
        assert int((weight == 0).sum()) == weight.numel() // 2, record["name"]
    summary = summarize_layers(result.layers, result.kept_dense, result.block_weights)
    assert summary["block_weights"] == sum(r["shape"][0] * r["shape"][1] for r in result.layers)
    assert headline(summary) == "sparsity 0.5000 of the block weights; none kept dense"


@pytest.mark.parametrize("model_type", DENSE_TYPES)
def test_no_linear_of_a_dense_model_is_a_router(model_type, token_ids):
    model = tiny_model(model_type)
    name, blocks = find_blocks(model)
    ids = token_ids[:96].reshape(4, 24)
    calls = record_block_calls(model, blocks, list(ids.split(2)), CPU, CPU)
    hidden = calls.hidden
    for i, block in enumerate(blocks):
        layers = prunable_layers(block, f"{name}.{i}", config=text_config(model))
        collected = collect_inputs(block, f"{name}.{i}", layers, calls.for_block(i), hidden, CPU)
        assert collected.routers == set() and collected.selectors == set(), (model_type, i)
        with torch.no_grad():
            hidden = [calls.for_block(i).call(block, j, h, CPU) for j, h in enumerate(hidden)]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "llama4_text", "granitemoe", "phimoe"])
def test_moe_routers_are_exactly_the_gates(model_type, token_ids):
    """The router found by dispatch is the gate whose top-k picks the experts (and qwen2_moe's one-output
    shared-expert gate), nothing else."""
    model = tiny_model(model_type)
    result = prune(model, token_ids)
    gates = {n for n, p in model.named_parameters() if p.dim() == 2
             and (n.endswith(("mlp.gate.weight", "router.weight", "shared_expert_gate.weight")))}
    assert set(result.routers) == gates and result.selectors == []
    assert {e["kind"] for e in result.kept_dense} == {"router"}


def test_sparse_attention_indexer_is_a_selector(token_ids):
    """DeepSeek-V4's lightning indexer picks the compressed entries (tokens) each query reads: its scorer's
    weights are selectors, kept dense; the compressor's kv/gate projections (a softmax, whose stabilising max
    picks nothing) are pruned; the routers are the MoE gates."""
    model = built("deepseek_v4", head_dim=24, num_key_value_heads=1, q_lora_rank=32, o_groups=2, o_lora_rank=8,
                  index_n_heads=2, index_head_dim=16, index_topk=2, hc_mult=2, mlp_layer_types=["moe"] * 4,
                  layer_types=["compressed_sparse_attention", "heavily_compressed_attention"] * 2,
                  compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8})
    result = prune(model, token_ids)
    assert result.selectors == [f"model.layers.{i}.self_attn.compressor.indexer.scorer.weights_proj.weight"
                                for i in (0, 2)]
    assert result.routers == [f"model.layers.{i}.mlp.gate.weight" for i in range(4)]
    pruned = {r["name"] for r in result.layers}
    for i in range(4):
        assert {f"model.layers.{i}.self_attn.compressor.kv_proj",
                f"model.layers.{i}.self_attn.compressor.gate_proj"} <= pruned
    kinds = {e["name"]: e["kind"] for e in result.kept_dense}
    assert kinds["model.layers.0.self_attn.compressor.indexer.scorer.weights_proj.weight"] == "selector"
    summary = summarize_layers(result.layers, result.kept_dense, result.block_weights)
    assert "2 selectors" in headline(summary) and "4 routers" in headline(summary)


def test_all_zero_input_layer_keeps_its_weights_under_a_magnitude_mask(token_ids, capsys):
    """A closed gate: up_proj all zero makes down_proj's every input zero. SparseGPT would zero the whole
    layer; it gets a magnitude mask instead, its kept weights bit for bit the dense ones, and is named."""
    model = tiny_model("llama")
    name, blocks = find_blocks(model)
    with torch.no_grad():
        blocks[1].mlp.up_proj.weight.zero_()
    down = blocks[1].mlp.down_proj.weight
    dense = down.detach().clone()
    result = prune(model, token_ids)
    record = next(r for r in result.layers if r["name"] == f"{name}.1.mlp.down_proj")
    assert record["fallback"].startswith(NO_SIGNAL) and "saw 0 calibration tokens" in record["fallback"]
    assert torch.equal(down, dense * topk_mask(dense.abs(), SparsityPattern(0.5)))
    assert int((down == 0).sum()) == down.numel() // 2
    # the dense zeros of up_proj stay (all of it): more zeros than the target, but the dense layer had them
    up = next(r for r in result.layers if r["name"] == f"{name}.1.mlp.up_proj")
    assert up["sparsity"] == 1.0 and up["dense_zeros"] == blocks[1].mlp.up_proj.weight.numel()
    others = [r for r in result.layers if "fallback" in r and r["name"] != f"{name}.1.mlp.down_proj"]
    assert others == []
    err = capsys.readouterr().err
    assert f"1 layer(s) without calibration signal got a magnitude mask, kept weights unchanged: " \
           f"{name}.1.mlp.down_proj (128 tokens)" in err
    summary = summarize_layers(result.layers, result.kept_dense, result.block_weights)
    assert headline(summary).endswith("; 1 layer(s) without calibration signal under a magnitude mask")


def test_xlstm_proj_down_without_signal_is_kept_under_a_magnitude_mask(tmp_path, capsys):
    """xLSTM starts its FFN gates at zero, so ffn.proj_down sees only zeros: magnitude mask, named in the
    warning and the report; the saved tensors hold exactly the target's zeros. igate/fgate_preact are
    ordinary layers (their outputs choose nothing): pruned, never routers."""
    model_dir, calib = tmp_path / "xlstm", tmp_path / "calib.txt"
    model = built("xlstm", num_heads=4)
    dense = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    calib.write_text(random_text(3000))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, *prune_args(model_dir, calib, out, "--method", "sparsegpt", "--sparsity", "0.5"))
    assert code == 0, err
    report = json.loads((out / "lmprune_report.json").read_text())
    assert report["routers"] == [] and report["selectors"] == []
    records = {r["name"]: r for r in report["layers"]}
    downs = [n for n in records if n.endswith("ffn.proj_down")]
    assert len(downs) == 4
    assert all(records[n.replace("proj_down", "proj_up_gate")]["dense_zeros"] > 0 for n in downs)
    assert any(n.endswith("igate_preact") for n in records) and any(n.endswith("fgate_preact") for n in records)
    assert any("without calibration signal" in line and downs[0] in line for line in err)
    assert "without calibration signal" in format_report(report)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        for name in downs:
            assert records[name]["fallback"].startswith(NO_SIGNAL)
            saved = f.get_tensor(f"{name}.weight")
            original = dense[f"{name}.weight"]
            assert int((saved == 0).sum()) == saved.numel() // 2
            assert torch.equal(saved, original * topk_mask(original.abs(), SparsityPattern(0.5)))
    assert err[-1].startswith(f"lmprune: saved to {out}: sparsity ")


def test_saved_tensor_with_more_zeros_than_target_plus_dense_fails(tmp_path):
    weight = torch.arange(1, 17, dtype=torch.float32).reshape(4, 4)
    weight[:, :3] = 0  # 12 zeros where 50% asks for 8
    save_file({"block.0.fc.weight": weight, "block.0.experts.w": torch.stack([weight, weight.flip(1)])},
              str(tmp_path / "model.safetensors"))
    pattern = SparsityPattern(0.5)
    record = {"name": "block.0.fc", "shape": [4, 4], "sparsity": 0.75}
    assert verify_saved_zeros(str(tmp_path), [{**record, "dense_zeros": 4}], pattern) == 1
    with pytest.raises(LmpruneError, match=r"layer block.0.fc has 12 of 16 weights zero, more than the 8 its target "
                                           r"prunes plus the 3 the dense layer had"):
        verify_saved_zeros(str(tmp_path), [{**record, "dense_zeros": 3}], pattern)
    expert = {"name": "block.0.experts.w[1]", "shape": [4, 4], "sparsity": 0.75, "dense_zeros": 0}
    with pytest.raises(LmpruneError, match=r"layer block.0.experts.w\[1\] has 12 of 16"):
        verify_saved_zeros(str(tmp_path), [expert], pattern)
    with pytest.raises(LmpruneError, match="as saved has 12 of 16 weights zero, 13 should be"):
        verify_saved_zeros(str(tmp_path), [{**record, "target": 13 / 16}], pattern)


def test_headline_states_the_share_of_block_weights_and_what_was_kept_dense():
    layers = [{"name": f"l{i}", "shape": [256, 320], "sparsity": 0.5, "error": 0.1, "error_masked": 0.2}
              for i in range(16)]
    kept = [{"name": f"r{i}", "shape": [4, 1024], "weights": 4096, "kind": "router", "reason": "x"} for i in range(4)]
    kept.append({"name": "c", "shape": [8, 1, 4], "weights": 32, "kind": DenseReason.CONVOLUTION.value, "reason": "x"})
    total = 16 * 256 * 320 + 4 * 4096 + 32
    summary = summarize_layers(layers, kept, total)
    assert headline(summary) == ("sparsity 0.4938 of the block weights; 16,416 weights (1.2%) kept dense: "
                                 "4 routers, 1 convolution")
    assert summary["kept_dense"]["by_reason"] == {"router": {"tensors": 4, "weights": 16384},
                                                  "convolution": {"tensors": 1, "weights": 32}}
    report = {"summary": summary, "settings": {}, "layers": layers}
    assert "summary:  sparsity 0.4938 of the block weights; 16,416 weights (1.2%) kept dense" in format_report(report)
    # a report written before block totals were kept still reads
    assert headline(summarize_layers(layers)) == "16 layers at sparsity 0.5000"
