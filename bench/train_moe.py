"""Train a small Mixtral-style MoE on TinyStories on the CPU, for pruning benchmarks (issue 13, item 8).

Random weights cannot show whether per-expert calibration works; this gives lmprune a trained MoE whose
experts are fused 3-D tensors (transformers 5's MixtralExperts) and are all in use.

    python bench/train_moe.py                      # 15 minutes, 2 threads -> bench/runs/moe-stories
    python bench/quality.py --preset moe-stories   # then prune it

The model: hidden 128, 4 layers, 4 heads / 2 KV heads, 8 experts of intermediate 256, top-2, tied
embeddings, 512 positions; 3.41M parameters, 3.15M of them in experts, 1.05M active per token.
Made with `nice -n 5 python bench/train_moe.py --minutes 14 --threads 1` (one thread: on the shared,
oversubscribed 2-core machine two threads ran 3-10x slower per step). 667 steps of 8 x 256 tokens (1.37M
tokens, ~3.9 passes over the training part) in 14.0 min. Held-out perplexity 8.16 (154 windows of 256;
random is 512; the dense stories260K scores 5.12 on the whole file after training on all of TinyStories).
Expert shares of the top-2 assignments on the held-out text, per layer (uniform 0.125):
    layer 0: 0.112 0.151 0.122 0.128 0.118 0.119 0.119 0.130
    layer 1: 0.122 0.131 0.124 0.122 0.133 0.116 0.133 0.120
    layer 2: 0.134 0.123 0.118 0.118 0.134 0.129 0.125 0.119
    layer 3: 0.122 0.139 0.118 0.107 0.151 0.106 0.119 0.138
With transformers' pooled aux loss instead (coefficient 0.02 or 0.1) some experts got 0.000-0.004 of a
layer's tokens; see balance_loss.

The data is ../shared/data/tinystories.valid.txt, split by stories: the first 90% (by characters, cut at a
story start) trains the model and later calibrates the pruning, the last 10% is held out for perplexity.
Both parts are written beside the model (train.txt, heldout.txt); bench/common.py's "moe-stories" preset
points at them. The tokenizer is stories260K's (vocab 512). Weights stay out of git (bench/runs/ is ignored).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from lmprune.data import evaluation_windows, tokenize
from lmprune.evaluate import perplexity

BENCH = Path(__file__).resolve().parent
SHARED = BENCH.parent.parent / "shared"

# The file has no story separator: paragraphs are split by blank lines and most stories open with this.
STORY_START = "Once upon a time"


def split_stories(text: str, train_fraction: float) -> tuple[str, str]:
    """Cut `text` at the first story start at or after `train_fraction` of its characters."""
    paragraphs = text.split("\n\n")
    offset, cut = 0, None
    for i, paragraph in enumerate(paragraphs):
        if offset >= train_fraction * len(text) and paragraph.lstrip().startswith(STORY_START):
            cut = i
            break
        offset += len(paragraph) + 2
    if cut is None:
        sys.exit(f"no paragraph starting with {STORY_START!r} after {train_fraction:.0%} of the text")
    return "\n\n".join(paragraphs[:cut]) + "\n", "\n\n".join(paragraphs[cut:])


def build_model(args, tokenizer):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, num_local_experts=args.experts, num_experts_per_tok=args.top_k,
        max_position_embeddings=512, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=None, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
        # Recorded for reference; training applies the load-balancing loss itself, per layer (see balance_loss).
        output_router_logits=False, router_aux_loss_coef=args.aux_coef,
    )
    return MixtralForCausalLM(config)


def balance_loss(router_logits, experts: int, top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss, averaged over layers.

    transformers' own (what `labels=` adds) pools every layer's counts before the product, so it only balances
    expert index e summed over layers: a layer can starve an expert if another layer overuses it (seen here at
    coefficients 0.02 and 0.1: shares down to 0.000 in a layer with the pooled loss at its balanced value).
    """
    return torch.stack([load_balancing_loss_func((logits,), experts, top_k) for logits in router_logits]).mean()


