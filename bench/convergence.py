"""How fast the fixed-mask updates reach the masked least-squares optimum on real layers (issue 32).

    python bench/convergence.py --preset smollm2-135m --blocks 0,15,29 --targets 0.6,0.7,2:4
    python bench/convergence.py --preset stories260k --blocks 0,2,4 --iterations 50 --tag smoke

For every Linear of the chosen blocks (early, middle, late) it takes the layer's Gram matrix H = XᵀX over
the calibration tokens of the dense model, fixes Wanda's per-row mask at each target, and measures the
relative reconstruction error ‖XW − XŴ‖²/‖XW‖², divided by the exact optimum's (`--update exact`), for:
  - ADMM (`--update admm`, default dampening) at every ρ of --rhos, per iteration;
  - ADMM with dampening 0 at ρ = 1 (its fixed point is the exact optimum itself);
  - Adam gradient descent (`--update gd`) at every learning rate of --lrs, per step; the best per layer type;
  - SparseGPT's one-pass update and the plain masked weights, as reference points.
Wall time per iteration is measured without the error evaluation (the observer's own time is taken off).
Then, per block, the dense block's output error (relative, on the calibration windows) after ADMM-Grad
prunes every layer of the block with 15, 20, 30, 50 and 100 iterations: monotone or not.

Results: bench/results/convergence_<preset>[_<tag>].json, plots convergence_<preset>_*.png, and a section of
bench/RESULTS.md. Timings need an otherwise idle machine and a fixed thread count (--threads).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, PRESETS, build_windows, git_commit, load_dense, require_shared, save_json  # noqa: E402
from lmprune.config import SparsityPattern  # noqa: E402
from lmprune.model import find_blocks, prunable_layers  # noqa: E402
from lmprune.solvers import build_layer_solver  # noqa: E402
from lmprune.solvers.admm import ADMMSettings, update as admm_update  # noqa: E402
from lmprune.solvers.linalg import relative_error  # noqa: E402
from lmprune.solvers.reference import ExactSettings, GDSettings, exact_update, gd_update  # noqa: E402

WITHIN = 0.01  # "within 1% of the optimum": error ≤ 1.01 × the optimum's


def capture_grams(model, windows: torch.Tensor, block_ids: list[int], batch: int) -> dict[str, dict]:
    """H = XᵀX (float64 sums) of every prunable Linear's inputs in the chosen blocks, from the dense model."""
    name, blocks = find_blocks(model)
    layers = [layer for i in block_ids for layer in prunable_layers(blocks[i], f"{name}.{i}")]
    grams = {layer.name: {"layer": layer, "H": None, "tokens": 0} for layer in layers}
    hooks = []
    for layer in layers:
        entry = grams[layer.name]

        def hook(module, args, output, entry=entry):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            entry["H"] = x.T @ x if entry["H"] is None else entry["H"] + x.T @ x
            entry["tokens"] += x.shape[0]

        hooks.append(layer.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch):
                model(windows[start:start + batch], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return grams


class Trace:
    """Errors per iteration, and the solver's wall time without this observer's own time."""

    def __init__(self, W, H, optimum: float):
        self.W, self.H, self.optimum = W, H, optimum
        self.errors: list[float] = []
        self.seconds: list[float] = []
        self.start = time.perf_counter()
        self.overhead = 0.0

    def __call__(self, it: int, weight: torch.Tensor) -> None:
        tick = time.perf_counter()
        self.seconds.append(tick - self.start - self.overhead)
        self.errors.append(relative_error(self.W, weight, self.H) / self.optimum)
        self.overhead += time.perf_counter() - tick

    def to_target(self) -> dict:
        """Iterations and seconds to get within 1% of the optimum (None: not reached)."""
        for i, (err, sec) in enumerate(zip(self.errors, self.seconds)):
            if err <= 1 + WITHIN:
                return {"reach_iterations": i + 1, "reach_seconds": sec}
        return {"reach_iterations": None, "reach_seconds": None}

    def row(self) -> dict:
        return {"errors": self.errors, "seconds": self.seconds, **self.to_target()}


def one_layer(W, H, mask, rhos, lrs, iterations) -> dict:
    tick = time.perf_counter()
    optimum = relative_error(W, exact_update(W, H, mask, ExactSettings(dampening=0.0))[0], H)
    out = {"optimum": optimum, "exact_seconds": time.perf_counter() - tick,
           "masked": relative_error(W, W * mask, H) / optimum}
    sparsegpt = build_layer_solver(mask="wanda", update="sparsegpt")
    tick = time.perf_counter()
    weight, _ = sparsegpt.update_solver.update(W, H, mask, sparsegpt.update_settings)  # its update alone
    out["sparsegpt"] = {"error": relative_error(W, weight, H) / optimum, "seconds": time.perf_counter() - tick}
    out["admm"] = {}
    for rho in rhos:
        trace = Trace(W, H, optimum)
        admm_update(W, H, mask, ADMMSettings(iterations=iterations, rho=rho), observe=trace)
        out["admm"][str(rho)] = trace.row()
    trace = Trace(W, H, optimum)
    admm_update(W, H, mask, ADMMSettings(iterations=iterations, rho=1.0, dampening=0.0), observe=trace)
    out["admm_undamped"] = trace.row()
    out["gd"] = {}
    gd_iterations = iterations * 10  # GD needs many more steps: give it ten times ADMM's
    for lr in lrs:
        trace = Trace(W, H, optimum)
        gd_update(W, H, mask, GDSettings(iterations=gd_iterations, lr=lr), observe=trace)
        out["gd"][str(lr)] = trace.row()
    return out


def block_output_error(model, block_index: int, windows, grams, pattern, iteration_counts, batch) -> dict:
    """The dense block's output error after ADMM-Grad prunes each of its layers (dense inputs, dense H)."""
    name, blocks = find_blocks(model)
    block = blocks[block_index]
    captured = {}

    def grab(module, args, kwargs, output):
        captured.setdefault("calls", []).append((args, kwargs, output[0] if isinstance(output, tuple) else output))

    handle = block.register_forward_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch):
                model(windows[start:start + batch], use_cache=False)
    finally:
        handle.remove()
    out = {}
    for iterations in iteration_counts:
        pruned = copy.deepcopy(block)
        solver = build_layer_solver("admm-grad", options={"iterations": iterations})
        for layer in prunable_layers(pruned, f"{name}.{block_index}"):
            H = grams[layer.name]["H"].float()
            result = solver(layer.get_weight(torch.device("cpu")), H, pattern)
            layer.set_weight(result.weight)
        num = den = 0.0
        with torch.no_grad():
            for args, kwargs, dense_out in captured["calls"]:
                got = pruned(*args, **kwargs)
                got = got[0] if isinstance(got, tuple) else got
                num += float((got.double() - dense_out.double()).pow(2).sum())
                den += float(dense_out.double().pow(2).sum())
        out[str(iterations)] = num / den
    values = [out[str(k)] for k in iteration_counts]
    out["monotone"] = all(b <= a for a, b in zip(values, values[1:]))
    return out


