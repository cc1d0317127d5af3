"""Does ALPS leave quality on the table inside a layer? Its settings on real layer problems, fitted and held out.

The calibration windows of a preset are split in two (even / odd windows). The dense model's inputs to a
few layers give two Grams per layer, H_fit and H_held. ALPS solves each layer on H_fit under several
settings; the relative error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) is printed on both Grams. A setting that lowers
the held-out error by much would be worth a grid run; one that only lowers the fitted error overfits.

    python bench/alps_settings.py --preset smollm2-135m --targets 2:4,0.7
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, build_windows, load_dense, require_shared  # noqa: E402
from lmprune.config import SparsityPattern  # noqa: E402
from lmprune.solvers.alps import AlpsSettings, solve  # noqa: E402

SETTINGS = {
    "default": AlpsSettings(),
    "pcg_iterations=50": AlpsSettings(pcg_iterations=50),
    "lambda2=0.001": AlpsSettings(lambda2=0.001),
    "lambda2=0.1": AlpsSettings(lambda2=0.1),
    # ρ grows about 3× more slowly: more ADMM iterations before the support freezes
    "slow growth": AlpsSettings(growth_high=1.1, growth_mid=1.05, growth_low=1.02, max_iterations=900),
}
LAYERS = {"smollm2-135m": ["model.layers.10.self_attn.q_proj", "model.layers.10.mlp.down_proj",
                           "model.layers.20.mlp.up_proj"],
          "stories260k": ["model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]}


def split_grams(model, windows, names):
    """{layer: [H from even windows, H from odd windows]} of the dense model's inputs (float64 sums)."""
    modules = dict(model.named_modules())
    grams = {name: [0, 0] for name in names}
    half = [0]

    def hook(name):
        def record(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[name][half[0]] = grams[name][half[0]] + x.T @ x
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    try:
        with torch.no_grad():
            for i, window in enumerate(windows):
                half[0] = i % 2
                model(window.reshape(1, -1), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: [g.float() for g in pair] for name, pair in grams.items()}, modules


def relative_error(W, W_new, H):
    D, W, H = (W_new - W).double(), W.double(), H.double()
    return float(torch.einsum("oi,ij,oj->", D, H, D) / torch.einsum("oi,ij,oj->", W, H, W))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(LAYERS), default="smollm2-135m")
    parser.add_argument("--targets", default="2:4,0.7")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    model, tokenizer = load_dense(preset)
    calibration, _ = build_windows(preset, tokenizer)
    grams, modules = split_grams(model, calibration, LAYERS[args.preset])
    print("| target | layer | setting | fitted error | held-out error | ADMM iterations |")
    print("|---|---|---|---|---|---|")
    for target in args.targets.split(","):
        pattern = SparsityPattern.parse(target)
        for name, (H_fit, H_held) in grams.items():
            W = modules[name].weight.detach().float()
            for label, settings in SETTINGS.items():
                tick = time.perf_counter()
                result = solve(W, H_fit, pattern, settings)
                print(f"| {target} | {name.removeprefix('model.layers.')} | {label} | "
                      f"{relative_error(W, result.weight, H_fit):.5f} | {relative_error(W, result.weight, H_held):.5f} | "
                      f"{result.info['iterations']} |", flush=True)
                print(f"    {time.perf_counter() - tick:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
