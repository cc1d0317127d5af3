"""The sweep: every causal-LM model type of the installed transformers, built tiny (tests/sweep.py).

For each swept type: the recorded block calls replay the model's own forward, and after a Wanda prune
every ≥2-D block weight is either at the target or kept dense, unchanged, for a reason from a closed
list (router, selector, depthwise convolution, state parameter). Types lmprune refuses
(REFUSED in sweep.py) must fail with exactly its one-line error. Every other type is listed in
tests/sweep_outcomes.md with its reason; the table and the README's model list must be current.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from conftest import REPO, check_replay
from lmprune.config import SparsityPattern
from lmprune.model import find_blocks, prunable_layers, text_config
from lmprune.pipeline import prune_model
from lmprune.solvers import build_layer_solver
from lmprune.errors import LmpruneError
from sweep import EXPERTS, KNOWN, OUTCOMES, REFUSED, outcomes_table, sample_ids, tiny_model

CPU = torch.device("cpu")
PATTERN = SparsityPattern(0.5, per_row=True)  # Wanda's own default: half of every row
# Read from the committed table (checked current below), so collecting the tests builds nothing.
SWEPT = re.findall(r"^\| `([^`]+)` \| (?:swept|refused|known failure) \|", OUTCOMES.read_text(), re.M)


def _cases():
    for model_type in SWEPT:
        marks = [pytest.mark.slow]
        if model_type in KNOWN:
            marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[model_type]))
        yield pytest.param(model_type, marks=marks, id=model_type)


def test_outcomes_table_is_current():
    """Every causal-LM type has a row, swept or with its reason: regenerate with `python tests/sweep.py`."""
    assert OUTCOMES.read_text() == outcomes_table()


def test_readme_names_every_swept_count():
    """The README's model list states the sweep's counts, as the table has them."""
    summary = re.search(r"(\d+) causal-LM model types, (\d+) swept", OUTCOMES.read_text())
    readme = " ".join((REPO / "README.md").read_text().split())
    assert f"{summary[2]} of the {summary[1]} causal-LM model types" in readme
    assert "tests/sweep_outcomes.md" in readme


_PRODUCTS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
             torch.mm, torch.Tensor.mm, torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm,
             torch.baddbmm, torch.einsum}


class ProductOperands(TorchFunctionMode):
    """The parameters (or views of them) that the model's forward takes as an operand of a matrix product."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.storages = {}
        for name, p in model.named_parameters():
            self.storages.setdefault(p.untyped_storage().data_ptr(), set()).add(name)
        self.names = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor):
                    self.names |= self.storages.get(t.untyped_storage().data_ptr(), set())
        return func(*args, **kwargs)


def product_operands(model: nn.Module, ids: torch.Tensor) -> set[str]:
    with torch.no_grad(), ProductOperands(model) as seen:
        model(input_ids=ids, use_cache=False)
    return seen.names


def kept_dense_reason(model: nn.Module, name: str, result, operands: set[str]) -> str | None:
    """Why weight `name` may stay dense, from the closed list, or None. Decided from the model itself, not
    from lmprune's own reasons: what a router's output has one entry for, how a weight is used."""
    if name in result.routers:
        # One score per expert (plus the shared experts a router may score too), or one gate.
        return "router" if model.get_parameter(name).shape[0] in (1, *range(EXPERTS, EXPERTS + 3)) else None
    if name in getattr(result, "selectors", ()):
        return "selector"
    if name not in {item["name"] for item in result.unpruned}:
        return None
    owner = model.get_submodule(name.rpartition(".")[0])
    if isinstance(owner, nn.Conv1d) and owner.groups == owner.in_channels and owner.groups > 1:
        return "depthwise convolution"
    if name not in operands:  # used elementwise only (an SSM's A_log, a norm's scale), or through exp(...)
        return "state parameter"
    return None


@pytest.mark.parametrize("model_type", list(_cases()))
def test_swept_type(model_type):
    model = tiny_model(model_type)
    ids = sample_ids(2)
    if model_type in REFUSED:
        with pytest.raises(LmpruneError) as refused:
            prune_model(model, ids, build_layer_solver("wanda"), PATTERN, CPU, batch_size=2, progress=False)
        assert str(refused.value) == REFUSED[model_type]
        return
    check_replay(model, ids, against_hidden_states=False)

    blocks_name, blocks = find_blocks(model)
    config = text_config(model)
    layers = [layer for i, block in enumerate(blocks)
              for layer in prunable_layers(block, f"{blocks_name}.{i}", config=config)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    operands = product_operands(model, ids)
    dense_row_zeros = {layer.name: (layer.get_weight(CPU) == 0).sum(1) for layer in layers}
    result = prune_model(model, ids, build_layer_solver("wanda"), PATTERN, CPU, batch_size=2, progress=False)
    pruned = {record["name"] for record in result.layers}
    covered, uncovered = set(), set()  # a fused expert tensor is covered when every expert slice is pruned
    for layer in layers:
        if layer.name in pruned:
            covered.update(layer.param_names())
            # Half of every row, or the zeros the dense row already had (an all-zero initialised layer).
            expected = int(dense_row_zeros[layer.name].clamp(min=layer.in_features // 2).sum())
            assert layer.zeros() == expected, (layer.name, layer.zeros(), expected)
        else:
            uncovered.update(layer.param_names())
    covered -= uncovered
    wrong = []
    for i, block in enumerate(blocks):
        for local, p in block.named_parameters():
            name = f"{blocks_name}.{i}.{local}"
            if p.dim() < 2 or "bias" in local.rsplit(".", 1)[-1] or name in covered:
                continue
            reason = kept_dense_reason(model, name, result, operands)
            if reason is None:
                wrong.append(name)
            elif not torch.equal(p, before[name]):
                wrong.append(f"{name} (kept dense as a {reason} but changed)")
    assert not wrong, f"neither pruned nor kept dense for a listed reason: {wrong}"
