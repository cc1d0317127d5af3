"""Prune a Hugging Face causal LM with llm-compressor (the maintained peer) on given token windows.

Runs inside bench/peers/.venv-llmc (see setup.sh); it does not import lmprune, so the two tools share
nothing but the windows file:

    {"calibration": LongTensor[n, seqlen], "evaluation": LongTensor[k, seqlen]}

Calibration windows go to `oneshot` as a dataset of ready `input_ids` (no re-tokenization, no BOS added,
no shuffling, batch 1, all n windows, seqlen tokens each). Perplexity is exp(mean next-token NLL) over
every predicted token of every evaluation window (logits[:, :-1] against ids[:, 1:], summed, divided
by the total count), the same convention as lmprune's.

    .venv-llmc/bin/python run_llmcompressor.py --model PATH --windows FILE.pt
        --method sparsegpt|wanda (--sparsity S | --pattern 2:4) --out RESULT.json [--threads N] [--save-masks MASKS.pt]
        [--save-weights WEIGHTS.pt] [--perturb EPS --perturb-seed S] [--profile owl --owl-m M --owl-lambda L]

`--save-weights` saves the pruned weight of every measured Linear (the decoder blocks', not lm_head), so
that bench/zeroshot.py can load them into its own copy of the model and score the peer's model with the
same code as lmprune's.

`--perturb` (Wanda only) multiplies every input norm llm-compressor's Wanda computed by its own factor
1 + EPS·N(0, 1) before the mask is chosen: the perturbation bench/sensitivity.py applies to lmprune, so
the two tools' rounding noise floors can be compared.

`--profile owl` uses llm-compressor's own OWL allocation (`sparsity_profile="owl"`, `owl_m`, `owl_lmbda`; it has
no defaults, both must be given): one sparsity per decoder layer from that layer's share of outlier scores
|W|·act > M × the layer's mean. In 0.14.0.1 the profile cannot run through `oneshot`: its activation pass
(`_get_activations` → `run_calibration`) fires lifecycle events while the modifier is still initializing
("Cannot invoke event before initializing"); and had it run, the per-decoder-layer dict it returns matches
neither the per-Linear `targets=["Linear"]` count nor the `list` case that hands sparsities to layers. So the
script calls llm-compressor's `_infer_owl_layer_sparsity` itself, inside an initialized empty session (as
llm-compressor's own unit test of it does), on the same calibration windows and the dense model, and then
gives those sparsities to the modifier as its documented per-target list, with the decoder layers as targets.
Every number OWL produces is llm-compressor's; only the plumbing around it is ours.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    p.add_argument("--windows", required=True, help="torch file with 'calibration' and 'evaluation' LongTensors")
    p.add_argument("--method", required=True, choices=["sparsegpt", "wanda"])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="unstructured sparsity in (0, 1)")
    target.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4")
    p.add_argument("--out", required=True, help="result JSON path")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--dense", action="store_true", help="also measure the dense model's perplexity first")
    p.add_argument("--save-masks", help="also save {layer name: bool keep-mask} of every measured Linear here")
    p.add_argument("--save-weights", help="also save {layer name: pruned weight} of every measured Linear here")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="a targeted layer whose measured sparsity falls short of the target by more fails")
    p.add_argument("--perturb", type=float, default=0.0,
                   help="Wanda only: scale each input norm by 1 + PERTURB·N(0, 1) (rounding-noise study)")
    p.add_argument("--perturb-seed", type=int, default=0)
    p.add_argument("--profile", choices=["uniform", "owl"], default="uniform",
                   help="owl: llm-compressor's OWL sparsity per decoder layer (unstructured --sparsity only)")
    p.add_argument("--owl-m", type=int, default=5, help="owl: outlier threshold, M × the layer's mean score")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="owl: layer sparsities span 2λ around the target")
    args = p.parse_args(argv)
    if args.profile == "owl" and args.pattern is not None:
        p.error("--profile owl needs --sparsity: an N:M pattern fixes every group's sparsity")
    if args.perturb and args.method != "wanda":
        p.error("--perturb applies to --method wanda only")
    if args.sparsity is not None and not 0.0 < args.sparsity < 1.0:
        p.error("--sparsity must be in (0, 1)")
    if args.pattern is not None:
        m = re.fullmatch(r"(\d+):(\d+)", args.pattern)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            p.error(f"--pattern must look like N:M with 0 < N < M, got {args.pattern!r}")
    return args


def load_windows(path):
    import torch

    data = torch.load(path, map_location="cpu")
    for key in ("calibration", "evaluation"):
        t = data.get(key) if isinstance(data, dict) else None
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.dtype != torch.long:
            sys.exit(f"{path}: expected {key!r} as a 2-D LongTensor [n, seqlen], got {type(t).__name__}")
    return data["calibration"], data["evaluation"]


def perplexity(model, windows, batch_size):
    # Mirrors lmprune.evaluate.perplexity on purpose: this runs in llm-compressor's venv, without lmprune.
    import torch
    import torch.nn.functional as F

    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(batch_size):
            logits = model(input_ids=batch, use_cache=False).logits
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                batch[:, 1:].reshape(-1),
                reduction="sum",
            )
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def is_lm_head(name):
    return re.match(r".*lm_head", name) is not None


def measure(model, n, m):
    """Measured sparsity of every Linear outside lm_head; with N:M also the count of groups breaking it."""
    import torch

    layers, zeros, total = {}, 0, 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or is_lm_head(name):
            continue
        w = module.weight.detach()
        z = int((w == 0).sum())
        entry = {"shape": list(w.shape), "sparsity": z / w.numel()}
        if n:
            cols = w.shape[1] - w.shape[1] % m
            groups = (w[:, :cols] != 0).reshape(w.shape[0], -1, m).sum(-1)
            entry["nm_violations"] = int((groups > n).sum())
        layers[name] = entry
        zeros += z
        total += w.numel()
    return layers, (zeros / total if total else 0.0)


def perturb_wanda_norms(eps, seed):
    """Wrap llm-compressor's Wanda so each layer's squared input norms are scaled by (1 + eps·N(0,1))²."""
    import torch
    from llmcompressor.modifiers.pruning.wanda import base

    generator = torch.Generator().manual_seed(seed)
    original = base.sparsify_weight

    def perturbed(module, row_scalars_dict, **kwargs):
        norms_squared = row_scalars_dict[module]
        scale = 1.0 + eps * torch.randn(norms_squared.shape[0], generator=generator)
        row_scalars_dict[module] = norms_squared * scale.to(norms_squared) ** 2
        return original(module=module, row_scalars_dict=row_scalars_dict, **kwargs)

    base.sparsify_weight = perturbed


def owl_block_sparsities(modifier_class, model, calib, sparsity, owl_m, owl_lambda):
    """llm-compressor's OWL sparsity of every decoder layer, {name: sparsity} in model order (see the docstring)."""
    import torch
    from compressed_tensors.utils import match_named_modules
    from llmcompressor.core import create_session
    from llmcompressor.utils.pytorch.module import infer_sequential_targets

    block_classes = infer_sequential_targets(model)
    blocks = dict(match_named_modules(model, block_classes))
    profiler = modifier_class(sparsity=sparsity, sparsity_profile="owl", owl_m=owl_m, owl_lmbda=owl_lambda,
                              targets=block_classes, ignore=["re:.*lm_head"])
    # Batches as oneshot's loader gives them here: one window each, no padding.
    loader = torch.utils.data.DataLoader([{"input_ids": row} for row in calib], batch_size=1)
    with create_session() as session:
        session.initialize(model=model)
        sparsities = profiler._infer_owl_layer_sparsity(model, blocks, loader)
    return block_classes, {name: float(sparsities[name]) for name in blocks}


