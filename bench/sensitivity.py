"""How far perplexity moves when a method's inputs move by float32-rounding amounts.

    python bench/sensitivity.py --preset smollm2-135m --method wanda --target 0.6 --eps 1e-6 --seeds 0,1

Two implementations of one algorithm differ in how they round: llm-compressor accumulates Wanda's
input norms as a running mean, we take them from the Gram matrix's diagonal, and both are exact to
about 1e-7. Near the pruning threshold such differences flip a few weights per row. This script
measures what that does to perplexity: for each seed it scales every layer's Gram matrix as D·H·D with
D = diag(1 + eps·N(0, 1)), which multiplies each input norm by its own (1 + eps·noise) with H still
positive semi-definite. It then reruns the whole prune and evaluation. The spread across seeds, next to
the unperturbed run in quality_<preset>.json, is the noise floor for "same algorithm, same numbers".
Results: bench/results/sensitivity_<preset>.json and a table in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH, PRESETS, build, build_windows, load_dense, load_json, replace_section, require_shared, run_once, save_json,
)
from lmprune.model import resolve_device  # noqa: E402


class PerturbedGram:
    """Wraps a layer solver: the solver sees D·H·D; the pipeline's error report still sees H."""

    def __init__(self, layer_solver, eps: float, seed: int):
        self.layer_solver, self.eps = layer_solver, eps
        self.generator = torch.Generator().manual_seed(seed)

    def __getattr__(self, name):  # name, per_row_default, ... of the wrapped solver
        return getattr(self.layer_solver, name)

    def __call__(self, W, H, pattern, stats=None):
        scale = 1.0 + self.eps * torch.randn(H.shape[0], generator=self.generator)
        scale = scale.to(H.device, H.dtype)
        return self.layer_solver(W, H * scale[:, None] * scale[None, :], pattern, stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="stories260k")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--target", default="0.6")
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    out = BENCH / "results" / f"sensitivity_{args.preset}.json"
    data = load_json(out)
    dense, tokenizer = load_dense(preset)
    calibration, evaluation = build_windows(preset, tokenizer)
    device = resolve_device("auto")
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        key = dict(method=args.method, target=args.target, eps=args.eps, seed=seed)
        if any(all(r.get(k) == v for k, v in key.items()) for r in data["runs"]):
            continue
        built = build(args.method)
        built.layer_solver = PerturbedGram(built.layer_solver, args.eps, seed)
        row = run_once(dense, args.method, args.target, calibration, evaluation, device, built=built)
        command = "python bench/sensitivity.py " + " ".join(sys.argv[1:])
        data["runs"].append({**key, "perplexity": row["perplexity"], "prune_seconds": row["prune_seconds"],
                             "command": command})
        save_json(out, data)
        print(f"{args.method} {args.target} eps={args.eps} seed={seed}: perplexity {row['perplexity']:.3f}",
              file=sys.stderr)
    replace_section(BENCH / "RESULTS.md", f"sensitivity-{args.preset}", format_table(args.preset, data))


def format_table(preset: str, data: dict) -> str:
    quality = load_json(BENCH / "results" / f"quality_{preset}.json")["runs"]
    lines = [f"### Perplexity under rounding-size perturbations: {preset}", "",
             "Commands:", *[f"- `{c}`" for c in dict.fromkeys(r.get("command", "") for r in data["runs"]) if c], "",
             "| method | target | eps | seed | perplexity | vs unperturbed |", "|---|---|---|---|---|---|"]
    for r in data["runs"]:
        base = next((q["perplexity"] for q in quality
                     if q["tool"] == "lmprune" and q["method"] == r["method"] and q["target"] == r["target"]), None)
        change = f"{r['perplexity'] / base - 1:+.2%}" if base else "—"
        lines.append(f"| {r['method']} | {r['target']} | {r['eps']:g} | {r['seed']} | {r['perplexity']:.2f} | {change} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
