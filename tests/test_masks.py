import pytest
import torch

from lmprune.config import SparsityPattern
from lmprune.errors import LmpruneError
from lmprune.masks import cubic_schedule, is_nm, layer_mask, nm_mask, prune_count, row_mask, topk_mask


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
def test_layer_mask_prunes_exact_floor_count(sparsity):
    scores = torch.rand(37, 53)
    mask = layer_mask(scores, sparsity)
    assert int((~mask).sum()) == int(37 * 53 * sparsity)
    # everything pruned scores no higher than everything kept
    if 0 < sparsity:
        assert scores[~mask].max() <= scores[mask].min()


def test_row_mask_exact_per_row():
    scores = torch.rand(10, 33)
    mask = row_mask(scores, 0.5)
    assert ((~mask).sum(1) == 16).all()


def test_spread_row_mask_meets_the_matrix_total():
    scores = torch.rand(2, 10, 33)  # two matrices (fused experts): the count is per matrix
    pattern = SparsityPattern((123 + 0.5) / 330, per_row=True, spread=True)
    mask = topk_mask(scores, pattern)
    assert ((~mask).sum(-1) == torch.tensor([13] * 3 + [12] * 7)).all()  # 123 = 10·12 + 3
    for row in range(10):  # each row prunes its own lowest scores
        s, m = scores[0, row], mask[0, row]
        assert s[~m].max() <= s[m].min()
    # without spread the same fraction prunes ⌊33·s⌋ = 12 in every row
    assert ((~topk_mask(scores, SparsityPattern(pattern.sparsity, per_row=True))).sum(-1) == 12).all()
    with pytest.raises(LmpruneError, match="spread needs per_row"):
        SparsityPattern(0.5, spread=True)


def test_ties_broken_deterministically_lower_index_first():
    scores = torch.ones(4, 8)
    mask = layer_mask(scores, 0.5)
    assert torch.equal(mask, layer_mask(scores.clone(), 0.5))
    assert not mask.reshape(-1)[:16].any() and mask.reshape(-1)[16:].all()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 3), (3, 7)])
def test_nm_mask_valid_and_keeps_largest(n, m):
    scores = torch.rand(6, m * 5)
    mask = nm_mask(scores, n, m)
    assert is_nm(mask, n, m)
    groups = mask.reshape(6, 5, m)
    assert (groups.sum(-1) == n).all()
    s = scores.reshape(6, 5, m)
    kept_min = torch.where(groups, s, torch.inf).min(-1).values
    pruned_max = torch.where(~groups, s, -torch.inf).max(-1).values
    assert (kept_min >= pruned_max).all()


def test_is_nm_detects_violation():
    mask = torch.tensor([[True, True, True, False]])
    assert not is_nm(mask, 2, 4)
    assert is_nm(mask, 3, 4)


def test_topk_mask_dispatches_on_pattern():
    scores = torch.rand(8, 16)
    assert is_nm(topk_mask(scores, SparsityPattern.nm("2:4")), 2, 4)
    assert ((~topk_mask(scores, SparsityPattern(0.25, per_row=True))).sum(1) == 4).all()
    assert int((~topk_mask(scores, SparsityPattern(0.25))).sum()) == 32


def test_prune_count_is_floor():
    assert prune_count(7, 0.5) == 3
    assert prune_count(100, 0.7) == 70  # no float round-down to 69


def test_cubic_schedules():
    assert cubic_schedule(0, 15, 0.6) == 0.0
    assert cubic_schedule(15, 15, 0.6) == pytest.approx(0.6)
    assert cubic_schedule(5, 15, 0.6, "fast") > cubic_schedule(5, 15, 0.6, "slow")
    assert cubic_schedule(5, 15, 0.6, "slow") == pytest.approx(0.6 * (1 / 3) ** 3)
    with pytest.raises(ValueError):
        cubic_schedule(1, 15, 0.6, "linear")


@pytest.mark.parametrize("kwargs", [{"sparsity": 1.0}, {"sparsity": -0.1}, {"n": 4, "m": 4}, {"n": 0, "m": 4}])
def test_bad_patterns_rejected(kwargs):
    with pytest.raises(LmpruneError):
        SparsityPattern(**kwargs)


def test_nm_width_check_names_layer():
    with pytest.raises(LmpruneError, match="down_proj.*172.*multiple of 8"):
        SparsityPattern.nm("4:8").check_width(172, "model.layers.0.mlp.down_proj")


