"""Batched expert solves: E same-shape layers solved at once give what E separate solves give, in the
solvers and through the pipeline (experts of a fused MoE tensor)."""

import pytest
import torch

from conftest import byte_tokenizer, random_text
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, tokenize
from lmprune.methods import build_method
from lmprune.pipeline import prune_model
from lmprune.solvers import SOLVERS, LayerSolver, build_layer_solver
from zoo import tiny_model

CPU = torch.device("cpu")
BATCHED = sorted(name for name, s in SOLVERS.items() if s.solve_batch is not None)
PATTERNS = [SparsityPattern(0.6), SparsityPattern(0.5, per_row=True), SparsityPattern.nm("2:4")]


def expert_problems(experts=5, rows=24, cols=32, seed=0):
    """Experts with their own input scales, token counts and one input never active in one expert, so that
    their solves differ (ALPS stops at different iterations)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(experts, rows, cols, generator=g)
    H = []
    for e in range(experts):
        X = torch.randn(40 + 17 * e, cols, generator=g) * (torch.rand(cols, generator=g) * 3 + 0.1 * e)
        if e == 2:
            X[:, 5] = 0  # a dead input: its Gram row and column are zero
        H.append(X.T @ X)
    return W, torch.stack(H)


def test_every_update_based_method_batches():
    assert {"sparsegpt", "admm1", "admm-grad", "alps"} <= set(BATCHED)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
@pytest.mark.parametrize("method", BATCHED)
def test_batch_equals_one_by_one(method, pattern):
    W, H = expert_problems()
    solver = build_layer_solver(method)
    batch = solver.solve_batch(W, H, pattern)
    assert len(batch) == W.shape[0]
    for e, got in enumerate(batch):
        alone = solver(W[e], H[e], pattern)
        assert torch.equal(got.mask, alone.mask), e
        torch.testing.assert_close(got.weight, alone.weight, rtol=1e-5, atol=1e-6)
        assert got.info.get("iterations") == alone.info.get("iterations")
        assert torch.all(got.weight[~got.mask] == 0)


def test_alps_batch_members_stop_on_their_own():
    W, H = expert_problems(experts=6, seed=3)
    H[4] = H[4] + 50 * torch.diag(torch.rand(H.shape[-1]))  # a very different problem
    solver = build_layer_solver("alps")
    iterations = [r.info["iterations"] for r in solver.solve_batch(W, H, SparsityPattern(0.7))]
    alone = [solver(W[e], H[e], SparsityPattern(0.7)).info["iterations"] for e in range(6)]
    assert iterations == alone and len(set(alone)) > 1  # the test has teeth only if they differ


def test_admm_batch_goes_to_float64_when_one_member_needs_it():
    g = torch.Generator().manual_seed(0)
    cols = 32
    X = [torch.randn(2000, cols, generator=g) for _ in range(3)]
    X[1] = torch.randn(2000, 1, generator=g) + 1e-3 * X[1]  # nearly identical inputs: cond bound > 1e6
    H = torch.stack([x.T @ x for x in X])
    W = torch.randn(3, 16, cols, generator=g)
    solver = build_layer_solver("admm1", options={"rho": 1e-5, "dampening": 0.0})
    assert [solver(W[e], H[e], SparsityPattern(0.5)).info["precision"] for e in range(3)] == [
        "float32", "float64", "float32"]
    batch = solver.solve_batch(W, H, SparsityPattern(0.5))
    assert [r.info["precision"] for r in batch] == ["float64"] * 3
    alone = solver(W[1], H[1], SparsityPattern(0.5))
    assert torch.equal(batch[1].mask, alone.mask)
    torch.testing.assert_close(batch[1].weight, alone.weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["sparsegpt", "alps"])
def test_pipeline_batches_fused_experts_with_the_same_result(method, monkeypatch):
    ids = tokenize(byte_tokenizer(), random_text(6000))
    windows = calibration_windows(ids, 16, 48, 0)  # enough tokens that no expert falls back to magnitude
    built = build_method(method)
    pattern = built.pattern(SparsityPattern(0.5))

    batched_model = tiny_model("mixtral")
    calls = []
    original = LayerSolver.solve_batch.fget

    def counting(self):
        batch = original(self)
        return None if batch is None else (lambda W, H, p: calls.append(W.shape[0]) or batch(W, H, p))

    monkeypatch.setattr(LayerSolver, "solve_batch", property(counting))
    batched = prune_model(batched_model, windows, built.layer_solver, pattern, CPU, batch_size=4, progress=False)
    monkeypatch.setattr(LayerSolver, "solve_batch", property(lambda self: None))
    single_model = tiny_model("mixtral")
    single = prune_model(single_model, windows, built.layer_solver, pattern, CPU, batch_size=4, progress=False)

    experts = batched_model.config.num_local_experts
    assert not any("fallback" in r for r in batched.layers)
    assert calls and set(calls) == {experts}  # every fused tensor in one batch of all its experts
    assert [r["name"] for r in batched.layers] == [r["name"] for r in single.layers]
    for a, b in zip(batched.layers, single.layers):
        assert a["tokens"] == b["tokens"] and a["sparsity"] == b["sparsity"] == 0.5
    for (name, p), q in zip(batched_model.named_parameters(), single_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
