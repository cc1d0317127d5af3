"""Acceptance on a real trained model: stories260K from ../shared (skipped when absent).

Calibration 64 × 256 tokens of TinyStories; perplexity over the whole file in 256-token windows.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import model_linears
from lmprune.cli import main
from lmprune.data import evaluation_windows, load_text, tokenize
from lmprune.evaluate import perplexity
from lmprune.masks import is_nm
from lmprune.model import load_model

pytestmark = pytest.mark.slow
EVAL_BATCH = 16


@pytest.fixture(scope="module")
def eval_windows(stories_path, tinystories_path):
    _, tokenizer = load_model(str(stories_path))
    return evaluation_windows(tokenize(tokenizer, load_text(str(tinystories_path))), 256)


@pytest.fixture(scope="module")
def pruned(stories_path, tinystories_path, tmp_path_factory):
    """Prune once per setting; returns {setting: output dir}."""
    outputs = {}

    def prune(method, *target):
        key = (method, *target)
        if key not in outputs:
            out = tmp_path_factory.mktemp(f"{method}")
            code = main(["prune", str(stories_path), "--method", method, *target, "--calib", str(tinystories_path),
                         "--nsamples", "64", "--seqlen", "256", "--out", str(out), "--overwrite", "--no-progress"])
            assert code == 0
            outputs[key] = out
        return outputs[key]

    return prune


def pruned_weights(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    return model, model_linears(model)


def test_dense_perplexity_matches_reference(stories_path, eval_windows):
    model, _ = load_model(str(stories_path))
    assert eval_windows.shape[0] == 1535
    assert perplexity(model, eval_windows, torch.device("cpu"), EVAL_BATCH, progress=False) == pytest.approx(5.12, abs=0.01)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_pruned_linear_exactly_half_zero(pruned, method):
    model, layers = pruned_weights(pruned(method, "--sparsity", "0.5"))
    assert len(layers) == 35
    for layer in layers:
        w = layer.module.weight
        assert int((w == 0).sum()) == w.numel() // 2, layer.name
    assert (model.lm_head.weight != 0).all()  # tied to the embeddings, never pruned


def test_perplexity_ordering_at_half_sparsity(pruned, eval_windows):
    ppl = {"dense": 5.12}
    for method in ("sparsegpt", "wanda", "magnitude"):
        model, _ = pruned_weights(pruned(method, "--sparsity", "0.5"))
        ppl[method] = perplexity(model, eval_windows, torch.device("cpu"), EVAL_BATCH, progress=False)
    assert ppl["dense"] < ppl["sparsegpt"] < ppl["wanda"] < ppl["magnitude"], ppl
    # llm-compressor 0.14 with 128 calibration windows: SparseGPT 20.65, Wanda 21.73
    assert ppl["sparsegpt"] < 24 and ppl["wanda"] < 26, ppl


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_two_four_pattern_in_every_layer(pruned, method):
    out = pruned(method, "--pattern", "2:4")
    _, layers = pruned_weights(out)
    for layer in layers:
        assert is_nm(layer.module.weight != 0, 2, 4), layer.name
    report = json.loads((out / "lmprune_report.json").read_text())
    assert report["summary"]["sparsity"] == 0.5


def test_dsnot_moves_wanda_masks_and_beats_wanda_at_70(pruned, eval_windows):
    ppl, row_counts = {}, {}
    for method in ("wanda", "dsnot"):
        out = pruned(method, "--sparsity", "0.7")
        model, layers = pruned_weights(out)
        ppl[method] = perplexity(model, eval_windows, torch.device("cpu"), EVAL_BATCH, progress=False)
        row_counts[method] = [(layer.module.weight != 0).sum(1) for layer in layers]
    for wanda_rows, dsnot_rows in zip(row_counts["wanda"], row_counts["dsnot"]):
        assert torch.equal(wanda_rows, dsnot_rows)  # swaps keep every row's count
    report = json.loads((pruned("dsnot", "--sparsity", "0.7") / "lmprune_report.json").read_text())
    swaps = [layer["info"]["swaps"] for layer in report["layers"]]
    assert len(swaps) == 35 and min(swaps) > 0
    assert all(layer["info"]["expected_error_ratio"] < 1 for layer in report["layers"])
    # 128 windows (bench/RESULTS.md): Wanda 135.63, DSnoT 122.31
    assert ppl["dsnot"] < 0.95 * ppl["wanda"], ppl
