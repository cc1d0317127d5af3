"""The command line: every bad input gives one clear line on stderr, exit code 2, and writes nothing."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lmprune
from conftest import byte_tokenizer, random_text
from lmprune.cli import main
from lmprune.model import describe_device, resolve_device


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny Llama whose MLP width (172) is not a multiple of 8, like stories260K's."""
    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(random_text(800))
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    # The plan line comes before the model is loaded, so errors found by loading it follow the plan.
    return code, captured.out, [line for line in captured.err.splitlines()
                                if line.strip() and not line.startswith("lmprune: plan: ")]


def prune_args(model, calib, out, *extra):
    return ["prune", model, "--calib", calib, "--nsamples", 2, "--seqlen", 32, "--out", out, "--no-progress", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "sparsegpt", "--sparsity", "1.0"], "sparsity must be in [0, 1), got 1.0"),
        (["--method", "sparsegpt", "--sparsity", "-0.2"], "sparsity must be in [0, 1), got -0.2"),
        (["--method", "sparsegpt", "--pattern", "4:4"], "invalid N:M pattern 4:4: need 0 < N < M"),
        (["--method", "sparsegpt", "--pattern", "2-4"], "invalid pattern '2-4'"),
        (["--method", "sparsegpt", "--pattern", "4:8"], "4:8 does not fit layer model.layers.0.mlp.down_proj: its input width 172"),
        (["--method", "obs", "--sparsity", "0.5"], "unknown method 'obs'"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--opt", "nope=1"], "unknown option"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--nsamples", "0"], "--nsamples must be at least 1"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--seqlen", "4096"], "exceeds the model's context length 128"),
        (["--method", "sparsegpt", "--sparsity", "0.5", "--skip", "("], "invalid --skip regex"),
    ],
)
def test_bad_prune_input(capsys, tiny_llama, calib, tmp_path, extra, message):
    out = tmp_path / "out"
    args = prune_args(tiny_llama, calib, out, *extra)
    code, _, err = run(capsys, *args)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lmprune: error: ") and message in err[0], err
    assert not out.exists()


def test_missing_model_path(capsys, calib, tmp_path):
    out = tmp_path / "out"
    code, _, err = run(capsys, *prune_args(tmp_path / "no_such_model", calib, out, "--method", "wanda", "--sparsity", "0.5"))
    assert code == 2 and len(err) == 1 and "model not found" in err[0]
    assert not out.exists()


def test_calibration_text_too_short(capsys, tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("the cat sat")
    out = tmp_path / "out"
    code, _, err = run(capsys, *prune_args(tiny_llama, short, out, "--method", "wanda", "--sparsity", "0.5"))
    assert code == 2 and len(err) == 1 and "calibration text too short: 11 tokens" in err[0], err
    assert not out.exists()


def test_missing_calibration_file(capsys, tiny_llama, tmp_path):
    code, _, err = run(capsys, *prune_args(tiny_llama, tmp_path / "none.txt", tmp_path / "out", "--method", "wanda", "--sparsity", "0.5"))
    assert code == 2 and len(err) == 1 and "no such file" in err[0]


def test_output_dir_not_empty_unless_overwrite(capsys, tiny_llama, calib, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(capsys, *prune_args(tiny_llama, calib, out, "--method", "wanda", "--sparsity", "0.5"))
    assert code == 2 and len(err) == 1 and "is not empty (use --overwrite" in err[0]
    assert (out / "keep.txt").read_text() == "precious"

    code, _, err = run(capsys, *prune_args(tiny_llama, calib, out, "--method", "wanda", "--sparsity", "0.5", "--overwrite"))
    assert code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


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
