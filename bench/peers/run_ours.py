"""lmprune's method on the saved SmolLM2 windows, under whichever Python runs this script.

Run with llm-compressor's venv to compare the two tools with every library identical:

    PYTHONPATH=src bench/peers/.venv-llmc/bin/python bench/peers/run_ours.py --method wanda --target 0.7

The windows are the ones `bench/quality.py --peers` saved for llm-compressor (bench/results/windows_<preset>.pt).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BENCH, PRESETS, load_dense, run_once  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--target", default="0.7")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    windows = torch.load(BENCH / "results" / f"windows_{args.preset}.pt")
    dense, _ = load_dense(PRESETS[args.preset])
    row = run_once(dense, args.method, args.target, windows["calibration"], windows["evaluation"], torch.device("cpu"))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}: {args.method} {args.target} "
          f"perplexity {row['perplexity']:.4f}, prune {row['prune_seconds']:.0f} s")


if __name__ == "__main__":
    main()
