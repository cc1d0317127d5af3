"""ADMM update, ADMM1 and ADMM-Grad on small synthetic least-squares problems."""

from __future__ import annotations

import pytest
import torch

from conftest import correlated_problem
from lmprune.config import SparsityPattern
from lmprune.errors import LmpruneError
from lmprune.masks import is_nm
from lmprune.solvers import build_layer_solver, method_names, update_names
from lmprune.solvers import admm
from lmprune.solvers.linalg import exact_masked_optimum, relative_error

torch.set_num_threads(1)


def make_problem(out=63, inp=96, tokens=400, seed=0):
    return correlated_problem(out, inp, tokens, seed, scales="log")


def random_mask(shape, keep=0.5, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < keep


def damped(H, lam):
    """The Gram matrix ADMM actually fits: λ on the unit diagonal after preconditioning = λ·diag(H)."""
    return H + lam * torch.diag(torch.diag(H))


def gap(W, W_new, W_opt, H):
    """Relative excess objective over the exact masked optimum."""
    f_opt = relative_error(W, W_opt, H)
    return (relative_error(W, W_new, H) - f_opt) / f_opt


@pytest.fixture(scope="module")
def problem():
    return make_problem()


# --- fixed-mask update --------------------------------------------------------------------------


def test_update_converges_to_exact_masked_optimum(problem):
    # Without dampening ADMM must reach the exact optimum of the undamped problem.
    W, H = problem
    mask = random_mask(W.shape)
    settings = admm.ADMMSettings(iterations=300, dampening=0.0)
    W_new, info = admm.update(W, H, mask, settings)
    assert info["iterations"] == 300
    assert torch.all(W_new[~mask] == 0)
    assert gap(W, W_new, exact_masked_optimum(W, H, mask), H) < 1e-4


@pytest.mark.parametrize("lam", [0.1, 0.0])
def test_update_close_after_default_iterations(problem, lam):
    # 20 iterations (the default). With the default λ = 0.1 the problem solved is the damped one,
    # so the gap is measured on it: objective and optimum both under H + λ·diag(H).
    W, H = problem
    mask = random_mask(W.shape, seed=2)
    W_new, _ = admm.update(W, H, mask, admm.ADMMSettings(dampening=lam))
    Hd = damped(H, lam)
    assert gap(W, W_new, exact_masked_optimum(W, Hd, mask), Hd) < 1e-2


def test_update_full_mask_keeps_weights_and_is_scale_invariant(problem):
    W, H = problem
    full = torch.ones_like(W, dtype=torch.bool)
    W_full, _ = admm.update(W, H, full, admm.ADMMSettings())
    assert torch.allclose(W_full, W, atol=1e-3)  # float32 round-off only
    mask = random_mask(W.shape, seed=3)
    a, _ = admm.update(W, H, mask, admm.ADMMSettings())
    b, _ = admm.update(W, H * 1e4, mask, admm.ADMMSettings())
    assert torch.allclose(a, b, atol=1e-3)


def test_admm_update_beats_sparsegpt_update_on_wanda_mask(problem):
    W, H = problem
    pattern = SparsityPattern(0.6, per_row=True)
    with_admm = build_layer_solver(mask="wanda", update="admm")(W, H, pattern)
    with_sgpt = build_layer_solver(mask="wanda", update="sparsegpt")(W, H, pattern)
    assert torch.equal(with_admm.mask, with_sgpt.mask)
    assert torch.all(with_admm.weight[~with_admm.mask] == 0)
    err_admm = relative_error(W, with_admm.weight, H)
    err_sgpt = relative_error(W, with_sgpt.weight, H)
    assert err_admm <= err_sgpt
    # ADMM1 is the same composition under one name.
    admm1 = build_layer_solver(method="admm1")(W, H, pattern)
    assert torch.equal(admm1.mask, with_admm.mask)
    assert torch.allclose(admm1.weight, with_admm.weight, atol=1e-5)


def test_dead_inputs(problem):
    W, H = problem
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0
    mask = random_mask(W.shape, seed=4)
    W_new, _ = admm.update(W, H, mask, admm.ADMMSettings())
    assert torch.isfinite(W_new).all()
    assert torch.all(W_new[:, 5] == 0)
    result = build_layer_solver(method="admm-grad")(W, H, SparsityPattern(0.5))
    assert torch.isfinite(result.weight).all()


def test_float64_fallback_when_ill_conditioned(problem):
    # λ = 0 and a tiny ρ leave the system badly conditioned: the layer is solved in float64.
    W, H = problem
    mask = random_mask(W.shape, seed=5)
    settings = admm.ADMMSettings(iterations=5, rho=1e-7, dampening=0.0)
    W_new, info = admm.update(W, H, mask, settings)
    assert info["precision"] == "float64"
    assert W_new.dtype == torch.float32 and torch.isfinite(W_new).all()
    assert admm.update(W, H, mask, admm.ADMMSettings())[1]["precision"] == "float32"


# --- ADMM-Grad ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_admm_grad_exact_layer_count(problem, sparsity):
    W, H = problem
    result = build_layer_solver(method="admm-grad")(W, H, SparsityPattern(sparsity))
    pruned = int((~result.mask).sum())
    assert pruned == int(W.numel() * sparsity)  # 63·96 = 6048: 3024 at 50%, 4233 at 70%
    assert torch.all(result.weight[~result.mask] == 0)
    assert result.info["iterations"] == 20
    # Per-layer: rows are not all pruned alike.
    assert len(set((~result.mask).sum(1).tolist())) > 1


def test_admm_grad_exact_per_row_count(problem):
    W, H = problem
    result = build_layer_solver(method="admm-grad", options={"schedule": "slow"})(
        W, H, SparsityPattern(0.7, per_row=True)
    )
    assert torch.all((~result.mask).sum(1) == int(96 * 0.7))  # 67 of 96 in every row


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_admm_grad_nm(problem, n, m):
    W, H = problem
    result = build_layer_solver(method="admm-grad")(W, H, SparsityPattern(n=n, m=m))
    assert is_nm(result.mask, n, m)
    assert int(result.mask.sum()) == W.numel() * n // m  # exactly n kept in every group
    assert torch.all(result.weight[~result.mask] == 0)
    wanda = build_layer_solver(method="wanda")(W, H, SparsityPattern(n=n, m=m))
    assert relative_error(W, result.weight, H) < relative_error(W, wanda.weight, H)


def test_error_ordering_at_70_percent(problem):
    W, H = problem
    pattern = SparsityPattern(0.7)
    errors = {
        name: relative_error(W, build_layer_solver(method=name)(W, H, pattern).weight, H)
        for name in ("admm-grad", "sparsegpt", "wanda")
    }
    assert errors["admm-grad"] < errors["sparsegpt"] < errors["wanda"], errors


# --- registry and settings ----------------------------------------------------------------------


def test_registry():
    assert {"admm1", "admm-grad"} <= set(method_names())
    assert "admm" not in method_names()  # update only
    assert "admm" in update_names()
    assert build_layer_solver(method="admm1").per_row_default
    assert not build_layer_solver(method="admm-grad").per_row_default
    assert build_layer_solver(method="admm-grad", options={"iterations": "30", "rho": "2"}).settings_dict() == {
        "iterations": 30, "rho": 2.0, "dampening": 0.1, "eps": 1e-8, "shrink": "dense", "gradual_steps": 15, "schedule": "fast",
    }


@pytest.mark.parametrize(
    "method,options",
    [
        ("admm1", {"iterations": 0}),
        ("admm1", {"iterations": "many"}),
        ("admm1", {"rho": 0}),
        ("admm1", {"rho": "nan"}),
        ("admm1", {"dampening": -0.1}),
        ("admm1", {"eps": -1}),
        ("admm1", {"schedule": "slow"}),  # not an ADMM1 option
        ("admm-grad", {"schedule": "medium"}),
        ("admm-grad", {"gradual_steps": 0}),
        ("admm-grad", {"gradual_steps": 25}),  # more than the 20 iterations
    ],
)
def test_bad_settings(method, options):
    with pytest.raises(LmpruneError):
        build_layer_solver(method=method, options=options)


def test_bad_settings_for_update():
    with pytest.raises(LmpruneError):
        build_layer_solver(mask="wanda", update="admm", options={"rho": -1})


def test_shrink_to_zero_is_a_ridge_towards_zero():
    """shrink=zero minimises ‖X(W−Ŵ)‖² + λ‖Ŵ‖² on the mask (preconditioned), so its kept weights are smaller."""
    from conftest import correlated_problem
    from lmprune.config import SparsityPattern
    from lmprune.solvers import build_layer_solver

    W, H = correlated_problem(rows=32, cols=64, tokens=512)
    dense = build_layer_solver("admm1", options={"iterations": "200"})(W, H, SparsityPattern(0.5))
    ridge = build_layer_solver("admm1", options={"iterations": "200", "shrink": "zero"})(W, H, SparsityPattern(0.5))
    assert torch.equal(dense.mask, ridge.mask)
    assert ridge.weight.norm() < dense.weight.norm()
    with pytest.raises(LmpruneError, match="shrink"):
        build_layer_solver("admm1", options={"shrink": "one"})
