"""`--out` as a hostile user would give it: the inputs are never touched, one run never replaces
another's output, lmprune replaces only what it wrote, and every exit (error, Ctrl-C, SIGTERM, SIGKILL)
leaves either the old output or the complete new one, and nothing else, behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest

from conftest import REPO, prune_args, random_text, run_cli, snapshot
from lmprune.errors import LmpruneError
from lmprune.model.saving import Destination, is_lmprune_output

WANDA = ("--method", "wanda", "--sparsity", "0.5")


@pytest.fixture
def work(tmp_path, tiny_llama):
    """tmp/work/{model/, calib.txt, notes.txt}: a model, its calibration text and an unrelated file."""
    work = tmp_path / "work"
    shutil.copytree(tiny_llama, work / "model")
    (work / "calib.txt").write_text(random_text(800))
    (work / "notes.txt").write_text("unrelated, precious")
    return work


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def fake_output(path: Path, tag: str) -> Path:
    """A directory as lmprune leaves it: a few files and, last, its report."""
    path.mkdir()
    (path / "model.safetensors").write_bytes(tag.encode() * 100)
    (path / "lmprune_report.json").write_text(json.dumps({"method": tag, "settings": {}, "layers": []}))
    return path


def leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("out, message", [
    ("model", "is the model directory"),
    (".", "contains the model directory"),
    ("model/pruned", "is inside the model directory"),
    ("link-to-model", "is the model directory"),
])
def test_out_holding_the_model_is_refused_even_with_overwrite(capsys, work, out, message):
    (work / "link-to-model").symlink_to(work / "model")
    before = snapshot(work)
    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", work / out, *WANDA, "--overwrite"))
    assert code == 2 and len(err) == 1 and err[0].startswith("lmprune: error: --out") and message in err[0], err
    assert snapshot(work) == before


def test_out_holding_the_calibration_or_evaluation_file_is_refused(capsys, tiny_llama, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "calib.txt").write_text(random_text(800))
    (data / "eval.txt").write_text(random_text(800, seed=1))
    before = snapshot(tmp_path)
    for calib, extra in ((data / "calib.txt", ()), (tmp_path / "data" / ".." / "data" / "calib.txt", ()),
                         (tiny_llama / "config.json", ("--eval", data / "eval.txt"))):
        code, _, err = run_cli(capsys, *prune_args(tiny_llama, calib, data, *WANDA, "--overwrite", *extra))
        assert code == 2 and len(err) == 1 and "contains the data file" in err[0], err
    assert snapshot(tmp_path) == before


def test_overwrite_never_replaces_a_directory_lmprune_did_not_write(capsys, work):
    out = work / "results"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "lmprune_report.json").write_text("[1, 2]")  # a file of that name is not enough: it must be a report
    before = snapshot(work)
    for overwrite in ((), ("--overwrite",)):
        code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", out, *WANDA, *overwrite))
        assert code == 2 and len(err) == 1, err
        assert "is not empty and holds no lmprune_report.json" in err[0] and "not even with --overwrite" in err[0]
    assert snapshot(work) == before


def test_overwrite_replaces_an_earlier_output_and_leaves_nothing_else(capsys, work):
    out = work / "out"
    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", out, *WANDA))
    assert code == 0, err
    first = snapshot(work)

    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", out, "--method", "magnitude",
                                               "--sparsity", "0.5"))
    assert code == 2 and len(err) == 1 and "is not empty (use --overwrite to replace it)" in err[0], err
    assert snapshot(work) == first

    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", out, "--method", "magnitude",
                                               "--sparsity", "0.5", "--overwrite"))
    assert code == 0, err
    assert json.loads((out / "lmprune_report.json").read_text())["method"] == "magnitude"
    assert sorted(p.name for p in work.iterdir()) == ["calib.txt", "model", "notes.txt", "out"]
    assert {k: v for k, v in snapshot(work).items() if not k.startswith("out")} == \
        {k: v for k, v in first.items() if not k.startswith("out")}


def test_second_run_fails_at_once_while_the_first_holds_the_lock(capsys, work):
    out = work / "out"
    before = snapshot(work)
    with Destination(str(out)) as first:
        code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", out, *WANDA))
        assert code == 2 and len(err) == 1, err
        assert f"another lmprune run (pid {os.getpid()}) is writing to {str(out)!r}" in err[0]
        assert leftovers(work) == [".out.lock", f".out.tmp-{os.getpid()}"] and os.listdir(first.tmp) == []
    assert snapshot(work) == before  # the first run's lock and temporary directory went with it


def test_lock_of_another_process_then_its_stale_lock_file(capsys, work):
    """A second process holds the lock: refused, naming it. Once that process is killed its lock file
    stays behind, but a lock dies with its process: the next run proceeds and removes the file."""
    out, lock = work / "out", work / ".out.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, b'%d\\n' % os.getpid())\n"
         "print('locked', flush=True)\nsys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(work)
        code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", out, *WANDA))
        assert code == 2 and len(err) == 1 and f"another lmprune run (pid {holder.pid}) is writing to" in err[0], err
        assert snapshot(work) == before
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()
    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", out, *WANDA))
    assert code == 0, err
    assert leftovers(work) == [] and (out / "lmprune_report.json").exists()


def test_destination_is_checked_before_the_model_loads(capsys, work, monkeypatch):
    import lmprune.model
    import lmprune.model.saving as saving

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the destination was checked")

    monkeypatch.setattr(lmprune.model, "load_model", no_loading)
    args = prune_args(work / "model", work / "calib.txt", work / "new" / "out", *WANDA)
    before = snapshot(work)

    # Not enough room for a checkpoint the size of the model's files.
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(saving.shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 1000, 1000))
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1 and "not enough free space for the checkpoint beside --out" in err[0], err
    assert "1000 bytes free" in err[0]
    assert snapshot(work) == before
    monkeypatch.undo()
    monkeypatch.setattr(lmprune.model, "load_model", no_loading)

    # A parent that refuses new entries (as a read-only one does; root ignores chmod, so it is simulated).
    real_mkdir = os.mkdir

    def read_only_mkdir(path, *rest, **kwargs):
        if ".out.tmp-" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *rest, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1, err
    assert f"cannot write beside --out {str(work / 'new' / 'out')!r}: permission denied" in err[0]
    assert snapshot(work) == before  # the parent it had to make is gone too


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_fails_before_any_work(capsys, work):
    parent = work / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        before = snapshot(work)
        code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", parent / "out", *WANDA))
        assert code == 2 and len(err) == 1 and "permission denied" in err[0], err
        assert snapshot(work) == before
    finally:
        parent.chmod(0o755)


def test_stale_temporary_directories_of_dead_runs_are_removed(capsys, work):
    dead, alive = dead_pid(), os.getppid()
    partial = work / f".out.tmp-{dead}"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a checkpoint")
    (work / f".out.old-{dead}").mkdir()  # an old output whose removal was cut short (its report went first)
    (work / f".out.tmp-{alive}").mkdir()  # a live process's: not ours to judge
    (work / f".other.tmp-{dead}").mkdir()  # beside another --out
    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", work / "out", *WANDA))
    assert code == 0, err
    assert leftovers(work) == [f".out.tmp-{alive}"] and (work / f".other.tmp-{dead}").exists()


def test_output_of_an_overwrite_killed_between_its_renames_is_restored(capsys, work):
    dead = dead_pid()
    old = fake_output(work / f".out.old-{dead}", "old")
    fake_output(work / f".out.tmp-{dead}", "new")
    expected = {k.replace(old.name, "out"): v for k, v in snapshot(work).items() if k.startswith(old.name)}
    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", work / "out", *WANDA))
    assert code == 2 and len(err) == 2, err
    assert f"restored {work / 'out'} from .out.old-{dead}, left by an interrupted --overwrite" in err[0]
    assert "is not empty (use --overwrite to replace it)" in err[1]
    assert {k: v for k, v in snapshot(work).items() if k.startswith("out")} == expected
    assert leftovers(work) == []


def test_interrupt_during_the_swap_puts_the_old_output_back(capsys, work, monkeypatch):
    out = fake_output(work / "out", "old")
    before = snapshot(work)
    real_rename = os.rename

    def interrupted(src, dst):
        if ".out.tmp-" in str(src):  # the second rename: the old output is already aside
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", interrupted)
    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", out, *WANDA, "--overwrite"))
    assert code == 130 and err[-1] == "lmprune: interrupted"
    assert snapshot(work) == before


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_run_leaves_nothing(capsys, work, monkeypatch, how):
    import lmprune.pipeline

    def interrupted(*args, **kwargs):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(lmprune.pipeline, "prune_model", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    before = snapshot(work)
    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", work / "out", *WANDA))
    assert code == 130 and err[-1] == "lmprune: interrupted"
    assert snapshot(work) == before
    assert signal.getsignal(signal.SIGTERM) == handler


@pytest.mark.slow  # a second Python process, which imports torch
def test_sigkill_between_the_renames_keeps_the_old_output(capsys, work):
    """A real SIGKILL at the worst moment of an --overwrite: the next run finds the old output whole."""
    out = fake_output(work / "out", "old")
    old = snapshot(out)
    script = (
        "import os, signal, sys\n"
        "from lmprune.model.saving import Destination\n"
        "class Files:\n"
        "    def save_pretrained(self, path):\n"
        "        open(os.path.join(path, 'model.safetensors'), 'w').write('new')\n"
        "real = os.rename\n"
        "def rename(src, dst):\n"
        "    if '.out.tmp-' in str(src):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(src, dst)\n"
        "os.rename = rename\n"
        "with Destination(sys.argv[1], overwrite=True) as destination:\n"
        "    destination.save(Files(), Files(), {'settings': {}, 'layers': []})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    killed = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists() and [n for n in leftovers(work) if ".old-" in n]  # the state such a kill leaves

    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", out, *WANDA))
    assert code == 2 and "restored" in err[0] and "is not empty (use --overwrite" in err[-1], err
    assert snapshot(out) == old and leftovers(work) == []


def test_is_lmprune_output(tmp_path):
    assert not is_lmprune_output(str(tmp_path))
    (tmp_path / "lmprune_report.json").write_text("{not json")
    assert not is_lmprune_output(str(tmp_path))
    (tmp_path / "lmprune_report.json").write_text(json.dumps({"settings": {}, "layers": []}))
    assert is_lmprune_output(str(tmp_path))


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(LmpruneError, match="exists and is not a directory"):
        Destination(str(tmp_path / "out")).__enter__()
    assert leftovers(tmp_path) == []
