"""Each method's declared statistics: the collect step sums only what the method reads, and the per-layer
error report (which reads XᵀX) is there for methods that collect it, or where the run asks for it."""

import json

import pytest
import torch

from conftest import byte_tokenizer, random_text
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, tokenize
from lmprune.pipeline import prune_model
from lmprune.report import format_report, load_report, summarize_layers
from lmprune.solvers import build_layer_solver
from zoo import tiny_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("spec, statistics", [
    ({"method": "magnitude"}, "none"),
    ({"method": "wanda"}, "diagonal"),
    ({"method": "dsnot"}, "diagonal"),
    ({"mask": "wanda", "update": "none"}, "diagonal"),
    ({"method": "sparsegpt"}, "gram"),
    ({"method": "alps"}, "gram"),
    ({"mask": "wanda", "update": "sparsegpt"}, "gram"),  # the update reads XᵀX
    ({"method": "wanda", "refine": "swaps"}, "gram"),  # so do the swaps' exact gains
])
def test_each_method_declares_what_it_reads(spec, statistics):
    assert build_layer_solver(**spec).statistics == statistics


@pytest.fixture(scope="module")
def calibration():
    return calibration_windows(tokenize(byte_tokenizer(), random_text(4000)), 4, 32, 0)


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "dsnot"])
def test_layer_errors_cost_nothing_in_the_model(model_type, method, calibration):
    """Without XᵀX a method's layers carry no error fields; --layer-errors adds them and changes no weight:
    the method reads the same diagonal sums either way."""
    runs = {}
    for layer_errors in (False, True):
        model = tiny_model(model_type)
        result = prune_model(model, calibration, build_layer_solver(method), SparsityPattern(0.6), CPU,
                             progress=False, layer_errors=layer_errors)
        runs[layer_errors] = (result, _weights(model))
    plain, measured = runs[False][0], runs[True][0]
    assert [r["name"] for r in plain.layers] == [r["name"] for r in measured.layers]
    assert not any("error" in r or "error_masked" in r for r in plain.layers)
    assert all(0 <= r["error_masked"] and 0 <= r["error"] for r in measured.layers)
    if method != "dsnot":  # no update and no swaps: the method's weights are its mask's
        assert all(r["error"] == r["error_masked"] for r in measured.layers)
    assert "mean_error" not in summarize_layers(plain.layers)
    assert summarize_layers(measured.layers)["mean_error"] > 0
    assert runs[False][1].keys() == runs[True][1].keys()
    assert all(torch.equal(runs[False][1][k], runs[True][1][k]) for k in runs[False][1])


def test_a_report_without_errors_reads_back(tmp_path, calibration):
    result = prune_model(tiny_model("llama"), calibration, build_layer_solver("wanda"), SparsityPattern(0.5), CPU,
                         progress=False)
    report = {"method": "wanda", "pattern": "50%", "settings": {}, "summary": summarize_layers(result.layers),
              "layers": result.layers}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    text = format_report(load_report(str(path)))
    assert "rel. errors: not computed" in text and "--layer-errors" in text
    first = result.layers[0]["name"]
    assert next(line for line in text.splitlines() if line.startswith(first)).split()[3:5] == ["—", "—"]


@pytest.mark.parametrize("model_type", ["llama", "qwen3_moe"])
def test_a_method_reading_nothing_runs_one_collection_batch(model_type, calibration):
    """Magnitude reads no statistics: its collection runs the first batch alone (for the routers), not
    every batch; token counts are then None, and no weight changes."""
    runs = {}
    for layer_errors in (False, True):  # --layer-errors collects XᵀX, so every batch runs and is counted
        model = tiny_model(model_type)
        blocks = model.model.layers
        calls = [0] * len(blocks)
        handles = [block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
                   for i, block in enumerate(blocks)]
        result = prune_model(model, calibration, build_layer_solver("magnitude"), SparsityPattern(0.5), CPU,
                             progress=False, layer_errors=layer_errors)
        for handle in handles:
            handle.remove()
        runs[layer_errors] = (result, _weights(model), calls)
    batches = len(calibration)
    (plain, plain_weights, plain_calls), (counted, counted_weights, counted_calls) = runs[False], runs[True]
    # The capture and replay check run every block alike in both; the collection is the difference.
    assert [c - p for c, p in zip(counted_calls, plain_calls)] == [batches - 1] * len(blocks)
    assert all(r["tokens"] is None for r in plain.layers)
    assert all(isinstance(r["tokens"], int) for r in counted.layers)
    assert plain.routers == counted.routers and (model_type == "llama") == (not plain.routers)
    assert plain_weights.keys() == counted_weights.keys()
    assert all(torch.equal(plain_weights[k], counted_weights[k]) for k in plain_weights)


def test_a_large_gram_is_added_in_blocks_of_rows_bit_for_bit(monkeypatch):
    """XᵀX above PRODUCT_BYTES is added a block of rows at a time (no temporary as large as the sum): the
    running sums are the same bits as adding the whole product (issue #30)."""
    from lmprune import statistics

    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(96, 700, generator=g) for _ in range(3)]
    whole, blocks = torch.zeros(700, 700), torch.zeros(700, 700)
    for flat in batches:
        whole.add_(flat.t() @ flat)
    monkeypatch.setattr(statistics, "PRODUCT_BYTES", 4 * 699 ** 2)  # 700 wide: too large; blocks of 174 rows
    for flat in batches:
        product = statistics.batch_sum(flat, "gram")
        assert product is None
        statistics.add_batch(blocks, flat, "gram", product)
    assert torch.equal(whole.view(torch.int32), blocks.view(torch.int32))


def test_a_report_without_token_counts_reads_back(tmp_path, calibration):
    """Magnitude's records carry tokens = null: the report validates and `lmprune report` shows "—"."""
    result = prune_model(tiny_model("llama"), calibration, build_layer_solver("magnitude"), SparsityPattern(0.5),
                         CPU, progress=False)
    report = {"method": "magnitude", "pattern": "50%", "settings": {}, "summary": summarize_layers(result.layers),
              "layers": result.layers}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    text = format_report(load_report(str(path)))
    first = result.layers[0]["name"]
    assert next(line for line in text.splitlines() if line.startswith(first)).split()[3:6] == ["—", "—", "—"]
