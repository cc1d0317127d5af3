"""The architecture zoo: every decoder family transformers offers, as tiny random-init models.

For each: the pipeline's own block-by-block path reproduces the model's hidden state after every block
(sequences longer than the sliding windows and attention chunks, so per-layer-type masks matter); the
methods give every prunable weight (Linear, Conv1D, each expert slice) its exact target sparsity;
routers stay untouched; the checkpoint reloads in plain transformers with the same weights.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import byte_tokenizer, check_replay, random_text
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, evaluation_windows, tokenize
from lmprune.evaluate import perplexity
from lmprune.model import ExpertSlice, find_blocks, prunable_layers, text_config
from lmprune.pipeline import prune_model
from lmprune.solvers import build_layer_solver
from zoo import MODEL_TYPES, MOE_TYPES, SEQLEN, WINDOW, tiny_model

CPU = torch.device("cpu")
# Layers that only exist in the hybrid stacks and that lmprune cannot prune (depthwise convolutions, SSM
# state matrices): they must be named as left dense, nothing else may be.
NOT_LINEAR = ("conv1d.weight", "A_log")


@pytest.fixture(scope="module")
def token_ids():
    return tokenize(byte_tokenizer(), random_text(4000))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_replay_reproduces_every_block(model_type, token_ids):
    assert SEQLEN > WINDOW
    check_replay(tiny_model(model_type), token_ids[: 4 * SEQLEN].reshape(4, SEQLEN))


def _check_pruned(model, result, before, sparsity):
    blocks_name, blocks = find_blocks(model)
    config = text_config(model)
    layers = [layer for i, b in enumerate(blocks) for layer in prunable_layers(b, f"{blocks_name}.{i}", config=config)]
    routers = set(result.routers)
    pruned = {r["name"] for r in result.layers}
    for layer in layers:
        if any(n in routers for n in layer.param_names()):
            assert layer.name not in pruned
            assert torch.equal(layer.stored(), before[layer.param_names()[0]][layer.expert]
                               if isinstance(layer, ExpertSlice) else before[layer.param_names()[0]]), layer.name
            continue
        assert layer.name in pruned, layer.name
        assert layer.zeros() == int(layer.numel() * sparsity), layer.name
    for name in routers:
        assert torch.equal(model.get_parameter(name), before[name]), name
    for item in result.unpruned:
        assert item["name"].endswith(NOT_LINEAR), item
    return layers


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_sparsegpt_prunes_every_weight_and_reloads(model_type, token_ids, tmp_path):
    model = tiny_model(model_type)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calibration = calibration_windows(token_ids, nsamples=8, seqlen=32, seed=0)
    result = prune_model(model, calibration, build_layer_solver("sparsegpt"), SparsityPattern(0.5), CPU,
                         batch_size=4, progress=False)
    layers = _check_pruned(model, result, before, 0.5)
    if model_type in MOE_TYPES:
        assert result.routers and any(isinstance(layer, ExpertSlice) for layer in layers)

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    expected = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    ppl = perplexity(reloaded, evaluation_windows(token_ids, 32, 2), CPU, progress=False)
    assert 1.0 < ppl < float("inf")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_admm_grad_exact_sparsity(model_type, token_ids):
    model = tiny_model(model_type)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calibration = calibration_windows(token_ids, nsamples=8, seqlen=32, seed=1)
    result = prune_model(model, calibration, build_layer_solver("admm-grad", options={"iterations": "6", "gradual_steps": "4"}),
                         SparsityPattern(0.6), CPU, batch_size=4, progress=False)
    _check_pruned(model, result, before, 0.6)
