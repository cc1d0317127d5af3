"""Streamed Wanda and magnitude against what they fundamentally need: two forward passes (issue #30).

Wanda needs each block's input statistics (one pass of the calibration batch through the block) and the
block's outputs with its pruned weights (a second pass, the next block's inputs); magnitude needs no
statistics at all. So the floor is: read each block once from the checkpoint, run the calibration batch
through it twice. This bench times, in the same run and on the same checkpoint, each as its own process
(imports, loading, tokenizing and calibration windows included in all three):
- `--forward-only`: that floor, with lmprune's own pieces (streamed loader, block store, recorded calls);
- `lmprune prune --stream --method wanda` and `--method magnitude` (which also write the pruned checkpoint);
and prints each prune's wall time over the floor's (the floor is run first and last; the faster counts).

    OMP_NUM_THREADS=1 python bench/stream_speed.py --hidden 2048 --ffn 8192 --blocks 16 --kv-heads 8 --shard-gb 1

The checkpoint is stream_memory.py's (generated once, in bench/runs/stream_memory/).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from stream_memory import CALIB, RUNS, SOURCE, checkpoint_dir, generate, prune  # noqa: E402


def forward_only(model_dir: str, nsamples: int, seqlen: int, seed: int = 0) -> None:
    """Each block read once from the checkpoint and the calibration batch run through it twice."""
    from lmprune.data import calibration_windows, load_text, tokenize
    from lmprune.model import find_blocks, move_outside_blocks, record_block_calls
    from lmprune.model.block_store import StreamedBlocks, first_of_each_class
    from lmprune.model.loading import load_streamed_model

    model, tokenizer, shards = load_streamed_model(model_dir, model_dir)
    windows = calibration_windows(tokenize(tokenizer, load_text(str(CALIB))), nsamples, seqlen, seed)
    store, device = StreamedBlocks(model, shards), torch.device("cpu")
    blocks_name, blocks = find_blocks(model)
    move_outside_blocks(model, blocks_name, device)
    with torch.no_grad():
        with store.loaded(first_of_each_class(blocks), blocks):
            calls = record_block_calls(model, blocks, list(windows.split(1)), device, device)
        hidden = calls.hidden
        for index, block in enumerate(blocks):
            store.load(index, block)
            call = calls.for_block(index)
            for _ in range(2):  # statistics, then outputs: the second pass's outputs feed the next block
                outputs = [call.call(block, j, states, device) for j, states in enumerate(hidden)]
            hidden[:] = outputs
            store.release(index, block)


def timed_forward_only(model: Path, nsamples: int, seqlen: int) -> float:
    # The allocator's huge pages as `lmprune` sets them (cli.py): the floor's tensors get the same pages.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
           "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1")}
    tick = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--forward-only", str(model), "--nsamples", str(nsamples),
                    "--seqlen", str(seqlen)], env=env, check=True)
    return time.perf_counter() - tick


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward-only", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--methods", default="wanda,magnitude")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--shard-gb", type=float, default=1.0)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=128)
    args = parser.parse_args()
    if args.forward_only:
        forward_only(args.forward_only, args.nsamples, args.seqlen)
        return
    model = checkpoint_dir(args)
    size = generate(model, args.hidden, args.ffn, args.blocks, args.kv_heads, int(args.shard_gb * 1e9))
    CALIB.write_text(SOURCE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    print(f"checkpoint {model}: {size / 1e9:.2f} GB; {args.nsamples} × {args.seqlen} calibration tokens", flush=True)
    # The floor runs first and last: the first run may find the checkpoint's pages out of the page cache, which
    # the prunes after it do not; the faster of the two is the floor (the conservative choice for the ratios).
    floors = [timed_forward_only(model, args.nsamples, args.seqlen)]
    print(f"two forward passes (streamed, each block read once): {floors[0]:.0f} s", flush=True)
    runs = []
    for method in args.methods.split(","):
        out = RUNS / f"out-speed-{method}"
        run = prune(model, out, method, True, args.nsamples, args.seqlen)
        shutil.rmtree(out, ignore_errors=True)
        runs.append((method, run))
        print(f"{method}: {run['wall']:.0f} s", flush=True)
    floors.append(timed_forward_only(model, args.nsamples, args.seqlen))
    floor = min(floors)
    print(f"two forward passes again: {floors[1]:.0f} s", flush=True)
    print("\n| run | wall | / two forward passes |\n|---|---|---|")
    print(f"| two forward passes (first / last run) | {floors[0]:.0f} / {floors[1]:.0f} s | 1.00 (the faster) |")
    for method, run in runs:
        print(f"| prune --stream --method {method} | {run['wall']:.0f} s | {run['wall'] / floor:.2f} |")


if __name__ == "__main__":
    main()
