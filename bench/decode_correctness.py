"""Are the sparse path's greedy generations the dense-with-zeros model's? (issue #31, item 4)

SmolLM2-135M pruned by the CLI (magnitude; 50%, 70%, 2:4), packed by `lmprune pack`, then for each prompt
greedy decoding with three models: the dense-with-zeros checkpoint (the reference), the packed model on
its portable path (SparseLinear unpacks each weight and calls the dense layer's own op) and on the
compiled batch-1 kernel (fp32 sums in its own order). Per path: how many generations are identical, and
the largest |logit difference| over the steps decoded from the same context (up to the first differing
token), absolute and relative to the largest |logit|. Where a generation differs, the dense model's gap
between its chosen token and the sparse path's at that step says whether rounding can explain it.

    python bench/decode_correctness.py [--targets 0.5 0.7 2:4] [--prompts 20] [--tokens 16]

The pruned and packed checkpoints go to a temporary directory, removed after.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PRESETS, require_shared  # noqa: E402

import lmprune  # noqa: E402
from lmprune.cli import main as cli  # noqa: E402
from lmprune.sparse.linear import SparseLinear  # noqa: E402

PROMPTS = [
    "The history of the city begins", "In 1998, the band released", "The river flows through", "She was born in",
    "The game was developed by", "During the war, the army", "The album received positive reviews", "Scientists have found",
    "The church was built in", "After the season ended, he", "The species is found in", "The film tells the story of",
    "In mathematics, a prime number", "The company announced that", "His first novel was", "The bridge was opened",
    "Once upon a time, there was", "The main building of the school", "According to the census, the population",
    "The song peaked at number", "The island is located", "He studied at the university of", "The ship was launched",
    "The election was held on",
]


def greedy(model, tokenizer, prompt: str, tokens: int) -> tuple[list[int], torch.Tensor]:
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, temperature=None,
                             top_k=None, top_p=None, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.eos_token_id)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.cat(out.logits).float()


def compare(reference: list, runs: list) -> dict:
    identical, max_abs, max_rel, divergences = 0, 0.0, 0.0, []
    for (expected, ref_logits), (actual, logits) in zip(reference, runs):
        same = next((i for i, (a, b) in enumerate(zip(actual, expected)) if a != b), len(expected))
        identical += same == len(expected)
        steps = same + 1 if same < len(expected) else same  # the differing step is still decoded from one context
        diff = (logits[:steps] - ref_logits[:steps]).abs().max().item()
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / ref_logits[:steps].abs().max().item())
        if same < len(expected):
            gap = (ref_logits[same, expected[same]] - ref_logits[same, actual[same]]).item()
            divergences.append({"step": same, "dense_gap": gap})
    return {"identical": identical, "max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_rel,
            "divergences": divergences}


def set_compiled(model, compiled: bool) -> int:
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    for layer in layers:
        layer.compiled = compiled
    return len(layers)


def run_target(target: str, work: Path, prompts: list[str], tokens: int) -> dict:
    from transformers import AutoTokenizer

    preset = PRESETS["smollm2-135m"]
    pruned, packed = work / f"pruned-{target}", work / f"packed-{target}"
    option = ("--pattern", target) if ":" in target else ("--sparsity", target)
    assert cli(["prune", preset["model"], "--method", "magnitude", *option, "--calib", preset["calib"],
                "--nsamples", "1", "--seqlen", "32", "--out", str(pruned), "--no-progress"]) == 0
    assert cli(["pack", str(pruned), "--out", str(packed)]) == 0
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    dense = lmprune.load_model(str(pruned))
    sparse = lmprune.load_model(str(packed), sparse=True)
    result = {"target": target, "prompts": len(prompts), "tokens": tokens,
              "dtype": str(next(dense.parameters()).dtype).removeprefix("torch."),
              "packed_layers": set_compiled(sparse, True)}
    reference = [greedy(dense, tokenizer, p, tokens) for p in prompts]
    for path, compiled in (("compiled", True), ("portable", False)):
        set_compiled(sparse, compiled)
        tick = time.perf_counter()
        result[path] = compare(reference, [greedy(sparse, tokenizer, p, tokens) for p in prompts])
        result[path]["seconds"] = round(time.perf_counter() - tick, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["0.5", "0.7", "2:4"])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    require_shared()
    torch.set_num_threads(args.threads)
    if not 20 <= args.prompts <= len(PROMPTS):
        sys.exit(f"--prompts: 20 to {len(PROMPTS)}")
    with tempfile.TemporaryDirectory(prefix="decode-correctness-") as tmp:
        for target in args.targets:
            result = run_target(target, Path(tmp), PROMPTS[:args.prompts], args.tokens)
            print(json.dumps(result), flush=True)
            for path in ("compiled", "portable"):
                r = result[path]
                gaps = ", ".join(f"{d['dense_gap']:.2e}" for d in r["divergences"]) or "-"
                print(f"| {target} | {path} | {r['identical']}/{result['prompts']} | {r['max_abs_logit_diff']:.2e} | "
                      f"{r['max_rel_logit_diff']:.2e} | {gaps} |", flush=True)


if __name__ == "__main__":
    main()
