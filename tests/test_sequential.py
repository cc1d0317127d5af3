"""--sequential layer: data-flow groups from the block's own forward, Grams with earlier groups pruned."""

import pytest
import torch

from conftest import byte_tokenizer, random_text
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, tokenize
from lmprune.errors import LmpruneError
from lmprune.model import find_blocks, prunable_layers, record_block_calls, text_config
from lmprune.pipeline import LayerSolve, collect_inputs, prune_group, prune_model
from lmprune.sequential import layer_groups
from lmprune.solvers import build_layer_solver
from zoo import tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def calibration():
    return calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 8, 24, 0)


def _short_groups(groups):
    return [[layer.name.rsplit(".", 1)[-1] for layer in group] for group in groups]


@pytest.mark.parametrize("model_type, expected", [
    ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    # Phi runs attention and MLP side by side on the same normed input: q/k/v and fc1 are one group.
    ("phi", [["q_proj", "k_proj", "v_proj", "fc1"], ["fc2"], ["dense"]]),
])
def test_groups_follow_the_forward(model_type, expected, calibration):
    model = tiny_model(model_type)
    name, blocks = find_blocks(model)
    layers = prunable_layers(blocks[0], f"{name}.0", [], text_config(model))
    calls = record_block_calls(model, blocks, list(calibration.split(4)), CPU, CPU)
    groups, stop_early = layer_groups(blocks[0], layers, calls.for_block(0), calls.hidden, CPU)
    assert sorted(map(sorted, _short_groups(groups))) == sorted(map(sorted, expected))
    assert _short_groups(groups)[0] == expected[0] and stop_early


def test_sequential_equals_pruning_group_by_group_on_whole_passes(calibration):
    """The reference re-runs the whole block for every group (no early stop), groups named by hand."""
    solver, pattern = build_layer_solver("sparsegpt"), SparsityPattern(0.6)
    model = tiny_model("llama")
    prune_model(model, calibration, solver, pattern, CPU, batch_size=4, progress=False, sequential="layer")

    reference = tiny_model("llama")
    name, blocks = find_blocks(reference)
    calls = record_block_calls(reference, blocks, list(calibration.split(4)), CPU, CPU)
    hidden = calls.hidden
    order = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    for index, block in enumerate(blocks):
        layers = {layer.name.rsplit(".", 1)[-1]: layer
                  for layer in prunable_layers(block, f"{name}.{index}", [], text_config(reference))}
        call = calls.for_block(index)
        for group in order:
            collected = collect_inputs(block, f"{name}.{index}", list(layers.values()), call, hidden, CPU)
            for short in group:
                solve = LayerSolve(layers[short], collected.inputs[layers[short].name], None)
                prune_group([solve], solver, solver, pattern, {}, CPU)
        with torch.no_grad():
            hidden = [call.call(block, j, h, CPU) for j, h in enumerate(hidden)]

    uniform = tiny_model("llama")
    prune_model(uniform, calibration, solver, pattern, CPU, batch_size=4, progress=False)
    got, want, plain = model.state_dict(), reference.state_dict(), uniform.state_dict()
    for key in got:
        assert torch.equal(got[key], want[key]), key
    # The first group sees the dense inputs either way; later groups see the pruned ones.
    assert torch.equal(got[f"{name}.0.self_attn.q_proj.weight"], plain[f"{name}.0.self_attn.q_proj.weight"])
    assert not torch.equal(got[f"{name}.0.self_attn.o_proj.weight"], plain[f"{name}.0.self_attn.o_proj.weight"])


def test_fused_experts_are_refused_before_work(calibration):
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LmpruneError, match="--sequential layer cannot order fused expert tensors.*--best-quality"):
        prune_model(model, calibration, build_layer_solver("sparsegpt"), SparsityPattern(0.5), CPU,
                    progress=False, sequential="layer")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