def layer_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def summarize(rows: list[dict], rhos, lrs) -> str:
    """Per target and layer type: ADMM's iterations/time to 1% at each ρ against the best GD's."""
    lines = ["| target | layer | masked | SparseGPT | " + " | ".join(f"ADMM ρ={r}" for r in rhos)
             + " | ADMM λ=0 ρ=1 | best GD (lr) | GD/ADMM time |", "|" + "---|" * (6 + len(rhos))]
    for row in rows:
        best_rho = min(rhos, key=lambda r: row["admm"][str(r)]["reach_seconds"] or float("inf"))
        admm_cells = []
        for rho in rhos:
            t = row["admm"][str(rho)]
            admm_cells.append(f"{t['reach_iterations']} it / {t['reach_seconds'] * 1e3:.0f} ms" if t["reach_iterations"]
                              else f"not in {len(t['errors'])} ({t['errors'][-1]:.4f})")
        und = row["admm_undamped"]
        und_cell = f"{und['reach_iterations']} it" if und["reach_iterations"] else f"{und['errors'][-1]:.4f}"
        reached = [(lr, row["gd"][str(lr)]) for lr in lrs if row["gd"][str(lr)]["reach_iterations"]]
        if reached:
            lr, g = min(reached, key=lambda p: p[1]["reach_seconds"])
            gd_cell = f"{g['reach_iterations']} it / {g['reach_seconds'] * 1e3:.0f} ms ({lr})"
            admm_s = row["admm"][str(best_rho)]["reach_seconds"]
            ratio = f"{g['reach_seconds'] / admm_s:.1f}×" if admm_s else "—"
        else:
            best = min(lrs, key=lambda lr: row["gd"][str(lr)]["errors"][-1])
            gd_cell, ratio = f"not reached ({row['gd'][str(best)]['errors'][-1]:.4f}, lr {best})", "—"
        lines.append(f"| {row['target']} | {row['layer']} | {row['masked']:.3f} | {row['sparsegpt']['error']:.4f} | "
                     + " | ".join(admm_cells) + f" | {und_cell} | {gd_cell} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], rhos, lrs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(len(targets), 2, figsize=(12, 4 * len(targets)), squeeze=False)
    for row_axes, target in zip(axes, targets):
        mine = [r for r in rows if r["target"] == target]
        for r in mine:
            for i, rho in enumerate(rhos):
                t = r["admm"][str(rho)]
                style = dict(color=f"C{i}", alpha=0.35, lw=0.8)
                row_axes[0].plot(range(1, len(t["errors"]) + 1), t["errors"], **style)
                row_axes[1].plot(t["seconds"], t["errors"], **style)
            best = min(lrs, key=lambda lr: r["gd"][str(lr)]["errors"][-1])
            g = r["gd"][str(best)]
            row_axes[0].plot(range(1, len(g["errors"]) + 1), g["errors"], color="k", alpha=0.35, lw=0.8, ls="--")
            row_axes[1].plot(g["seconds"], g["errors"], color="k", alpha=0.35, lw=0.8, ls="--")
        for ax, xlabel in zip(row_axes, ("iterations", "seconds")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axhline(1 + WITHIN, color="r", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("error / exact optimum")
            ax.set_title(f"Wanda mask {target}: ADMM ρ∈{rhos} (colours), best-lr Adam GD (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--blocks", default="0,15,29")
    parser.add_argument("--targets", default="0.6,0.7,2:4")
    parser.add_argument("--rhos", default="0.1,0.3,1,3,10")
    parser.add_argument("--lrs", default="0.001,0.003,0.01,0.03,0.1")
    parser.add_argument("--iterations", type=int, default=100, help="ADMM iterations (GD gets 10×)")
    parser.add_argument("--block-iterations", default="15,20,30,50,100")
    parser.add_argument("--nsamples", type=int, help="calibration windows (default: the preset's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    if args.nsamples:
        preset["nsamples"] = args.nsamples
    rhos = [float(x) for x in args.rhos.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    block_ids = [int(x) for x in args.blocks.split(",")]
    model, tokenizer = load_dense(preset)
    calibration, _ = build_windows(preset, tokenizer)
    grams = capture_grams(model, calibration, block_ids, batch=8)
    rows, blocks = [], []
    for target in args.targets.split(","):
        pattern = SparsityPattern.parse(target)
        wanda = build_layer_solver("wanda")
        for name, entry in grams.items():
            W, H = entry["layer"].get_weight(torch.device("cpu")), entry["H"].float()
            mask = wanda(W, H, wanda_pattern(pattern)).mask
            row = {"target": target, "layer": name, "type": layer_type(name), "shape": list(W.shape),
                   "tokens": entry["tokens"], **one_layer(W, H, mask, rhos, lrs, args.iterations)}
            rows.append(row)
            print(f"{target} {name}: ADMM ρ=1 {row['admm']['1.0']['reach_iterations']} it, masked {row['masked']:.3f}",
                  flush=True)
        for b in block_ids:
            entry = block_output_error(model, b, calibration, grams, pattern,
                                       [int(x) for x in args.block_iterations.split(",")], batch=8)
            blocks.append({"target": target, "block": b, **entry})
            print(f"{target} block {b}: {entry}", flush=True)
    stem = f"convergence_{args.preset}" + (f"_{args.tag}" if args.tag else "")
    out = BENCH / "results" / f"{stem}.json"
    save_json(out, {"commit": git_commit(), "threads": args.threads, "preset": preset, "rhos": rhos, "lrs": lrs,
                    "layers": rows, "blocks": blocks})
    plot(rows, rhos, lrs, BENCH / "results" / f"{stem}.png")
    print(summarize(rows, rhos, lrs))
    print(f"results in {out}")


def wanda_pattern(pattern: SparsityPattern) -> SparsityPattern:
    """Wanda's own granularity: per row for unstructured targets."""
    return pattern if pattern.is_nm else SparsityPattern(pattern.sparsity, per_row=True)


if __name__ == "__main__":
    main()
