"""Every path lmprune writes, as a careless or hostile user gives it (issue 34: items 3, 4, 5 and two of 8).

Each refusal is one line, exit code 2, before any work (the model never loads), and leaves every input
and everything beside it byte for byte as it was (`snapshot`). What lmprune writes gets open()'s mode.
"""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import prune_args, random_text, run_cli, snapshot
from lmprune.errors import LmpruneError
from lmprune.paths import Input, atomic_path, check_output_dir, check_output_file, normal_mode, normalize_modes

PIQA = {"goal": "The dog is hungry.", "sol1": "It gets some food.", "sol2": "It reads a book.", "label": 0}
REPORT = {"method": "wanda", "pattern": "50%", "settings": {"model": "m"},
          "summary": {"layers": 2, "sparsity": 0.5, "mean_error": 0.1, "mean_error_masked": 0.2},
          "layers": [{"name": f"layer{i}", "shape": [4, 4], "sparsity": 0.5, "error": 0.1 * (i + 1),
                      "error_masked": 0.2} for i in range(2)]}


@pytest.fixture
def work(tmp_path, tiny_llama):
    """tmp/work/: model/, calib.txt, eval.txt, td/piqa/validation.jsonl (task data), ckpt/ (an lmprune
    output with its report), notes.txt (the user's), empty/ (a directory)."""
    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "model")
    (work / "calib.txt").write_text(random_text(800))
    (work / "eval.txt").write_text(random_text(800, seed=1))
    (work / "td" / "piqa").mkdir(parents=True)
    (work / "td" / "piqa" / "validation.jsonl").write_text(json.dumps(PIQA) + "\n")
    (work / "ckpt").mkdir()
    (work / "ckpt" / "lmprune_report.json").write_text(json.dumps(REPORT))
    (work / "notes.txt").write_text("unrelated, precious")
    (work / "empty").mkdir()
    return work


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: output paths are checked before it."""
    import lmprune.model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(lmprune.model, "load_model", refuse)


@pytest.fixture
def umask():
    """Set the umask for one test (the writes must follow it), restoring it afterwards."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


def refused(capsys, work, *args) -> str:
    """Run `lmprune ARGS` expecting one error line, exit code 2 and nothing changed under `work`."""
    before = snapshot(work)
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("lmprune: error: "), (code, err)
    assert snapshot(work) == before
    return err[0]


def modes(root: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


# -- eval --json (items 3 and 5) --------------------------------------------------------------------------
def eval_json(work, json_path, *extra) -> list:
    return ["eval", work / "model", "--data", work / "eval.txt", "--tasks", "piqa", "--task-data", work / "td",
            "--limit", 1, "--json", json_path, "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize("target, overwrite, message", [
    ("model/config.json", "", "is inside the model directory"),
    ("model/config.json", "--overwrite", "is inside the model directory"),
    ("model/model.safetensors", "--overwrite", "is inside the model directory"),
    ("model/new.json", "", "is inside the model directory"),
    ("eval.txt", "--overwrite", "is the data file"),
    ("td/piqa/validation.jsonl", "--overwrite", "is inside the task data directory"),
    ("td", "--overwrite", "is the task data directory"),
    ("link-to-config", "--overwrite", "is inside the model directory"),
    ("link-to-model/x.json", "", "is inside the model directory"),
    ("calib.txt", "", "exists (add --overwrite to replace it)"),
    ("notes.txt", "", "exists (add --overwrite to replace it)"),
    ("ckpt/lmprune_report.json", "--overwrite", "is a file of the lmprune checkpoint"),
    ("missing/results.json", "", "does not exist (create it first)"),
    ("empty", "", "is a directory: give a file name"),
    ("notes.txt/results.json", "", "which is a file, not a directory"),
    ("", "", "--json is empty"),
    ("/dev/null", "--overwrite", "exists and is not a regular file"),
])
def test_eval_json_refused_before_the_model_loads(capsys, work, no_loading, target, overwrite, message):
    (work / "link-to-config").symlink_to(work / "model" / "config.json")
    (work / "link-to-model").symlink_to(work / "model")
    path = target if target in ("", "/dev/null") else work / target
    error = refused(capsys, work, *eval_json(work, path, *[overwrite] * bool(overwrite)))
    assert message in error and (not target or error.startswith(f"lmprune: error: --json {str(path)!r}")), error


def test_eval_overwrite_needs_json(capsys, work, no_loading):
    error = refused(capsys, work, "eval", work / "model", "--data", work / "eval.txt", "--overwrite")
    assert error == "lmprune: error: --overwrite replaces an existing --json FILE: it needs --json"


def test_eval_json_with_overwrite_replaces_a_file_the_user_names(capsys, work, umask):
    pytest.importorskip("lm_eval")
    umask(0o027)
    inputs = {k: v for k, v in snapshot(work).items() if not k.startswith("notes.txt")}
    code, _, err = run_cli(capsys, *eval_json(work, work / "notes.txt", "--overwrite"))
    assert code == 0, err
    assert set(json.loads((work / "notes.txt").read_text())) == {"piqa"}
    assert stat.S_IMODE((work / "notes.txt").stat().st_mode) == 0o640
    assert {k: v for k, v in snapshot(work).items() if not k.startswith("notes.txt")} == inputs  # no *.tmp-PID


