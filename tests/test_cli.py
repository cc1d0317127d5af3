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


@pytest.fixture(scope="module")
def real_report(tiny_llama, tmp_path_factory) -> dict:
    """The report of a real run (with an evaluation), to spoil field by field."""
    root = tmp_path_factory.mktemp("report")
    (root / "calib.txt").write_text(random_text(800))
    assert main([str(a) for a in prune_args(tiny_llama, root / "calib.txt", root / "out", "--method", "wanda",
                                            "--sparsity", "0.5", "--eval", root / "calib.txt")]) == 0
    return json.loads((root / "out" / "lmprune_report.json").read_text())


def spoil(report: dict, path: str, value=KeyError) -> dict:
    """A copy of `report` with the field at `path` ("summary.sparsity", "layers.2.shape") set to `value`,
    or deleted (KeyError)."""
    import copy

    report = copy.deepcopy(report)
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    holder = report
    for key in parents:
        holder = holder[key]
    if value is KeyError:
        del holder[last]
    else:
        holder[last] = value
    return report


@pytest.mark.parametrize("path, value, problem", [
    ("summary", [1, 2], "summary is an array, not an object"),
    ("summary", "0.5", "summary is a string, not an object"),
    ("summary", KeyError, "summary is missing"),
    ("summary.sparsity", KeyError, "summary.sparsity is missing"),  # never printed as "sparsity 0.0000"
    ("summary.sparsity", "half", "summary.sparsity is a string, not a number"),
    ("summary.layers", True, "summary.layers is a boolean, not an integer"),
    ("layers", {"a": 1}, "layers is an object, not an array"),
    ("layers", KeyError, "layers is missing"),
    ("layers.2", "q_proj", "layers[2] is a string, not an object"),
    ("layers.2.shape", "64x64", "layers[2].shape is a string, not an array"),
    ("layers.2.shape", ["64", 64], "layers[2].shape holds a string, not only integers"),
    ("layers.2.name", KeyError, "layers[2].name is missing"),
    ("layers.2.error", "small", "layers[2].error is a string, not a number"),  # optional (--layer-errors), typed
    ("layers.2.sparsity", None, "layers[2].sparsity is null, not a number"),
    ("method", 3, "method is a number, not a string"),
    ("settings", None, "settings is null, not an object"),
    ("timings.total", "slow", "timings holds a string, not only numbers"),
    ("evaluation.0.perplexity", [1.0], "evaluation[0].perplexity is an array, not a number"),
    ("evaluation.0.windows", KeyError, "evaluation[0].windows is missing"),
    ("allocation", "owl", "allocation is a string, not an object or null"),
    ("unpruned", [{"name": "lm_head"}], "unpruned[0].shape is missing"),
])
def test_a_report_that_is_not_one_is_refused_in_one_line(capsys, tmp_path, real_report, path, value, problem):
    report = tmp_path / "lmprune_report.json"
    report.write_text(json.dumps(spoil(real_report, path, value)))
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "report", tmp_path)
    assert (code, out) == (2, "")
    assert err == [f"lmprune: error: {report} is not an lmprune report: {problem}"]
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "is not an lmprune report: its top level is an array, not an object"),
    (b"null", "is not an lmprune report: its top level is null, not an object"),
    (b'{"method": ', "is not a valid JSON report: Expecting value: line 1 column 12 (char 11)"),
    (b"", "is not a valid JSON report: Expecting value: line 1 column 1 (char 0)"),
    (b"\xff\xfe{}", "is not a valid JSON report: it is not UTF-8 text"),
])
def test_a_file_that_is_not_a_json_report_is_refused_in_one_line(capsys, tmp_path, content, message):
    report = tmp_path / "report.json"
    report.write_bytes(content)
    code, out, err = run(capsys, "report", report)
    assert (code, out) == (2, "")
    assert err == [f"lmprune: error: {report} {message}"]
    assert report.read_bytes() == content


def test_a_real_report_and_its_non_finite_numbers_still_print(capsys, tmp_path, real_report):
    # write_json stores non-finite numbers as "NaN"/"Infinity": a report holding them is still a report
    report = spoil(spoil(real_report, "summary.mean_error", "NaN"), "timings.total", "Infinity")
    (tmp_path / "lmprune_report.json").write_text(json.dumps(report))
    code, text, err = run(capsys, "report", tmp_path)
    assert code == 0 and err == []
    assert f"sparsity: {real_report['summary']['sparsity']:.4f}  mean rel. error: nan" in text
    assert "total inf" in text


@pytest.mark.parametrize("argv, message", [
    (["prune"], "the following arguments are required: model, --out (see `lmprune prune --help`)"),
    (["prune", "m", "--out", "o", "--sparsity", "half"],
     "argument --sparsity: invalid float value: 'half' (see `lmprune prune --help`)"),
    (["prune", "m", "--out", "o", "--sparsity", "0.5", "--pattern", "2:4"],
     "argument --pattern: not allowed with argument --sparsity (see `lmprune prune --help`)"),
    (["frob"], "argument command: invalid choice: 'frob' (choose from 'prune', 'eval', 'report', 'methods', 'pack', "
                   "'unpack', 'generate', 'bench-decode') "
               "(see `lmprune --help`)"),
    ([], "the following arguments are required: command (see `lmprune --help`)"),
    (["report"], "the following arguments are required: paths (see `lmprune report --help`)"),
    (["eval", "m", "--batch-size", "0"], "argument --batch-size: must be at least 1, got 0 (see `lmprune eval --help`)"),
])
def test_a_command_line_argparse_refuses_is_one_line(capsys, monkeypatch, argv, message):
    for variable in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and captured.out == ""
    assert captured.err.splitlines() == [f"lmprune: error: {message}"]
    monkeypatch.setenv("RANK", "1")  # torchrun's other processes: rank 0 says it
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--help"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0 and captured.out.startswith("usage: lmprune prune ") and captured.err == ""


def test_the_command_line_asks_torch_for_huge_pages_where_the_kernel_offers_them():
    """cli.py sets THP_MEM_ALLOC_ENABLE before torch's first allocation (a prune's fresh layer-sized tensors
    cost more to fault in than to fill), only where transparent huge pages exist, and never over the user's
    own setting."""
    import os
    import subprocess
    import sys

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            offered = "[never]" not in f.read()
    except OSError:
        offered = False
    probe = "import os, lmprune.cli; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    got = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == ("1" if offered else "None")
    got = subprocess.run([sys.executable, "-c", probe], env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                         capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "0"
