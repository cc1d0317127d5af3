"""The fast exact checks agree with the plain reductions they replace, on every case that matters."""

import pytest
import torch

from lmprune.tensor_checks import all_finite, count_true, count_zeros


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 777, -1])
def test_all_finite_matches_isfinite(dtype, bad, where):
    t = torch.randn(40, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    if bad is not None:
        t.view(-1)[where] = bad
    assert all_finite(t) == bool(torch.isfinite(t).all()) == (bad is None)


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    assert not all_finite(torch.tensor([1.0, float("nan")], dtype=torch.complex64))
    big = torch.full((3,), torch.finfo(torch.float32).max)  # finite, though their sum overflows
    assert all_finite(big)


def test_counts_match_sums():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(300, 70, generator=g)
    t[t.abs() < 0.5] = 0.0
    t[0, :5] = -0.0  # a negative zero is a zero
    mask = t > 0.3
    assert count_true(mask) == int(mask.sum())
    for dim in (0, 1):
        assert count_true(mask, dim=dim).tolist() == mask.sum(dim).tolist()
        assert count_true(mask.t(), dim=dim).tolist() == mask.t().sum(dim).tolist()  # a strided view
    assert count_zeros(t) == int((t == 0).sum())
