"""ALPS: batched PCG on a fixed support, the ADMM phase's quality, exact counts, settings."""

from __future__ import annotations

import pytest
import torch

from lmprune.config import SparsityPattern
from lmprune.errors import LmpruneError
from conftest import correlated_problem
from lmprune.masks import is_nm, prune_count
from lmprune.solvers import SOLVERS, build_layer_solver
from lmprune.solvers.alps import AlpsSettings, masked_pcg, solve, update
from lmprune.solvers.linalg import exact_masked_optimum, reconstruction_error, relative_error


def correlated_layer(out=64, inp=128, tokens=512, seed=0):
    return correlated_problem(out, inp, tokens, seed, scales="log")


def objective(W, W_new, H):
    return reconstruction_error(W, W_new, H)[0]


def test_masked_pcg_reaches_exact_optimum():
    W, H = correlated_layer(out=24, inp=64, tokens=256, seed=1)
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(W.shape, generator=g) > 0.6
    mask[3] = False  # an empty row stays zero
    exact = exact_masked_optimum(W, H, mask)
    # Normalise as the solver does, so the system is well scaled in float32.
    n = torch.sqrt(torch.diagonal(H))
    Hn = H / n[:, None] / n[None, :]
    Z = masked_pcg(Hn, (W * n) @ Hn, mask, X0=W * n, iterations=200, rtol=1e-7)
    pcg = Z / n
    assert not pcg[~mask].any()
    best = objective(W, exact, H)
    gap = (objective(W, pcg, H) - best) / best
    assert abs(gap) < 1e-5
    # A few steps already improve on the masked start, and more steps improve further.
    few = masked_pcg(Hn, (W * n) @ Hn, mask, X0=W * n, iterations=3) / n
    assert objective(W, few, H) < objective(W, W * mask, H)
    assert objective(W, pcg, H) < objective(W, few, H)


@pytest.mark.parametrize("sparsity", [0.7, 0.9])
def test_alps_beats_sparsegpt_and_wanda(sparsity):
    W, H = correlated_layer()
    pattern = SparsityPattern(sparsity=sparsity)
    errors = {}
    for name in ("alps", "sparsegpt", "wanda", "admm-grad"):
        if name not in SOLVERS:
            continue
        result = build_layer_solver(method=name)(W, H, pattern)
        errors[name] = relative_error(W, result.weight, H)
    assert errors["alps"] < errors["sparsegpt"] < errors["wanda"], errors
    assert errors["alps"] < 0.8 * errors["sparsegpt"], errors
    if "admm-grad" in errors:
        assert errors["alps"] < errors["admm-grad"], errors


def test_info_and_pcg_does_not_hurt():
    W, H = correlated_layer(seed=3)
    result = solve(W, H, SparsityPattern(sparsity=0.8), AlpsSettings())
    info = result.info
    assert 30 <= info["iterations"] <= 300 and info["rho"] >= 0.1
    assert info["error_after_pcg"] <= info["error_before_pcg"] * (1 + 1e-6)
    assert info["error_after_pcg"] == pytest.approx(relative_error(W, result.weight, H), rel=1e-4)
    # On the final support the polished weights are (near) the exact optimum.
    exact = relative_error(W, exact_masked_optimum(W, H, result.mask), H)
    assert info["error_after_pcg"] <= exact * 1.02


@pytest.mark.parametrize("sparsity", [0.5, 0.73])
def test_exact_layer_count(sparsity):
    W, H = correlated_layer(out=30, inp=50, seed=4)
    result = solve(W, H, SparsityPattern(sparsity=sparsity), AlpsSettings(max_iterations=40))
    assert int((~result.mask).sum()) == prune_count(W.numel(), sparsity)
    assert not result.weight[~result.mask].any()


def test_per_row_counts():
    W, H = correlated_layer(out=20, inp=64, seed=5)
    result = solve(W, H, SparsityPattern(sparsity=0.6, per_row=True), AlpsSettings(max_iterations=40))
    assert ((~result.mask).sum(1) == prune_count(64, 0.6)).all()
    assert not result.weight[~result.mask].any()


def test_two_four_valid_and_better_than_sparsegpt():
    W, H = correlated_layer(out=32, inp=64, seed=6)
    pattern = SparsityPattern(n=2, m=4)
    result = build_layer_solver(method="alps")(W, H, pattern)
    assert is_nm(result.mask, 2, 4) and int(result.mask.sum()) == W.numel() // 2
    assert not result.weight[~result.mask].any()
    sgpt = build_layer_solver(method="sparsegpt")(W, H, pattern)
    assert relative_error(W, result.weight, H) < relative_error(W, sgpt.weight, H)


def test_dead_inputs_and_zero_sparsity():
    W, H = correlated_layer(out=16, inp=32, seed=7)
    H[5, :] = 0
    H[:, 5] = 0
    result = solve(W, H, SparsityPattern(sparsity=0.5), AlpsSettings(max_iterations=40))
    assert torch.isfinite(result.weight).all()
    assert not result.mask[:, 5].any()  # a dead input's weights carry nothing: pruned first
    dense = solve(W, H, SparsityPattern(sparsity=0.0), AlpsSettings())
    assert dense.mask.all() and torch.equal(dense.weight, W)


def test_nm_width_must_divide():
    W, H = correlated_layer(out=8, inp=30, seed=9)
    with pytest.raises(ValueError):
        solve(W, H, SparsityPattern(n=2, m=4), AlpsSettings())


def test_fixed_mask_update_through_registry():
    W, H = correlated_layer(seed=8)
    layer = build_layer_solver(mask="wanda", update="alps", options={"pcg_iterations": "30"})
    assert layer.name == "wanda+alps"
    pattern = SparsityPattern(sparsity=0.7, per_row=True)
    result = layer(W, H, pattern)
    wanda_only = build_layer_solver(mask="wanda", update="none")(W, H, pattern)
    assert torch.equal(result.mask, wanda_only.mask)
    assert not result.weight[~result.mask].any()
    after = relative_error(W, result.weight, H)
    assert after < 0.7 * relative_error(W, wanda_only.weight, H)
    assert result.info["error_after_pcg"] == pytest.approx(after, rel=1e-6)
    weight, _ = update(W, H, result.mask, AlpsSettings(pcg_iterations=0))
    assert torch.allclose(weight, W * result.mask)


@pytest.mark.parametrize(
    "options",
    [
        {"rho0": "0"},
        {"growth_low": "0.9"},
        {"min_iterations": "400"},
        {"max_iterations": "0"},
        {"check_interval": "0"},
        {"pcg_iterations": "-1"},
        {"lambda2": "-0.1"},
        {"change_mid": "0.5", "change_high": "0.1"},
        {"pcg_iterations": "ten"},
        {"no_such_option": "1"},
    ],
)
def test_bad_settings_rejected(options):
    with pytest.raises(LmpruneError):
        build_layer_solver(method="alps", options=options)


def test_options_reach_settings():
    layer = build_layer_solver(method="alps", options={"rho0": "0.5", "max-iterations": "60"})
    assert layer.mask_settings.rho0 == 0.5 and layer.mask_settings.max_iterations == 60
