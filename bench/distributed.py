"""Wall time of one pruning: 1 process × N threads (and × 1 thread) against N processes × 1 thread (torchrun).

    python bench/distributed.py --preset stories260k --processes 2
    python bench/distributed.py --preset smollm2-135m --processes 2 --method sparsegpt --nsamples 16
    python bench/distributed.py --preset smollm2-135m --processes 8 --device cuda   # 1 GPU vs 8 GPUs

Each configuration is the real command line (`lmprune prune`, or `torchrun -m lmprune prune`) in its own
subprocess; "wall" is the whole command (imports, model load, launcher), "prune" is the pipeline's own
total from the report (rank 0's clock: calibration capture to the last block). It also counts how many
mask entries differ between the two outputs (float32 summation order, see tests/test_distributed.py).
Results: bench/results/distributed_<preset>.json and a table in bench/RESULTS.md. Run it on an idle
machine; on a shared one, only the ratio from one invocation means anything.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
SHARED = REPO.parent / "shared"
PRESETS = {
    "stories260k": dict(model=str(SHARED / "models" / "stories260K"),
                        calib=str(SHARED / "data" / "tinystories.valid.txt"), nsamples=64, seqlen=256),
    "smollm2-135m": dict(model="smollm2-135m", calib=str(SHARED / "data" / "wikitext2.valid.tokens.txt"),
                         nsamples=16, seqlen=256),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, threads: int, args: argparse.Namespace, out: Path) -> dict:
    preset = PRESETS[args.preset]
    prune = ["prune", preset["model"], "--calib", preset["calib"],
             "--nsamples", str(args.nsamples or preset["nsamples"]), "--seqlen", str(args.seqlen or preset["seqlen"]),
             "--method", args.method, "--sparsity", str(args.sparsity), "--device", args.device,
             "--out", str(out), "--no-progress", "--overwrite"]
    if processes == 1:
        command = [sys.executable, "-m", "lmprune", *prune]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-port", str(_free_port()), "-m", "lmprune", *prune]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "src"))
    tick = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - tick
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "lmprune_report.json").read_text())
    return {"processes": processes, "threads_each": threads, "command": " ".join(command), "wall_s": wall,
            "prune_s": report["timings"]["total"], "timings": report["timings"]}


def mask_flips(a: Path, b: Path) -> tuple[int, int]:
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    flips = sum(int(((x[k] != 0) != (y[k] != 0)).sum()) for k in x if x[k].dim() >= 2)
    return flips, sum(x[k].numel() for k in x if x[k].dim() >= 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="stories260k")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int)
    parser.add_argument("--seqlen", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile (recorded)")
    args = parser.parse_args()
    n = args.processes
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, n, args, Path(tmp) / "one")  # on a GPU: 1 GPU; on the CPU: n threads in one process
        single = run(1, 1, args, Path(tmp) / "single") if args.device == "cpu" else None  # 1 thread: the unit
        many = run(n, 1, args, Path(tmp) / "many")
        flips, total = mask_flips(Path(tmp) / "one", Path(tmp) / "many")
        # The yardstick for those flips: the same single process with n threads instead of 1.
        thread_flips = mask_flips(Path(tmp) / "one", Path(tmp) / "single")[0] if single else None
    runs = [one] + ([single] if single else []) + [many]
    result = {"preset": args.preset, "method": args.method, "sparsity": args.sparsity, "device": args.device,
              "torch": torch.__version__, "note": args.note, "runs": runs,
              "mask_flips": flips, "weights": total, "mask_flips_threads_vs_1_thread": thread_flips,
              "speedup_wall": one["wall_s"] / many["wall_s"], "speedup_prune": one["prune_s"] / many["prune_s"]}
    if single:
        result["speedup_prune_vs_1_thread"] = single["prune_s"] / many["prune_s"]
    suffix = "" if args.device == "cpu" else f"-{args.device.split(':')[0]}"
    path = BENCH / "results" / f"distributed_{args.preset}{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(f"{r['processes']} process(es) × {r['threads_each']} thread(s): wall {r['wall_s']:.1f} s, "
              f"prune {r['prune_s']:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in r['timings'].items())})")
    print(f"speed-up over 1 process × {n} threads: {result['speedup_prune']:.2f}× (prune), "
          f"{result['speedup_wall']:.2f}× (wall); "
          f"over 1 × 1: {result.get('speedup_prune_vs_1_thread', 0):.2f}× (prune); "
          f"mask flips {flips} of {total} (1 process, {n} threads vs 1 thread: {thread_flips}); written to {path}")


if __name__ == "__main__":
    main()
