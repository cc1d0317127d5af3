"""CUDA does the same work as the CPU: every solver, the block pipeline (activations kept on the GPU or
offloaded to the CPU), SparseLLM's block refiner, half-precision models and the CLI.

Skipped where no GPU is present (CI has none); run on a GPU machine with `python -m pytest tests/test_cuda.py`.
Float32 on a GPU sums in another order than on a CPU, so near-tied mask decisions may flip: the tests
allow a few flipped weights and a small perplexity difference, and require everything else to agree.
"""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import correlated_problem, model_linears
from lmprune.cli import main
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, evaluation_windows, load_text, tokenize
from lmprune.evaluate import perplexity
from lmprune.masks import is_nm
from lmprune.methods import build_method
from lmprune.model import load_model
from lmprune.pipeline import prune_model
from lmprune.solvers import InputStats, build_layer_solver, method_names
from lmprune.solvers.linalg import relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
METHODS = ["magnitude", "wanda", "sparsegpt", "admm1", "admm-grad", "alps", "dsnot", "sparsellm"]


@pytest.fixture(scope="module")
def problem():
    return correlated_problem(offset=1.0, with_stats=True)


@pytest.mark.parametrize("target", ["0.6", "2:4"])
@pytest.mark.parametrize("method", method_names())
def test_solver_on_cuda_matches_cpu(problem, method, target):
    W, H, stats = problem
    pattern = SparsityPattern.parse(target)
    solver = build_layer_solver(method)
    on_cpu = solver(W, H, pattern, stats)
    on_gpu = solver(W.to(CUDA), H.to(CUDA), pattern, InputStats(stats.total.to(CUDA), stats.tokens))
    assert on_gpu.weight.device.type == "cuda" and on_gpu.mask.device.type == "cuda"
    weight, mask = on_gpu.weight.cpu(), on_gpu.mask.cpu()
    assert torch.isfinite(weight).all()
    assert not weight[~mask].any()
    assert int(mask.sum()) == int(on_cpu.mask.sum())
    if pattern.is_nm:
        assert is_nm(mask, pattern.n, pattern.m)
    assert (mask == on_cpu.mask).float().mean() >= 0.99
    assert relative_error(W, weight, H) == pytest.approx(relative_error(W, on_cpu.weight, H), rel=0.02)


@pytest.fixture(scope="module")
def stories(stories_path, tinystories_path):
    model, tokenizer = load_model(str(stories_path))
    ids = tokenize(tokenizer, load_text(str(tinystories_path)))
    return model, calibration_windows(ids, 16, 256, seed=0), evaluation_windows(ids, 256, 200)


def _prune(dense, method, calibration, device, store_device=None, target="0.5"):
    model = copy.deepcopy(dense)
    built = build_method(method)
    result = prune_model(model, calibration, built.layer_solver, built.pattern(SparsityPattern.parse(target)), device,
                         store_device=store_device, refiner=built.refiner, progress=False)
    return model, result


@pytest.mark.parametrize("method", METHODS)
def test_pipeline_on_cuda_matches_cpu(stories, method):
    dense, calibration, evaluation = stories
    ppl = []
    for device in (CPU, CUDA):
        model, result = _prune(dense, method, calibration, device)
        # The pipeline hands the model back where it found it; only one block at a time visits the GPU.
        assert {p.device for p in model.parameters()} == {CPU}
        for layer in model_linears(model):
            weight = layer.module.weight
            assert int((weight == 0).sum()) == weight.numel() // 2, (device, layer.name)
        assert len(result.layers) == 35
        ppl.append(perplexity(model, evaluation, device, 16, progress=False))
    assert ppl[1] == pytest.approx(ppl[0], rel=0.02), ppl  # CUDA vs CPU


@pytest.mark.parametrize("method", ["sparsegpt", "sparsellm"])
def test_offloaded_activations_give_identical_weights(stories, method):
    """Keeping calibration activations on the CPU only moves tensors; the arithmetic is the same."""
    dense, calibration, _ = stories
    on_gpu, _ = _prune(dense, method, calibration, CUDA)
    offloaded, _ = _prune(dense, method, calibration, CUDA, store_device=CPU)
    for a, b in zip(on_gpu.parameters(), offloaded.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_on_cuda(stories, dtype):
    """Half-precision weights are solved in float32 and written back in their own dtype, still sparse."""
    dense, calibration, evaluation = stories
    reference, _ = _prune(dense, "sparsegpt", calibration, CUDA, target="2:4")
    model, _ = _prune(copy.deepcopy(dense).to(dtype), "sparsegpt", calibration, CUDA, target="2:4")
    for layer in model_linears(model):
        assert layer.module.weight.dtype == dtype
        assert is_nm(layer.module.weight != 0, 2, 4), layer.name
    ppl_half = perplexity(model.float(), evaluation, CUDA, 16, progress=False)
    ppl_float = perplexity(reference, evaluation, CUDA, 16, progress=False)
    assert ppl_half == pytest.approx(ppl_float, rel=0.05)


def test_cli_prunes_on_cuda_and_checkpoint_reloads_on_cpu(stories_path, tinystories_path, tmp_path):
    out = tmp_path / "out"
    code = main(["prune", str(stories_path), "--method", "alps", "--pattern", "2:4", "--calib",
                 str(tinystories_path), "--nsamples", "8", "--seqlen", "256", "--device", "cuda",
                 "--offload-activations", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "lmprune_report.json").read_text())
    assert report["device"].startswith("cuda"), report["device"]
    model = AutoModelForCausalLM.from_pretrained(out)
    for layer in model_linears(model):
        assert is_nm(layer.module.weight != 0, 2, 4), layer.name
    assert main(["eval", str(out), "--data", str(tinystories_path), "--seqlen", "256", "--max-windows", "20",
                 "--device", "cuda", "--no-progress"]) == 0
