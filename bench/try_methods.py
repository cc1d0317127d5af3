"""Prune and evaluate a few method settings on a preset, printing one line each; saves nothing.

For quick comparisons of options before a grid run (bench/quality.py keeps the results):

    python bench/try_methods.py --preset smollm2-135m --targets 0.5,0.7 --methods 'dsnot,dsnot[same_sign=false]'
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, build_windows, load_dense, require_shared, run_once, split_methods  # noqa: E402
from lmprune.model import resolve_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="stories260k")
    parser.add_argument("--methods", required=True, help="comma-separated, e.g. 'wanda,dsnot[cycles=5]'")
    parser.add_argument("--targets", default="0.5,0.7")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model, tokenizer = load_dense(preset)
    calibration, evaluation = build_windows(preset, tokenizer)
    device = resolve_device("auto")
    for method in split_methods(args.methods):
        for target in args.targets.split(","):
            tick = time.perf_counter()
            row = run_once(model, method, target, calibration, evaluation, device)
            print(f"{method:36s} {target:5s} perplexity {row['perplexity']:10.2f}  "
                  f"mean layer error {row['summary']['mean_error']:.4f}  {time.perf_counter() - tick:.0f} s", flush=True)


if __name__ == "__main__":
    main()
