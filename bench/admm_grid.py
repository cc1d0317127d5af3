"""ADMM's penalty ρ and iteration count end to end: perplexity and prune time (issue 32, item 3).

    python bench/admm_grid.py --preset smollm2-135m              # ADMM1 and ADMM-Grad, 60% and 70%, 4 ρ × 4 it
    python bench/admm_grid.py --preset stories260k --rhos 1 --iterations 5,20 --tag smoke
    python bench/admm_grid.py --preset smollm2-135m --table-only  # rewrite the RESULTS.md tables from the JSONL

Every cell prunes a fresh copy of the dense model with `admm1[rho=R,iterations=I]` or
`admm-grad[rho=R,iterations=I,gradual_steps=min(15,I)]` (ADMM-Grad's mask schedule must fit in its
iterations, so below 15 iterations the mask grows over all of them) and measures WikiText-2 test perplexity
on the preset's evaluation windows and the wall time of the prune (forward passes included).

Cells run in order of information: first the defaults (ρ = 1, 20 iterations) of every method and target, then
the rest of the defaults' row and column (ρ at 20 iterations, iterations at ρ = 1), nearest first, then the
other cells. Each finished cell is appended at once to bench/results/admm_grid_<preset>[_<tag>].jsonl, and a
restart skips the cells already there (same method, target, ρ, iterations, calibration and evaluation sizes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH, PRESETS, append_jsonl, build_windows, load_dense, load_jsonl, replace_section, require_shared, run_once,
)
from lmprune.model import resolve_device  # noqa: E402

DEFAULT_RHO, DEFAULT_ITERATIONS = 1.0, 20  # lmprune's defaults for admm1 and admm-grad
GRADUAL_STEPS = 15  # admm-grad's default mask schedule length


def spec(method: str, rho: float, iterations: int) -> str:
    """The bench method spec of one cell."""
    options = f"rho={rho:g},iterations={iterations}"
    if method == "admm-grad":
        options += f",gradual_steps={min(GRADUAL_STEPS, iterations)}"
    return f"{method}[{options}]"


def plan(methods: list[str], targets: list[str], rhos: list[float], iterations: list[int]) -> list[tuple]:
    """Every (method, target, ρ, iterations) cell, most informative first (see the module docstring)."""

    def distance(values: list, default, value) -> int:
        """Steps from the default along a sorted axis (a default outside the axis counts as its nearest)."""
        ordered = sorted(values)
        home = min(range(len(ordered)), key=lambda i: abs(ordered[i] - default))
        return abs(ordered.index(value) - home)

    def priority(cell):
        method, target, rho, its = cell
        on_row, on_column = its == DEFAULT_ITERATIONS, rho == DEFAULT_RHO
        tier = 0 if on_row and on_column else 1 if on_row or on_column else 2
        steps = distance(rhos, DEFAULT_RHO, rho) + distance(iterations, DEFAULT_ITERATIONS, its)
        return tier, steps, targets.index(target), methods.index(method)

    cells = [(m, t, r, i) for m in methods for t in targets for r in rhos for i in iterations]
    return sorted(cells, key=priority)


def cell_key(row: dict) -> tuple:
    return row["method"], row["target"], row["rho"], row["iterations"], row["nsamples"], row["eval_windows"]


def table(rows: list[dict], methods: list[str], targets: list[str], rhos: list[float], iterations: list[int]) -> str:
    """Per method and target, ρ down × iterations across: perplexity (prune seconds); defaults in bold."""
    cells = {(r["method"], r["target"], r["rho"], r["iterations"]): r for r in rows}
    out, not_started = [], []
    for method in methods:
        for target in targets:
            if not any(key[:2] == (method, target) for key in cells):
                not_started.append(f"{method} at {target}")
                continue
            out += [f"**{method} at {target}**: perplexity (prune s)", "",
                    "| ρ \\ iterations | " + " | ".join(str(i) for i in iterations) + " |",
                    "|---|" + "---|" * len(iterations)]
            for rho in rhos:
                line = []
                for its in iterations:
                    r = cells.get((method, target, rho, its))
                    text = f"{r['perplexity']:.2f} ({r['prune_seconds']:.0f})" if r else "—"
                    line.append(f"**{text}**" if (rho, its) == (DEFAULT_RHO, DEFAULT_ITERATIONS) and r else text)
                out.append(f"| {rho:g} | " + " | ".join(line) + " |")
            out.append("")
    done = len(cells)
    total = len(methods) * len(targets) * len(rhos) * len(iterations)
    out.append(f"{done} of {total} cells finished; — marks a cell not run"
               + (f"; not started: {', '.join(not_started)}." if not_started else "."))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--methods", default="admm1,admm-grad")
    parser.add_argument("--targets", default="0.6,0.7")
    parser.add_argument("--rhos", default="0.1,0.3,1,3")
    parser.add_argument("--iterations", default="5,10,20,50")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows (of the preset's length)")
    parser.add_argument("--eval-windows", type=int, help="evaluation windows (default: the preset's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tag", default="")
    parser.add_argument("--table-only", action="store_true", help="rewrite the RESULTS.md tables; run nothing")
    args = parser.parse_args()
    methods, targets = args.methods.split(","), args.targets.split(",")
    rhos = [float(x) for x in args.rhos.split(",")]
    iterations = [int(x) for x in args.iterations.split(",")]
    preset = dict(PRESETS[args.preset], nsamples=args.nsamples)
    if args.eval_windows:
        preset["eval_windows"] = args.eval_windows
    path = BENCH / "results" / (f"admm_grid_{args.preset}" + (f"_{args.tag}" if args.tag else "") + ".jsonl")
    marker = f"admm-grid-{args.preset}" + (f"-{args.tag}" if args.tag else "")
    setup = {"nsamples": preset["nsamples"], "eval_windows": preset["eval_windows"]}

    def write_table() -> None:
        rows = [r for r in load_jsonl(path) if all(r[k] == v for k, v in setup.items())]
        heading = (f"### ADMM ρ × iterations: {args.preset}, calibration {preset['nsamples']} × {preset['seqlen']}, "
                   f"evaluation {preset['eval_windows'] or 'all'} windows × {preset['eval_seqlen']}")
        body = table(rows, methods, targets, rhos, iterations)
        replace_section(BENCH / "RESULTS.md", marker, heading + "\n\n" + body)

    if args.table_only:
        write_table()
        return
    require_shared()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dense, tokenizer = load_dense(preset)
    calibration, evaluation = build_windows(preset, tokenizer)
    finished = {cell_key(r) for r in load_jsonl(path)}
    for method, target, rho, its in plan(methods, targets, rhos, iterations):
        key = (method, target, rho, its, setup["nsamples"], setup["eval_windows"])
        if key in finished:
            print(f"skip {method} {target} rho={rho:g} it={its} (done)", flush=True)
            continue
        result = run_once(dense, spec(method, rho, its), target, calibration, evaluation, device)
        row = {"method": method, "target": target, "rho": rho, "iterations": its, **setup, "threads": args.threads,
               "spec": spec(method, rho, its), **{k: result[k] for k in ("perplexity", "prune_seconds", "eval_seconds",
                                                                   "commit", "device", "timings", "summary")}}
        append_jsonl(path, row)
        print(f"{method} {target} rho={rho:g} it={its}: ppl {row['perplexity']:.2f}, "
              f"prune {row['prune_seconds']:.0f}s", flush=True)
        write_table()
    write_table()


if __name__ == "__main__":
    main()
