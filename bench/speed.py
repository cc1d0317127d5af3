"""Prune time per method (forward passes vs solves), peak RSS, and solve time vs layer width.

    python bench/speed.py --preset stories260k --target 0.6          # whole-model timings, one run
    python bench/speed.py --layers --widths 512,1024,2048,4096       # synthetic square layers
    python bench/speed.py --preset smollm2-135m --device cuda        # on a GPU (files get a -cuda suffix)

Every method runs in its own subprocess (so peak RSS is its own) with a fixed thread count; run it on
an otherwise idle machine and compare ratios from one invocation, not absolute seconds across runs.
Results: bench/results/speed_<preset>.json / speed_layers.json and a table in bench/RESULTS.md. GPU
timings synchronise the device before every clock read, so each phase is charged its own kernels.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    split_methods,
    BENCH, METHODS, PRESETS, build, build_windows, load_dense, prune, replace_section,
    require_shared, save_json,
)
from lmprune.config import SparsityPattern  # noqa: E402
from lmprune.model import describe_device, device_clock, resolve_device  # noqa: E402
from lmprune.solvers import InputStats  # noqa: E402


def one_model_run(preset_name: str, method: str, target: str, threads: int, nsamples: int | None,
                  device: torch.device, blocks: int | None = None) -> dict:
    torch.set_num_threads(threads)
    preset = dict(PRESETS[preset_name])
    if nsamples:
        preset["nsamples"] = nsamples
    model, tokenizer = load_dense(preset)
    if blocks:
        keep_first_blocks(model, blocks)
    calibration, _ = build_windows(preset, tokenizer)
    tick = time.perf_counter()
    result = prune(model, method, target, calibration, device, layer_errors=False)
    total = time.perf_counter() - tick
    t = result.timings
    return {"method": method, "target": target, "total_s": total, "solve_s": t["solve"] + t.get("refine", 0.0),
            "forward_s": t["capture"] + t["gram_forward"] + t["propagate"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device": describe_device(device),
            **({"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {})}


def keep_first_blocks(model, count: int) -> None:
    """Cut the model to its first `count` blocks: every block does the same work, so a few time a method at
    the model's real widths and calibration size in a fraction of the run."""
    from torch import nn

    from lmprune.model import find_blocks, text_config

    name, blocks = find_blocks(model)
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList(list(blocks)[:count]))
    config = text_config(model)
    config.num_hidden_layers = count
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:count]


def one_layer_run(method: str, width: int, target: str, threads: int, device: torch.device) -> dict:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4 * width, width, generator=g) @ (torch.eye(width) + torch.randn(width, width, generator=g) / width**0.5)
    H, W = (X.T @ X).to(device), torch.randn(width, width, generator=g).to(device)
    stats = InputStats(X.sum(0).to(device), X.shape[0])
    built = build(method)
    pattern = built.pattern(SparsityPattern.parse(target))
    if device.type == "cuda":  # the first CUDA call pays for kernel loading; time the second
        built.layer_solver(W, H, pattern, stats)
    tick = device_clock(device)
    built.layer_solver(W, H, pattern, stats)
    return {"method": method, "width": width, "target": target, "solve_s": device_clock(device) - tick,
            "device": describe_device(device)}


def spawn(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="stories260k")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--target", default="0.6")
    parser.add_argument("--nsamples", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the fastest is kept")
    parser.add_argument("--blocks", type=int, help="time only the model's first N blocks (cut before pruning)")
    parser.add_argument("--layers", action="store_true", help="synthetic layers instead of a model")
    parser.add_argument("--widths", default="512,1024,2048")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one method in this process
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    methods = split_methods(args.methods)
    device = resolve_device(args.device)
    # Timings on another device are another measurement: keep them beside the CPU's, not over them.
    suffix = "" if device.type == "cpu" else f"-{device.type}"

    if args.one:
        row = (one_layer_run(args.one, args.width, args.target, args.threads, device) if args.layers
               else one_model_run(args.preset, args.one, args.target, args.threads, args.nsamples, device,
                                  args.blocks))
        print(json.dumps(row))
        return

    common_args = ["--target", args.target, "--threads", str(args.threads), "--device", args.device]
    command = "python bench/speed.py " + " ".join(sys.argv[1:])
    if args.layers:
        rows = []
        for width in [int(w) for w in args.widths.split(",")]:
            for method in methods:
                runs = [spawn(["--layers", "--one", method, "--width", str(width), *common_args])
                        for _ in range(args.repeat)]
                rows.append(min(runs, key=lambda r: r["solve_s"]))
                print(rows[-1], file=sys.stderr)
        save_json(BENCH / "results" / f"speed_layers{suffix}.json", {"command": command, "runs": rows})
        replace_section(BENCH / "RESULTS.md", f"speed-layers{suffix}", layer_table(rows, command, args))
        return

    require_shared()
    rows = []
    for method in methods:
        extra = (["--nsamples", str(args.nsamples)] if args.nsamples else []) + \
                (["--blocks", str(args.blocks)] if args.blocks else [])
        runs = [spawn(["--preset", args.preset, "--one", method, *common_args, *extra]) for _ in range(args.repeat)]
        rows.append(min(runs, key=lambda r: r["total_s"]))
        print(rows[-1], file=sys.stderr)
    # A smaller calibration set is a different measurement: keep it beside the preset's, not over it.
    name = args.preset + (f"-n{args.nsamples}" if args.nsamples else "") + (f"-b{args.blocks}" if args.blocks else "") \
        + suffix
    save_json(BENCH / "results" / f"speed_{name}.json", {"command": command, "runs": rows})
    replace_section(BENCH / "RESULTS.md", f"speed-{name}", model_table(rows, command, args))


def model_table(rows, command, args) -> str:
    base = next((r for r in rows if r["method"] == "sparsegpt"), None)
    sizes = (f", {args.nsamples} calibration windows" if args.nsamples else "") + \
            (f", first {args.blocks} blocks only" if args.blocks else "")
    gpu = any("peak_gpu_mb" in r for r in rows)
    lines = [f"### Prune time: {args.preset}{sizes}, target {args.target}, {_where(rows, args)}", "",
             f"Command: `{command}`", "",
             "| method | total s | forward s | solve s | × sparsegpt (total) | peak RSS MB |" + (" peak GPU MB |" if gpu else ""),
             "|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    for r in rows:
        ratio = f"{r['total_s'] / base['total_s']:.2f}" if base else "—"
        lines.append(f"| {r['method']} | {r['total_s']:.1f} | {r['forward_s']:.1f} | {r['solve_s']:.1f} | {ratio} | "
                     f"{r['peak_rss_mb']:.0f} |" + (f" {r.get('peak_gpu_mb', 0):.0f} |" if gpu else ""))
    return "\n".join(lines)


def _where(rows, args) -> str:
    device = rows[0].get("device", "cpu") if rows else "cpu"
    return f"{args.threads} threads" if device == "cpu" else device


def _seconds(s: float) -> str:
    return f"{s:.2f}" if s >= 0.1 else f"{s:.2g}"  # GPU solves take milliseconds


def layer_table(rows, command, args) -> str:
    widths = sorted({r["width"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [f"### Solve time per layer vs width (square layer, 4·width tokens, target {args.target}, {_where(rows, args)})",
             "", f"Command: `{command}`", "",
             "| method | " + " | ".join(str(w) for w in widths) + " |", "|---|" + "---|" * len(widths)]
    for m in methods:
        cells = [next((_seconds(r["solve_s"]) for r in rows if r["method"] == m and r["width"] == w), "—") for w in widths]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
