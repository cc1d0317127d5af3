"""--reconstruct block: Adam on a pruned block's kept weights against the dense block's output.

The masks are held fixed bit for bit, the block's output error on the calibration tokens falls (measured here
with a plain forward, not the module's own bookkeeping), a fit that would raise it is undone, and the run is
deterministic given the seed: a killed streamed run resumes bit for bit, two processes match one.
"""

import subprocess
import sys

import pytest
import torch

from conftest import byte_tokenizer, prune_args, random_text, run_cli
from lmprune.config import ReconstructSettings, SparsityPattern
from lmprune.data import calibration_windows, load_text, tokenize
from lmprune.errors import LmpruneError
from lmprune.masks import topk_mask
from lmprune.model import find_blocks, load_model, prunable_layers, record_block_calls
from lmprune.pipeline import prune_model
from lmprune.reconstruct import reconstruct_block
from lmprune.solvers import build_layer_solver
from test_distributed import _env, _free_port, compare, prune_command, report
from test_resume import resumes_bit_identical
from test_streaming import layer_records
from test_streaming import report as streamed_report
from zoo import tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def stories_block(stories_path, tinystories_path):
    """stories260K's block 1 with every layer magnitude-pruned to 70%, its pruned-stream inputs (block 0 pruned
    too) and the dense block's outputs on the dense stream: 8 windows of 64 tokens in batches of 2."""
    model, tokenizer = load_model(str(stories_path), "float32", progress=False)
    text = load_text(str(tinystories_path), "calibration")[:200_000]
    calibration = calibration_windows(tokenize(tokenizer, text), 8, 64, 0)
    name, blocks = find_blocks(model)
    calls = record_block_calls(model, blocks, list(calibration.split(2)), CPU, CPU)
    with torch.no_grad():
        dense_in = [blocks[0](h, *calls.call_args[calls.call_index[0][j]][0],
                              **calls.call_args[calls.call_index[0][j]][1]) for j, h in enumerate(calls.hidden)]
        dense_in = [d[0] if isinstance(d, tuple) else d for d in dense_in]
        call = calls.for_block(1)
        targets = [call.call(blocks[1], j, d, CPU) for j, d in enumerate(dense_in)]
        for index in (0, 1):
            for layer in prunable_layers(blocks[index], f"{name}.{index}"):
                W = layer.get_weight(CPU)
                layer.set_weight(W * topk_mask(W.abs(), SparsityPattern(0.7)))
        pruned_in = [calls.for_block(0).call(blocks[0], j, h, CPU) for j, h in enumerate(calls.hidden)]
    return blocks[1], prunable_layers(blocks[1], f"{name}.1"), call, pruned_in, targets


def block_error(block, call, inputs, targets) -> float:
    """‖B(X_p) − Y_d‖² / ‖Y_d‖² with the block's own forward."""
    with torch.no_grad():
        miss = sum(float((call.call(block, j, x, CPU) - t).double().pow(2).sum()) for j, (x, t) in
                   enumerate(zip(inputs, targets)))
    return miss / sum(float(t.double().pow(2).sum()) for t in targets)


def fitted(stories_block, settings):
    """A fresh copy of the pruned block reconstructed with `settings`: (weights before, after, record, errors)."""
    import copy

    block, layers, call, inputs, targets = stories_block
    block = copy.deepcopy(block)
    layers = prunable_layers(block, "block")
    before = {layer.name: layer.get_weight(CPU) for layer in layers}
    error_before = block_error(block, call, inputs, targets)
    record = reconstruct_block(block, layers, call, inputs, targets, settings, CPU, block_index=1)
    after = {layer.name: layer.get_weight(CPU) for layer in layers}
    return before, after, record, (error_before, block_error(block, call, inputs, targets))


def test_masks_are_held_exactly_and_the_block_error_falls_on_stories260k(stories_block):
    before, after, record, (error_before, error_after) = fitted(stories_block, ReconstructSettings(steps=40, lr=1e-3,
                                                                                                    batch=4))
    for name in before:
        assert torch.equal(before[name] == 0, after[name] == 0), name  # the very same zeros
        assert not torch.equal(before[name], after[name]), name  # every kept weight set was fitted
    assert record["kept"] == "reconstructed"
    assert record["error_before"] == pytest.approx(error_before, rel=1e-6)
    assert record["error_after"] == pytest.approx(error_after, rel=1e-6)
    assert error_after < 0.8 * error_before, (error_before, error_after)


