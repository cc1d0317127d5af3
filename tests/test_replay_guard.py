"""The replay guard (model/replay_guard.py): an architecture whose block-by-block replay is not its own forward
is refused before pruning (one line, exit 2, nothing written); models the replay reproduces pass it."""

import pytest
import torch
from torch import nn
from transformers.models.llama import modeling_llama

from conftest import prune_args, run_cli, snapshot
from lmprune.config import SparsityPattern
from lmprune.errors import LmpruneError
from lmprune.model import find_blocks, record_block_calls
from lmprune.model.loading import load_model
from lmprune.model.replay_guard import check_replay, tolerance
from lmprune.pipeline import prune_model
from lmprune.solvers import build_layer_solver
from sweep import sample_ids
from zoo import tiny_model

CPU = torch.device("cpu")
UNSUPPORTED = "model_type 'llama': lmprune's block-by-block replay does not reproduce the model's own forward ({}): " \
              "this architecture is not supported yet"


class _Looped(list):
    """The slice of blocks the model's forward loops over (Llama: `self.layers[:num_hidden_layers]`)."""

    def __iter__(self):
        for block in super().__iter__():
            yield block
            yield block


class CalledTwice(nn.ModuleList):
    """A looped stack: the model's loop calls each block twice in a row (lmprune's own iteration is plain)."""

    def __getitem__(self, index):
        got = super().__getitem__(index)
        return _Looped(got) if isinstance(index, slice) else got


class Halving(nn.Module):
    """Not a block: what a model computes between its blocks (called as the model calls a block)."""

    def forward(self, hidden, *args, **kwargs):
        return hidden * 0.5


class _Between(list):
    def __iter__(self):
        for block in super().__iter__():
            yield block
            yield Halving()


class WithModulesBetween(nn.ModuleList):
    """Each block followed by a module that is not in the list of blocks (XLM's attention beside its FFNs)."""

    def __getitem__(self, index):
        got = super().__getitem__(index)
        return _Between(got) if isinstance(index, slice) else got


def _prune(model):
    return prune_model(model, sample_ids(2), build_layer_solver("wanda"), SparsityPattern(0.5), CPU, batch_size=2,
                       progress=False)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_block_called_twice_is_refused_before_pruning():
    model = tiny_model("llama")
    model.model.layers.__class__ = CalledTwice
    before = _weights(model)
    with pytest.raises(LmpruneError) as refused:
        _prune(model)
    assert str(refused.value) == UNSUPPORTED.format(
        "each block must be called exactly once per forward; called: block 0 2 times, block 1 2 times, "
        "block 2 2 times, block 3 2 times")
    assert _unchanged(model, before)


def test_guard_counts_calls_in_the_models_own_forward():
    """The guard's own count (not only record_block_calls'): calls recorded from the plain stack, then looped."""
    model = tiny_model("llama")
    ids = sample_ids(2)
    _, blocks = find_blocks(model)
    calls = record_block_calls(model, blocks, [ids], CPU, CPU)
    model.model.layers.__class__ = CalledTwice
    with pytest.raises(LmpruneError, match=r"called: block 0 2 times, block 1 2 times, block 2 2 times, block 3 2 "
                                           r"times\): this architecture is not supported yet$"):
        check_replay(model, blocks, calls, ids, CPU, CPU)


def test_module_between_blocks_is_refused_before_pruning():
    """The replay feeds block 0's output straight to block 1; the model halves it first. The record pass hands
    each block's input back unchanged, so only the comparison with the own forward can see it."""
    model = tiny_model("llama")
    model.model.layers.__class__ = WithModulesBetween
    before = _weights(model)
    with pytest.raises(LmpruneError) as refused:
        _prune(model)
    message = str(refused.value)
    prefix, _, rest = message.partition("(block 1 differs by ")
    assert prefix == UNSUPPORTED.split("(")[0], message
    error, _, tail = rest.partition(" relative to its largest output, ")
    assert float(error) > 0.1, message  # halving the input changes the output by the order of the output
    assert tail == "tolerance 0.0001 in float32): this architecture is not supported yet", message
    assert _unchanged(model, before)


def test_cli_refuses_with_one_line_and_writes_nothing(tiny_llama, text_file, tmp_path, capsys, monkeypatch):
    init = modeling_llama.LlamaModel.__init__

    def with_modules_between(self, config):
        init(self, config)
        self.layers.__class__ = WithModulesBetween

    monkeypatch.setattr(modeling_llama.LlamaModel, "__init__", with_modules_between)
    before = snapshot(tmp_path), snapshot(tiny_llama)
    code, out, err = run_cli(capsys, *prune_args(tiny_llama, text_file, tmp_path / "out", "--method", "wanda",
                                                 "--sparsity", "0.5"))
    assert code == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("lmprune: error: " + UNSUPPORTED.split("(")[0] + "(block 1 differs by "), err
    assert err[0].endswith("tolerance 0.0001 in float32): this architecture is not supported yet"), err
    assert (snapshot(tmp_path), snapshot(tiny_llama)) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_guard_passes_a_model_the_replay_reproduces(dtype):
    """Plain Llama in each precision: the tolerance (4 eps of the dtype, at least 1e-4) leaves room for the
    replay's kernel differences; the per-block errors are printed nowhere, so the guard returning is the check."""
    model = tiny_model("llama").to(dtype)
    ids = sample_ids(4)
    _, blocks = find_blocks(model)
    calls = record_block_calls(model, blocks, list(ids.split(2)), CPU, CPU)
    check_replay(model, blocks, calls, ids[:2], CPU, CPU)


def test_tolerance_per_dtype():
    assert tolerance(torch.float32) == 1e-4
    assert tolerance(torch.bfloat16) == 4 * 2 ** -7
    assert tolerance(torch.float16) == 4 * 2 ** -10


def test_stories260k_passes_the_guard(stories_path):
    model, _ = load_model(str(stories_path))
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    _, blocks = find_blocks(model)
    calls = record_block_calls(model, blocks, [ids], CPU, CPU)
    check_replay(model, blocks, calls, ids, CPU, CPU)