def block_of(layer_name, block_names):
    """The decoder layer holding a Linear ("model.layers.3" for "model.layers.3.mlp.up_proj")."""
    return next((b for b in block_names if layer_name.startswith(b + ".")), None)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    if args.method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier as Modifier
    else:
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier as Modifier

    if args.perturb:
        perturb_wanda_norms(args.perturb, args.perturb_seed)

    calib, evaluation = load_windows(args.windows)
    n_calib, seqlen = calib.shape
    print(f"[llmc] windows: calibration {tuple(calib.shape)}, evaluation {tuple(evaluation.shape)}", flush=True)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    lm_head = model.get_output_embeddings()
    lm_head_before = lm_head.weight.detach().clone() if lm_head is not None else None

    result = {"tool": "llmcompressor", "version": importlib.metadata.version("llmcompressor"),
              "method": args.method + ("+owl" if args.profile == "owl" else ""),
              "target": args.pattern or str(args.sparsity),
              **({"perturb": args.perturb, "perturb_seed": args.perturb_seed} if args.perturb else {})}
    if args.dense:
        t0 = time.perf_counter()
        result["dense_perplexity"] = perplexity(model, evaluation, args.eval_batch_size)
        print(f"[llmc] dense perplexity {result['dense_perplexity']:.4f} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)

    owl_seconds = 0.0  # OWL's dense activation pass, counted in prune_seconds
    if args.pattern:
        n, m = (int(x) for x in args.pattern.split(":"))
        # llm-compressor ignores `sparsity` under an N:M mask_structure; set it to the implied value.
        modifier = Modifier(sparsity=0.5, mask_structure=args.pattern, targets=["Linear"],
                            ignore=["re:.*lm_head"])
    elif args.profile == "owl":
        n, m = 0, 0
        t0 = time.perf_counter()
        block_classes, block_sparsities = owl_block_sparsities(Modifier, model, calib, args.sparsity,
                                                               args.owl_m, args.owl_lambda)
        owl_seconds = time.perf_counter() - t0
        result["owl"] = {"m": args.owl_m, "lambda": args.owl_lambda, "block_sparsities": block_sparsities}
        print(f"[llmc] OWL sparsities of {len(block_sparsities)} decoder layers: "
              f"{min(block_sparsities.values()):.4f} to {max(block_sparsities.values()):.4f} "
              f"(mean {sum(block_sparsities.values()) / len(block_sparsities):.4f}; {owl_seconds:.1f}s)", flush=True)
        # A list holds one sparsity per target in model order; targets are the decoder layers, whose
        # Linears (less lm_head, outside them anyway) are all pruned, as with targets=["Linear"].
        modifier = Modifier(sparsity=list(block_sparsities.values()), mask_structure="0:0", targets=block_classes,
                            ignore=["re:.*lm_head"])
    else:
        n, m = 0, 0
        modifier = Modifier(sparsity=args.sparsity, mask_structure="0:0", targets=["Linear"],
                            ignore=["re:.*lm_head"])
    dataset = Dataset.from_dict({"input_ids": calib.tolist()})

    # Record what reaches the input embedding during oneshot, to prove the calibration tokens went in
    # exactly as given (no re-tokenization, BOS, truncation or padding).
    seen = set()
    embed = model.get_input_embeddings()
    hook = embed.register_forward_hook(
        lambda _mod, inputs, _out: seen.update(tuple(row) for row in inputs[0].reshape(-1, inputs[0].shape[-1]).tolist())
    )

    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=[modifier],
        pipeline="sequential",
        num_calibration_samples=n_calib,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    prune_seconds = time.perf_counter() - t0 + owl_seconds
    hook.remove()
    print(f"[llmc] pruned {result['method']} {result['target']}: {prune_seconds:.1f}s"
          + (f" (OWL's pass {owl_seconds:.1f}s + oneshot)" if owl_seconds else " (oneshot)"), flush=True)
    model.eval()

    layers, overall = measure(model, n, m)
    problems = []
    expected = set(tuple(row) for row in calib.tolist())
    calibration_tokens_match = seen == expected
    if not calibration_tokens_match:
        problems.append(f"calibration inputs differ from the windows: {len(seen)} distinct rows seen, "
                        f"{len(expected)} expected, {len(seen & expected)} in common")
    want = 1 - n / m if n else args.sparsity
    owl = result.get("owl")
    for name, entry in layers.items():
        # Under OWL each Linear answers to its decoder layer's sparsity; the model's total to the target.
        layer_want = owl["block_sparsities"].get(block_of(name, owl["block_sparsities"]), want) if owl else want
        if entry["sparsity"] < layer_want - args.tolerance:
            problems.append(f"{name}: measured sparsity {entry['sparsity']:.4f} below its target {layer_want:.4f}")
        if entry.get("nm_violations"):
            problems.append(f"{name}: {entry['nm_violations']} groups keep more than {n} of {m}")
    if owl:
        if abs(overall - want) > args.tolerance:
            problems.append(f"overall measured sparsity {overall:.4f} is not within {args.tolerance} of {want}")
        measured = {}
        for name, entry in layers.items():
            zeros_total = measured.setdefault(block_of(name, owl["block_sparsities"]), [0.0, 0])
            size = entry["shape"][0] * entry["shape"][1]
            zeros_total[0] += entry["sparsity"] * size
            zeros_total[1] += size
        owl["block_sparsities_measured"] = {block: zeros / size for block, (zeros, size) in measured.items()}
    lm_head_untouched = None
    if lm_head_before is not None:
        lm_head_untouched = bool(torch.equal(lm_head_before, model.get_output_embeddings().weight.detach()))
        if not lm_head_untouched:
            problems.append("lm_head changed")

    if args.save_masks:
        torch.save({name: module.weight.detach() != 0 for name, module in model.named_modules()
                    if name in layers}, args.save_masks)
    if args.save_weights:
        torch.save({name: module.weight.detach().clone() for name, module in model.named_modules()
                    if name in layers}, args.save_weights)
    t0 = time.perf_counter()
    ppl = perplexity(model, evaluation, args.eval_batch_size)
    eval_seconds = time.perf_counter() - t0
    print(f"[llmc] perplexity {ppl:.4f} on {evaluation.shape[0]} windows ({eval_seconds:.1f}s); "
          f"block-linear sparsity {overall:.4f} over {len(layers)} layers", flush=True)

    result.update({
        "perplexity": ppl,
        "prune_seconds": prune_seconds,
        "eval_seconds": eval_seconds,
        "sparsity": overall,
        "layers": layers,
        "lm_head_untouched": lm_head_untouched,
        "calibration_tokens_match": calibration_tokens_match,
        "calibration_windows": int(n_calib),
        "evaluation_windows": int(evaluation.shape[0]),
        "seqlen": int(seqlen),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "problems": problems,
    })
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"[llmc] wrote {args.out}", flush=True)
    if problems:
        print("[llmc] PRUNING CHECK FAILED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