def test_the_same_seed_gives_the_same_bits_and_another_seed_other_ones(stories_block):
    settings = ReconstructSettings(steps=6, lr=1e-3, batch=2, seed=3)
    _, one, _, _ = fitted(stories_block, settings)
    _, two, _, _ = fitted(stories_block, settings)
    _, other, _, _ = fitted(stories_block, ReconstructSettings(steps=6, lr=1e-3, batch=2, seed=4))
    assert all(torch.equal(one[name], two[name]) for name in one)
    assert not all(torch.equal(one[name], other[name]) for name in one)


def test_a_fit_that_raises_the_error_is_undone(stories_block):
    before, after, record, (error_before, error_after) = fitted(stories_block, ReconstructSettings(steps=3, lr=1.0))
    assert record["kept"] == "layer-wise" and record["why"] == "the fit raised the block's output error"
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert error_after == error_before


def test_two_ranks_summing_their_gradients_take_one_processs_steps_and_end_identical(stories_block):
    # Two "ranks" as threads: each holds half the batches (rank r: global batches r, r + 2) and all-reduces
    # through a barrier, adding in rank order as a collective would. Each step takes all four batches.
    import copy
    import threading

    block, _, call, inputs, targets = stories_block
    settings = ReconstructSettings(steps=5, lr=1e-3, batch=8)
    _, alone, _, _ = fitted(stories_block, settings)
    barrier, shared, exchanges = threading.Barrier(2), {}, [0, 0]

    def rank(r, out):
        def all_reduce(tensors):
            shared[r] = [t.clone() for t in tensors]
            barrier.wait()
            for k, t in enumerate(tensors):
                t.copy_(shared[0][k] + shared[1][k])
            exchanges[r] += 1
            barrier.wait()

        mine = copy.deepcopy(block)
        layers = prunable_layers(mine, "block")
        ids = [r, r + 2]
        out[r] = reconstruct_block(mine, layers, call, [inputs[g] for g in ids], [targets[g] for g in ids],
                                   settings, CPU, block_index=1, batch_ids=ids, total_batches=4,
                                   all_reduce=all_reduce), {layer.name: layer.get_weight(CPU) for layer in layers}

    out = {}
    threads = [threading.Thread(target=rank, args=(r, out)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert exchanges == [1 + settings.steps + 1] * 2  # the error before, one gradient per step, the error after
    (record0, weights0), (record1, weights1) = out[0], out[1]
    assert record0 == record1 and record0["kept"] == "reconstructed"
    assert all(torch.equal(weights0[name], weights1[name]) for name in weights0)  # identical on every rank
    for name, w in alone.items():  # one process's steps, up to the order of the sums
        assert torch.allclose(weights0[name], w, atol=1e-5, rtol=0), name


def test_pipeline_records_each_block_and_keeps_the_target_sparsity():
    calibration = calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 8, 24, 0)
    plain, fitted_model = tiny_model("llama"), tiny_model("llama")
    solver, pattern = build_layer_solver("sparsegpt"), SparsityPattern(0.6)
    prune_model(plain, calibration, solver, pattern, CPU, batch_size=4, progress=False)
    result = prune_model(fitted_model, calibration, solver, pattern, CPU, batch_size=4, progress=False,
                         reconstruct=ReconstructSettings(steps=10, lr=1e-3, batch=4))
    name, blocks = find_blocks(plain)
    assert [b["block"] for b in result.blocks] == list(range(len(blocks)))
    assert all(b["reconstruct"]["error_after"] <= b["reconstruct"]["error_before"] for b in result.blocks)
    a, b = plain.state_dict(), fitted_model.state_dict()
    # Block 0 is pruned as without --reconstruct (no dense targets: the stream only gives the block's targets);
    # its zeros are the same, and its kept weights were fitted.
    w = f"{name}.0.mlp.down_proj.weight"
    assert torch.equal(a[w] == 0, b[w] == 0) and not torch.equal(a[w], b[w])
    for key in a:
        if "norm" in key or "embed" in key:
            assert torch.equal(a[key], b[key]), key  # only the pruned layers' weights move


def test_fused_experts_are_refused():
    calibration = calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 4, 24, 0)
    with pytest.raises(LmpruneError, match="--reconstruct block cannot optimise fused expert tensors"):
        prune_model(tiny_model("mixtral"), calibration, build_layer_solver("sparsegpt"), SparsityPattern(0.5), CPU,
                    progress=False, reconstruct=ReconstructSettings())


