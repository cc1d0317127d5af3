"""DSnoT: prune-and-grow on Wanda's mask towards zero expected output error, weights never changed."""

import pytest
import torch

from conftest import correlated_problem, text_file  # noqa: F401  (fixture)
from lmprune.config import SparsityPattern
from lmprune.errors import LmpruneError
from lmprune.masks import is_nm
from lmprune.methods import build_method
from lmprune.solvers import InputStats, build_layer_solver
from lmprune.solvers.linalg import relative_error


def expected_errors(W, weight, stats):
    """Per row, the mean over calibration tokens of the dense output minus the pruned one."""
    return (W - weight) @ stats.mean


def unit_problem(W_row):
    """One row over 4 inputs, each with mean 1 and variance 1 (so equal input norms): H = n(I + 11ᵀ)."""
    n = 100
    W = torch.tensor([W_row])
    H = n * (torch.eye(4) + torch.ones(4, 4))
    return W, H, InputStats(torch.full((4,), float(n)), n)


def test_one_swap_worked_by_hand():
    # Wanda keeps 3 and −2 (largest |W|); the pruned 1.5 and 1 leave e = 2.5. The best grow is 1.5 (the
    # largest positive contribution), paid for by pruning the kept weight of the other sign, −2:
    # e becomes 2.5 − 2 − 1.5 = −1. No pruned weight has a negative contribution, so the row stops.
    W, H, stats = unit_problem([3.0, -2.0, 1.5, 1.0])
    solver = build_layer_solver("dsnot", options={"same_sign": "false"})
    result = solver(W, H, SparsityPattern(0.5, per_row=True), stats)
    assert result.mask.tolist() == [[True, False, True, False]]
    assert torch.equal(result.weight, torch.tensor([[3.0, 0.0, 1.5, 0.0]]))
    assert result.info["swaps"] == 1
    assert result.info["expected_error_ratio"] == pytest.approx(1 / 2.5)
    assert float(expected_errors(W, result.weight, stats)) == pytest.approx(-1.0)


@pytest.mark.parametrize("options", [{}, {"same_sign": "false", "threshold": "3"}, {"same_sign": "false", "cycles": "0"}])
def test_swap_refused_by_sign_threshold_or_cycles(options):
    # Default same_sign: the swap would flip e from 2.5 to −1; threshold 3 > |e| = 2.5; no cycles at all.
    W, H, stats = unit_problem([3.0, -2.0, 1.5, 1.0])
    result = build_layer_solver("dsnot", options=options)(W, H, SparsityPattern(0.5, per_row=True), stats)
    assert result.mask.tolist() == [[True, True, False, False]]
    assert result.info["swaps"] == 0


def test_nm_swap_that_grows_the_error_is_refused():
    # 2:4 keeps 3 and 2, prunes 1 and 0.5: e = 1.5. Growing 1 forces pruning the group's weaker kept
    # weight, 2, so e becomes 1.5 + 2 − 1 = 2.5: same sign but larger. Unchecked, the next swap grows
    # 0.5 and prunes 3: e = 5. The default refuses the first swap.
    W, H, stats = unit_problem([3.0, 2.0, 1.0, 0.5])
    pattern = SparsityPattern.parse("2:4")
    unchecked = build_layer_solver("dsnot", options={"same_sign": "false"})(W, H, pattern, stats)
    assert unchecked.mask.tolist() == [[False, False, True, True]]
    assert unchecked.info["expected_error_ratio"] == pytest.approx(5 / 1.5)
    checked = build_layer_solver("dsnot")(W, H, pattern, stats)
    assert checked.mask.tolist() == [[True, True, False, False]] and checked.info["swaps"] == 0


@pytest.fixture(scope="module")
def shifted():
    """Inputs with large per-feature means, where the expected error dominates the squared error."""
    return correlated_problem(rows=64, cols=256, offset=3.0, with_stats=True)


def reference_dsnot(W, H, stats, sparsity, cycles, same_sign):
    """The paper's loop written row by row with Python lists: grow the pruned weight with the largest
    sign(e)·W·E[x]/Var[x], prune the lowest-Wanda kept weight whose W·E[x] has the other sign;
    `same_sign`: stop the row instead of a swap that flips the sign of e."""
    mean, variance = stats.mean, stats.variance(H)
    scores = W.abs() * H.diagonal().sqrt()
    mask = build_layer_solver("wanda")(W, H, SparsityPattern(sparsity, per_row=True)).mask.clone()
    for i in range(W.shape[0]):
        c = (W[i] * mean).tolist()
        key = (W[i] * mean / variance).tolist()
        kept, s = mask[i].tolist(), scores[i].tolist()
        e = sum(cj for cj, k in zip(c, kept) if not k)
        grow = {1: sorted((j for j in range(len(c)) if not kept[j] and key[j] > 0), key=lambda j: -key[j]),
                0: sorted((j for j in range(len(c)) if not kept[j] and key[j] < 0), key=lambda j: key[j])}
        prune = {0: sorted((j for j in range(len(c)) if kept[j] and c[j] < 0), key=lambda j: s[j]),
                 1: sorted((j for j in range(len(c)) if kept[j] and c[j] > 0), key=lambda j: s[j])}
        for _ in range(cycles):
            side = int(e > 0)
            if abs(e) <= 5e-5 or not grow[side] or not prune[1 - side]:
                break
            g, p = grow[side].pop(0), prune[1 - side].pop(0)
            if same_sign and (e + c[p] - c[g] > 0) != (e > 0):
                break
            mask[i, g], mask[i, p] = True, False
            e += c[p] - c[g]
    return mask


