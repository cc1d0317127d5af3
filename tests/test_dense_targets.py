"""--dense-targets: the target weight is the least-squares fit of the dense outputs; block 0 is unchanged."""

import pytest
import torch

from conftest import byte_tokenizer, random_text
from lmprune import dense_targets
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, tokenize
from lmprune.errors import LmpruneError
from lmprune.model import find_blocks
from lmprune.pipeline import prune_model
from lmprune.solvers import build_layer_solver
from zoo import tiny_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("block", [False, True])
def test_target_is_the_least_squares_fit(monkeypatch, block):
    """W′ fits X_d Wᵀ from X_p; with block targets (E = X_pᵀ(R_d − R_p)) it fits X_d Wᵀ + (R_d − R_p)."""
    monkeypatch.setattr(dense_targets, "DAMPING", 0.0)
    g = torch.Generator().manual_seed(0)
    Xp = torch.randn(400, 12, generator=g, dtype=torch.float64)
    Xd = Xp + 0.3 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    miss = torch.randn(400, 5, generator=g, dtype=torch.float64) if block else torch.zeros(400, 5, dtype=torch.float64)
    fitted = dense_targets.dense_target(W, Xp.t() @ Xp, Xp.t() @ Xd, Xp.t() @ miss if block else None)
    reference = torch.linalg.lstsq(Xp, Xd @ W.t() + miss).solution.t()
    assert torch.allclose(fitted, reference, atol=1e-10)


def test_same_inputs_give_the_weight_back():
    H = torch.eye(4) * 3 + 1
    W = torch.randn(2, 4)
    assert torch.equal(dense_targets.dense_target(W, H, H), W)


def test_first_block_is_pruned_as_without_dense_targets():
    calibration = calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 8, 24, 0)
    solver, pattern = build_layer_solver("sparsegpt"), SparsityPattern(0.6)
    plain, dense = tiny_model("llama"), tiny_model("llama")
    prune_model(plain, calibration, solver, pattern, CPU, batch_size=4, progress=False)
    prune_model(dense, calibration, solver, pattern, CPU, batch_size=4, progress=False, dense_targets=True)
    name, _ = find_blocks(plain)
    a, b = plain.state_dict(), dense.state_dict()
    for key in a:
        if key.startswith(f"{name}.0."):
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a[f"{name}.1.mlp.down_proj.weight"], b[f"{name}.1.mlp.down_proj.weight"])
    assert int((b[f"{name}.1.mlp.down_proj.weight"] == 0).sum()) == int(0.6 * 96 * 64)


def test_fused_experts_are_refused():
    calibration = calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 4, 24, 0)
    with pytest.raises(LmpruneError, match="--dense-targets cannot read fused expert tensors.*--best-quality"):
        prune_model(tiny_model("mixtral"), calibration, build_layer_solver("sparsegpt"), SparsityPattern(0.5), CPU,
                    progress=False, dense_targets=True)


def test_passes_cut_short_change_nothing(monkeypatch):
    """Sequential + dense targets: stopping each pass after the group's last layer gives the same model."""
    import lmprune.sequential as sequential

    calibration = calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 8, 24, 0)
    solver, pattern = build_layer_solver("sparsegpt"), SparsityPattern(0.6)
    short, whole = tiny_model("llama"), tiny_model("llama")
    prune_model(short, calibration, solver, pattern, CPU, batch_size=4, progress=False, sequential="layer",
                dense_targets=True)
    groups = sequential.layer_groups
    monkeypatch.setattr(sequential, "layer_groups", lambda *args: (groups(*args)[0], False))
    prune_model(whole, calibration, solver, pattern, CPU, batch_size=4, progress=False, sequential="layer",
                dense_targets=True)
    a, b = short.state_dict(), whole.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _down_proj_scale(model_type: str, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmprune.model.calls import record_block_calls
    from lmprune.pipeline import plan_layers
    from zoo import COMMON

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **COMMON, **config)).eval()
    _, blocks = find_blocks(model)

    ids = torch.randint(0, 256, (2, 24))
    calls = record_block_calls(model, blocks, [ids], CPU, CPU)
    layers = {layer.name.rsplit(".", 2)[-2] + "." + layer.name.rsplit(".", 1)[-1]: layer
              for layer in plan_layers(model, SparsityPattern(0.5), [])[1]}
    block = blocks[1]
    return {key: dense_targets.output_scale(block, layer, calls.for_block(1), calls.hidden[0], CPU)
            for key, layer in layers.items() if key in ("mlp.down_proj", "self_attn.o_proj")}


def test_output_scale_is_read_off_the_block():
    llama = _down_proj_scale("llama")
    assert llama["mlp.down_proj"] == (1.0, "")
    assert llama["self_attn.o_proj"][0] is None  # its output also feeds the MLP: no fixed scale
    granite = _down_proj_scale("granite", residual_multiplier=0.25)  # Granite scales each residual branch
    assert granite["mlp.down_proj"][0] == pytest.approx(0.25, rel=1e-4)
    for model_type in ("gemma2", "olmo2"):  # a norm after the MLP, before the residual add
        # (OLMo2's random-init MLP outputs sit far below its norm's ε, where the norm is linear: the check
        # at the block output's scale is what catches it)
        alpha, why = _down_proj_scale(model_type)["mlp.down_proj"]
        assert alpha is None and "fixed scale" in why, model_type


def _last_hidden_error(model, dense, windows) -> float:
    with torch.no_grad():
        got = model.model(windows).last_hidden_state
        want = dense.model(windows).last_hidden_state
    return float((got - want).norm() / want.norm())


def test_block_targets_bring_the_model_output_closer_to_the_dense_one(capsys):
    calibration = calibration_windows(tokenize(byte_tokenizer(), random_text(6000)), 16, 24, 0)
    solver, pattern = build_layer_solver("sparsegpt"), SparsityPattern(0.7)
    dense, layer, block = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    prune_model(layer, calibration, solver, pattern, CPU, batch_size=4, progress=False, sequential="layer",
                dense_targets=True)
    result = prune_model(block, calibration, solver, pattern, CPU, batch_size=4, progress=False, sequential="layer",
                         dense_targets=True, block_targets=True)
    name, _ = find_blocks(block)
    assert result.block_targets == {"layers": [f"{name}.{i}.mlp.down_proj" for i in range(4)]}
    assert int((block.state_dict()[f"{name}.3.mlp.down_proj.weight"] == 0).sum()) == int(0.7 * 64 * 96)
    with_blocks, without = _last_hidden_error(block, dense, calibration), _last_hidden_error(layer, dense, calibration)
    assert with_blocks < 0.9 * without, (with_blocks, without)


def test_block_targets_that_cannot_apply_are_reported(capsys):
    calibration = calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 8, 24, 0)
    model = tiny_model("gemma2")
    result = prune_model(model, calibration, build_layer_solver("sparsegpt"), SparsityPattern(0.5), CPU,
                         batch_size=4, progress=False, sequential="layer", dense_targets=True, block_targets=True)
    assert sorted(result.block_targets) == ["not_applied"] and len(result.block_targets["not_applied"]) == 4
    err = capsys.readouterr().err
    assert "block targets did not apply in 4 block(s), which kept plain dense targets" in err
    with pytest.raises(LmpruneError, match="--block-targets needs --dense-targets and --sequential layer"):
        prune_model(model, calibration, build_layer_solver("sparsegpt"), SparsityPattern(0.5), CPU,
                    progress=False, dense_targets=True, block_targets=True)
