"""Where do lmprune's and llm-compressor's masks part? Block by block, on the same windows.

    bench/peers/.venv-llmc/bin/python bench/peers/run_llmcompressor.py --model PATH --windows W.pt \
        --method wanda --sparsity 0.6 --out /tmp/llmc.json --save-masks /tmp/llmc_masks.pt
    python bench/peers/compare_masks.py --model PATH --windows W.pt --method wanda --target 0.6 \
        --peer-masks /tmp/llmc_masks.pt

For each pruned layer it prints the fraction of weights whose keep/prune decision differs. If the two
tools compute the same scores, block 0 (whose inputs are the dense model's in both) agrees up to
rounding-size near-ties, and any gap that grows in later blocks comes from pruned inputs drifting
apart; a systematic difference shows up as a large gap already in block 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import prune  # noqa: E402
from lmprune.model import load_model, resolve_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True)
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--target", default="0.6")
    parser.add_argument("--peer-masks", required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    calibration = torch.load(args.windows)["calibration"]
    prune(model, args.method, args.target, calibration, resolve_device("auto"))
    peer = torch.load(args.peer_masks)
    modules = dict(model.named_modules())
    per_block: dict[int, list[float]] = {}
    for name, peer_keep in peer.items():
        keep = modules[name].weight.detach() != 0
        differ = (keep != peer_keep).float().mean().item()
        block = int(re.search(r"\.(\d+)\.", name).group(1))
        per_block.setdefault(block, []).append(differ)
        if block < 2:
            print(f"{name}: {differ:.2e} of decisions differ")
    for block, values in sorted(per_block.items()):
        print(f"block {block}: mean {sum(values) / len(values):.2e}, max {max(values):.2e}")


if __name__ == "__main__":
    main()
