"""Exit codes of repeated two-process torchrun prunes of stories260K: a run that saved its checkpoint must exit 0.

    python bench/torchrun_exits.py              # 50 runs (issue 34's acceptance)
    python bench/torchrun_exits.py --runs 5     # a quick look on a shared machine

Each run is the real command line (`torchrun --nproc-per-node 2 -m lmprune prune ...`, one thread per process,
the CPU and gloo) into a fresh output directory, removed after the run. Before the process group was torn
down in order on every rank, about one run in seven exited 1 after saving: rank 1 aborted at exit
("terminate called without an active exception"). Each run's exit code, time and any stderr line that is
not lmprune's own are printed and appended to bench/results/torchrun_exits.jsonl as they come, so a stopped
bench keeps what it measured; the last line is the count of exit codes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared"
MODEL = SHARED / "models" / "stories260K"
CALIB = SHARED / "data" / "tinystories.valid.txt"
RESULTS = BENCH / "results" / "torchrun_exits.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(out: Path, timeout: float) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "lmprune", "prune", str(MODEL), "--calib", str(CALIB), "--out", str(out),
               "--method", "sparsegpt", "--pattern", "2:4", "--nsamples", "4", "--batch-size", "2", "--seqlen", "64",
               "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    tick = time.perf_counter()
    try:
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        code, stderr = run.returncode, run.stderr
    except subprocess.TimeoutExpired as exc:
        code, stderr = "timeout", exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    saved = (out / "lmprune_report.json").is_file()
    # torchrun's own notices (e.g. the OMP_NUM_THREADS one) are not the run's; anything else is worth reading
    noise = [line for line in stderr.splitlines() if line.strip() and not line.startswith("lmprune: ")
             and "OMP_NUM_THREADS" not in line and not set(line.strip()) <= {"*"}]
    result = {"exit": code, "saved": saved, "seconds": round(time.perf_counter() - tick, 1), "other_stderr": noise[-5:]}
    if code != 0:  # a failure keeps its whole story: lmprune's own lines and the traceback
        result["stderr"] = stderr.splitlines()[-80:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="how many runs (default 50)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds one run may take (default 300)")
    parser.add_argument("--log", type=Path, default=RESULTS, help=f"append each run's result here (default {RESULTS})")
    args = parser.parse_args()
    if not MODEL.exists():
        sys.exit(f"skipped: {MODEL} not found (../shared beside the repo holds the model and data)")
    args.log.parent.mkdir(parents=True, exist_ok=True)
    counts: collections.Counter = collections.Counter()
    work = Path(tempfile.mkdtemp(prefix="torchrun_exits-"))
    try:
        with open(args.log, "a", encoding="utf-8") as log:
            for index in range(1, args.runs + 1):
                out = work / f"run{index}"
                result = {"run": index, **one_run(out, args.timeout)}
                shutil.rmtree(out, ignore_errors=True)
                counts[result["exit"]] += 1
                log.write(json.dumps(result) + "\n")
                log.flush()
                print(f"run {index:>3}/{args.runs}: exit {result['exit']}, saved {result['saved']}, "
                      f"{result['seconds']} s" + "".join(f"\n    {line}" for line in result["other_stderr"]),
                      flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = ", ".join(f"exit {code}: {n}" for code, n in sorted(counts.items(), key=str))
    print(f"{args.runs} runs: {summary}")
    sys.exit(0 if set(counts) == {0} else 1)


if __name__ == "__main__":
    main()
