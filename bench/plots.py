"""Plots from bench/results/quality_<preset>.json: perplexity vs sparsity, and per-layer error.

    python bench/plots.py --preset stories260k [--layer-target 0.7]
Needs matplotlib (pip install -e ".[plots]"). Writes bench/results/<preset>_perplexity.png and
bench/results/<preset>_layer_error.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, METHODS, PRESETS, load_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="stories260k")
    parser.add_argument("--layer-target", default="0.7")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = load_json(BENCH / "results" / f"quality_{args.preset}.json")
    runs = [r for r in data["runs"] if ":" not in r["target"]]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    series = sorted({(r["tool"], r["method"]) for r in runs}, key=lambda k: (METHODS.index(k[1]) if k[1] in METHODS else 99, k[0]))
    for tool, method in series:
        points = sorted((float(r["target"]), r["perplexity"]) for r in runs if (r["tool"], r["method"]) == (tool, method))
        label = method if tool == "lmprune" else f"{method} ({tool})"
        ax.plot([p[0] * 100 for p in points], [p[1] for p in points], marker="o",
                linestyle="-" if tool == "lmprune" else "--", label=label)
    ax.axhline(data["dense"]["perplexity"], color="gray", linewidth=0.8, label="dense")
    _save(plt, fig, ax, "sparsity (%)", "perplexity (log)", f"{args.preset}: perplexity vs sparsity",
          f"{args.preset}_perplexity.png")

    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    for r in data["runs"]:
        if r["tool"] == "lmprune" and r["target"] == args.layer_target and r.get("layers"):
            ax.plot([layer["error"] for layer in r["layers"]], label=r["method"], linewidth=1)
    _save(plt, fig, ax, "layer (pruning order)", "relative reconstruction error",
          f"{args.preset}: per-layer error at {args.layer_target}", f"{args.preset}_layer_error.png")


def _save(plt, fig, ax, xlabel: str, ylabel: str, title: str, name: str) -> None:
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = BENCH / "results" / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(path)


if __name__ == "__main__":
    main()
