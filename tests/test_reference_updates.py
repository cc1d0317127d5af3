"""`--update exact` and `--update gd` (issue 32) on synthetic problems whose masked optimum is known."""

import pytest
import torch

from conftest import correlated_problem
from lmprune.config import SparsityPattern
from lmprune.errors import LmpruneError
from lmprune.solvers import build_layer_solver
from lmprune.solvers.linalg import relative_error


def lstsq_optimum(W, H, mask):
    """An independent reference: each row's least squares on its kept columns of X, X = chol(H)ᵀ,
    by QR (torch.linalg.lstsq), in float64."""
    X = torch.linalg.cholesky(H.double()).T  # XᵀX = H
    out = torch.zeros_like(W, dtype=torch.float64)
    for i in range(W.shape[0]):
        support = mask[i].nonzero().squeeze(1)
        y = X @ W[i].double()
        out[i, support] = torch.linalg.lstsq(X[:, support], y.unsqueeze(1)).solution.squeeze(1)
    return out


@pytest.fixture(scope="module")
def problem():
    return correlated_problem(rows=48, cols=96, tokens=1024)


@pytest.mark.parametrize("pattern", [SparsityPattern(0.6), SparsityPattern(0.5, per_row=True),
                                     SparsityPattern.nm("2:4")], ids=["60%", "50%-rows", "2:4"])
def test_exact_matches_the_least_squares_optimum(problem, pattern):
    W, H = problem
    result = build_layer_solver(mask="wanda", update="exact")(W, H, pattern)
    reference = lstsq_optimum(W, H, result.mask)
    assert torch.equal(result.weight == 0, ~result.mask | (reference == 0))
    relative = (result.weight.double() - reference).norm() / reference.norm()
    assert relative < 1e-5
    # And no update method does better on the same mask.
    for update in ("sparsegpt", "admm"):
        other = build_layer_solver(mask="wanda", update=update)(W, H, pattern)
        assert relative_error(W, result.weight, H) <= relative_error(W, other.weight, H) * (1 + 1e-6)


def test_exact_batches_rows_of_unequal_support(problem):
    """Per-layer masks give rows different support sizes; tiny chunks split them: same optimum."""
    W, H = problem
    mask = build_layer_solver("magnitude")(W, H, SparsityPattern(0.7)).mask
    assert mask.sum(1).unique().numel() > 3
    whole = build_layer_solver(mask="magnitude", update="exact")(W, H, SparsityPattern(0.7)).weight
    chunked = build_layer_solver(mask="magnitude", update="exact", options={"chunk_bytes": "1"})(
        W, H, SparsityPattern(0.7)).weight
    assert torch.allclose(whole, chunked, rtol=0, atol=1e-6)
    reference = lstsq_optimum(W, H, mask)
    assert (whole.double() - reference).norm() / reference.norm() < 1e-5


def test_exact_refuses_a_layer_too_large_in_one_line(problem):
    W, H = problem
    solver = build_layer_solver(mask="wanda", update="exact", options={"max_work": "1000"})
    with pytest.raises(LmpruneError, match=r"a \[48, 96\] layer needs .* over its limit"):
        solver(W, H, SparsityPattern(0.5))


def test_exact_singular_sub_gram_says_how_to_proceed():
    """Fewer tokens than kept inputs: the optimum is not unique; the error names the way out."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(8, 32, generator=g)
    W = torch.randn(4, 32, generator=g)
    H = X.T @ X
    with pytest.raises(LmpruneError, match="dampening=0.01"):
        build_layer_solver(mask="magnitude", update="exact")(W, H, SparsityPattern(0.5))
    damped = build_layer_solver(mask="magnitude", update="exact", options={"dampening": "0.01"})(
        W, H, SparsityPattern(0.5))
    assert torch.isfinite(damped.weight).all()


def test_gd_descends_to_the_optimum_and_keeps_the_mask(problem):
    W, H = problem
    pattern = SparsityPattern(0.6)
    mask = build_layer_solver("wanda")(W, H, pattern).mask
    optimum = relative_error(W, lstsq_optimum(W, H, mask).float(), H)
    masked = relative_error(W, W * mask, H)
    errors = []
    for iterations in (10, 100, 2000):
        result = build_layer_solver(mask="wanda", update="gd", options={"iterations": iterations})(W, H, pattern)
        assert torch.equal(result.mask, mask)
        assert bool((result.weight[~mask] == 0).all())
        errors.append(relative_error(W, result.weight, H))
    assert masked > errors[0] > errors[1] > errors[2] >= optimum * (1 - 1e-6)
    assert errors[2] < optimum * 1.01  # within 1% of the optimum given enough steps


@pytest.mark.parametrize("options, message", [({"lr": "0"}, "lr"), ({"iterations": "0"}, "iterations"),
                                              ({"beta2": "1"}, "beta2"), ({"dampening": "-1"}, "dampening")])
def test_bad_reference_settings(options, message):
    update = "exact" if "dampening" in options else "gd"
    with pytest.raises(LmpruneError, match=message):
        build_layer_solver(mask="wanda", update=update, options=options)
