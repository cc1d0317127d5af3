"""MoE measurements on the trained Mixtral-style model (preset moe-stories, made by bench/train_moe.py).

    python bench/moe.py calibration   # --moe-calibration routed vs all, a few methods at 60/70%
    python bench/moe.py speed         # prune time of the MoE next to a dense model of equal active size
    python bench/moe.py checkpoint    # CLI prune at 60% per layer, reload in plain transformers, count zeros
    python bench/moe.py granularity   # Wanda and magnitude at 60%, per row vs per layer, experts kept or not

Results go to bench/results/moe_stories.json (resumable) and sections of bench/RESULTS.md.
The quality grid itself (every method × 50/60/70%/2:4) is bench/quality.py --preset moe-stories.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH, PRESETS, build_windows, git_commit, load_dense, load_json, prune, replace_section, require_shared,
    run_once, save_json,
)

OUT = BENCH / "results" / "moe_stories.json"
CAL_METHODS = ["sparsegpt", "alps"]
CAL_TARGETS = ["0.6"]
# The quality grid's sizes (bench/RESULTS.md): 32 calibration windows, 64 evaluation windows, so a CPU run
# of every cell fits a session; the preset's 128 windows are for a quiet machine or a GPU.
SIZES = dict(nsamples=32, eval_windows=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["calibration", "speed", "checkpoint", "granularity"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    preset = {**PRESETS["moe-stories"], **SIZES}
    data = load_json(OUT)
    data.setdefault("runs", [])
    command = "python bench/moe.py " + " ".join(sys.argv[1:])
    {"calibration": calibration, "speed": speed, "checkpoint": checkpoint,
     "granularity": granularity}[args.what](preset, data, command)


def calibration(preset, data, command) -> None:
    dense, tokenizer = load_dense(preset)
    calib, evaluation = build_windows(preset, tokenizer)
    cpu = torch.device("cpu")
    for method in CAL_METHODS:
        for target in CAL_TARGETS:
            for mode in ("routed", "all"):
                if any(r.get("kind") == "calibration" and (r["method"], r["target"], r["mode"]) == (method, target, mode)
                       for r in data["runs"]):
                    continue
                row = run_once(dense, method, target, calib, evaluation, cpu, moe_calibration=mode)
                row.update(kind="calibration", mode=mode, command=command)
                fallbacks = row["summary"]["layers_with_fallback"]
                row["fallback_experts"] = len(fallbacks)
                row.pop("layers")
                data["runs"].append(row)
                save_json(OUT, data)
                print(f"{method} {target} {mode}: {row['perplexity']:.3f} ({len(fallbacks)} fallbacks)", file=sys.stderr)
    rows = [r for r in data["runs"] if r.get("kind") == "calibration"]
    lines = ["| method | target | routed | all | experts on the magnitude fallback (routed) |", "|---|---|---|---|---|"]
    for method in CAL_METHODS:
        for target in CAL_TARGETS:
            got = {r["mode"]: r for r in rows if (r["method"], r["target"]) == (method, target)}
            if len(got) == 2:
                lines.append(f"| {method} | {target} | {got['routed']['perplexity']:.3f} | {got['all']['perplexity']:.3f} "
                             f"| {got['routed']['fallback_experts']} |")
    lines.append(f"\nCommand: `{command}` (commit {git_commit()}).")
    replace_section(BENCH / "RESULTS.md", "moe-calibration", "\n".join(lines))
    print("\n".join(lines))


@contextlib.contextmanager
def one_by_one():
    """Expert solves one at a time, as before they were batched (for the speed comparison)."""
    from lmprune.solvers import LayerSolver

    batched = LayerSolver.solve_batch
    LayerSolver.solve_batch = property(lambda self: None)
    try:
        yield
    finally:
        LayerSolver.solve_batch = batched


SPEED_METHODS = ("sparsegpt", "admm-grad", "alps")
SPEED_MODELS = ("moe", "moe one by one", "dense")


def speed(preset, data, command) -> None:
    """Prune time of the MoE (expert solves batched, and one by one) and of a dense Llama with the same active
    parameters (MLP width = top-k × expert width), random init, the same calibration windows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    moe, tokenizer = load_dense(preset)
    calib, _ = build_windows(preset, tokenizer)
    c = moe.config
    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size * c.num_experts_per_tok,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=True)).eval()
    cpu = torch.device("cpu")
    rows = []
    for method in SPEED_METHODS:
        for label, model in zip(SPEED_MODELS, (moe, moe, dense)):
            copy_ = copy.deepcopy(model)
            with one_by_one() if label == "moe one by one" else contextlib.nullcontext():
                tick = time.perf_counter()
                result = prune(copy_, method, "0.6", calib, cpu)
                seconds = time.perf_counter() - tick
            active = sum(p.numel() for n, p in model.named_parameters() if "layers" in n)
            rows.append(dict(kind="speed", model=label, method=method, seconds=seconds, timings=result.timings,
                             layers=len(result.layers), block_params=active, command=command, commit=git_commit()))
            if label == "moe":
                weights = {n: p.detach().clone() for n, p in copy_.named_parameters()}
            elif label == "moe one by one":
                rows[-1]["same_weights"] = all(torch.equal(weights[n], p) for n, p in copy_.named_parameters())
            print(rows[-1], file=sys.stderr)
    data["runs"] = [r for r in data["runs"] if r.get("kind") != "speed"] + rows
    save_json(OUT, data)
    lines = ["| method | model | layers solved | block parameters | capture+Gram+propagate s | solve s | total s "
             "| MoE / dense |", "|---|---|---|---|---|---|---|---|"]
    for method in SPEED_METHODS:
        pair = {r["model"]: r for r in rows if r["method"] == method}
        for label in SPEED_MODELS:
            r, t = pair[label], pair[label]["timings"]
            forward = t["capture"] + t["gram_forward"] + t["propagate"]
            ratio = f"{r['seconds'] / pair['dense']['seconds']:.2f}×" if label != "dense" else ""
            same = " (weights identical to batched)" if r.get("same_weights") else ""
            lines.append(f"| {method} | {label}{same} | {r['layers']} | {r['block_params']:,} | {forward:.1f} "
                         f"| {t['solve']:.1f} | {r['seconds']:.1f} | {ratio} |")
    lines.append(f"\nCommand: `{command}` (commit {git_commit()}), {torch.get_num_threads()} threads.")
    replace_section(BENCH / "RESULTS.md", "moe-speed", "\n".join(lines))
    print("\n".join(lines))