# -- report --plot (item 5) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target, overwrite, message", [
    ("missing/errors.png", "", "does not exist (create it first)"),
    ("empty", "", "is a directory: give a file name"),
    ("notes.txt/errors.png", "", "which is a file, not a directory"),
    ("errors.txt", "", "has extension .txt: name a format matplotlib writes (avif, eps"),
    ("errors", "", "has no extension: name a format matplotlib writes"),
    ("notes.txt", "", "exists (add --overwrite to replace it)"),
    ("ckpt/lmprune_report.json", "--overwrite", "is inside the checkpoint directory"),
    ("ckpt/errors.png", "", "is inside the checkpoint directory"),
    ("report.json", "--overwrite", "is the report"),
    ("", "", "--plot is empty"),
])
def test_report_plot_refused_before_any_work(capsys, work, target, overwrite, message):
    pytest.importorskip("matplotlib")
    shutil.copy(work / "ckpt" / "lmprune_report.json", work / "report.json")
    path = work / target if target else ""
    error = refused(capsys, work, "report", work / "ckpt", work / "report.json", "--plot", path,
                    *[overwrite] * bool(overwrite))
    assert message in error, error


def test_report_plot_that_fails_mid_write_leaves_the_old_file_and_no_temporary(capsys, work, monkeypatch):
    pytest.importorskip("matplotlib")  # the command checks for it before it plots
    import errno

    import lmprune.cli

    def disk_full(reports, path, image_format):
        Path(path).write_bytes(b"half a plot")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lmprune.cli, "plot_layer_errors", disk_full)
    (work / "errors.png").write_bytes(b"the old plot")
    error = refused(capsys, work, "report", work / "ckpt", "--plot", work / "errors.png", "--overwrite")
    assert error == f"lmprune: error: cannot write --plot {str(work / 'errors.png')!r}: no space left on device"


def test_report_overwrite_needs_plot(capsys, work):
    error = refused(capsys, work, "report", work / "ckpt", "--overwrite")
    assert error == "lmprune: error: --overwrite replaces an existing --plot FILE: it needs --plot"


def test_report_plot_is_written_atomically_with_the_normal_mode(capsys, work, umask):
    pytest.importorskip("matplotlib")
    umask(0o002)
    before = snapshot(work)
    for extra in ((), ("--overwrite",)):  # a second time: the file exists, --overwrite replaces it
        code, out, err = run_cli(capsys, "report", work / "ckpt", "--plot", work / "errors.svg", *extra)
        assert code == 0 and out.endswith(f"plot written to {work / 'errors.svg'}\n"), err
        assert b"<svg" in (work / "errors.svg").read_bytes()  # the format of its extension
        assert stat.S_IMODE((work / "errors.svg").stat().st_mode) == 0o664
        assert {k: v for k, v in snapshot(work).items() if k != "errors.svg"} == before


# -- prune --out (item 4, item 8's --out '') ------------------------------------------------------------------
@pytest.mark.parametrize("inside, flag, message", [
    ("td", "--task-data", "contains the task data directory"),
    ("calib.txt", "--calib", "contains the data file"),
    ("eval.txt", "--eval", "contains the data file"),
])
def test_overwrite_never_deletes_an_input_inside_the_old_output(capsys, work, no_loading, inside, flag, message):
    out = work / "out"
    out.mkdir()
    (out / "lmprune_report.json").write_text(json.dumps(REPORT))  # an earlier output: --overwrite replaces it
    shutil.move(work / inside, out / inside)
    extra = {"--task-data": ("--eval-tasks", "piqa", "--task-data", out / "td"),
             "--eval": ("--eval", out / "eval.txt")}.get(flag, ())
    calib = out / "calib.txt" if flag == "--calib" else work / "notes.txt"
    error = refused(capsys, work, *prune_args(work / "model", calib, out, "--method", "magnitude",
                                              "--sparsity", 0.5, "--overwrite", *extra))
    assert error.startswith(f"lmprune: error: --out {str(out)!r} {message}"), error


def test_task_data_through_a_symlink_inside_the_old_output(capsys, work, no_loading):
    out = work / "out"
    out.mkdir()
    (out / "lmprune_report.json").write_text(json.dumps(REPORT))
    shutil.move(work / "td", out / "td")
    (work / "td-link").symlink_to(out / "td")
    error = refused(capsys, work, *prune_args(work / "model", work / "calib.txt", out, "--method", "magnitude",
                                              "--sparsity", 0.5, "--overwrite", "--eval-tasks", "piqa",
                                              "--task-data", work / "td-link"))
    assert "contains the task data directory" in error, error