@pytest.mark.parametrize("same_sign", [True, False])
@pytest.mark.parametrize("sparsity, cycles", [(0.5, 50), (0.7, 10), (0.3, 200)])
def test_matches_the_papers_loop(sparsity, cycles, same_sign):
    W, H, stats = correlated_problem(rows=24, cols=96, offset=1.0, with_stats=True, seed=3)
    options = {"cycles": str(cycles), "same_sign": str(same_sign)}
    result = build_layer_solver("dsnot", options=options)(W, H, SparsityPattern(sparsity, per_row=True), stats)
    assert torch.equal(result.mask, reference_dsnot(W, H, stats, sparsity, cycles, same_sign))
    assert result.info["swaps"] >= 12  # at least half the rows swapped: the comparison is not vacuous


@pytest.mark.parametrize("target", ["0.5", "0.7", "2:4", "4:8"])
def test_keeps_counts_and_cuts_expected_error(shifted, target):
    W, H, stats = shifted
    pattern = SparsityPattern.parse(target)
    pattern = pattern if pattern.is_nm else SparsityPattern(pattern.sparsity, per_row=True)
    wanda = build_layer_solver("wanda")(W, H, pattern)
    dsnot = build_layer_solver("dsnot")(W, H, pattern, stats)
    assert torch.equal(dsnot.mask.sum(1), wanda.mask.sum(1))  # every row keeps the same count
    if pattern.is_nm:
        assert is_nm(dsnot.mask, pattern.n, pattern.m)
        assert torch.equal(dsnot.mask.reshape(64, -1, pattern.m).sum(-1), wanda.mask.reshape(64, -1, pattern.m).sum(-1))
    assert torch.equal(dsnot.weight, W * dsnot.mask)  # kept weights unchanged
    assert dsnot.info["swaps"] > 64
    before = expected_errors(W, wanda.weight, stats).norm()
    after = expected_errors(W, dsnot.weight, stats).norm()
    assert float(after / before) == pytest.approx(dsnot.info["expected_error_ratio"], rel=1e-4)
    # N:M must prune inside the grown weight's group, whatever its sign, so more swaps are refused.
    assert after < (0.8 if pattern.is_nm else 0.4) * before


def test_same_sign_never_flips_an_error(shifted):
    W, H, stats = shifted
    pattern = SparsityPattern(0.6, per_row=True)
    before = expected_errors(W, build_layer_solver("wanda")(W, H, pattern).weight, stats)
    result = build_layer_solver("dsnot", options={"same_sign": "true"})(W, H, pattern, stats)
    after = expected_errors(W, result.weight, stats)
    assert result.info["swaps"] > 0
    assert bool(((torch.sign(after) == torch.sign(before)) | (after.abs() < 1e-4)).all())
    assert bool((after.abs() <= before.abs() + 1e-4).all())


def test_magnitude_start_and_layer_wide_mask(shifted):
    W, H, stats = shifted
    pattern = SparsityPattern(0.6)  # per layer: rows keep unequal counts, and DSnoT keeps them
    start = build_layer_solver("magnitude")(W, H, pattern)
    result = build_layer_solver("dsnot", options={"init": "magnitude"})(W, H, pattern, stats)
    assert torch.equal(result.mask.sum(1), start.mask.sum(1))
    assert result.info["swaps"] > 0


def test_composes_with_an_update(shifted):
    W, H, stats = shifted
    pattern = SparsityPattern(0.6, per_row=True)
    mask_only = build_layer_solver("dsnot")(W, H, pattern, stats)
    updated = build_layer_solver(mask="dsnot", update="sparsegpt")(W, H, pattern, stats)
    assert torch.equal(updated.mask, mask_only.mask)
    assert not updated.weight[~updated.mask].any()
    assert relative_error(W, updated.weight, H) < 0.9 * relative_error(W, mask_only.weight, H)


def test_needs_input_stats():
    W, H = correlated_problem(rows=8, cols=16)
    with pytest.raises(LmpruneError, match="mean"):
        build_layer_solver("dsnot")(W, H, SparsityPattern(0.5))


@pytest.mark.parametrize("options, message", [
    ({"init": "sparsegpt"}, "init must be one of"),
    ({"cycles": "-1"}, "cycles must be non-negative"),
    ({"threshold": "-0.1"}, "threshold"),
    ({"variance_power": "-1"}, "variance_power"),
])
def test_bad_options_fail_clearly(options, message):
    with pytest.raises(LmpruneError, match=message):
        build_layer_solver("dsnot", options=options)


def test_sparsellm_refuses_dsnot_as_its_layer_method():
    with pytest.raises(LmpruneError, match="needs the inputs' mean"):
        build_method("sparsellm", options={"layer_method": "dsnot"})
