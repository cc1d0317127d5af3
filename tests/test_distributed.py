"""Several processes (torch.distributed, gloo on the CPU) prune exactly as one does, and fail together.

Two processes sum each Gram matrix in a different order than one process (each rank sums its own
batches, then the ranks' sums are added), so float32 results may differ in the last bits. A mask entry
can then flip only where two weights' scores tie to within that rounding: we count flips and allow at
most FLIP_FRACTION of the weights; kept weights agree to WEIGHT_ATOL. On these models no flip happens
for the layer-wise methods (the tests would still pass with a few). SparseLLM's alternating least
squares amplifies the rounding (it refits weights to targets through several epochs), so its weights
are compared by relative norm instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, byte_tokenizer, one_thread, random_text, snapshot
from lmprune.cli import main
from lmprune.distributed import Ranks, solve_cost
from lmprune.errors import LmpruneError

pytestmark = pytest.mark.slow

FLIP_FRACTION = 1e-3
WEIGHT_ATOL = 1e-4
TIMEOUT = 120  # seconds a launched run may take before the test calls it a hang


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(env, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), LMPRUNE_DIST_TIMEOUT="60", **extra)


def _rank_main(rank: int, world: int, port: str, argv: list[str], stderr: str, fail: str | None) -> None:
    """One rank, in a forked child: torchrun's variables, its own stderr file, then `lmprune ARGV`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LMPRUNE_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    if fail is not None:
        inject_failure(fail)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's exit: its code, as the interpreter would make it
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # an uncaught error: print it as Python would, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


def inject_failure(how: str) -> None:
    """Make this process fail in its second solve (or its N-th: "kill@N"): raise, or be killed outright."""
    import signal

    import lmprune.pipeline as pipeline

    how, _, at = how.partition("@")
    solve, calls = pipeline.prune_group, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(at or 2):
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure")
        return solve(*args, **kwargs)

    pipeline.prune_group = failing


