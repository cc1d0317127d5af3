"""--reconstruct block against --best-quality alone (issue #33): perplexity in and out of the calibration
domain, and prune time, in one run on one machine.

    python bench/reconstruct.py --preset stories260k --nsamples 32
    python bench/reconstruct.py --preset smollm2-135m --nsamples 16 --eval-windows 16

Rows: --best-quality ALPS at the target, then the same plus --reconstruct block (default settings unless
--opt reconstruct_*=… is given). "other" is the out-of-domain text: wikitext2 test for stories260K,
TinyStories valid for SmolLM2 (calibrated on wikitext2 valid).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict

import torch

from common import BENCH, PRESETS, SHARED, build, build_windows, git_commit, require_shared
from lmprune.config import ReconstructSettings, SparsityPattern, parse_options, settings_from_options
from lmprune.data import evaluation_windows, load_text, tokenize
from lmprune.evaluate import perplexity
from lmprune.model import describe_device, load_model, resolve_device
from lmprune.pipeline import prune_model

OTHER = {"stories260k": SHARED / "data" / "wikitext2.test.raw.txt",
         "smollm2-135m": SHARED / "data" / "tinystories.valid.txt"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(OTHER), default="stories260k")
    parser.add_argument("--target", default="0.7")
    parser.add_argument("--method", default="alps")
    parser.add_argument("--nsamples", type=int)
    parser.add_argument("--eval-windows", type=int)
    parser.add_argument("--opt", action="append", default=[], help="reconstruct_steps=, reconstruct_lr=, ...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    preset = dict(PRESETS[args.preset])
    preset["nsamples"] = args.nsamples or preset["nsamples"]
    preset["eval_windows"] = args.eval_windows or preset["eval_windows"]
    device = resolve_device(args.device)
    dense, tokenizer = load_model(preset["model"], "float32", progress=False)
    calibration, own = build_windows(preset, tokenizer)
    other = evaluation_windows(tokenize(tokenizer, load_text(str(OTHER[args.preset]), "evaluation")),
                               preset["eval_seqlen"], preset["eval_windows"] or own.shape[0])
    options = {k.removeprefix("reconstruct_"): v for k, v in parse_options(args.opt).items()}
    settings = settings_from_options(ReconstructSettings, options, "--reconstruct")
    method = build(args.method)
    pattern = method.pattern(SparsityPattern.parse(args.target))
    rows = []
    for reconstruct in (None, settings):
        model = copy.deepcopy(dense)
        tick = time.perf_counter()
        result = prune_model(model, calibration, method.layer_solver, pattern, device, progress=False,
                             sequential="layer", dense_targets=True, block_targets=True, reconstruct=reconstruct)
        seconds = time.perf_counter() - tick
        row = {"rows": "best-quality" + (" + reconstruct" if reconstruct else ""), "prune_seconds": seconds,
               "reconstruct_seconds": result.timings.get("reconstruct", 0.0),
               "ppl_own": perplexity(model, own, device, batch_size=8, progress=False),
               "ppl_other": perplexity(model, other, device, batch_size=8, progress=False),
               "blocks": [b["reconstruct"] for b in result.blocks if "reconstruct" in b]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "blocks"}), flush=True)
    out = BENCH / "results" / (f"reconstruct-{args.preset}-{args.target}-steps{settings.steps}-lr{settings.lr:g}"
                               f"-batch{settings.batch}.json")
    out.write_text(json.dumps({"preset": args.preset, "target": args.target, "method": args.method,
                               "nsamples": preset["nsamples"], "seqlen": preset["seqlen"],
                               "settings": asdict(settings), "device": describe_device(device),
                               "commit": git_commit(), "rows": rows}, indent=1))
    print(f"| rows | ppl {args.preset} own domain | ppl other domain | prune s (reconstruct s) |")
    for row in rows:
        print(f"| {row['rows']} | {row['ppl_own']:.3f} | {row['ppl_other']:.3f} | "
              f"{row['prune_seconds']:.0f} ({row['reconstruct_seconds']:.0f}) |")
    fits = rows[1]["blocks"]
    print("block error before → after: " + ", ".join(f"{f['error_before']:.3f}→{f['error_after']:.3f}"
                                                      for f in fits))


if __name__ == "__main__":
    main()