def test_selection_matches_stable_sort_with_many_ties():
    """The O(n) selection prunes exactly what a stable ascending sort would."""
    from lmprune.masks import prune_lowest, prune_lowest_per_row

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (13, 40), generator=g).float()  # heavy ties
    for k in (0, 1, 77, 260, 519, 520):
        expected = torch.ones(scores.numel(), dtype=torch.bool)
        expected[torch.sort(scores.reshape(-1), stable=True).indices[:k]] = False
        assert torch.equal(prune_lowest(scores, k), expected.reshape(scores.shape))
    for k in (0, 3, 17, 40):
        expected = torch.ones_like(scores, dtype=torch.bool)
        expected.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[:, :k], False)
        assert torch.equal(prune_lowest_per_row(scores, k), expected)
    inf_scores = scores.masked_fill(scores > 2, float("inf"))  # as the N:M gradual rule protects entries
    assert int((~prune_lowest(inf_scores, 300)).sum()) == 300


def _stable_sort_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    pruned = torch.sort(scores.reshape(-1), stable=True).indices[:k]
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[pruned] = False
    return mask.reshape(scores.shape)


@pytest.mark.parametrize("kind", ["normal", "ties", "half_zero", "sorted", "heavy_tail", "constant", "aliased"])
def test_large_selection_matches_stable_sort(kind):
    """Above 65536 entries the k-th value is bracketed from a sample; the mask must still be exact."""
    torch.manual_seed(1)
    n = 300_001
    values = {
        "normal": lambda: torch.randn(n),
        "ties": lambda: torch.randn(n).mul(3).round(),
        "half_zero": lambda: torch.cat([torch.zeros(n // 2), torch.rand(n - n // 2)]),
        "sorted": lambda: torch.rand(n).sort().values,
        "heavy_tail": lambda: torch.randn(n).mul(6).exp(),
        "constant": lambda: torch.ones(n),
        # every sampled entry is an outlier: the bracket misses and the full selection must take over
        "aliased": lambda: torch.rand(n).index_add_(0, torch.arange(0, n, n // 16384), torch.full(((n - 1) // (n // 16384) + 1,), 10.0)),
    }[kind]()
    for k in (1, 12_345, n // 2, n - 7):
        mask = layer_mask(values, k / n + 1e-12)
        assert torch.equal(mask, _stable_sort_mask(values, prune_count(n, k / n + 1e-12))), k


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_per_row_is_torch_kthvalue(monkeypatch, threads, dtype):
    """The CPU selection through numpy (blocks of rows, a thread pool) gives torch.kthvalue's values exactly:
    with ties, negative values and -0.0, on a non-contiguous view, for every k, and with NaN (torch's own)."""
    from lmprune import masks

    monkeypatch.setattr(masks, "_ROW_BLOCK_BYTES", 8 * 700 * 37)  # 37 or 74 rows a block: many, one partial
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(threads)
        scores = torch.randn(700, 300, generator=g, dtype=dtype).mT  # [300, 700], not contiguous
        ties = torch.randint(-3, 4, (300, 700), generator=g).to(dtype)
        ties[0, :10] = -0.0
        for s in (scores, ties):
            for k in (1, 2, 350, 699):
                assert torch.equal(masks.kth_per_row(s, k), torch.kthvalue(s, k, dim=-1, keepdim=True).values)
        ties[5, 5] = float("nan")
        assert torch.equal(masks.kth_per_row(ties, 350), torch.kthvalue(ties, 350, dim=-1, keepdim=True).values)
    finally:
        torch.set_num_threads(old)


def test_ties_in_a_few_rows_are_broken_as_a_stable_sort_would():
    """Rows whose k-th value is tied are fixed alone (masks.py); the others keep the plain threshold."""
    from lmprune.masks import prune_lowest_per_row

    g = torch.Generator().manual_seed(7)
    scores = torch.randn(64, 300, generator=g)
    k = 150
    for row in (3, 40, 63):  # a tie straddling the k-th value: equal to it at three places
        kth = scores[row].sort().values[k - 1]
        scores[row, :3] = kth
    expected = torch.ones_like(scores, dtype=torch.bool)
    expected.scatter_(-1, torch.sort(scores, dim=-1, stable=True).indices[:, :k], False)
    mask = prune_lowest_per_row(scores, k)
    assert torch.equal(mask, expected)
    assert (mask.sum(1) == 300 - k).all()