def launch(args: list, tmp_path: Path, world: int = 2, fail: dict[int, str] | None = None) -> list[tuple[int, str]]:
    """`lmprune ARGS` as `world` processes with the variables torchrun sets (forked: no second import of torch,
    spawned where CUDA is already initialised); (exit code, stderr) of each. A run that does not end
    within TIMEOUT is a hang."""
    import multiprocessing

    context = multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    port = str(_free_port())
    logs = [tmp_path.parent / f"{tmp_path.name}-rank{r}.err" for r in range(world)]
    procs = [context.Process(target=_rank_main, args=(r, world, port, [str(a) for a in args], str(logs[r]),
                                                      (fail or {}).get(r)))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(TIMEOUT)
        assert all(p.exitcode is not None for p in procs), "a rank did not finish: hang"
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join()
    out = [(p.exitcode, log.read_text()) for p, log in zip(procs, logs)]
    for log in logs:
        log.unlink()
    return out


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lmprune: error:")]


def compare(one: Path, two: Path) -> tuple[int, int, float]:
    """(mask flips, weights compared, largest |difference| of weights kept by both) over all ≥2-D tensors."""
    a, b = load_all(one), load_all(two)
    assert a.keys() == b.keys()
    flips = total = 0
    worst = 0.0
    for name in a:
        if a[name].dim() < 2:
            assert torch.equal(a[name], b[name]), name
            continue
        kept_a, kept_b = a[name] != 0, b[name] != 0
        flips += int((kept_a != kept_b).sum())
        total += kept_a.numel()
        both = kept_a & kept_b
        if both.any():
            worst = max(worst, float((a[name].float() - b[name].float())[both].abs().max()))
    return flips, total, worst


def load_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whether in one file or sharded (a streamed run writes a shard per block)."""
    return {k: v for shard in sorted(path.glob("*.safetensors")) for k, v in load_file(shard).items()}


def report(path: Path) -> dict:
    import json

    return json.loads((path / "lmprune_report.json").read_text())


def prune_command(model, calib, out, *extra) -> list:
    return ["prune", model, "--calib", calib, "--out", out, "--no-progress", *extra]


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    from zoo import tiny_model

    path = tmp_path_factory.mktemp("tiny_moe")
    tiny_model("qwen3_moe").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(random_text(3000))
    return path


def check_same(one: Path, two: Path) -> tuple[int, int, float]:
    """Two runs agree within the rounding tolerances; returns compare()'s (flips, weights, worst)."""
    flips, total, worst = compare(one, two)
    assert flips <= FLIP_FRACTION * total, (flips, total)
    assert worst <= WEIGHT_ATOL, worst
    r1, r2 = report(one), report(two)
    assert r2["processes"] == 2 and "processes" not in r1
    assert [(l["name"], l["tokens"], l["sparsity"], l.get("fallback")) for l in r1["layers"]] == \
           [(l["name"], l["tokens"], l["sparsity"], l.get("fallback")) for l in r2["layers"]]
    assert r1["routers"] == r2["routers"] and r1["unpruned"] == r2["unpruned"]
    return flips, total, worst


def test_torchrun_two_processes_match_one_on_stories260k(stories_path, tinystories_path, tmp_path):
    # 5 windows in batches of 2: rank 0 holds batches 0 and 2 (one of them a single window), rank 1 batch 1.
    common = ["--nsamples", 5, "--batch-size", 2, "--seqlen", 64, "--method", "sparsegpt", "--pattern", "2:4"]
    assert main([str(a) for a in prune_command(stories_path, tinystories_path, tmp_path / "one", *common)]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(_free_port()), "-m", "lmprune", *map(str, prune_command(stories_path, tinystories_path,
                                                                           tmp_path / "two", *common))]
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    # One process speaks for the run: one plan line, one saved line.
    assert sum(line.startswith("lmprune: plan:") for line in run.stderr.splitlines()) == 1, run.stderr
    assert sum(line.startswith("lmprune: saved to") for line in run.stderr.splitlines()) == 1, run.stderr
    check_same(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no lock, temp or stray directory


@pytest.mark.parametrize("method", [["dsnot", "--sparsity", "0.5"], ["sparsegpt", "--pattern", "2:4"]])
def test_two_processes_match_one_on_moe(tiny_moe, tmp_path, method):
    # DSnoT needs Σx per layer; SparseGPT solves each rank's share of a fused tensor's experts in batches;
    # routed experts need per-expert token counts (some fall back to magnitude).
    # Self-generated calibration: every rank must prune on the very same windows.
    common = ["--nsamples", 4, "--seqlen", 32, "--method", *method]
    assert main([str(a) for a in prune_command(tiny_moe, "self", tmp_path / "one", *common)]) == 0
    results = launch(prune_command(tiny_moe, "self", tmp_path / "two", *common), tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    check_same(tmp_path / "one", tmp_path / "two")
    layers = report(tmp_path / "one")["layers"]
    assert any("fallback" in l for l in layers) and any("fallback" not in l and "[" in l["name"] for l in layers)


def test_sparsellm_two_processes(tiny_llama, calib_text, tmp_path):
    # Rank 0 gathers each block's inputs, refines, and sends the block: the same tokens as one process.
    common = ["--nsamples", 3, "--seqlen", 32, "--method", "sparsellm", "--sparsity", "0.5"]
    assert main([str(a) for a in prune_command(tiny_llama, calib_text, tmp_path / "one", *common)]) == 0
    results = launch(prune_command(tiny_llama, calib_text, tmp_path / "two", *common), tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    # Its epochs amplify the Grams' rounding (and keep_best may then pick another epoch, equally good):
    # the inputs it saw are compared, and its results by their output error.
    mlps1 = [m for b in report(tmp_path / "one")["blocks"] for m in b["mlps"]]
    mlps2 = [m for b in report(tmp_path / "two")["blocks"] for m in b["mlps"]]
    assert len(mlps1) == len(mlps2) == 2 and [m["tokens"] for m in mlps1] == [m["tokens"] for m in mlps2] == [96, 96]
    assert mlps2[0]["errors"]["layerwise"] == pytest.approx(mlps1[0]["errors"]["layerwise"], rel=1e-5)
    for m1, m2 in zip(mlps1, mlps2):
        assert m2["error"] == pytest.approx(m1["error"], rel=0.1) and m2["error"] < m2["error_layerwise"]
    assert [l["sparsity"] for l in report(tmp_path / "one")["layers"]] == \
           [l["sparsity"] for l in report(tmp_path / "two")["layers"]]


@pytest.mark.parametrize("levers", [["--allocation", "owl"], ["--allocation", "depth"], ["--sequential", "layer"]])
def test_allocation_and_sequential_two_processes(tiny_llama, calib_text, tmp_path, levers):
    # OWL's outlier ratios come from every process's windows (their Σx² all-reduced); --sequential layer
    # shares each stage's solved weights before the next stage's Grams are read. (depth + sequential also
    # runs, but on this 128-token toy a float32 near-tie in block 0's o_proj flips 2 mask entries and the
    # later stages, fitted to it, amplify that past this test's tolerances: measured, not a logic error.)
    common = ["--nsamples", 4, "--seqlen", 32, "--method", "sparsegpt", "--sparsity", "0.6", *levers]
    assert main([str(a) for a in prune_command(tiny_llama, calib_text, tmp_path / "one", *common)]) == 0
    results = launch(prune_command(tiny_llama, calib_text, tmp_path / "two", *common), tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    check_same(tmp_path / "one", tmp_path / "two")
    if levers[0] == "--allocation":
        one, two = report(tmp_path / "one")["allocation"], report(tmp_path / "two")["allocation"]
        assert two["block_sparsities"] == pytest.approx(one["block_sparsities"], abs=1e-6)


@pytest.mark.parametrize("levers", [["--stream"], ["--dense-targets", "--sequential", "layer", "--block-targets"],
                                    ["--stream", "--dense-targets", "--sequential", "layer"]])
def test_streaming_and_dense_targets_two_processes(stories_path, tinystories_path, tmp_path, levers):
    # --stream: every rank reads each block from the checkpoint, rank 0 alone writes; compared with one
    # in-memory process. --dense-targets: the cross products X_pᵀX_d (and the block targets' X_pᵀ(R_d − R_p))
    # are all-reduced like the Grams.
    # Dense targets + sequential + block targets amplify float32 summation order into mask flips at a near
    # tie, even in one process (stories260K, one thread: --batch-size 4 flips 5% of the entries against
    # --batch-size 1 at the same mean error). So both runs take the very same sums: two batches of 4
    # windows, one per rank, added once (B0 + B1 either way), on one thread as the ranks: the same bits.
    common = ["--nsamples", 8, "--batch-size", 4, "--seqlen", 64, "--method", "sparsegpt", "--sparsity", "0.6"]
    dense = [lever for lever in levers if lever != "--stream"]
    with one_thread():
        assert main([str(a) for a in prune_command(stories_path, tinystories_path, tmp_path / "one", *common,
                                                   *dense)]) == 0
    results = launch(prune_command(stories_path, tinystories_path, tmp_path / "two", *common, *levers), tmp_path)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert check_same(tmp_path / "one", tmp_path / "two") == (0, 259328, 0.0)
    assert report(tmp_path / "two")["settings"].get("stream", False) == ("--stream" in levers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no partial output, lock or temp left


def test_a_killed_rank_keeps_a_streamed_runs_finished_blocks_and_two_processes_resume(tiny_llama, calib_text,
                                                                                       tmp_path):
    # Rank 1 solves 6 of each block's 7 layers: its 7th solve is in block 1, after block 0 is durable.
    command = prune_command(tiny_llama, calib_text, tmp_path / "out", "--nsamples", 4, "--seqlen", 32,
                            "--method", "sparsegpt", "--sparsity", "0.5", "--stream")
    (code0, err0), (code1, _) = launch(command, tmp_path, fail={1: "kill@7"})
    assert (code0, code1) == (2, -9), err0[-3000:]
    lines = errors(err0)
    assert len(lines) == 1 and "lost contact with the other ranks" in lines[0], err0[-3000:]
    assert "1 finished block(s) are kept in" in lines[0] and "run the same command again to continue" in lines[0]
    assert not (tmp_path / "out").exists()
    assert len(json.loads((tmp_path / ".out.partial" / "lmprune_state.json").read_text())["blocks"]) == 1

    results = launch(command, tmp_path)  # the same command continues: rank 0 sends block 0 to rank 1
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "pruning from block 1" in results[0][1]
    assert report(tmp_path / "out")["resumed"] == {"from_block": 1}
    # Against an uninterrupted two-process run: the same sums in the same order, so the very same bits.
    whole = launch(prune_command(tiny_llama, calib_text, tmp_path / "whole", *command[7:]), tmp_path)
    assert [code for code, _ in whole] == [0, 0], whole[0][1][-3000:]
    flips, total, worst = compare(tmp_path / "whole", tmp_path / "out")
    assert (flips, worst) == (0, 0.0) and total == 123520
    assert [l["error"] for l in report(tmp_path / "out")["layers"]] == \
           [l["error"] for l in report(tmp_path / "whole")["layers"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "whole"]


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_the_run_with_one_error_and_no_output(tiny_llama, calib_text, tmp_path, how):
    # Rank 1 fails in its second solve of block 0, while rank 0 solves its own share.
    before = snapshot(tmp_path)
    command = prune_command(tiny_llama, calib_text, tmp_path / "out", "--nsamples", 4, "--seqlen", 32,
                            "--method", "sparsegpt", "--sparsity", "0.5")
    (code0, err0), (code1, err1) = launch(command, tmp_path, fail={1: how})
    assert code0 == 2, err0[-3000:]
    lines = errors(err0)
    assert len(lines) == 1, err0[-3000:]
    if how == "raise":
        assert lines[0] == "lmprune: error: rank 1 of 2 failed: RuntimeError: injected failure"
        assert code1 == 1 and "RuntimeError: injected failure" in err1
    else:
        assert lines[0].startswith("lmprune: error: rank 0 lost contact with the other ranks while "), lines
        assert code1 == -9
    assert snapshot(tmp_path) == before  # no output, no temporary directory, no lock


def test_rank_0_refusing_the_output_stops_every_rank(tiny_llama, calib_text, tmp_path):
    (tmp_path / "out").write_text("not a directory")
    before = snapshot(tmp_path)
    command = prune_command(tiny_llama, calib_text, tmp_path / "out", "--nsamples", 2, "--seqlen", 32,
                            "--method", "wanda", "--sparsity", "0.5")
    (code0, err0), (code1, err1) = launch(command, tmp_path)
    assert (code0, code1) == (2, 2)
    assert len(errors(err0)) == 1 and "exists and is not a directory" in errors(err0)[0], err0
    assert errors(err1) == []  # rank 0 speaks for the run
    assert snapshot(tmp_path) == before


def test_every_process_needs_a_batch():
    with pytest.raises(LmpruneError, match="2 calibration batch"):
        Ranks(rank=0, world=3).shard(torch.zeros(4, 8, dtype=torch.long), 2)


def test_assignment_balances_cost_and_is_deterministic():
    ranks = Ranks(rank=1, world=2)
    # stories260K-like block: q k v o [64 → 64], gate up [64 → 172], down [172 → 64]: down costs the most.
    costs = [solve_cost(64, 64)] * 4 + [solve_cost(64, 172)] * 2 + [solve_cost(172, 64)]
    assert ranks.assign(costs) == [1, 1, 1, 1, 1, 1, 0]  # down alone is still more than all the rest
    # Largest first, each to the least loaded rank (ties: the lowest): 8 gate_up then 4 down experts.
    experts = [solve_cost(64, 32)] * 8 + [solve_cost(32, 64)] * 4
    owners = Ranks(rank=0, world=3).assign(experts)
    assert owners == Ranks(rank=2, world=3).assign(experts)  # every rank computes the same assignment
    assert owners == [0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2, 2]
    assert len({sum(c for c, o in zip(experts, owners) if o == r) for r in range(3)}) == 1  # equal loads


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.0"], "lmprune: error: sparsity must be in [0, 1), got 1.0"),  # lmprune's own check
    (["--sparsity", "half"], "lmprune: error: argument --sparsity: invalid float value: 'half' "
                             "(see `lmprune prune --help`)"),  # argparse's
])
def test_a_bad_input_under_torchrun_is_said_once_by_rank_0(tiny_llama, calib_text, tmp_path, extra, message):
    before, model = snapshot(tmp_path), snapshot(tiny_llama)
    command = prune_command(tiny_llama, calib_text, tmp_path / "out", "--nsamples", 2, "--seqlen", 32,
                            "--method", "wanda", *extra)
    (code0, err0), (code1, err1) = launch(command, tmp_path)
    assert (code0, code1) == (2, 2)
    assert err0.splitlines() == [message] and err1 == ""
    assert snapshot(tmp_path) == before and snapshot(tiny_llama) == model


class FakeGroup:
    """torch.distributed's calls that Ranks.close makes, recorded in order."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "barrier", lambda group=None: self.calls.append(("barrier", group)))
        monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: self.calls.append(("destroy",)))


@pytest.mark.parametrize("done, failed, calls", [
    (True, False, [("barrier", "farewell"), ("destroy",)]),  # a finished run: wait for every rank, then leave
    (False, False, [("destroy",)]),  # stopped before the end (Ctrl-C): the others are not at the barrier
    (True, True, []),  # a peer is gone: nothing that could wait on it
    (False, True, []),
])
def test_close_waits_for_every_rank_then_destroys_the_group(monkeypatch, done, failed, calls):
    group = FakeGroup(monkeypatch)
    ranks = Ranks(rank=1, world=2, backend="gloo", failed=failed, done=done, farewell="farewell")
    ranks.close()
    assert group.calls == calls


def test_a_peer_lost_at_the_farewell_barrier_leaves_the_result_alone(monkeypatch):
    group = FakeGroup(monkeypatch)

    def lost(group=None):
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(torch.distributed, "barrier", lost)
    Ranks(rank=0, world=2, backend="gloo", done=True, farewell="farewell").close()  # no exception
    assert group.calls == []
