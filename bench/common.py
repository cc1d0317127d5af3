"""Shared pieces of the benchmarks: presets (model + data + sizes), window building, timed pruning."""

from __future__ import annotations

import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from lmprune.config import Allocation, SparsityPattern
from lmprune.data import calibration_windows, evaluation_windows, load_text, tokenize
from lmprune.evaluate import perplexity
from lmprune.methods import build_method
from lmprune.model import describe_device, load_model
from lmprune.pipeline import prune_model
from lmprune.report import summarize_layers

BENCH = Path(__file__).resolve().parent
SHARED = BENCH.parent.parent / "shared"
MOE_STORIES = BENCH / "runs" / "moe-stories"  # made by bench/train_moe.py, not in git

PRESETS = {
    "stories260k": dict(
        model=str(SHARED / "models" / "stories260K"),
        calib=str(SHARED / "data" / "tinystories.valid.txt"), nsamples=128, seqlen=256,
        eval=str(SHARED / "data" / "tinystories.valid.txt"), eval_seqlen=256, eval_windows=None,
    ),
    "smollm2-135m": dict(
        model="smollm2-135m",
        calib=str(SHARED / "data" / "wikitext2.valid.tokens.txt"), nsamples=64, seqlen=512,
        eval=str(SHARED / "data" / "wikitext2.test.raw.txt"), eval_seqlen=512, eval_windows=32,
    ),
    # A small trained Mixtral-style MoE (8 experts, top-2) for expert pruning. Create it first (≈15 min on
    # the CPU): `python bench/train_moe.py`. It writes the model and its story split: train.txt (90%,
    # calibration) and heldout.txt (10%, evaluation), so calibration never sees the evaluation text.
    "moe-stories": dict(
        model=str(MOE_STORIES),
        calib=str(MOE_STORIES / "train.txt"), nsamples=128, seqlen=256,
        eval=str(MOE_STORIES / "heldout.txt"), eval_seqlen=256, eval_windows=None,
        created_by="python bench/train_moe.py",
    ),
}

METHODS = ["magnitude", "wanda", "dsnot", "sparsegpt", "admm1", "admm-grad", "alps", "sparsellm"]
TARGETS = ["0.5", "0.6", "0.7", "0.8", "2:4"]  # run by default
TABLE_TARGETS = ["0.5", "0.6", "0.7", "0.8", "0.9", "2:4"]  # column order of the tables


def require_shared() -> None:
    if not SHARED.exists():
        sys.exit(f"skipped: {SHARED} not found (../shared beside the repo holds the models and data)")


