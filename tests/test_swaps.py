"""--refine swaps: exact-gain 1-swaps within rows or N:M groups, checked against brute force on small problems."""

import itertools
import json

import pytest
import torch

from conftest import correlated_problem, prune_args, random_text, run_cli as run, snapshot
from lmprune.config import SparsityPattern
from lmprune.masks import is_nm, topk_mask
from lmprune.methods import build_method
from lmprune.solvers.swaps import _best_swaps, swap_masks

PER_ROW = SparsityPattern(0.6, per_row=True)
PER_LAYER = SparsityPattern(0.6)
NM = SparsityPattern(n=2, m=4)


def row_errors(W0, G, w):
    """(w − w₀)ᵀ G (w − w₀) per row, in float64: the definition, independent of the solver's residuals."""
    d = (w - W0).double()
    return ((d @ G.double()) * d).sum(-1)


def start(W0, pattern):
    """A magnitude mask (far from locally optimal on correlated inputs) and the weights the swaps start from."""
    mask = topk_mask(W0.abs(), pattern)
    return W0 * mask, mask


def row_optimum_value(W0, G, w, row, j):
    """The value of w[row, j] minimising the row error with the rest fixed, from three evaluations of the
    quadratic e(t) (no residual formula involved)."""
    def e(t):
        x = w[row].clone()
        x[j] = t
        return float(row_errors(W0[row:row + 1], G, x[None])[0])
    e0, e1, em = e(0.0), e(1.0), e(-1.0)
    curvature, slope = (e1 + em - 2 * e0) / 2, (e1 - em) / 2
    return -slope / (2 * curvature)


