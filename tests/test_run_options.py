"""The prune command's options object (built once, the command line left as typed), the run module's window
length, and the one logger with its rank-0 filter."""

import logging

import pytest

from conftest import random_text
from lmprune import log
from lmprune.cli import build_parser, prune_options
from lmprune.errors import LmpruneError
from lmprune.run import checked_seqlen, load


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(random_text(800))
    return path


def parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


def test_options_apply_best_quality_and_leave_the_command_line_as_typed(tiny_llama, calib, tmp_path):
    args = parse("prune", tiny_llama, "--method", "sparsegpt", "--sparsity", "0.5", "--calib", calib,
                 "--out", tmp_path / "out", "--best-quality", "--no-progress")
    typed = dict(vars(args))
    options = prune_options(args)
    assert vars(args) == typed  # nothing written back into the parsed flags
    assert (options.config.sequential, options.config.dense_targets, options.config.block_targets) == \
           ("layer", True, True)
    assert (args.sequential, args.dense_targets, args.block_targets) == ("none", False, False)
    assert options.stream is False and options.progress is False and options.model_dir == str(tiny_llama)
    assert options.config.seqlen is None  # the default: known once the model is loaded
    assert options.pattern.per_row is False and options.config.calib == str(calib)  # sparsegpt: per layer


def test_calib_default_is_self_generation_decided_once(tiny_llama, tmp_path):
    args = parse("prune", tiny_llama, "--method", "wanda", "--sparsity", "0.5", "--out", tmp_path / "out")
    options = prune_options(args)
    assert args.calib is None and options.config.calib == "self" and options.self_calibration
    assert options.pattern.per_row is True  # wanda's default granularity, resolved into the options


def test_window_length_is_resolved_once_into_new_options(tiny_llama, calib, tmp_path):
    options = prune_options(parse("prune", tiny_llama, "--method", "wanda", "--sparsity", "0.5", "--calib", calib,
                                  "--out", tmp_path / "out"))
    model, _, shards = load(str(tiny_llama), "auto", stream=False, progress=False)
    assert shards is None
    assert checked_seqlen(None, model, "--seqlen") == 128  # 2048 capped at max_position_embeddings
    assert checked_seqlen(64, model, "--seqlen") == 64
    with pytest.raises(LmpruneError, match=r"^--eval-seqlen 129 exceeds the model's context length 128$"):
        checked_seqlen(129, model, "--eval-seqlen")
    resolved = options.with_seqlen(128)
    assert resolved.config.seqlen == 128 and options.config.seqlen is None  # a new object: no state bag


@pytest.mark.parametrize("extra, message", [
    (["--fresh"], "--fresh discards a streamed run's partial output: it needs --stream"),
    (["--gen-batch-size", "0"], "--gen-batch-size must be at least 1, got 0"),
    (["--allocation", "owl", "--pattern", "2:4"], "--allocation owl needs an unstructured --sparsity: 2:4 fixes"),
])
def test_each_rule_is_checked_by_the_options(tiny_llama, calib, tmp_path, extra, message):
    target = [] if "--pattern" in extra else ["--sparsity", "0.5"]
    args = parse("prune", tiny_llama, "--method", "wanda", *target, "--calib", calib, "--out", tmp_path / "out",
                 *extra)
    with pytest.raises(LmpruneError) as error:
        prune_options(args)
    assert str(error.value).startswith(message)
    assert not (tmp_path / "out").exists()


def test_logger_prints_to_the_current_stderr_and_rank_0_alone_reports_progress(capsys):
    try:
        log.configure(rank0=True)
        log.logger.info("plan: one")
        log.logger.warning("restored two")
        assert capsys.readouterr().err == "lmprune: plan: one\nlmprune: restored two\n"
        log.configure(rank0=False)  # another rank: progress and warnings are rank 0's, errors anyone's
        log.logger.info("plan: one")
        log.logger.warning("restored two")
        log.logger.error("error: three")
        assert capsys.readouterr().err == "lmprune: error: three\n"
        log.configure(rank0=True)
        log.configure(rank0=True)  # configured again: still one handler, each line once
        logging.getLogger("lmprune").info("four")  # the name library modules log to
        assert capsys.readouterr().err == "lmprune: four\n"
    finally:
        log.configure(rank0=True)