@pytest.mark.parametrize("out, message", [
    ("td/out", "is inside the task data directory"),
    ("calib.txt/out", "is inside the data file"),
    ("notes.txt/out", "which is a file, not a directory"),
    ("notes.txt", "exists and is not a directory"),
])
def test_out_inside_an_input_or_under_a_file(capsys, work, no_loading, out, message):
    error = refused(capsys, work, *prune_args(work / "model", work / "calib.txt", work / out, "--method",
                                              "magnitude", "--sparsity", 0.5, "--eval-tasks", "piqa",
                                              "--task-data", work / "td"))
    assert message in error, error


@pytest.mark.parametrize("sibling", [".out.lock", ".out.partial", f".out.tmp-{2 ** 22 + 1}", ".out.old-7"])
def test_out_whose_hidden_siblings_are_inputs(capsys, work, no_loading, sibling):
    """The lock is truncated and unlinked, a dead run's temporary directory removed: never an input's."""
    shutil.move(work / "td", work / sibling)
    error = refused(capsys, work, *prune_args(work / "model", work / "calib.txt", work / "out", "--method",
                                              "magnitude", "--sparsity", 0.5, "--eval-tasks", "piqa",
                                              "--task-data", work / sibling))
    assert f"would use {str(work / sibling)!r}, the task data directory, as its temporary or lock file" in error


def test_empty_out_is_refused_not_taken_as_the_current_directory(capsys, work, no_loading, monkeypatch):
    monkeypatch.chdir(work)
    error = refused(capsys, work, *prune_args(work / "model", work / "calib.txt", "", "--method", "magnitude",
                                              "--sparsity", 0.5, "--overwrite"))
    assert error == "lmprune: error: --out is empty: give a path (use . for the current directory)"


# -- modes (item 8) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream, mask", [("--no-stream", 0o022), ("--stream", 0o027)])
def test_every_file_of_a_checkpoint_gets_the_same_normal_mode(capsys, work, umask, stream, mask):
    umask(mask)
    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", work / "out", "--method",
                                               "wanda", "--sparsity", 0.5, stream))
    assert code == 0, err
    assert modes(work / "out") == {0o666 & ~mask} and stat.S_IMODE((work / "out").stat().st_mode) == 0o777 & ~mask
    assert any(p.suffix == ".safetensors" for p in (work / "out").iterdir())


# -- the module's API (for pack/unpack and any later output) ---------------------------------------------------
def test_atomic_path_leaves_the_old_file_and_no_temporary_on_failure(tmp_path, umask):
    umask(0o077)
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with atomic_path(str(target)) as tmp:
        Path(tmp).write_text("new")
    assert target.read_text() == "new" and stat.S_IMODE(target.stat().st_mode) == normal_mode() == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_normalize_modes_gives_what_mkdir_and_open_give(tmp_path, umask):
    """As the alias cache's conversion leaves it: a mkdtemp directory (0700) holding a 0600 file."""
    import tempfile

    umask(0o022)
    converted = Path(tempfile.mkdtemp(dir=tmp_path))
    (converted / "sub").mkdir(mode=0o700)
    (converted / "sub" / "model.safetensors").write_bytes(b"w")
    (converted / "sub" / "model.safetensors").chmod(0o600)
    (converted / "outside").symlink_to(tmp_path)
    tmp_path.chmod(0o750)
    normalize_modes(str(converted))
    assert [stat.S_IMODE(p.stat().st_mode) for p in (converted, converted / "sub", converted / "sub" /
                                                      "model.safetensors")] == [0o755, 0o755, 0o644]
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o750  # a link's target is left alone


def test_atomic_path_writes_through_a_symlink(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    with atomic_path(str(tmp_path / "link.json")) as tmp:
        Path(tmp).write_text("new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"


def test_check_output_api(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_bytes(b"w")
    inputs = [Input(str(tmp_path / "model"), "the model directory")]
    check_output_dir(str(tmp_path / "packed"), inputs)  # a new directory beside the input: fine
    check_output_file(str(tmp_path / "packed.json"), inputs, overwrite=False, flag="--out")
    with pytest.raises(LmpruneError, match=r"^--out '.*/model/weights.bin' is inside the model directory"):
        check_output_file(str(tmp_path / "model" / "weights.bin"), inputs, overwrite=True, flag="--out")
    with pytest.raises(LmpruneError, match="contains the model directory"):
        check_output_dir(str(tmp_path), inputs)
    # A blob elsewhere that the model directory links to (a hub snapshot) is the model's too.
    (tmp_path / "blobs").mkdir()
    (tmp_path / "blobs" / "abc").write_bytes(b"w")
    (tmp_path / "model" / "model.safetensors").symlink_to(tmp_path / "blobs" / "abc")
    with pytest.raises(LmpruneError, match=r"contains '.*/blobs/abc', a file of the model directory"):
        check_output_dir(str(tmp_path / "blobs"), inputs)
    with pytest.raises(LmpruneError, match=r"is '.*/blobs/abc', a file of the model directory"):
        check_output_file(str(tmp_path / "blobs" / "abc"), inputs, overwrite=True, flag="--json")