@pytest.mark.parametrize("extra, message", [
    (["--opt", "reconstruct_steps=5"], "--opt reconstruct_steps needs --reconstruct block"),
    (["--reconstruct", "block", "--opt", "reconstruct_rate=5"],
     "unknown option 'reconstruct_rate' for --reconstruct (known: reconstruct_steps, reconstruct_lr, "
     "reconstruct_batch)"),
    (["--reconstruct", "block", "--opt", "reconstruct_lr=0"], "reconstruct_lr must be a positive number, got 0.0"),
    (["--reconstruct", "block", "--opt", "reconstruct_steps=0"], "reconstruct_steps must be at least 1, got 0"),
])
def test_bad_settings_are_one_error_and_write_nothing(capsys, tiny_llama, tmp_path, extra, message):
    text = tmp_path / "calib.txt"
    text.write_text(random_text(500))
    code, _, err = run_cli(capsys, *prune_args(tiny_llama, text, tmp_path / "out", "--method", "wanda",
                                               "--sparsity", "0.5", *extra))
    assert code == 2 and len(err) == 1 and err[0].startswith("lmprune: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_cli_reports_the_settings_and_each_blocks_fit(capsys, tiny_llama, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(random_text(500))
    code, _, err = run_cli(capsys, *prune_args(tiny_llama, text, tmp_path / "out", "--method", "sparsegpt",
                                               "--sparsity", "0.5", "--seed", "7", "--reconstruct", "block",
                                               "--opt", "reconstruct_steps=5", "--opt", "reconstruct_lr=1e-3",
                                               "--opt", "blocksize=32"))
    assert code == 0, err
    got = streamed_report(tmp_path / "out")
    assert got["settings"]["reconstruct"] == {"steps": 5, "lr": 1e-3, "batch": 8, "seed": 7}
    assert got["settings"]["options"]["blocksize"] == 32  # the rest of --opt is the method's
    assert [b["block"] for b in got["blocks"]] == [0, 1]
    assert all(b["reconstruct"]["steps"] == 5 and "error_after" in b["reconstruct"] for b in got["blocks"])


def test_a_killed_streamed_run_resumes_bit_identical(capsys, tmp_path, monkeypatch):
    work = resumes_bit_identical(capsys, monkeypatch, tmp_path, (
        "--method", "sparsegpt", "--sparsity", "0.5", "--reconstruct", "block", "--opt", "reconstruct_steps=8",
        "--opt", "reconstruct_lr=1e-3", "--opt", "reconstruct_batch=1", "--stream"))
    assert layer_records(work / "out") == layer_records(work / "whole")
    fits = [b["reconstruct"] for b in streamed_report(work / "whole")["blocks"]]
    assert [b["reconstruct"] for b in streamed_report(work / "out")["blocks"]] == fits
    assert any(fit["kept"] == "reconstructed" for fit in fits)


def test_two_processes_match_one(stories_path, tinystories_path, tmp_path):
    # 4 windows in batches of 1, 4 per step: each step's gradient is the sum over all four, split 2 + 2 over
    # the ranks and all-reduced; only the order of the sums differs from one process.
    common = ["--nsamples", 4, "--batch-size", 1, "--seqlen", 64, "--method", "sparsegpt", "--sparsity", "0.6",
              "--reconstruct", "block", "--opt", "reconstruct_steps=10", "--opt", "reconstruct_lr=1e-3",
              "--opt", "reconstruct_batch=4"]
    from lmprune.cli import main

    assert main([str(a) for a in prune_command(stories_path, tinystories_path, tmp_path / "one", *common)]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "lmprune", *map(str, prune_command(stories_path, tinystories_path,
                                                                           tmp_path / "two", *common))]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    flips, total, worst = compare(tmp_path / "one", tmp_path / "two")
    assert flips <= 0.002 * total and worst < 1e-3, (flips, total, worst)
    one, two = report(tmp_path / "one")["blocks"], report(tmp_path / "two")["blocks"]
    assert [b["reconstruct"]["kept"] for b in one] == [b["reconstruct"]["kept"] for b in two]
    for a, b in zip(one, two):
        assert b["reconstruct"]["error_before"] == pytest.approx(a["reconstruct"]["error_before"], rel=1e-3)
        assert b["reconstruct"]["error_after"] == pytest.approx(a["reconstruct"]["error_after"], rel=1e-2)
