"""The output-hash matrix: sha256 of every tensor each `lmprune prune` writes, over methods and levers.

A restructuring of the pruning loop must leave every checkpoint bit for bit the same. This script runs
`python -m lmprune prune` as subprocesses (one thread, seed 0, 8 windows × 64 tokens) on stories260K
(../shared) and on a tiny random Qwen3-MoE built from a config with a fixed seed, and records per cell:
the exit code, the sha256 of every tensor of the output checkpoint (in whatever shards it is written), and
the sha256 of the report's deterministic fields (per-layer records without their seconds, routers,
selectors, kept-dense weights, allocation, block targets, block records). A cell the CLI refuses records
its exit code and error line instead: a refusal that appears or disappears is a difference too.

    python bench/output_hashes.py --record bench/results/output_hashes.json   # the baseline
    python bench/output_hashes.py --check bench/results/output_hashes.json    # exit 1 on any difference
    python bench/output_hashes.py --check FILE --only stories/wanda            # cells whose name contains it
    python bench/output_hashes.py --record FILE --src /tmp/base/src            # another checkout's sources

Cells besides plain CLI runs: "resume" kills a streamed run as it writes block 2 (the disk fills: the same
fault tests/test_resume.py injects) and then runs the same command again, which continues from block 2;
"torchrun" launches 2 processes with torch.distributed.run (gloo, one thread each).
Outputs go to a temporary directory (or --keep DIR, to compare the tensors of two runs afterwards).
"""

from __future__ import annotations

import argparse
import hashlib
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
STORIES = SHARED / "models" / "stories260K"
CALIB = SHARED / "data" / "tinystories.valid.txt"
CALIBRATION = ("--nsamples", "8", "--seqlen", "64", "--seed", "0", "--no-progress")
# Report fields that do not depend on timing or the machine.
REPORT_KEYS = ("routers", "selectors", "kept_dense", "unpruned", "allocation", "block_targets", "blocks", "resumed")
FAST = {  # solver settings that keep the iterative methods to seconds on these models
    "admm1": ("--opt", "iterations=10"),
    "admm-grad": ("--opt", "iterations=10", "--opt", "gradual_steps=5"),
    "alps": ("--opt", "max_iterations=30"),
    "sparsellm": ("--opt", "epochs=2"),
}
METHODS = ["magnitude", "wanda", "sparsegpt", "dsnot", "admm1", "admm-grad", "alps", "sparsellm"]

# A kill while block 2 is written, as tests/test_streaming.py's disk_full_at does it, then the CLI's exit.
KILLED = """
import errno, os, sys
import lmprune.model.shards as shards
from lmprune.cli import main
real = shards.write_shard
def write_shard(path, tensors, *metadata):
    if "model-00003-of" in path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    real(path, tensors, *metadata)
shards.write_shard = write_shard
sys.exit(main(sys.argv[1:]))
"""


def cells() -> dict[str, tuple[str, str, list[str]]]:
    """name -> (model key, kind: cli|resume|torchrun, prune options)."""
    out = {}
    for model in ("stories", "moe"):
        for method in METHODS:
            out[f"{model}/{method}/0.5"] = (model, "cli", ["--method", method, "--sparsity", "0.5", *FAST.get(method, ())])
        out[f"{model}/mask-wanda+update-admm/0.5"] = (model, "cli", ["--mask", "wanda", "--update", "admm", "--sparsity",
                                                                     "0.5", "--opt", "iterations=10"])
        out[f"{model}/sparsegpt/2:4"] = (model, "cli", ["--method", "sparsegpt", "--pattern", "2:4"])
        out[f"{model}/wanda/2:4"] = (model, "cli", ["--method", "wanda", "--pattern", "2:4"])
        out[f"{model}/sparsegpt/best-quality"] = (model, "cli", ["--method", "sparsegpt", "--sparsity", "0.5",
                                                                 "--best-quality"])
        out[f"{model}/wanda/owl"] = (model, "cli", ["--method", "wanda", "--sparsity", "0.5", "--allocation", "owl"])
        out[f"{model}/sparsegpt/depth"] = (model, "cli", ["--method", "sparsegpt", "--sparsity", "0.5",
                                                          "--allocation", "depth"])
        out[f"{model}/wanda/stream"] = (model, "cli", ["--method", "wanda", "--sparsity", "0.5", "--stream"])
        out[f"{model}/sparsegpt/stream-depth"] = (model, "cli", ["--method", "sparsegpt", "--sparsity", "0.5",
                                                                 "--allocation", "depth", "--stream"])
        out[f"{model}/sparsegpt/best-quality-stream-resumed"] = (model, "resume", ["--method", "sparsegpt", "--sparsity",
                                                                                   "0.5", "--best-quality", "--stream"])
        out[f"{model}/wanda/depth-stream-resumed"] = (model, "resume", ["--method", "wanda", "--sparsity", "0.5",
                                                                        "--allocation", "depth", "--stream"])
        out[f"{model}/sparsegpt/torchrun2"] = (model, "torchrun", ["--method", "sparsegpt", "--sparsity", "0.5",
                                                                   "--batch-size", "2"])
        out[f"{model}/sparsellm/torchrun2"] = (model, "torchrun", ["--method", "sparsellm", "--sparsity", "0.5",
                                                                   *FAST["sparsellm"], "--batch-size", "2"])
    return out


