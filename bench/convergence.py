"""How fast the fixed-mask updates reach the masked least-squares optimum on real layers (issue 32).

    python bench/convergence.py --preset smollm2-135m --blocks 0,15,29 --targets 0.6,0.7,2:4
    python bench/convergence.py --preset stories260k --blocks 0,2,4 --iterations 50 --tag smoke
    python bench/convergence.py --preset smollm2-135m --table-only   # table, verdict and plot from the JSONL

For every Linear of the chosen blocks (early, middle, late) it takes the layer's Gram matrix H = XᵀX over
the calibration tokens of the dense model, fixes Wanda's per-row mask at each target, and measures the
relative reconstruction error ‖XW − XŴ‖²/‖XW‖², divided by the exact optimum's (`--update exact`), for:
  - ADMM (`--update admm`, default dampening) at every ρ of --rhos, per iteration;
  - ADMM with dampening 0 at ρ = 1 (its fixed point is the exact optimum itself);
  - Adam gradient descent (`--update gd`) at every learning rate of --lrs, per step; the best per layer;
  - SparseGPT's one-pass update and the plain masked weights, as reference points.
Wall time per iteration is measured without the error evaluation (the observer's own time is taken off).
Then, per block, the dense block's output error (relative, on the calibration windows) after ADMM-Grad
prunes every layer of the block with 15, 20, 30 and 50 iterations: monotone or not.

Every finished layer and block is appended at once to bench/results/convergence_<preset>[_<tag>].jsonl; a
rerun with the same --nsamples and --iterations skips what is there, so a long run can be stopped and resumed.
The plot (convergence_<preset>[_<tag>].png), the table and the verdict numbers come from that file.
Timings need an otherwise idle machine and a fixed thread count (--threads).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH, PRESETS, append_jsonl, build_windows, git_commit, load_dense, load_jsonl, require_shared,
)
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


def best_gd(row: dict) -> tuple[str, dict, bool]:
    """The row's best Adam learning rate: the fastest to 1%, else the lowest final error; and whether it reached."""
    reached = [(lr, g) for lr, g in row["gd"].items() if g["reach_seconds"]]
    if reached:
        return *min(reached, key=lambda p: p[1]["reach_seconds"]), True
    return *min(row["gd"].items(), key=lambda p: p[1]["errors"][-1]), False


def summarize(rows: list[dict], rhos) -> str:
    """Per target and layer: ADMM's iterations/time to 1% at each ρ, and undamped, against the best GD's."""

    def reach(t: dict) -> str:
        return (f"{t['reach_iterations']} it / {t['reach_seconds'] * 1e3:.0f} ms" if t["reach_iterations"]
                else f"not in {len(t['errors'])} ({t['errors'][-1]:.4f})")

    lines = ["| target | layer | masked | SparseGPT | " + " | ".join(f"ADMM ρ={r}" for r in rhos)
             + " | ADMM λ=0 ρ=1 | best GD (lr) | GD/ADMM λ=0 time |", "|" + "---|" * (8 + len(rhos))]
    for row in rows:
        und = row["admm_undamped"]
        lr, g, reached = best_gd(row)
        gd_cell = f"{reach(g)} ({lr})" if reached else f"not reached ({g['errors'][-1]:.4f}, lr {lr})"
        ratio = f"{g['reach_seconds'] / und['reach_seconds']:.1f}×" if reached and und["reach_seconds"] else "—"
        lines.append(f"| {row['target']} | {row['layer']} | {row['masked']:.3f} | {row['sparsegpt']['error']:.4f} | "
                     + " | ".join(reach(row["admm"][str(rho)]) for rho in rhos)
                     + f" | {reach(und)} | {gd_cell} | {ratio} |")
    return "\n".join(lines)