def lr_at(progress: float, args) -> float:
    """Linear warmup over the first `warmup` of training, then cosine down to lr/10."""
    if progress < args.warmup:
        return args.lr * progress / args.warmup
    t = min(1.0, (progress - args.warmup) / (1 - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def expert_shares(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[layers, experts]: each expert's share of the top-k assignments over `windows` (rows sum to 1)."""
    layers, experts, k = model.config.num_hidden_layers, model.config.num_local_experts, model.config.num_experts_per_tok
    counts = torch.zeros(layers, experts)
    for batch in windows.split(batch_size):
        router_logits = model(input_ids=batch, use_cache=False, output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):
            chosen = logits.topk(k, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(chosen, minlength=experts).float()
    return counts / counts.sum(dim=1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(BENCH / "runs" / "moe-stories"))
    parser.add_argument("--data", default=str(SHARED / "data" / "tinystories.valid.txt"))
    parser.add_argument("--tokenizer", default=str(SHARED / "models" / "stories260K"))
    parser.add_argument("--minutes", type=float, default=15.0, help="training time budget (the schedule follows it)")
    parser.add_argument("--steps", type=int, help="train this many steps instead of a time budget (reproducible)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=0.03, help="fraction of training spent warming up")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256, help="per expert")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--aux-coef", type=float, default=0.02)
    parser.add_argument("--log-every", type=float, default=60.0, help="seconds between progress lines")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    if not Path(args.data).is_file() or not Path(args.tokenizer).is_dir():
        sys.exit(f"need {args.data} and {args.tokenizer} (../shared beside the repo)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_text, heldout_text = split_stories(Path(args.data).read_text(encoding="utf-8"), 0.9)
    (out / "train.txt").write_text(train_text, encoding="utf-8")
    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    # Tokenized as one stream, the way lmprune's calibration and evaluation read a .txt file.
    train_ids = tokenize(tokenizer, train_text)
    heldout = evaluation_windows(tokenize(tokenizer, heldout_text), args.seqlen)
    print(f"train {len(train_text)} chars / {train_ids.numel()} tokens; held out {len(heldout_text)} chars / "
          f"{heldout.shape[0]} windows of {args.seqlen}", file=sys.stderr)

    model = build_model(args, tokenizer)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * args.top_k // args.experts
    print(f"{total / 1e6:.2f}M parameters ({expert / 1e6:.2f}M in experts, {active / 1e6:.2f}M active per token)",
          file=sys.stderr)

    # No weight decay on norms (1-D); embeddings, attention, experts and routers decay.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    budget = args.minutes * 60
    model.train()
    start = last_log = time.perf_counter()
    step, losses = 0, []
    while True:
        elapsed = time.perf_counter() - start
        # Progress is time-based with --minutes, so the cosine ends when the budget does on a busy machine too.
        progress = step / args.steps if args.steps else elapsed / budget
        if progress >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress, args)
        starts = torch.randint(0, train_ids.numel() - args.seqlen, (args.batch,), generator=generator)
        batch = torch.stack([train_ids[s: s + args.seqlen] for s in starts.tolist()])
        output = model(input_ids=batch, use_cache=False, output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(output.logits[:, :-1].reshape(-1, output.logits.shape[-1]),
                                                    batch[:, 1:].reshape(-1))
        aux_loss = balance_loss(output.router_logits, args.experts, args.top_k)
        optimizer.zero_grad(set_to_none=True)
        (lm_loss + args.aux_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        losses.append(lm_loss.item())
        if time.perf_counter() - last_log >= args.log_every:
            last_log = time.perf_counter()
            recent = sum(losses[-20:]) / len(losses[-20:])
            # A few held-out windows show overfitting early: the training text is small (~350K tokens).
            model.eval()
            peek = perplexity(model, heldout[:16], torch.device("cpu"), batch_size=8, progress=False)
            model.train()
            print(f"step {step}  {last_log - start:.0f} s  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"train ppl {math.exp(recent):.2f}  held-out ppl (16 windows) {peek:.2f}  "
                  f"aux {aux_loss.item():.3f}", file=sys.stderr)
    train_seconds = time.perf_counter() - start
    model.eval()

    ppl = perplexity(model, heldout, torch.device("cpu"), batch_size=8, progress=False)
    shares = expert_shares(model, heldout)
    print(f"trained {step} steps ({step * args.batch * args.seqlen} tokens) in {train_seconds / 60:.1f} min; "
          f"held-out perplexity {ppl:.3f} ({heldout.shape[0]} windows of {args.seqlen})")
    print(f"expert shares of routed tokens on the held-out text (top-{args.top_k}, uniform = {1 / args.experts:.3f}):")
    for layer, row in enumerate(shares):
        print(f"  layer {layer}: " + " ".join(f"{s:.3f}" for s in row.tolist()) + f"   (min {row.min():.3f})")

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"command": "python bench/train_moe.py " + " ".join(sys.argv[1:]), "steps": step,
            "tokens": step * args.batch * args.seqlen, "train_seconds": train_seconds, "heldout_perplexity": ppl,
            "heldout_windows": int(heldout.shape[0]), "expert_shares": shares.tolist(), "args": vars(args)}
    (out / "train_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
