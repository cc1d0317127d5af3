"""Peak memory of `lmprune prune --stream` against the in-memory path on a checkpoint of several GB (issue #17).

Generates (once) a random-init Llama-shaped float32 checkpoint of several GB in bench/runs/stream_memory/
(ignored by git), one safetensors shard per block or shards of --shard-gb as large checkpoints come,
written a block at a time so this script never holds it whole. Then prunes it with each method, streaming
and in memory, each run a separate `python -m lmprune` process whose peak RSS is read from its own rusage
(wait4's ru_maxrss), and checks that the two outputs hold equal tensors, one tensor at a time.
`--reference DIR` instead compares the streamed output with DIR/out-METHOD-memory (or -stream) kept
(--keep) by an earlier run, and skips the in-memory run: a change is checked against the output before it.

    OMP_NUM_THREADS=1 python bench/stream_memory.py [--methods wanda,sparsegpt] [--blocks 240]
    OMP_NUM_THREADS=1 python bench/stream_memory.py --hidden 2048 --ffn 8192 --blocks 16 --kv-heads 8 --shard-gb 1

The second is issue #30's shape (Llama-3.2-1B's blocks in float32: 243 MB each, 3.9 GB in 1 GB shards of
four blocks each), where one block is 6% of the model; the first (issue #17's) has 240 narrow blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "bench" / "runs" / "stream_memory"
SOURCE = ROOT.parent / "shared" / "data" / "wikitext2.valid.tokens.txt"
CALIB = RUNS / "calib.txt"  # the first 200 kB of SOURCE: tokenizing all of it would dwarf a few windows


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def generate(path: Path, hidden: int, ffn: int, blocks: int, kv_heads: int, shard_bytes: int) -> int:
    """A random-init LlamaForCausalLM checkpoint, written block by block into shards of at most `shard_bytes`
    (0: one shard per block), the part outside the blocks in a last shard of its own; returns its weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "lmprune_bench_done").exists():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    heads = hidden // 64
    config = LlamaConfig(vocab_size=257, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0,
                         eos_token_id=256, dtype="float32")
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    kv = 64 * (kv_heads or heads)
    block_bytes = 4 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn + 2 * hidden)
    per_shard = max(1, shard_bytes // block_bytes) if shard_bytes else 1
    count = -(-blocks // per_shard) + 1
    weight_map = {}
    pending: dict[str, torch.Tensor] = {}

    def shard(i: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    def linear(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) / inp**0.5

    for b in range(blocks):
        p = f"model.layers.{b}."
        pending.update({p + "self_attn.q_proj.weight": linear(hidden, hidden), p + "self_attn.k_proj.weight": linear(kv, hidden),
                        p + "self_attn.v_proj.weight": linear(kv, hidden), p + "self_attn.o_proj.weight": linear(hidden, hidden),
                        p + "mlp.gate_proj.weight": linear(ffn, hidden), p + "mlp.up_proj.weight": linear(ffn, hidden),
                        p + "mlp.down_proj.weight": linear(hidden, ffn),
                        p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden)})
        if (b + 1) % per_shard == 0 or b + 1 == blocks:  # a shard holds at most per_shard blocks at a time
            shard(b // per_shard, pending)
            pending = {}
    shard(count - 1, {"model.embed_tokens.weight": torch.randn(257, hidden, generator=g),
                      "model.norm.weight": torch.ones(hidden), "lm_head.weight": linear(257, hidden)})
    total = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    (path / "lmprune_bench_done").write_text("")
    return total


def checkpoint_dir(args) -> Path:
    """Where the checkpoint of this shape lives (generated once)."""
    return RUNS / (f"llama-h{args.hidden}-f{args.ffn}-b{args.blocks}"
                   + (f"-kv{args.kv_heads}" if args.kv_heads else "") + (f"-s{args.shard_gb:g}" if args.shard_gb else ""))


def prune(model: Path, out: Path, method: str, stream: bool, nsamples: int, seqlen: int) -> dict:
    """One `lmprune prune` in its own process: its peak RSS (ru_maxrss of that process alone) and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "lmprune", "prune", str(model), "--method", method, "--sparsity", "0.5",
               "--calib", str(CALIB), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--out", str(out),
               "--no-progress", "--stream" if stream else "--no-stream"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    tick = time.perf_counter()
    child = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - tick
    err = child.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{err}")
    return {"peak_rss": usage.ru_maxrss * 1024, "wall": wall, "command": " ".join(command[1:])}


def same_tensors(a: Path, b: Path) -> tuple[bool, int]:
    """Every tensor of checkpoint a equals b's (same names, dtype, values); read one tensor at a time."""
    from safetensors import safe_open

    def where(path: Path) -> dict[str, Path]:
        index = path / "model.safetensors.index.json"
        if index.exists():
            return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            return dict.fromkeys(f.keys(), path / "model.safetensors")

    wa, wb = where(a), where(b)
    if wa.keys() != wb.keys():
        return False, 0
    for name in sorted(wa):
        with safe_open(str(wa[name]), "pt") as fa, safe_open(str(wb[name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False, len(wa)
    return True, len(wa)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="wanda,sparsegpt")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=240)
    parser.add_argument("--kv-heads", type=int, default=0, help="key/value heads of 64 dims (0: as many as query heads)")
    parser.add_argument("--shard-gb", type=float, default=0, help="shard size in GB (0: one shard per block)")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--keep", action="store_true", help="keep the outputs afterwards")
    parser.add_argument("--reference", type=Path, help="compare with DIR/out-METHOD-memory; no in-memory run")
    args = parser.parse_args()
    model = checkpoint_dir(args)
    size = generate(model, args.hidden, args.ffn, args.blocks, args.kv_heads, int(args.shard_gb * 1e9))
    CALIB.write_text(SOURCE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    print(f"checkpoint {model}: {size / 1e9:.2f} GB of float32 weights ({args.blocks} blocks, hidden {args.hidden}, "
          f"FFN {args.ffn})", flush=True)
    rows = []
    for method in args.methods.split(","):
        runs = {}
        for stream in (True,) if args.reference else (True, False):
            out = RUNS / f"out-{method}-{'stream' if stream else 'memory'}"
            runs[stream] = prune(model, out, method, stream, args.nsamples, args.seqlen)
            print(f"{method} {'stream' if stream else 'memory'}: peak RSS {runs[stream]['peak_rss'] / 1e9:.2f} GB, "
                  f"wall {runs[stream]['wall']:.0f} s", flush=True)
        reference = (args.reference or RUNS) / f"out-{method}-memory"
        if args.reference and not reference.exists():  # an earlier streamed output, kept before a change
            reference = args.reference / f"out-{method}-stream"
        equal, tensors = same_tensors(RUNS / f"out-{method}-stream", reference)
        rows.append((method, runs[True], runs.get(False), equal, tensors))
        if not args.keep:
            for stream in ("stream",) if args.reference else ("stream", "memory"):
                shutil.rmtree(RUNS / f"out-{method}-{stream}", ignore_errors=True)
    print("\n| method | checkpoint | streaming peak RSS | in-memory peak RSS | streaming / checkpoint | "
          "wall streaming / in-memory | outputs equal |")
    print("|---|---|---|---|---|---|---|")
    for method, s, m, equal, tensors in rows:
        memory = f"{m['peak_rss'] / 1e9:.2f} GB" if m else "–"
        wall = f"{s['wall'] / m['wall']:.2f}" if m else f"{s['wall']:.0f} s streaming"
        against = "" if m else f", against {args.reference}"
        print(f"| {method} | {size / 1e9:.2f} GB | {s['peak_rss'] / 1e9:.2f} GB | {memory} | "
              f"{s['peak_rss'] / size:.3f} | {wall} | {'yes' if equal else 'NO'} ({tensors} tensors{against}) |")
    for method, s, m, _, _ in rows:
        print(f"\n{method}: `{s['command']}` vs the same with --no-stream")


if __name__ == "__main__":
    main()
