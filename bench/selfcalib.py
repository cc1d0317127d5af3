"""Self-generated calibration (`--calib self`) against real text, on SmolLM2-135M (issue #15).

    python bench/selfcalib.py                       # admm-grad, sparsegpt, alps × 50%, 70% × 3 sources
    python bench/selfcalib.py --table-only          # rewrite the RESULTS.md table from the JSON

Every (method, target) is calibrated three ways with the same number of windows of the same length:
text the model samples itself from its BOS token (`self`), WikiText-2 valid (in domain for the
evaluation) and TinyStories (out of domain). All are evaluated on the smollm2-135m preset's WikiText-2
test windows. Rows go to bench/results/selfcalib_smollm2-135m.json after every run; a rerun skips the
rows already there (and reuses the self windows saved beside the JSON).
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH, PRESETS, SHARED, load_dense, load_json, replace_section, require_shared, run_once, save_json, split_methods,
)
from lmprune.data import calibration_windows, evaluation_windows, load_text, tokenize  # noqa: E402
from lmprune.model import describe_device, resolve_device  # noqa: E402
from lmprune.selfcalib import self_calibration  # noqa: E402

PRESET = "smollm2-135m"
SOURCES = {
    "self": None,
    "wikitext2-valid": SHARED / "data" / "wikitext2.valid.tokens.txt",
    "tinystories": SHARED / "data" / "tinystories.valid.txt",
}
OUT = BENCH / "results" / f"selfcalib_{PRESET}.json"
MARKER = f"selfcalib-{PRESET}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="admm-grad,sparsegpt,alps")
    parser.add_argument("--targets", default="0.5,0.7")
    parser.add_argument("--sources", default=",".join(SOURCES))
    parser.add_argument("--nsamples", type=int, default=16)
    # 16 × 256 rather than the grid's 64 × 512: the shared 2-core CPU could not afford more in time.
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    data = load_json(OUT)
    if not args.table_only:
        run(args, data)
    table = format_table(load_json(OUT))
    replace_section(BENCH / "RESULTS.md", MARKER, table)
    print(table)


def run(args, data: dict) -> None:
    require_shared()
    torch.set_num_threads(args.threads)
    preset = PRESETS[PRESET]
    device = resolve_device(args.device)
    dense, tokenizer = load_dense(preset)
    evaluation = evaluation_windows(tokenize(tokenizer, load_text(preset["eval"], "evaluation")),
                                    preset["eval_seqlen"], preset["eval_windows"])
    data.setdefault("settings", {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0,
                                 "eval": preset["eval"], "eval_seqlen": preset["eval_seqlen"],
                                 "eval_windows": preset["eval_windows"]})
    if (data["settings"]["nsamples"], data["settings"]["seqlen"]) != (args.nsamples, args.seqlen):
        sys.exit(f"{OUT} holds {data['settings']['nsamples']} × {data['settings']['seqlen']} rows; "
                 "move it away to change the calibration size")
    data.setdefault("threads", args.threads)
    data.setdefault("device", describe_device(device))
    data.setdefault("machine", f"{platform.machine()} {platform.processor() or ''}".strip())
    if "dense" not in data:
        # The dense model's perplexity on these windows is in the quality grid's file (same preset).
        data["dense"] = load_json(BENCH / "results" / f"quality_{PRESET}.json").get("dense", {})

    done = {(r["method"], r["target"], r["calib"]) for r in data["runs"]}
    sources = [s for s in args.sources.split(",") if s]
    windows: dict[str, tuple[torch.Tensor, float]] = {}
    # Method-major order: an interrupted run leaves whole method rows (all three sources) behind.
    for method in split_methods(args.methods):
        for target in [t for t in args.targets.split(",") if t]:
            for source in sources:
                if (method, target, source) in done:
                    continue
                if source not in windows:
                    windows[source] = calibration(source, dense, tokenizer, args, device)
                calib, generation_seconds = windows[source]
                row = run_once(dense, method, target, calib, evaluation, device, progress=not args.no_progress)
                row.update(calib=source, generation_seconds=generation_seconds, nsamples=args.nsamples,
                           seqlen=args.seqlen, threads=args.threads)
                data["runs"].append(row)
                save_json(OUT, data)
                print(f"{method} {target} {source}: perplexity {row['perplexity']:.2f} "
                      f"(prune {row['prune_seconds']:.0f} s)", flush=True)


def calibration(source: str, dense, tokenizer, args, device) -> tuple[torch.Tensor, float]:
    """The calibration windows of one source and the seconds spent generating them (0 for text)."""
    if source == "self":
        # Kept (gitignored) so a resumed run does not spend the CPU minutes again; same seed, same tokens.
        cached = BENCH / "results" / f"windows_selfcalib_{PRESET}_{args.nsamples}x{args.seqlen}.pt"
        if cached.exists():
            saved = torch.load(cached)
            return saved["ids"], saved["seconds"]
        ids, info = self_calibration(dense, tokenizer, args.nsamples, args.seqlen, 0, device,
                                     progress=not args.no_progress)
        torch.save({"ids": ids, "seconds": info["seconds"]}, cached)
        return ids, info["seconds"]
    ids = tokenize(tokenizer, load_text(str(SOURCES[source])))
    return calibration_windows(ids, args.nsamples, args.seqlen, seed=0), 0.0


def format_table(data: dict) -> str:
    settings = data.get("settings", {})
    runs = {(r["method"], r["target"], r["calib"]): r for r in data.get("runs", [])}
    dense = data.get("dense", {}).get("perplexity")
    lines = [
        f"### Self-calibration: {PRESET}",
        "",
        f"Calibration {settings.get('nsamples')} × {settings.get('seqlen')} tokens (seed 0) from each source; "
        f"evaluation on WikiText-2 test, {settings.get('eval_windows')} windows × {settings.get('eval_seqlen')} "
        f"tokens{f' (dense: **{dense:.2f}**)' if dense else ''}. {data.get('threads')} thread(s) on "
        f"{data.get('device')}, machine shared with other work (times are indicative).",
        "`self` = sampled by the dense model from its BOS token (temperature 1, EOS suppressed, 16 per batch); "
        "gen s = its generation time, prune s = pruning alone (evaluation excluded).",
        "",
        "Command: `python bench/selfcalib.py` (resumable; `--table-only` rewrites this table)",
        "",
        "| method | target | self | wikitext2-valid | tinystories | self gen s | prune s (self / wiki / tiny) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(m, t) for m, t, _ in runs}, key=lambda k: (["sparsegpt", "admm-grad", "alps"].index(k[0])
                                                             if k[0] in ("sparsegpt", "admm-grad", "alps") else 9, k[1]))
    for method, target in keys:
        rows = [runs.get((method, target, s)) for s in SOURCES]
        ppl = [f"{r['perplexity']:.2f}" if r else "—" for r in rows]
        prune = " / ".join(f"{r['prune_seconds']:.0f}" if r else "—" for r in rows)
        gen = f"{rows[0]['generation_seconds']:.0f}" if rows[0] else "—"
        lines.append(f"| {method} | {float(target):.0%} | {' | '.join(ppl)} | {gen} | {prune} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
