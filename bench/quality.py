"""Perplexity of every method × sparsity on a preset model, optionally beside llm-compressor.

    python bench/quality.py --preset stories260k                      # all methods × 50/60/70/80%/2:4
    python bench/quality.py --preset smollm2-135m --methods sparsegpt,wanda --peers
    python bench/quality.py --preset smollm2-135m --methods alps+owl,alps+depth,alps+owl+seq --targets 0.7
    python bench/quality.py --preset smollm2-135m --methods '' --targets 0.7 --peers --peer-methods sparsegpt+owl,wanda+owl

A method spec takes pipeline levers after "+": owl, depth, seq (--sequential layer), and owl-m=, owl-lambda=,
depth-slope= (which imply their allocation). A peer method (--peer-methods) is sparsegpt or wanda, optionally with
+owl (owl-m=, owl-lambda=): llm-compressor's own OWL profile, with lmprune's defaults M and λ unless given.

Results go to bench/results/quality_<preset>.json (saved after every run; an interrupted run resumes,
skipping rows already there; --fresh starts over) and a table in bench/RESULTS.md. A row whose time is
known to be disturbed by other work on the machine can be marked "timing_disturbed": true in the JSON;
the table then flags its time with *.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    split_levers, split_methods,
    BENCH, METHODS, PRESETS, TABLE_TARGETS, TARGETS, build_windows, load_dense, load_json, replace_section, require_shared,
    run_once, save_json,
)
from lmprune.config import Allocation  # noqa: E402
from lmprune.evaluate import perplexity  # noqa: E402
from lmprune.model import describe_device, resolve_device  # noqa: E402

PEER_PYTHON = BENCH / "peers" / ".venv-llmc" / "bin" / "python"
PEER_METHODS = ("sparsegpt", "wanda")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="stories260k")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--nsamples", type=int, help="override the preset's calibration windows")
    parser.add_argument("--eval-windows", type=int, help="override the preset's evaluation windows")
    parser.add_argument("--peers", action="store_true", help="also run llm-compressor (bench/peers/setup.sh)")
    parser.add_argument("--peer-methods", default=",".join(PEER_METHODS),
                        help="llm-compressor's methods with --peers: sparsegpt, wanda, each optionally +owl")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fresh", action="store_true", help="ignore earlier results in the JSON")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="rewrite the RESULTS.md table from the JSON; run nothing")
    args = parser.parse_args()
    peer_methods = [_peer_flags(m) for m in split_methods(args.peer_methods)] if args.peers else []
    if args.table_only:
        table = format_table(load_json(BENCH / "results" / f"quality_{args.preset}.json"))
        replace_section(BENCH / "RESULTS.md", f"quality-{args.preset}", table)
        _write_lever_grid(load_json(BENCH / "results" / f"quality_{args.preset}.json"))
        print(table)
        return
    require_shared()
    torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    if args.nsamples:
        preset["nsamples"] = args.nsamples
    if args.eval_windows:
        preset["eval_windows"] = args.eval_windows
    methods = split_methods(args.methods)
    targets = [t for t in args.targets.split(",") if t]
    out = BENCH / "results" / f"quality_{args.preset}.json"
    data = {"runs": []} if args.fresh else load_json(out)
    device = resolve_device(args.device)

    dense, tokenizer = load_dense(preset)
    calibration, evaluation = build_windows(preset, tokenizer)
    data.update(preset=args.preset, settings=preset)
    # The file's machine is the one that made its first rows; a row made elsewhere records its own device
    # (and the table flags its time), so a run on a lent GPU cannot relabel the CPU rows.
    data.setdefault("threads", args.threads)
    data.setdefault("device", describe_device(device))
    data.setdefault("machine", f"{platform.machine()} {platform.processor() or ''}".strip())
    data.pop("command", None)
    if "dense" not in data:
        tick = time.perf_counter()
        data["dense"] = {"perplexity": perplexity(dense, evaluation, device, 8, progress=not args.no_progress),
                         "eval_seconds": time.perf_counter() - tick}
        save_json(out, data)
    eval_s = data["dense"]["eval_seconds"]
    todo = [(m, t) for m in methods for t in targets if not _done(data, "lmprune", m, t)]
    command = "python bench/quality.py " + " ".join(f"'{a}'" if "[" in a or not a else a for a in sys.argv[1:])
    if (todo or args.peers) and command not in data.setdefault("commands", []):
        data["commands"].append(command)
    print(f"{args.preset}: dense perplexity {data['dense']['perplexity']:.3f}; {len(todo)} runs to do, "
          f"each ≈ 2 calibration passes ({calibration.numel()} tokens) + solves + {eval_s:.0f} s of evaluation",
          file=sys.stderr)

    for i, (method, target) in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {method} {target}", file=sys.stderr)
        row = run_once(dense, method, target, calibration, evaluation, device, progress=not args.no_progress)
        data["runs"].append(row)
        save_json(out, data)
        print(f"    perplexity {row['perplexity']:.3f}, prune {row['prune_seconds']:.1f} s", file=sys.stderr)

    if args.peers:
        run_peers(data, out, preset, calibration, evaluation, targets, args.threads, peer_methods)
    replace_section(BENCH / "RESULTS.md", f"quality-{args.preset}", format_table(data))
    _write_lever_grid(data)
    print(format_table(data))


def _done(data: dict, tool: str, method: str, target: str) -> bool:
    return any(r["tool"] == tool and r["method"] == method and r["target"] == target for r in data["runs"])


def _peer_flags(spec: str) -> tuple[str, list[str]]:
    """(spec, run_llmcompressor.py's flags) for a peer method such as "wanda" or "sparsegpt+owl"."""
    base, allocation, sequential, dense, block = split_levers(spec)
    if base not in PEER_METHODS or allocation.kind == "depth" or sequential != "none" or dense or block:
        sys.exit(f"--peer-methods: {spec!r} is not one of {', '.join(PEER_METHODS)}, optionally with +owl")
    if allocation.kind == "uniform":
        return spec, ["--method", base]
    if allocation.owl_m != int(allocation.owl_m):
        sys.exit(f"--peer-methods: {spec!r}: llm-compressor's owl_m is an integer")
    return spec, ["--method", base, "--profile", "owl", "--owl-m", str(int(allocation.owl_m)),
                  "--owl-lambda", repr(allocation.owl_lambda)]


def run_peers(data, out, preset, calibration, evaluation, targets, threads, peer_methods) -> None:
    if not PEER_PYTHON.exists():
        sys.exit(f"{PEER_PYTHON} missing: run bench/peers/setup.sh first")
    windows = out.with_name(f"windows_{data['preset']}.pt")
    torch.save({"calibration": calibration, "evaluation": evaluation}, windows)
    model_path = _model_path(preset["model"])
    for method, method_flags in peer_methods:
        for target in targets:
            if _done(data, "llmcompressor", method, target):
                continue
            if ":" in target and "--profile" in method_flags:
                print(f"[llm-compressor] {method} {target}: skipped, OWL needs an unstructured target", file=sys.stderr)
                continue
            result = out.with_name(f"peer_{data['preset']}_{method}_{target.replace(':', '-')}.json")
            flag = ["--pattern", target] if ":" in target else ["--sparsity", target]
            print(f"[llm-compressor] {method} {target}", file=sys.stderr)
            # A non-zero exit with a result means a sanity check failed (e.g. llm-compressor's Wanda
            # rounds the per-row count down: 68.75% at "70%"); keep the row, its measured sparsity shows it.
            subprocess.run([str(PEER_PYTHON), str(BENCH / "peers" / "run_llmcompressor.py"), "--model", model_path,
                            "--windows", str(windows), *method_flags, *flag, "--out", str(result),
                            "--threads", str(threads)], check=False)
            if not result.exists():
                sys.exit(f"llm-compressor {method} {target} failed without a result")
            row = load_json(result)
            row.pop("layers", None)
            row.update(tool="llmcompressor", method=method, target=target)
            data["runs"].append(row)
            save_json(out, data)
            result.unlink()


def _model_path(model: str) -> str:
    from lmprune.aliases import resolve_model

    return resolve_model(model)


def format_table(data: dict) -> str:
    runs = data["runs"]
    targets = [t for t in TABLE_TARGETS if any(r["target"] == t for r in runs)]
    tools_methods = []
    for r in runs:
        key = (r["tool"], r["method"])
        if key not in tools_methods:
            tools_methods.append(key)
    def order(key):
        base = key[1].partition("[")[0].partition("+")[0]
        return (METHODS.index(base) if base in METHODS else 99, key[1], key[0] != "lmprune")

    tools_methods.sort(key=order)
    settings = data["settings"]
    lines = [
        f"### Perplexity: {data['preset']}",
        "",
        f"Calibration {settings['nsamples']} × {settings['seqlen']} tokens of `{Path(settings['calib']).name}` (seed 0); "
        f"evaluation on `{Path(settings['eval']).name}`, {settings['eval_seqlen']}-token windows"
        + (f", first {settings['eval_windows']}" if settings.get("eval_windows") else ", whole file")
        + f". Dense: **{data['dense']['perplexity']:.2f}**. {data.get('threads')} threads on {data.get('device')}.",
        "",
        "Commands (each added the rows it names; earlier rows are kept):",
        *[f"- `{c}`" for c in data.get("commands", [])],
        "",
        "| tool | method | " + " | ".join(_label(t) for t in targets) + " | prune s (per target) |",
        "|---|---|" + "---|" * len(targets) + "---|",
    ]
    for tool, method in tools_methods:
        cells, times = [], []
        for t in targets:
            row = next((r for r in runs if r["tool"] == tool and r["method"] == method and r["target"] == t), None)
            cells.append(f"{row['perplexity']:.2f}" if row else "—")
            times.append((f"{row['prune_seconds']:.0f}" + ("*" if row.get("timing_disturbed") else "")
                          + ("†" if _elsewhere(data, row) else "")) if row else "—")
        lines.append(f"| {tool} | {method} | " + " | ".join(cells) + " | " + "/".join(times) + " |")
    if any(r.get("timing_disturbed") for r in runs):
        lines += ["", "\\* prune time inflated by another process that ran at the same time; the perplexity is unaffected."]
    elsewhere = sorted({r["device"] for r in runs if _elsewhere(data, r)})
    if elsewhere:
        lines += ["", f"† pruned and evaluated on {', '.join(elsewhere)}, not on {data.get('device')}: "
                  "its time is not comparable with the other rows'."]
    off = [r for r in runs if ":" not in r["target"] and "sparsity" in r
           and abs(r["sparsity"] - float(r["target"])) > 0.002]
    off += [r for r in runs if ":" not in r["target"] and "summary" in r
            and abs(r["summary"].get("sparsity", 0) - float(r["target"])) > 0.002]
    if off:
        lines += ["", "Measured sparsity differing from the target: " + "; ".join(
            f"{r['tool']} {r['method']} {_label(r['target'])}: {r.get('sparsity', r.get('summary', {}).get('sparsity')):.4f}"
            for r in off)]
    return "\n".join(lines)


GRID_METHODS = ("alps", "admm-grad", "sparsegpt", "wanda")  # issue #18's grid
GRID_ORDER = ("uniform", "owl", "depth", "seq", "owl+seq", "depth+seq")  # its levers; others follow


def _lever_key(row: dict) -> tuple[str, str]:
    """("alps", "owl+dense+seq") for a row of "alps+owl+dense+seq": the levers in one canonical order. A depth
    row is named by the slope it recorded: `depth` when that is the target's default slope, else
    depth-slope=X (rows made before the default depended on the target recorded 0.3 at every target)."""
    base, *levers = row["method"].split("+")
    used = (row.get("allocation") or {}).get("depth_slope")
    if used is not None and ":" not in row["target"]:
        default = Allocation("depth").slope_for(float(row["target"]))
        levers = [lever for lever in levers if lever.partition("=")[0] not in ("depth", "depth-slope")]
        levers.append("depth" if abs(used - default) < 1e-9 else f"depth-slope={used:g}")
    rank = {"owl": 0, "depth": 0, "dense": 1, "seq": 2, "block": 3}
    levers.sort(key=lambda lever: (rank.get(lever.partition("=")[0].partition("-")[0], 0), lever))
    return base, "+".join(levers) or "uniform"


def format_lever_grid(data: dict) -> str:
    """Issue #18's grid: each method of GRID_METHODS under every lever combination measured, a column per
    target; the lowest perplexity of each method and target in bold, a missing cell "—"."""
    runs = [r for r in data["runs"] if "[" not in r["method"] and r["method"].partition("+")[0] in GRID_METHODS]
    targets = [t for t in ("0.6", "0.7", "0.8", "2:4") if any(r["target"] == t for r in runs)]
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in runs:
        base, levers = _lever_key(r)
        rows.setdefault((base, levers, r["tool"]), {})[r["target"]] = r["perplexity"]

    def order(key):
        base, levers, tool = key
        known = GRID_ORDER.index(levers) if levers in GRID_ORDER else len(GRID_ORDER)
        return GRID_METHODS.index(base), tool != "lmprune", known, levers.count("+"), levers

    best = {}
    for (base, _, tool), cells in rows.items():
        for t, ppl in cells.items():
            if tool == "lmprune":
                best[base, t] = min(best.get((base, t), ppl), ppl)
    lines = [
        f"### Levers grid: {data['preset']}",
        "",
        ("Generated from the same JSON as the perplexity table above (rows with a lever, and each method's "
         "uniform row). Bold: the lowest of lmprune's cells for that method and target; —: not run."),
        "",
        "| method | levers | tool | " + " | ".join(_label(t) for t in targets) + " |",
        "|---|---|---|" + "---|" * len(targets),
    ]
    for key in sorted(rows, key=order):
        base, levers, tool = key
        cells = []
        for t in targets:
            ppl = rows[key].get(t)
            text = "—" if ppl is None else f"{ppl:.2f}"
            cells.append(f"**{text}**" if ppl is not None and tool == "lmprune" and ppl == best[base, t] else text)
        lines.append(f"| {base} | {levers} | {tool} | " + " | ".join(cells) + " |")
    cells = sum(1 for (b, levers, tool), c in rows.items() if tool == "lmprune" and levers in GRID_ORDER
                for t in c if t in ("0.6", "0.7", "0.8") or (t == "2:4" and levers in ("uniform", "seq")))
    wanted = len(GRID_METHODS) * (len(GRID_ORDER) * 3 + 2)
    lines += ["", (f"The issue's grid (these {len(GRID_METHODS)} methods × {{uniform, owl, depth}} × sequential "
                   f"on/off × 60/70/80%, and 2:4 with sequential on/off): {cells} of {wanted} cells measured.")]
    return "\n".join(lines)


def _write_lever_grid(data: dict) -> None:
    if any("+" in r["method"] for r in data["runs"]):
        replace_section(BENCH / "RESULTS.md", f"levers-{data['preset']}", format_lever_grid(data))


def _elsewhere(data: dict, row: dict) -> bool:
    return row.get("device", data.get("device")) != data.get("device")


def _label(target: str) -> str:
    return target if ":" in target else f"{float(target):.0%}"


if __name__ == "__main__":
    main()
