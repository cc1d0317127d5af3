"""MoE experts: per-expert Gram matrices equal to the routed tokens' own, --moe-calibration all, experts that
receive no token, nn.Linear experts in a ModuleList, routers never pruned, unknown weights named."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import byte_tokenizer, random_text
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, tokenize
from lmprune.masks import is_nm
from lmprune.methods import build_method
from lmprune.model import find_blocks, prunable_layers, record_block_calls, text_config
from lmprune.pipeline import collect_inputs, prune_model
from lmprune.report import summarize_layers
from lmprune.solvers import build_layer_solver
from zoo import tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def token_ids():
    return tokenize(byte_tokenizer(), random_text(4000))


def moe_inputs(model, block, ids):
    """The MoE module's input tokens [T, hidden] for block 0, and the router's top-k choice [T, k]."""
    seen = {}

    def keep(module, args):  # returns None: a pre-hook's return value would replace the input
        seen.setdefault("x", args[0].reshape(-1, args[0].shape[-1]))

    hook = block.mlp.register_forward_pre_hook(keep)
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        hook.remove()
        _, _, top_k = block.mlp.gate(seen["x"])
    return seen["x"], top_k


def expert_intermediate(experts, e, x):
    gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return experts.act_fn(gate) * up


@pytest.mark.parametrize("mode", ["routed", "all"])
def test_expert_grams_sum_exactly_their_tokens(mode, token_ids):
    model = tiny_model("mixtral")
    name, blocks = find_blocks(model)
    ids = token_ids[:96].reshape(4, 24)
    calls = record_block_calls(model, blocks, list(ids.split(2)), CPU, CPU)
    layers = prunable_layers(blocks[0], f"{name}.0", config=text_config(model))
    collected = collect_inputs(blocks[0], f"{name}.0", layers, calls.for_block(0), calls.hidden, CPU,
                                with_stats=True, moe_calibration=mode)
    # What a method reading the diagonal alone gets (statistics.py), with and without XᵀX beside it.
    diagonal = collect_inputs(blocks[0], f"{name}.0", layers, calls.for_block(0), calls.hidden, CPU,
                              moe_calibration=mode, statistics="diagonal").inputs
    both = collect_inputs(blocks[0], f"{name}.0", layers, calls.for_block(0), calls.hidden, CPU,
                          moe_calibration=mode, statistics="diagonal", full_gram=True).inputs
    x, top_k = moe_inputs(model, blocks[0], ids)
    experts = blocks[0].mlp.experts
    assert collected.routers == {f"{name}.0.mlp.gate.weight"}
    for e in range(experts.num_experts):
        xe = x[(top_k == e).any(-1)] if mode == "routed" else x
        assert 0 < xe.shape[0] < x.shape[0] or mode == "all"
        hidden_e = expert_intermediate(experts, e, xe)
        for param, X in (("gate_up_proj", xe), ("down_proj", hidden_e)):
            got = collected.inputs[f"{name}.0.mlp.experts.{param}[{e}]"]
            assert got.tokens == X.shape[0]
            assert torch.allclose(got.gram, X.t() @ X, rtol=1e-4, atol=1e-4), (param, e)
            assert torch.allclose(got.stats.total, X.sum(0), rtol=1e-4, atol=1e-4), (param, e)
            alone = diagonal[f"{name}.0.mlp.experts.{param}[{e}]"]
            assert alone.gram is None and alone.tokens == X.shape[0]
            assert torch.allclose(alone.diagonal, (X * X).sum(0), rtol=1e-4, atol=1e-5), (param, e)
            beside = both[f"{name}.0.mlp.experts.{param}[{e}]"]
            assert torch.equal(beside.diagonal, alone.diagonal) and torch.equal(beside.gram, got.gram), (param, e)


def test_transposed_expert_storage_is_read_from_the_models_products(token_ids):
    """gpt_oss stores experts [in, out] (flagged); llama4 does too, unflagged, and multiplies with bmm."""
    for model_type, attr in (("gpt_oss", "mlp"), ("llama4_text", "feed_forward")):
        model = tiny_model(model_type)
        name, blocks = find_blocks(model)
        calibration = calibration_windows(token_ids, nsamples=8, seqlen=32, seed=0)
        result = prune_model(model, calibration, build_layer_solver("wanda"), SparsityPattern.nm("2:4"), CPU,
                             batch_size=4, progress=False)
        experts = [r for r in result.layers if "[" in r["name"]]
        assert experts and all(r["shape"][1] == 64 or r["shape"][0] == 64 for r in experts)
        fused = getattr(blocks[0], attr).experts.gate_up_proj  # [experts, in=hidden, out]
        for e in range(fused.shape[0]):
            assert is_nm(fused[e].t() != 0, 2, 4), (model_type, e)  # 2:4 along the input dimension


def _never_route_to(gate, banned: int):
    """Patch a Mixtral router so that expert `banned` never receives a token."""

    def forward(hidden_states):
        logits = F.linear(hidden_states.reshape(-1, gate.hidden_dim), gate.weight)
        logits[:, banned] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top, index = torch.topk(probs, gate.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    gate.forward = forward


@pytest.mark.parametrize("method", ["sparsegpt", "alps", "admm-grad", "wanda", "dsnot"])
def test_expert_without_tokens_is_neither_deleted_nor_dense(method, token_ids):
    model = tiny_model("mixtral")
    name, blocks = find_blocks(model)
    for block in blocks:
        _never_route_to(block.mlp.gate, banned=3)
    before = blocks[0].mlp.experts.down_proj[3].detach().clone()
    built = build_method(method)
    result = prune_model(model, calibration_windows(token_ids, 8, 32, 0), built.layer_solver,
                         built.pattern(SparsityPattern(0.5)), CPU, batch_size=4, progress=False)
    records = {r["name"]: r for r in result.layers}
    for param in ("gate_up_proj", "down_proj"):
        record = records[f"{name}.0.mlp.experts.{param}[3]"]
        assert record["tokens"] == 0 and "magnitude" in record["fallback"]
        assert record["sparsity"] == 0.5
    kept = blocks[0].mlp.experts.down_proj[3]
    assert torch.equal(kept[kept != 0], before[kept != 0])  # magnitude keeps the weights it keeps
    assert int((kept != 0).sum()) == kept.numel() // 2
    for n, r in records.items():  # the fallback is for experts with fewer tokens than inputs, and only them
        assert ("fallback" in r) == (r["tokens"] < r["shape"][1]), n
    summary = summarize_layers(result.layers)
    named = {r["name"]: r["tokens"] for r in summary["layers_with_fallback"]}
    assert {n for n, t in named.items() if t == 0} == {f"{name}.{i}.mlp.experts.{p}[3]" for i in range(len(blocks))
                                                        for p in ("gate_up_proj", "down_proj")}


class LegacyExpert(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=False)
        self.w2 = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)))


class LegacyMoE(nn.Module):
    """transformers-4.x / remote-code style: a router Linear and a ModuleList of Linear experts."""

    def __init__(self, hidden, inner, experts=4, top_k=2, banned=None):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(LegacyExpert(hidden, inner) for _ in range(experts))
        self.top_k, self.banned = top_k, banned

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        logits = self.router(flat)
        if self.banned is not None:
            logits[:, self.banned] = float("-inf")
        weights, index = torch.topk(logits.softmax(-1), self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(index == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.reshape(x.shape)


def test_linear_experts_in_a_module_list(token_ids):
    model = tiny_model("llama")
    torch.manual_seed(1)
    name, blocks = find_blocks(model)
    for block in blocks:
        block.mlp = LegacyMoE(64, 48, banned=2)
    router_before = blocks[0].mlp.router.weight.detach().clone()
    result = prune_model(model, calibration_windows(token_ids, 8, 32, 0), build_layer_solver("sparsegpt"),
                         SparsityPattern(0.5), CPU, batch_size=4, progress=False)
    assert f"{name}.0.mlp.router.weight" in result.routers
    assert torch.equal(blocks[0].mlp.router.weight, router_before)
    records = {r["name"]: r for r in result.layers}
    assert f"{name}.0.mlp.router" not in records
    total = 8 * 32
    for e in range(4):
        record = records[f"{name}.0.mlp.experts.{e}.w1"]
        assert record["sparsity"] == 0.5
        if e == 2:
            assert record["tokens"] == 0 and "magnitude" in record["fallback"]
        else:
            assert 64 <= record["tokens"] < total and "fallback" not in record
    assert records[f"{name}.0.self_attn.q_proj"]["tokens"] == total
    assert result.unpruned == []


class EinsumMLP(nn.Module):
    """A block MLP whose weights lmprune has no view for: a plain matrix and a fused 3-D tensor, both
    multiplied through einsum."""

    def __init__(self, hidden):
        super().__init__()
        self.num_experts = 2
        self.mixing = nn.Parameter(torch.randn(hidden, hidden) / hidden**0.5)
        self.fused = nn.Parameter(torch.randn(2, hidden, hidden) / hidden**0.5)

    def forward(self, x):
        y = torch.einsum("bth,oh->bto", x, self.mixing)
        return torch.einsum("bth,eoh->bto", y, self.fused)


def test_weights_lmprune_cannot_prune_are_named(token_ids, capsys):
    model = tiny_model("llama")
    name, blocks = find_blocks(model)
    blocks[1].mlp = EinsumMLP(64)
    fused_before = blocks[1].mlp.fused.detach().clone()
    result = prune_model(model, calibration_windows(token_ids, 4, 32, 0), build_layer_solver("sparsegpt"),
                         SparsityPattern(0.5), CPU, batch_size=4, progress=False)
    unpruned = {u["name"]: u["reason"] for u in result.unpruned}
    assert set(unpruned) == {f"{name}.1.mlp.mixing", f"{name}.1.mlp.fused"}
    assert "einsum" in unpruned[f"{name}.1.mlp.fused"]
    assert "cannot prune" in unpruned[f"{name}.1.mlp.mixing"]
    assert torch.equal(blocks[1].mlp.fused, fused_before)
    assert not any("fused" in r["name"] for r in result.layers)
    err = capsys.readouterr().err
    assert "warning: 2 block weight(s) left dense" in err and f"{name}.1.mlp.fused" in err


def test_skip_excludes_experts_without_warning(token_ids, capsys):
    model = tiny_model("qwen2_moe")
    name, blocks = find_blocks(model)
    result = prune_model(model, calibration_windows(token_ids, 4, 32, 0), build_layer_solver("wanda"),
                         SparsityPattern(0.5), CPU, skip=[r"experts\.down_proj"], batch_size=4, progress=False)
    assert not any("experts.down_proj" in r["name"] for r in result.layers)
    assert any("experts.gate_up_proj" in r["name"] for r in result.layers)
    assert result.unpruned == [] and "left dense" not in capsys.readouterr().err
    # qwen2_moe's shared expert is an ordinary MLP (pruned); its one-output gate is not
    assert f"{name}.0.mlp.shared_expert.down_proj" in {r["name"] for r in result.layers}
    assert f"{name}.0.mlp.shared_expert_gate.weight" in result.routers


def test_sparsellm_names_the_experts_it_leaves_layerwise(token_ids):
    model = tiny_model("qwen2_moe")
    built = build_method("sparsellm", options={"epochs": "1"})
    result = prune_model(model, calibration_windows(token_ids, 4, 32, 0), built.layer_solver,
                         built.pattern(SparsityPattern(0.5)), CPU, batch_size=4, refiner=built.refiner, progress=False)
    block = result.blocks[0]
    assert "MoE experts left to the layer-wise pass" in block["note"] and "experts.gate_up_proj" in block["note"]
    assert [m["down"] for m in block["mlps"]] == ["model.layers.0.mlp.shared_expert.down_proj"]


def test_all_tokens_reach_every_expert(token_ids):
    model = tiny_model("olmoe")
    result = prune_model(model, calibration_windows(token_ids, 4, 32, 0), build_layer_solver("sparsegpt"),
                         SparsityPattern(0.5), CPU, batch_size=4, progress=False, moe_calibration="all")
    experts = [r for r in result.layers if "[" in r["name"]]
    assert len(experts) == 4 * 4 * 2
    assert all(r["tokens"] == 4 * 32 and "fallback" not in r and r["sparsity"] == 0.5 for r in experts)


def test_all_tokens_needs_experts_called_with_their_routing(token_ids):
    """Llama 4's experts take pre-routed inputs: 'all' cannot be honoured, and says so."""
    from lmprune.errors import LmpruneError

    with pytest.raises(LmpruneError, match="moe-calibration routed"):
        prune_model(tiny_model("llama4_text"), calibration_windows(token_ids, 2, 32, 0), build_layer_solver("wanda"),
                    SparsityPattern(0.5), CPU, progress=False, moe_calibration="all")


def test_mask_and_update_composition_on_experts(token_ids):
    """--mask wanda --update admm on fused experts: N:M masks along each slice's inputs, weights updated."""
    model = tiny_model("mixtral")
    name, blocks = find_blocks(model)
    before = blocks[0].mlp.experts.gate_up_proj.detach().clone()
    result = prune_model(model, calibration_windows(token_ids, 8, 32, 0),
                         build_layer_solver(mask="wanda", update="admm"), SparsityPattern.nm("2:4"), CPU,
                         batch_size=4, progress=False)
    fused = blocks[0].mlp.experts.gate_up_proj  # [experts, out, in]
    for e in range(fused.shape[0]):
        assert is_nm(fused[e] != 0, 2, 4), e
        record = next(r for r in result.layers if r["name"] == f"{name}.0.mlp.experts.gate_up_proj[{e}]")
        if "fallback" not in record:  # the update moved the kept weights
            kept = fused[e] != 0
            assert not torch.equal(fused[e][kept], before[e][kept]), e
