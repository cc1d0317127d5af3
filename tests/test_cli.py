"""The command line: every bad input gives one clear line on stderr, exit code 2, and writes nothing."""

import json

import pytest
import torch

import lmprune
from conftest import prune_args, random_text, run_cli as run, snapshot
from lmprune.cli import main
from lmprune.model import describe_device, resolve_device


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(random_text(800))
    return path


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "sparsegpt", "--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
        (["--method", "sparsegpt", "--sparsity", "-0.2"], "sparsity must be in [0, 1), got -0.2"),
        (["--method", "sparsegpt", "--pattern", "4:4"], "invalid N:M pattern 4:4: need 0 < N < M"),
        (["--method", "sparsegpt", "--pattern", "2-4"], "invalid pattern '2-4'"),
        (["--method", "sparsegpt", "--pattern", "4:8"], "4:8 does not fit layer model.layers.0.mlp.down_proj: its input width 172"),
        (["--method", "obs", "--sparsity", "0.5"], "unknown method 'obs' (choose from: admm-grad, admm1, alps, "
                                                   "dsnot, magnitude, sparsegpt, sparsellm, wanda)"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--opt", "nope=1"], "unknown option"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "0"], "--nsamples must be at least 1"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--seqlen", "4096"], "exceeds the model's context length 128"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--skip", "("], "invalid --skip regex"),
        (["--method", "wanda", "--sparsity", "0.5", "--seqlen", "0"], "--seqlen must be at least 2, got 0"),
        (["--method", "wanda", "--sparsity", "0.5", "--seqlen", "-3"], "--seqlen must be at least 2, got -3"),
        (["--method", "wanda", "--sparsity", "0.5", "--eval-seqlen", "1"], "--eval-seqlen must be at least 2, got 1"),
        (["--method", "wanda", "--sparsity", "0.5", "--eval-max-windows", "0"],
         "--eval-max-windows must be at least 1, got 0"),
        (["--method", "wanda", "--sparsity", "0.5", "--eval-max-windows", "-2"],
         "--eval-max-windows must be at least 1, got -2"),
    ],
)
def test_bad_prune_input(capsys, tiny_llama, calib, tmp_path, extra, message):
    before, model_before = snapshot(tmp_path), snapshot(tiny_llama)
    out = tmp_path / "out"
    args = prune_args(tiny_llama, calib, out, *extra)  # a --seqlen in extra wins: argparse keeps the last
    code, _, err = run(capsys, *args)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lmprune: error: ") and message in err[0], err
    assert snapshot(tmp_path) == before and snapshot(tiny_llama) == model_before  # nothing written, nothing left


def test_missing_model_path(capsys, calib, tmp_path):
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    code, _, err = run(capsys, *prune_args(tmp_path / "no_such_model", calib, out, "--method", "wanda", "--sparsity", "0.5"))
    assert code == 2 and len(err) == 1 and "model not found" in err[0]
    assert snapshot(tmp_path) == before