def build_moe(path: Path) -> Path:
    """A tiny random Qwen3-MoE (tests/zoo.py's config, seed 0) with the byte tokenizer, in safetensors shards."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import byte_tokenizer
    from transformers.utils import logging as hf_logging
    from zoo import tiny_model

    hf_logging.disable_progress_bar()
    tiny_model("qwen3_moe", seed=0).save_pretrained(path, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(path)
    return path


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_digest(path: Path) -> str:
    """The model's weights and config, so that a check on other inputs is not mistaken for a regression."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".json") and not f.name.startswith("tokenizer"):
            h.update(f.name.encode() + file_digest(f).encode())
    return h.hexdigest()


def tensor_hashes(out: Path) -> dict[str, str]:
    """sha256 of each tensor's dtype, shape and bytes, over every shard of the checkpoint."""
    import torch
    from safetensors import safe_open

    hashes = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name).contiguous()
                h = hashlib.sha256(f"{t.dtype}{list(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                hashes[name] = h.hexdigest()
    return hashes


def untimed(value):
    """`value` without its "seconds" entries, at any depth (layer and block records carry their time)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def report_hashes(out: Path) -> dict[str, str]:
    report = untimed(json.loads((out / "lmprune_report.json").read_text()))
    fields = {"report.layers": report.get("layers", []), **{f"report.{k}": report.get(k) for k in REPORT_KEYS}}
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest() for k, v in fields.items()}


SRC = [REPO / "src"]  # the lmprune sources the cells run (--src)


def env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return dict(base, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(SRC[0]),
                LMPRUNE_DIST_TIMEOUT="120", TQDM_DISABLE="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def error_line(done: subprocess.CompletedProcess) -> str:
    """The run's `lmprune: error:` line (the end of its stderr where it has none): no timings or progress."""
    errors = [line for line in done.stderr.splitlines() if line.startswith("lmprune: error:")]
    return errors[0] if errors else done.stderr.strip()[-300:]


def run_cell(kind: str, model: Path, options: list[str], out: Path) -> dict:
    argv = ["prune", str(model), "--calib", str(CALIB), "--out", str(out), *CALIBRATION, *options]
    py = [sys.executable]
    if kind == "resume":
        killed = subprocess.run([*py, "-c", KILLED, *argv], env=env(), capture_output=True, text=True)
        if killed.returncode != 2 or "2 finished block(s) are kept" not in killed.stderr:
            return {"exit": killed.returncode, "error": "the killed run did not stop at block 2: " + error_line(killed)}
    command = [*py, "-m", "lmprune", *argv]
    if kind == "torchrun":
        command = [*py, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                   "-m", "lmprune", *argv]
    done = subprocess.run(command, env=env(), capture_output=True, text=True)
    cell: dict = {"exit": done.returncode}
    if done.returncode != 0:
        cell["error"] = error_line(done)
        return cell
    if kind == "resume" and "pruning from block 2" not in done.stderr:
        cell["error"] = "the second run did not resume from block 2"
    cell.update(tensor_hashes(out))
    cell.update(report_hashes(out))
    return cell


def run_matrix(only: str | None, keep: Path | None) -> dict:
    work = Path(tempfile.mkdtemp(prefix="output_hashes-")) if keep is None else keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        models = {"stories": STORIES, "moe": build_moe(work / "moe-model")}
        result = {"inputs": {k: model_digest(p) for k, p in models.items()} | {"calib": file_digest(CALIB)},
                  "cells": {}}
        for name, (model, kind, options) in cells().items():
            if only and only not in name:
                continue
            out = work / name.replace("/", "_").replace(":", "-")
            shutil.rmtree(out, ignore_errors=True)
            tick = time.time()
            result["cells"][name] = run_cell(kind, models[model], options, out)
            cell = result["cells"][name]
            status = "ok" if cell["exit"] == 0 and "error" not in cell else f"exit {cell['exit']}: {cell.get('error')}"
            print(f"{name}: {status} ({time.time() - tick:.1f} s)", file=sys.stderr, flush=True)
        return result
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def differences(old: dict, new: dict) -> list[str]:
    out = [f"input {k}: recorded {old['inputs'].get(k)}, now {v}" for k, v in new["inputs"].items()
           if old["inputs"].get(k) != v]
    for name, cell in new["cells"].items():
        before = old["cells"].get(name)
        if before is None:
            out.append(f"{name}: not in the recorded matrix")
            continue
        for key in sorted(set(before) | set(cell)):
            if before.get(key) != cell.get(key):
                out.append(f"{name}: {key}: recorded {str(before.get(key))[:80]!r}, now {str(cell.get(key))[:80]!r}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, metavar="FILE", help="write the matrix to FILE")
    mode.add_argument("--check", type=Path, metavar="FILE", help="compare with FILE; exit 1 on a difference")
    parser.add_argument("--only", help="run only the cells whose name contains this")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the outputs in DIR")
    parser.add_argument("--src", type=Path, metavar="DIR",
                        help="run the lmprune under DIR (e.g. `git archive BASE src` unpacked) instead of this repo's src")
    args = parser.parse_args()
    if args.src:
        SRC[0] = args.src.resolve()
    if not STORIES.exists():
        print(f"{STORIES} not found: ../shared holds stories260K", file=sys.stderr)
        return 2
    tick = time.time()
    result = run_matrix(args.only, args.keep)
    print(f"{len(result['cells'])} cells in {time.time() - tick:.0f} s", file=sys.stderr)
    if args.record:
        if args.only and args.record.exists():  # refresh those cells only
            recorded = json.loads(args.record.read_text())
            recorded["cells"].update(result["cells"])
            recorded["inputs"] = result["inputs"]
            result = recorded
        args.record.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        return 0
    found = differences(json.loads(args.check.read_text()), result)
    for line in found:
        print(line)
    print(f"{len(found)} difference(s) in {len(result['cells'])} cells", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