def plot(rows: list[dict], rhos, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(len(targets), 2, figsize=(12, 4 * len(targets)), squeeze=False)
    for row_axes, target in zip(axes, targets):
        mine = [r for r in rows if r["target"] == target]
        for r in mine:
            curves = [(r["admm"][str(rho)], dict(color=f"C{i}")) for i, rho in enumerate(rhos)]
            curves += [(r["admm_undamped"], dict(color="k")), (best_gd(r)[1], dict(color="k", ls="--"))]
            for t, style in curves:
                style.update(alpha=0.35, lw=0.8)
                row_axes[0].plot(range(1, len(t["errors"]) + 1), t["errors"], **style)
                row_axes[1].plot(t["seconds"], t["errors"], **style)
        for ax, xlabel in zip(row_axes, ("iterations", "seconds")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axhline(1 + WITHIN, color="r", lw=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("error / exact optimum")
            ax.set_title(f"Wanda mask {target}, {len(mine)} layers")
    fig.suptitle(f"ADMM λ=0.1 at ρ ∈ {rhos} (colours), ADMM λ=0 ρ=1 (black), best Adam GD (dashed); "
                 "red: 1% above the optimum", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def row_key(row: dict) -> tuple:
    """What a finished row stands for: a rerun with the same setup skips it."""
    return (row["kind"], row["target"], row.get("layer", row.get("block")), row["nsamples"], row["iterations"])


def verdict(rows: list[dict]) -> str:
    """Per target, the numbers of the paper's claim: undamped ADMM to 1% against the best Adam GD."""
    lines = []
    for target in sorted({r["target"] for r in rows}):
        mine = [r for r in rows if r["target"] == target]
        und = [r["admm_undamped"] for r in mine]
        reached = sorted(u["reach_iterations"] for u in und if u["reach_iterations"])
        within20 = sum(1 for it in reached if it <= 20)
        ratios, gd_steps = [], []
        for r, u in zip(mine, und):
            best = min((g for g in r["gd"].values() if g["reach_seconds"]), key=lambda g: g["reach_seconds"],
                       default=None)
            if best:
                gd_steps.append(best["reach_iterations"])
                if u["reach_seconds"]:
                    ratios.append(best["reach_seconds"] / u["reach_seconds"])
        lines.append(
            f"{target}: ADMM λ=0 ρ=1 within 1% in {len(reached)} of {len(mine)} layers, {within20} within 20 it"
            + (f" (median {statistics.median(reached):g} it, {reached[0]}–{reached[-1]})" if reached else "")
            + f"; best GD within 1% in {len(gd_steps)} layers"
            + (f" (median {statistics.median(gd_steps):g} steps)" if gd_steps else "")
            + (f"; GD/ADMM λ=0 time median {statistics.median(ratios):.1f}× "
               f"({min(ratios):.1f}–{max(ratios):.1f}×, "
               f"{len(ratios)} layers, {sum(1 for x in ratios if x >= 10)} at ≥ 10×)" if ratios else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--blocks", default="0,15,29")
    parser.add_argument("--targets", default="0.6,0.7,2:4")
    parser.add_argument("--rhos", default="0.1,0.3,1,3,10")
    parser.add_argument("--lrs", default="0.03", help="Adam learning rates (0.03 was the best of 0.01/0.03 for "
                                                      "every layer at 70%%)")
    parser.add_argument("--iterations", type=int, default=50, help="ADMM iterations (GD gets 10×)")
    parser.add_argument("--block-iterations", default="15,20,30,50")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    parser.add_argument("--table-only", action="store_true", help="the table, verdict and plot from the JSONL")
    args = parser.parse_args()
    stem = f"convergence_{args.preset}" + (f"_{args.tag}" if args.tag else "")
    out = BENCH / "results" / f"{stem}.jsonl"
    targets = args.targets.split(",")
    rhos = [float(x) for x in args.rhos.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    block_ids = [int(x) for x in args.blocks.split(",")]
    block_iterations = [int(x) for x in args.block_iterations.split(",")]
    setup = {"nsamples": args.nsamples, "iterations": args.iterations}
    if not args.table_only:
        run(args, out, targets, rhos, lrs, block_ids, block_iterations, setup)
    rows = [r for r in load_jsonl(out) if r["target"] in targets and all(r[k] == v for k, v in setup.items())]
    layers = [r for r in rows if r["kind"] == "layer"]
    if layers:
        plot(layers, rhos, BENCH / "results" / f"{stem}.png")
        print(summarize(layers, rhos))
        print(verdict(layers))
    for b in (r for r in rows if r["kind"] == "block"):
        print(f"{b['target']} block {b['block']}: " + " → ".join(f"{b[str(k)]:.5f}" for k in block_iterations)
              + (" (monotone)" if b["monotone"] else " (NOT monotone)"))
    print(f"results in {out}")


def run(args, out: Path, targets, rhos, lrs, block_ids, block_iterations, setup) -> None:
    """Measure every (target, layer) and (target, block) not yet in `out`, appending each as it finishes."""
    finished = {row_key(r) for r in load_jsonl(out)}
    # a target's blocks are measured after its layers: all its blocks there means the target is done
    todo = [t for t in targets if any(("block", t, b, args.nsamples, args.iterations) not in finished
                                      for b in block_ids)]
    if not todo:
        return
    require_shared()
    torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset], nsamples=args.nsamples)
    model, tokenizer = load_dense(preset)
    calibration, _ = build_windows(preset, tokenizer)
    grams = capture_grams(model, calibration, block_ids, batch=8)
    common = {"commit": git_commit(), "threads": args.threads, **setup, "rhos": rhos, "lrs": lrs}
    for target in targets:
        pattern = SparsityPattern.parse(target)
        wanda = build_layer_solver("wanda")
        for name, entry in grams.items():
            if ("layer", target, name, args.nsamples, args.iterations) in finished:
                continue
            W, H = entry["layer"].get_weight(torch.device("cpu")), entry["H"].float()
            mask = wanda(W, H, wanda_pattern(pattern)).mask
            row = {"kind": "layer", "target": target, "layer": name, "type": layer_type(name), "shape": list(W.shape),
                   "tokens": entry["tokens"], **common, **one_layer(W, H, mask, rhos, lrs, args.iterations)}
            append_jsonl(out, row)
            print(f"{target} {name}: ADMM λ=0 {row['admm_undamped']['reach_iterations']} it, "
                  f"masked {row['masked']:.3f}", flush=True)
        for b in block_ids:
            if ("block", target, b, args.nsamples, args.iterations) in finished:
                continue
            entry = block_output_error(model, b, calibration, grams, pattern, block_iterations, batch=8)
            append_jsonl(out, {"kind": "block", "target": target, "block": b, **common, **entry})
            print(f"{target} block {b}: {entry}", flush=True)


def wanda_pattern(pattern: SparsityPattern) -> SparsityPattern:
    """Wanda's own granularity: per row for unstructured targets."""
    return pattern if pattern.is_nm else SparsityPattern(pattern.sparsity, per_row=True)


if __name__ == "__main__":
    main()