def test_calibration_text_too_short(capsys, tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    before = snapshot(tmp_path)
    out = tmp_path / "sub" / "out"  # its parent is made for the run, and removed again when it fails
    code, _, err = run(capsys, *prune_args(tiny_llama, short, out, "--method", "wanda", "--sparsity", "0.5"))
    assert code == 2 and len(err) == 1 and "calibration text too short: 11 tokens" in err[0], err
    assert snapshot(tmp_path) == before


def test_missing_calibration_file(capsys, tiny_llama, tmp_path):
    code, _, err = run(capsys, *prune_args(tiny_llama, tmp_path / "none.txt", tmp_path / "out", "--method", "wanda", "--sparsity", "0.5"))
    assert code == 2 and len(err) == 1 and "no such file" in err[0]


def test_prune_writes_checkpoint_and_report(capsys, tiny_llama, calib, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, *prune_args(tiny_llama, calib, out, "--mask", "wanda", "--update", "sparsegpt",
                                           "--pattern", "2:4", "--skip", "down_proj", "--eval", calib))
    assert code == 0, err
    report = json.loads((out / "lmprune_report.json").read_text())
    assert report["method"] == "wanda+sparsegpt" and report["pattern"] == "2:4"
    assert report["device"] == describe_device(resolve_device("auto"))
    assert report["summary"]["layers"] == 12  # 2 blocks × 6 (down_proj skipped)
    assert report["summary"]["sparsity"] == 0.5
    assert all(r["error"] <= r["error_masked"] for r in report["layers"])
    assert report["evaluation"][0]["perplexity"] > 1
    assert {"capture", "gram_forward", "solve", "propagate", "total"} <= set(report["timings"])
    assert report["versions"]["torch"] == torch.__version__  # with its build tag (+cpu, +cu130, ...)
    assert report["versions"]["lmprune"] == lmprune.__version__

    code, text, _ = run(capsys, "report", out)
    assert code == 0 and "wanda+sparsegpt" in text and "model.layers.1.mlp.up_proj" in text


def test_eval_command(capsys, tiny_llama, calib):
    code, text, _ = run(capsys, "eval", tiny_llama, "--data", calib, "--seqlen", 32, "--max-windows", 3, "--no-progress")
    assert code == 0 and "perplexity" in text and "3 windows × 32 tokens" in text


def test_eval_needs_something(capsys, tiny_llama):
    code, _, err = run(capsys, "eval", tiny_llama)
    assert code == 2 and "nothing to evaluate" in err[0]


def test_methods_lists_solvers(capsys):
    code, text, _ = run(capsys, "methods")
    assert code == 0 and "sparsegpt" in text and "--opt blocksize=128" in text
    assert "sparsellm    [block]" in text and "--opt epochs=4" in text


def test_unknown_dataset_name_is_a_clear_error(capsys, tiny_llama, tmp_path):
    code, _, err = run(capsys, *prune_args(tiny_llama, "c5", tmp_path / "out", "--method", "wanda", "--sparsity", "0.5"))
    assert code == 2 and "wikitext2, ptb, c4" in err[0]


def test_version_flag(capsys):
    import lmprune

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lmprune {lmprune.__version__}"


def test_best_quality_is_sequential_layer_with_dense_and_block_targets(capsys, tiny_llama, calib, tmp_path):
    from safetensors.torch import load_file

    outs = {}
    for name, levers in (("best", ["--best-quality"]),
                         ("both", ["--sequential", "layer", "--dense-targets", "--block-targets"]), ("plain", [])):
        outs[name] = tmp_path / name
        code, _, err = run(capsys, *prune_args(tiny_llama, calib, outs[name], "--method", "sparsegpt",
                                               "--sparsity", "0.6", *levers))
        assert code == 0, err
    settings = {n: json.loads((o / "lmprune_report.json").read_text())["settings"] for n, o in outs.items()}
    assert (settings["best"]["sequential"], settings["best"]["dense_targets"], settings["best"]["block_targets"]) == (
        "layer", True, True)
    code, text, _ = run(capsys, "report", outs["best"])
    assert code == 0 and "sequential: layer  dense targets: yes  block targets: 2 of 2 blocks" in text, text
    code, _, err = run(capsys, *prune_args(tiny_llama, calib, tmp_path / "bad", "--method", "sparsegpt",
                                           "--sparsity", "0.6", "--block-targets", "--sequential", "layer"))
    assert code == 2 and err == ["lmprune: error: --block-targets needs --dense-targets and --sequential layer "
                                 "(--best-quality sets all three)"]
    weights = {n: load_file(o / "model.safetensors") for n, o in outs.items()}
    assert all(torch.equal(weights["best"][k], weights["both"][k]) for k in weights["both"])
    assert not all(torch.equal(weights["best"][k], weights["plain"][k]) for k in weights["plain"])
