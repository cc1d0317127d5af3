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


def test_target_is_the_least_squares_fit(monkeypatch):
    monkeypatch.setattr(dense_targets, "DAMPING", 0.0)
    g = torch.Generator().manual_seed(0)
    Xp = torch.randn(400, 12, generator=g, dtype=torch.float64)
    Xd = Xp + 0.3 * torch.randn(400, 12, generator=g, dtype=torch.float64)
    W = torch.randn(5, 12, generator=g, dtype=torch.float64)
    fitted = dense_targets.dense_target(W, Xp.t() @ Xp, Xp.t() @ Xd)
    reference = torch.linalg.lstsq(Xp, Xd @ W.t()).solution.t()
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
    import lmprune.pipeline as pipeline

    calibration = calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 8, 24, 0)
    solver, pattern = build_layer_solver("sparsegpt"), SparsityPattern(0.6)
    short, whole = tiny_model("llama"), tiny_model("llama")
    prune_model(short, calibration, solver, pattern, CPU, batch_size=4, progress=False, sequential="layer",
                dense_targets=True)
    groups = pipeline.layer_groups
    monkeypatch.setattr(pipeline, "layer_groups", lambda *args: (groups(*args)[0], False))
    prune_model(whole, calibration, solver, pattern, CPU, batch_size=4, progress=False, sequential="layer",
                dense_targets=True)
    a, b = short.state_dict(), whole.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