def all_swaps(W0, G, w, mask, pattern, value):
    """Every single swap of every row by brute force: {row: [(error after, i, j)]}."""
    rows, cols = w.shape
    group = pattern.m if pattern.is_nm else cols
    out = {}
    for row in range(rows):
        found = []
        for i, j in itertools.product(range(cols), repeat=2):
            if not (mask[row, i] and not mask[row, j] and i // group == j // group):
                continue
            x = w.clone()
            x[row, i] = 0
            x[row, j] = W0[row, j] if value == "dense" else row_optimum_value(W0, G, x, row, j)
            found.append((float(row_errors(W0[row:row + 1], G, x[row:row + 1])[0]), i, j))
        out[row] = found
    return out


@pytest.mark.parametrize("pattern", [PER_ROW, PER_LAYER, NM], ids=["per-row", "per-layer", "2:4"])
@pytest.mark.parametrize("value", ["dense", "best"])
def test_error_never_rises_and_counts_are_kept(pattern, value):
    W0, G = correlated_problem(rows=24, cols=48, tokens=512, seed=1)
    w, mask = start(W0, pattern)
    previous = row_errors(W0, G, w)
    lowered = 0
    for rounds in range(1, 9):  # deterministic: `rounds` rounds are the first rounds of a longer run
        weight, new_mask, swaps = swap_masks(W0, G, w, mask, pattern, rounds, value)
        errors = row_errors(W0, G, weight)
        assert (errors <= previous * (1 + 1e-12)).all()  # every row, every round
        lowered += int((errors < previous * (1 - 1e-9)).sum())
        previous = errors
        assert torch.equal(new_mask.sum(1), mask.sum(1))  # each row keeps its count: the layer its sparsity
        assert torch.equal(weight == 0, ~new_mask)  # zero exactly off the mask, nonzero on it
        if pattern.is_nm:
            assert is_nm(new_mask, 2, 4)
            assert torch.equal(new_mask.reshape(24, -1, 4).sum(-1), mask.reshape(24, -1, 4).sum(-1))
        if value == "dense":
            assert torch.equal(weight, W0 * new_mask)  # restored weights come back at their own values
        assert torch.equal(swaps >= 1, (new_mask != mask).any(1))
    assert lowered > 24  # the magnitude mask was far from locally optimal: many rows improved


def test_nothing_to_swap_at_sparsity_zero():
    W0, G = correlated_problem(rows=4, cols=8, tokens=64, seed=5)
    mask = torch.ones_like(W0, dtype=torch.bool)
    weight, new_mask, swaps = swap_masks(W0, G, W0, mask, SparsityPattern(0.0, per_row=True), 5)
    assert torch.equal(weight, W0) and torch.equal(new_mask, mask) and int(swaps.sum()) == 0


def test_swap_found_when_mask_is_not_locally_optimal():
    """Uncorrelated inputs (diagonal G): the row error is Σ over pruned j of w₀_j² G_jj, so the best mask
    keeps the largest w₀_j² G_jj; a mask that keeps the smallest instead is fixed by one known swap."""
    G = torch.diag(torch.tensor([1.0, 4.0, 0.25, 9.0]))
    W0 = torch.tensor([[1.0, 1.0, 1.0, 1.0]])  # w₀² G: 1, 4, 0.25, 9
    mask = torch.tensor([[True, False, True, False]])  # keeps 1 and 0.25, prunes 4 and 9: error 13
    weight, new_mask, swaps = swap_masks(W0, G, W0 * mask, mask, PER_ROW, 1, "dense")
    # Best swap: prune 0.25 (index 2), restore 9 (index 3): error 4 + 0.25.
    assert new_mask.tolist() == [[True, False, False, True]] and int(swaps[0]) == 1
    assert float(row_errors(W0, G, weight)[0]) == pytest.approx(4.25)
    weight, new_mask, swaps = swap_masks(W0, G, W0 * mask, mask, PER_ROW, 10, "dense")
    assert new_mask.tolist() == [[False, True, False, True]] and int(swaps[0]) == 2  # the optimum, then stop
    assert float(row_errors(W0, G, weight)[0]) == pytest.approx(1.25)


@pytest.mark.parametrize("pattern", [PER_ROW, NM], ids=["per-row", "2:4"])
@pytest.mark.parametrize("value", ["dense", "best"])
def test_gain_is_the_exact_error_change_and_the_best_swap(pattern, value):
    W0, G = correlated_problem(rows=5, cols=12, tokens=256, seed=2)
    w, mask = start(W0, pattern)
    if value == "best":  # start from weights off the dense values, as after an update
        w = (W0 + 0.3 * torch.randn(W0.shape, generator=torch.Generator().manual_seed(0))) * mask
    d = (w - W0).double()
    r = d @ G.double()
    owner = torch.zeros(5, dtype=torch.long)
    gain, i, j = _best_swaps(w.double(), W0.double(), r, G.double()[None], owner, mask, pattern.m or 12, value)
    before = row_errors(W0, G, w)
    brute = all_swaps(W0, G, w, mask, pattern, value)
    for row in range(5):
        best = min(brute[row])
        assert float(gain[row]) == pytest.approx(best[0] - float(before[row]), rel=1e-6, abs=1e-9 * float(before[row]))
        chosen = next(e for e, a, b in brute[row] if (a, b) == (int(i[row]), int(j[row])))
        assert chosen == pytest.approx(best[0], rel=1e-9)  # the swap taken is a best one (ties allowed)
    weight, _, _ = swap_masks(W0, G, w, mask, pattern, 1, value)
    change = row_errors(W0, G, weight) - before
    taken = gain < -1e-9 * before
    assert torch.allclose(change[taken], gain[taken], rtol=1e-6)  # applying it changes the error by exactly the gain


@pytest.mark.parametrize("pattern", [PER_ROW, NM], ids=["per-row", "2:4"])
@pytest.mark.parametrize("value", ["dense", "best"])
def test_converged_mask_admits_no_lowering_swap(pattern, value):
    W0, G = correlated_problem(rows=4, cols=8, tokens=128, seed=3)
    w, mask = start(W0, pattern)
    weight, new_mask, swaps = swap_masks(W0, G, w, mask, pattern, 200, value)
    assert int(swaps.sum()) > 0
    errors = row_errors(W0, G, weight)
    for row, found in all_swaps(W0, G, weight, new_mask, pattern, value).items():
        assert min(found)[0] >= float(errors[row]) * (1 - 1e-9)  # locally optimal: no single swap helps


def test_batched_experts_equal_a_loop():
    problems = [correlated_problem(rows=10, cols=24, tokens=256, seed=s) for s in range(3)]
    W0 = torch.stack([W for W, _ in problems])
    G = torch.stack([H for _, H in problems])
    for pattern, value in [(PER_ROW, "dense"), (NM, "best")]:
        mask = topk_mask(W0.abs(), pattern)
        batched = swap_masks(W0, G, W0 * mask, mask, pattern, 5, value)
        for e in range(3):
            single = swap_masks(W0[e], G[e], W0[e] * mask[e], mask[e], pattern, 5, value)
            assert torch.equal(batched[1][e], single[1]) and torch.equal(batched[2][e], single[2])
            assert torch.allclose(batched[0][e], single[0], rtol=1e-6, atol=1e-7)


def layer_error(W, H, weight):
    return float(row_errors(W, H, weight).sum())


@pytest.mark.parametrize("method, mask, update, pattern", [
    ("wanda", None, None, PER_ROW),
    ("magnitude", None, None, PER_LAYER),
    (None, "wanda", "none", NM),
    ("sparsegpt", None, None, PER_ROW),
    ("alps", None, None, NM),
    ("admm-grad", None, None, PER_ROW),
    (None, "wanda", "admm", PER_ROW),
])
def test_refine_composes_with_every_method(method, mask, update, pattern):
    W, H = correlated_problem(rows=16, cols=32, tokens=512, seed=4)
    plain = build_method(method, mask, update).layer_solver
    refined = build_method(method, mask, update, {"swap_rounds": "4"}, refine="swaps").layer_solver
    assert refined.name == plain.name + "+swaps"
    before, after = plain(W, H, pattern), refined(W, H, pattern)
    assert layer_error(W, H, after.weight) <= layer_error(W, H, before.weight) * (1 + 1e-6)
    assert after.info["swaps"] > 0
    assert after.info["swap_error_after"] < after.info["swap_error_before"]
    assert torch.equal(after.weight == 0, ~after.mask)
    if pattern.is_nm:
        assert is_nm(after.mask, 2, 4)
    else:
        assert torch.equal(after.mask.sum(1), before.mask.sum(1))
    if plain.refit() == (None, None):
        assert torch.equal(after.weight, W * after.mask)  # no update: kept weights keep their values


def test_refine_batch_equals_a_loop():
    problems = [correlated_problem(rows=8, cols=16, tokens=256, seed=s) for s in range(2)]
    W = torch.stack([w for w, _ in problems])
    H = torch.stack([h for _, h in problems])
    solver = build_method("sparsegpt", refine="swaps").layer_solver
    batched = solver.solve_batch(W, H, PER_ROW)
    for e in range(2):
        single = solver(W[e], H[e], PER_ROW)
        assert torch.equal(batched[e].mask, single.mask)
        assert torch.allclose(batched[e].weight, single.weight, rtol=1e-5, atol=1e-6)


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(random_text(800))
    return path


@pytest.mark.parametrize("extra, message", [
    (["--method", "wanda", "--refine", "bogus"], "unknown --refine 'bogus' (choose from: none, swaps)"),
    (["--method", "sparsellm", "--refine", "swaps"], "--refine swaps cannot follow sparsellm"),
    (["--method", "wanda", "--opt", "swap_rounds=3"], "swap_rounds is a setting of --refine swaps"),
    (["--method", "wanda", "--refine", "swaps", "--opt", "swap_rounds=0"], "swap_rounds must be at least 1, got 0"),
])
def test_bad_refine_input(capsys, tiny_llama, calib, tmp_path, extra, message):
    before = snapshot(tmp_path)
    code, _, err = run(capsys, *prune_args(tiny_llama, calib, tmp_path / "out", "--sparsity", "0.5", *extra))
    assert code == 2 and len(err) == 1 and err[0].startswith("lmprune: error: ") and message in err[0], err
    assert snapshot(tmp_path) == before


def test_prune_with_refine_swaps(capsys, tiny_llama, calib, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, *prune_args(tiny_llama, calib, out, "--method", "wanda", "--sparsity", "0.5",
                                           "--refine", "swaps", "--opt", "swap_rounds=3"))
    assert code == 0, err
    report = json.loads((out / "lmprune_report.json").read_text())
    assert report["method"] == "wanda+swaps" and report["settings"]["options"] == {"swap_rounds": 3}
    assert report["summary"]["sparsity"] == 0.5
    assert sum(layer["info"]["swaps"] for layer in report["layers"]) > 0