def build_windows(preset: dict, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    calib_ids = tokenize(tokenizer, load_text(preset["calib"]))
    eval_ids = tokenize(tokenizer, load_text(preset["eval"], "evaluation"))
    return (
        calibration_windows(calib_ids, preset["nsamples"], preset["seqlen"], seed=0),
        evaluation_windows(eval_ids, preset["eval_seqlen"], preset["eval_windows"]),
    )


def split_methods(text: str) -> list[str]:
    """Split a --methods list on commas outside brackets: "wanda,dsnot[cycles=5,init=magnitude]" is two."""
    return [m for m in re.split(r",(?![^\[]*\])", text) if m]


def split_levers(method: str) -> tuple[str, Allocation, str, bool, bool]:
    """A spec's pipeline levers after "+": "alps+owl", "alps+depth+depth-slope=0.2+seq", "sparsegpt+owl-lambda=0.1"
    (owl-m / owl-lambda imply owl, depth-slope implies depth; dense: --dense-targets; block: --block-targets);
    returns (method spec, allocation, sequential, dense targets, block targets)."""
    base, *levers = method.split("+")
    kind, knobs, sequential, dense, block = "uniform", {}, "none", False, False
    for lever in levers:
        key, _, value = lever.partition("=")
        if key == "dense":
            dense = True
        elif key == "block":
            block = True
        elif key == "seq":
            sequential = "layer"
        elif key in ("owl", "depth"):
            kind = key
        elif key in ("owl-m", "owl-lambda", "depth-slope"):
            kind = key.partition("-")[0]
            knobs[key.replace("-", "_")] = float(value)
        else:
            raise ValueError(f"unknown lever {lever!r} in {method!r}")
    return base, Allocation(kind, **knobs), sequential, dense, block


def build(method: str):
    """lmprune's Method for a spec such as "admm-grad[schedule=slow,iterations=30]" (levers after "+" ignored)."""
    name, _, rest = split_levers(method)[0].partition("[")
    options = dict(pair.split("=", 1) for pair in rest.rstrip("]").split(",") if pair)
    return build_method(name, options=options)


def prune(model, method: str, target: str, calibration, device, progress=False, built=None,
          moe_calibration="routed", layer_errors=True):
    """Prune `model` in place with the method spec at the target; returns the pipeline's PruneResult.

    `layer_errors`: every layer's relative error, also for methods that read no XᵀX (the quality tables and
    plots show them); the speed bench turns it off to time what `lmprune prune` does."""
    built = built or build(method)
    _, allocation, sequential, dense, block = split_levers(method)
    return prune_model(model, calibration, built.layer_solver, built.pattern(SparsityPattern.parse(target)), device,
                       refiner=built.refiner, progress=progress, moe_calibration=moe_calibration,
                       allocation=allocation, sequential=sequential, dense_targets=dense,
                       block_targets=block, layer_errors=layer_errors)


def run_once(dense_model, method: str, target: str, calibration, evaluation, device, progress=False,
             built=None, moe_calibration="routed") -> dict:
    """Prune a copy of the dense model and evaluate it; returns the row the benchmarks store.

    `built` overrides the Method that `method` names (e.g. a wrapped layer solver).
    """
    model = copy.deepcopy(dense_model)
    tick = time.perf_counter()
    result = prune(model, method, target, calibration, device, progress=progress, built=built,
                   moe_calibration=moe_calibration)
    prune_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    ppl = perplexity(model, evaluation, device, batch_size=8, progress=progress)
    return {
        "tool": "lmprune", "method": method, "target": target, "perplexity": ppl,
        "prune_seconds": prune_seconds, "eval_seconds": time.perf_counter() - tick, "commit": git_commit(),
        "device": describe_device(device),
        "timings": result.timings, "summary": summarize_layers(result.layers), "allocation": result.allocation,
        "layers": [{k: r.get(k) for k in ("name", "error", "error_masked", "sparsity", "seconds", "tokens")}
                   for r in result.layers],
    }


def git_commit() -> str:
    """The checkout's commit (with "+dirty" for uncommitted changes), so every row says what code made it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(BENCH), *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:  # a copy without .git (e.g. sent to another machine): the sender names the commit
        return os.environ.get("LMPRUNE_COMMIT", "unknown")
    return commit + ("+dirty" if git("status", "--porcelain", "--", "../src") else "")


def load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"runs": []}


def load_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines results file (none if it is not there yet)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_jsonl(path: Path, row: dict) -> None:
    """Append one finished row at once, so an interrupted long run keeps every row it finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def replace_section(markdown: Path, marker: str, body: str) -> None:
    """Replace the text between <!-- marker:start --> and <!-- marker:end --> (appending if absent)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = markdown.read_text() if markdown.exists() else "# Benchmark results\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    markdown.write_text(text)


def require_model(preset: dict) -> None:
    """Exit with a message naming the script that makes a preset's model when that model is not there yet."""
    # config.json, not the directory: the training script writes its data split there before the model.
    if "created_by" in preset and not (Path(preset["model"]) / "config.json").is_file():
        sys.exit(f"no model at {preset['model']}: create it first with `{preset['created_by']}`")


def load_dense(preset: dict):
    require_model(preset)
    model, tokenizer = load_model(preset["model"])
    return model, tokenizer
