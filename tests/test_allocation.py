"""Sparsity allocation across blocks: OWL and depth rules, exact model totals, refusals."""

import pytest
import torch

from conftest import byte_tokenizer, prune_args, random_text, run_cli
from lmprune.allocation import SparsityBudget, _split, depth_sparsities, outlier_ratio, owl_sparsities
from lmprune.config import Allocation, SparsityPattern
from lmprune.data import calibration_windows, tokenize
from lmprune.errors import LmpruneError
from lmprune.masks import prune_count
from lmprune.model import find_blocks
from lmprune.pipeline import prune_model
from lmprune.safety import verify_sparsity
from lmprune.solvers import build_layer_solver
from zoo import tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def calibration():
    return calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 8, 24, 0)


def test_depth_rises_linearly_with_size_weighted_mean_at_target():
    sizes = [100, 300, 100, 500]
    out = depth_sparsities(0.7, sizes, 0.15)
    assert out[-1] - out[0] == pytest.approx(0.15)
    assert [b - a for a, b in zip(out, out[1:])] == pytest.approx([0.05] * 3)
    assert sum(s * n for s, n in zip(out, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-12)


def test_owl_keeps_more_weights_where_more_outliers():
    sizes = [10, 10, 10, 10]
    out = owl_sparsities(0.6, sizes, [0.02, 0.08, 0.05, 0.02], lam=0.1)
    assert out[1] == min(out) and out[0] == out[3] == max(out)
    assert max(out) - min(out) == pytest.approx(0.2)
    assert sum(out) / 4 == pytest.approx(0.6)


def test_outlier_ratio_counts_scores_above_m_times_mean():
    scores = torch.tensor([1.0] * 98 + [100.0, 200.0])  # mean 3.98: two outliers above 5 × mean
    assert outlier_ratio([scores[:50], scores[50:]], 5.0) == pytest.approx(0.02)


def test_allocation_outside_0_1_is_refused():
    with pytest.raises(LmpruneError, match="outside \\[0, 1\\)"):
        depth_sparsities(0.9, [1, 1, 1], 0.4)


def test_split_is_exact_and_proportional():
    assert _split(10, [1, 1, 1]) == [4, 3, 3]
    counts = _split(12345, [4096, 1024, 1024, 12288])
    assert sum(counts) == 12345 and all(abs(c - 12345 * n / 18432) < 1 for c, n in zip(counts, [4096, 1024, 1024, 12288]))


def test_budget_total_is_exact_for_awkward_sizes():
    class Layer:
        def __init__(self, name, n):
            self.name, self.n = name, n

        def numel(self):
            return self.n

    blocks = [[Layer(f"{b}.{i}", n) for i, n in enumerate((4097, 333, 1001))] for b in range(5)]
    sizes = [sum(l.n for l in layers) for layers in blocks]
    budget = SparsityBudget(0.7, depth_sparsities(0.7, sizes, 0.2))
    patterns = {}
    for b, layers in enumerate(blocks):
        patterns.update(budget.layer_patterns(b, layers, last=b == 4))
    total = sum(sizes)
    assert sum(budget.counts.values()) == prune_count(total, 0.7)
    for layers in blocks:
        for layer in layers:  # the fraction handed to the solvers gives back exactly the layer's count
            assert prune_count(layer.n, patterns[layer.name].sparsity) == budget.counts[layer.name]


@pytest.mark.parametrize("kind", ["owl", "depth"])
@pytest.mark.parametrize("method, per_row", [("magnitude", False), ("sparsegpt", False), ("wanda", True),
                                             ("sparsegpt", True), ("admm-grad", True), ("dsnot", True)])
def test_model_total_is_exactly_the_target(kind, method, per_row, calibration):
    model = tiny_model("llama")
    result = prune_model(model, calibration, build_layer_solver(method), SparsityPattern(0.6, per_row=per_row), CPU,
                         progress=False, allocation=Allocation(kind, owl_lambda=0.1, depth_slope=0.2))
    _, blocks = find_blocks(model)
    pruned = {r["name"] for r in result.layers}
    zeros = total = 0
    for name, module in model.named_modules():
        if name in pruned:
            zeros += int((module.weight == 0).sum())
            total += module.weight.numel()
            if per_row:  # a spread per-row mask: rows prune ⌊k/rows⌋ or one more, the extra ones first
                per = (module.weight == 0).sum(1)
                base, extra = divmod(int(per.sum()), per.numel())
                assert per.tolist() == [base + 1] * extra + [base] * (per.numel() - extra)
    assert len(pruned) == 7 * len(blocks)
    assert zeros == prune_count(total, 0.6)
    spread = result.allocation["block_sparsities"]
    assert max(spread) - min(spread) == pytest.approx(0.2)
    if kind == "depth":
        assert spread == sorted(spread)
    for r in result.layers:
        block = int(r["name"].split(".")[2])
        assert abs(r["sparsity"] - spread[block]) < 2 / (r["shape"][0] * r["shape"][1]) + 1e-9
        assert r["sparsity"] == r["target"]


@pytest.mark.parametrize("target, slope", [(0.5, 0.3), (0.7, 0.3), (0.8, 0.2), (0.9, 0.1)])
def test_default_depth_slope_leaves_the_last_block_half_the_targets_density(target, slope, calibration):
    """The default slope is min(0.3, 1 − target): 0.3 would ask 0.9 for a block sparsity over 1 (an error)."""
    result = prune_model(tiny_model("llama"), calibration, build_layer_solver("magnitude"), SparsityPattern(target),
                         CPU, progress=False, allocation=Allocation("depth"))
    spread = result.allocation["block_sparsities"]
    assert result.allocation["depth_slope"] == pytest.approx(slope)
    assert spread[-1] - spread[0] == pytest.approx(slope)
    assert spread[-1] <= target + (1 - target) / 2 + 1e-9
    with pytest.raises(LmpruneError, match="outside \\[0, 1\\)"):  # the old fixed default at 0.9
        prune_model(tiny_model("llama"), calibration, build_layer_solver("magnitude"), SparsityPattern(0.9), CPU,
                    progress=False, allocation=Allocation("depth", depth_slope=0.3))


@pytest.mark.parametrize("method", ["sparsegpt", "alps"])
def test_moe_total_is_exact_with_batched_experts(method, calibration):
    """Experts of one fused tensor may get different counts from the budget: they are then solved one by one,
    and the model's total (every expert slice counted) is still exactly the target."""
    model = tiny_model("mixtral")
    result = prune_model(model, calibration, build_layer_solver(method), SparsityPattern(0.6), CPU,
                         progress=False, allocation=Allocation("depth", depth_slope=0.2))
    zeros = sum(round(r["sparsity"] * r["shape"][0] * r["shape"][1]) for r in result.layers)
    total = sum(r["shape"][0] * r["shape"][1] for r in result.layers)
    assert any("experts" in r["name"] for r in result.layers)
    assert zeros == prune_count(total, 0.6)
    assert all(r["sparsity"] == r["target"] for r in result.layers)


def test_verify_sparsity_checks_the_allocated_total():
    records = [{"name": "a", "shape": [2, 5], "sparsity": 0.6}, {"name": "b", "shape": [2, 5], "sparsity": 0.6}]
    verify_sparsity(records, SparsityPattern(0.6), counts={"a": 6, "b": 6})
    with pytest.raises(LmpruneError, match="prunes 11 of 20 weights, not the 12"):
        verify_sparsity(records, SparsityPattern(0.6), counts={"a": 6, "b": 5})
    with pytest.raises(LmpruneError, match="layer b is off its target 70.00%"):
        verify_sparsity(records, SparsityPattern(0.65), counts={"a": 6, "b": 7})


def test_verify_sparsity_checks_the_rows_of_a_spread_layer():
    layer = type("Layer", (), {"read_weight": lambda self, device: weight})()
    records = [{"name": "a", "shape": [3, 4], "sparsity": 7 / 12}]
    pattern = SparsityPattern(0.5, per_row=True)
    weight = torch.tensor([[0, 0, 0, 1.0], [0, 0, 1, 1], [0, 0, 1, 1]])  # 7 zeros: 3, 2, 2
    verify_sparsity(records, pattern, {"a": layer}, counts={"a": 7}, whole_model=False)
    weight = torch.tensor([[0, 0, 1, 1.0], [0, 0, 0, 1], [0, 0, 1, 1]])  # the extra zero in the wrong row
    with pytest.raises(LmpruneError, match="not in every row"):
        verify_sparsity(records, pattern, {"a": layer}, counts={"a": 7}, whole_model=False)


def test_nm_is_refused_before_work(calibration):
    with pytest.raises(LmpruneError, match="--allocation owl needs an unstructured --sparsity"):
        prune_model(tiny_model("llama"), calibration, build_layer_solver("wanda"), SparsityPattern.nm("2:4"), CPU,
                    progress=False, allocation=Allocation("owl"))
    Allocation("depth").check(SparsityPattern(0.5, per_row=True))  # per-row masks take spread counts
    Allocation("uniform").check(SparsityPattern.nm("2:4"))
    with pytest.raises(LmpruneError, match="does not combine with a block refinement"):
        prune_model(tiny_model("llama"), calibration, build_layer_solver("sparsegpt"), SparsityPattern(0.5), CPU,
                    progress=False, allocation=Allocation("depth"), refiner=lambda ctx: {})


def test_cli_allocation(tiny_llama, text_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, *prune_args(tiny_llama, text_file, tmp_path / "nm", "--method", "sparsegpt",
                                               "--pattern", "2:4", "--allocation", "owl"))
    assert code == 2 and err == ["lmprune: error: --allocation owl needs an unstructured --sparsity: 2:4 fixes "
                                 "the sparsity of every group (use --allocation uniform)"]
    assert not (tmp_path / "nm").exists()
    code, _, err = run_cli(capsys, *prune_args(tiny_llama, text_file, tmp_path / "bad", "--method", "sparsegpt",
                                               "--sparsity", "0.5", "--allocation", "depth", "--depth-slope", "1.5"))
    assert code == 2 and err == ["lmprune: error: --depth-slope must be in (-1, 1), got 1.5"]
    out = tmp_path / "owl"
    code, _, _ = run_cli(capsys, *prune_args(tiny_llama, text_file, out, "--method", "sparsegpt", "--sparsity", "0.5",
                                             "--allocation", "owl", "--owl-lambda", "0.05", "--sequential", "layer"))
    assert code == 0
    code, text, _ = run_cli(capsys, "report", out)
    assert code == 0
    assert "allocation: owl  owl_m 5  owl_lambda 0.05  block sparsities:" in text and "sequential: layer  dense targets: no" in text