def granularity(preset, data, command) -> None:
    """Where Wanda loses to magnitude on this MoE: the per-row threshold, and in which layers."""
    from lmprune.config import SparsityPattern
    from lmprune.evaluate import perplexity
    from lmprune.pipeline import prune_model

    from common import build

    dense, tokenizer = load_dense(preset)
    calib, evaluation = build_windows(preset, tokenizer)
    cpu = torch.device("cpu")
    rows = []
    for method, per_row, skip in (("wanda", False, []), ("magnitude", True, []), ("wanda", True, [r"experts"])):
        model = copy.deepcopy(dense)
        built = build(method)
        prune_model(model, calib, built.layer_solver, SparsityPattern(0.6, per_row=per_row), cpu, skip=skip,
                    progress=False)
        rows.append(dict(kind="granularity", method=method, per_row=per_row, skip=skip, command=command,
                         perplexity=perplexity(model, evaluation, cpu, 8, progress=False), commit=git_commit()))
        print(rows[-1], file=sys.stderr)
    data["runs"] = [r for r in data["runs"] if r.get("kind") != "granularity"] + rows
    save_json(OUT, data)


def checkpoint(preset, data, command) -> None:
    """The CLI's checkpoint, reloaded by plain transformers: every expert slice exactly at 60%."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "alps60"
        subprocess.run([sys.executable, "-m", "lmprune.cli", "prune", preset["model"], "--method", "alps",
                        "--sparsity", "0.6", "--per-layer", "--calib", preset["calib"], "--nsamples", str(preset["nsamples"]),
                        "--seqlen", "256", "--eval", preset["eval"], "--eval-seqlen", "256",
                        "--eval-max-windows", str(preset["eval_windows"]), "--out", str(out),
                        "--no-progress"], check=True)
        model = AutoModelForCausalLM.from_pretrained(out)
        slices = []
        for name, p in model.named_parameters():
            if "experts" in name:
                for e in range(p.shape[0]):
                    zeros = int((p[e] == 0).sum())
                    slices.append((f"{name}[{e}]", zeros, int(p[e].numel() * 0.6)))
        report = load_json(out / "lmprune_report.json")
    wrong = [s for s in slices if s[1] != s[2]]
    row = dict(kind="checkpoint", slices=len(slices), wrong=wrong, perplexity=report["evaluation"][0]["perplexity"],
               command=command, commit=git_commit())
    data["runs"] = [r for r in data["runs"] if r.get("kind") != "checkpoint"] + [row]
    save_json(OUT, data)
    text = (f"`lmprune prune bench/runs/moe-stories --method alps --sparsity 0.6 --per-layer ...`, reloaded with "
            f"`AutoModelForCausalLM.from_pretrained`: {len(slices)} expert slices, {len(slices) - len(wrong)} at exactly "
            f"⌊numel·0.6⌋ zeros; perplexity {row['perplexity']:.3f}. Command: `{command}` (commit {git_commit()}).")
    replace_section(BENCH / "RESULTS.md", "moe-checkpoint", text)
    print(text)
    if wrong:
        sys.exit(f"slices off target: {wrong[:5]}")


if __name__ == "__main__":
    main()
