"""A tensor parked on disk comes back bit for bit, and its file goes with it (spill.py)."""

import os

import pytest
import torch

from lmprune.spill import SpilledTensor


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int32])
def test_spilled_tensor_round_trip(tmp_path, dtype):
    t = (torch.randn(37, 53) * 100).to(dtype)
    t[0, 0] = -0.0 if dtype.is_floating_point else 0
    with SpilledTensor(t.t(), str(tmp_path)) as parked:  # a non-contiguous view is parked as its values
        assert os.listdir(tmp_path) == []  # an unnamed file: nothing a resumed run could mistake for output
        for _ in range(2):
            back = parked.load()
            assert back.shape == (53, 37) and back.dtype == dtype
            assert torch.equal(back.view(torch.uint8), t.t().contiguous().view(torch.uint8))
    assert parked.file.closed


def test_spill_refuses_a_device_tensor(tmp_path):
    with pytest.raises(ValueError):
        SpilledTensor(torch.zeros(2, device="meta"), str(tmp_path))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_a_solve_with_its_gram_parked_writes_the_same_layer_and_report(tmp_path, method):
    """A streamed run hands SparseGPT XᵀX to overwrite and parks a copy for the error report (solve.py):
    the written weight, the report record and XᵀX afterwards are those of a solve that copies."""
    import copy

    from conftest import correlated_problem
    from lmprune.collect import LayerInputs
    from lmprune.config import SparsityPattern
    from lmprune.model.layers import LinearLayer
    from lmprune.solve import LayerSolve, prune_group
    from lmprune.solvers import build_layer_solver

    W, H = correlated_problem(rows=40, cols=72, tokens=600)
    results = []
    for spill_dir in (None, str(tmp_path)):
        linear = nn_linear(W)
        inputs = LayerInputs(gram=H.clone(), stats=None, tokens=600, diagonal=H.diagonal().clone())
        group = [LayerSolve(LinearLayer("layer", linear), inputs, None)]
        solver, fallback = build_layer_solver(method), build_layer_solver("magnitude")
        assert solver.takes_gram == (method == "sparsegpt")
        records = prune_group(group, solver, fallback, SparsityPattern(0.5), {}, torch.device("cpu"),
                              spill_dir=spill_dir)
        assert torch.equal(inputs.gram, H)
        results.append((linear.weight.detach().clone(), copy.deepcopy(records)))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert "error" in results[0][1][0]  # XᵀX was collected: the report reads it, parked or not
    assert os.listdir(tmp_path) == []


def nn_linear(W):
    linear = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(W)
    return linear


def test_a_full_disk_leaves_the_gram_to_a_copying_solve(tmp_path, monkeypatch):
    """No room to park XᵀX: the solve copies it as in memory (same weights), and nothing is lost."""
    import errno

    import lmprune.solve as solve_module
    from conftest import correlated_problem
    from lmprune.collect import LayerInputs
    from lmprune.config import SparsityPattern
    from lmprune.model.layers import LinearLayer
    from lmprune.solve import LayerSolve, prune_group
    from lmprune.solvers import build_layer_solver

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    W, H = correlated_problem(rows=24, cols=48, tokens=300)
    weights = []
    for spill_dir in (None, str(tmp_path)):
        linear = nn_linear(W)
        inputs = LayerInputs(gram=H.clone(), stats=None, tokens=300)
        group = [LayerSolve(LinearLayer("layer", linear), inputs, None)]
        with monkeypatch.context() as patch:
            patch.setattr(solve_module, "SpilledTensor", full)
            prune_group(group, build_layer_solver("sparsegpt"), build_layer_solver("magnitude"), SparsityPattern(0.5),
                        {}, torch.device("cpu"), spill_dir=spill_dir)
        assert torch.equal(inputs.gram, H)
        weights.append(linear.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
