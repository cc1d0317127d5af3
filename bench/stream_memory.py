"""Peak memory of `lmprune prune --stream` against the in-memory path on a checkpoint of several GB (issue #17).

Generates (once) a random-init Llama-shaped float32 checkpoint of at least 4 GB in bench/runs/stream_memory/
(ignored by git), one safetensors shard per block as large checkpoints come, written a block at a time so
this script never holds it whole. Then prunes it with each method, streaming and in memory, each run a
separate `python -m lmprune` process whose peak RSS is read from its own rusage (wait4's ru_maxrss), and
checks that the two outputs hold equal tensors, one tensor at a time.

    OMP_NUM_THREADS=1 python bench/stream_memory.py [--methods wanda,sparsegpt] [--blocks 240]
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


def generate(path: Path, hidden: int, ffn: int, blocks: int) -> int:
    """A random-init LlamaForCausalLM checkpoint, written block by block; returns its weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "lmprune_bench_done").exists():
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    config = LlamaConfig(vocab_size=257, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=blocks,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=0,
                         eos_token_id=256, dtype="float32")
    config.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    count = blocks + 1
    weight_map = {}

    def shard(i: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    def linear(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) / inp**0.5

    for b in range(blocks):
        p = f"model.layers.{b}."
        shard(b, {p + "self_attn.q_proj.weight": linear(hidden, hidden), p + "self_attn.k_proj.weight": linear(hidden, hidden),
                  p + "self_attn.v_proj.weight": linear(hidden, hidden), p + "self_attn.o_proj.weight": linear(hidden, hidden),
                  p + "mlp.gate_proj.weight": linear(ffn, hidden), p + "mlp.up_proj.weight": linear(ffn, hidden),
                  p + "mlp.down_proj.weight": linear(hidden, ffn),
                  p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden)})
    shard(blocks, {"model.embed_tokens.weight": torch.randn(257, hidden, generator=g),
                   "model.norm.weight": torch.ones(hidden), "lm_head.weight": linear(257, hidden)})
    total = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    (path / "lmprune_bench_done").write_text("")
    return total


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
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs afterwards")
    args = parser.parse_args()
    model = RUNS / f"llama-h{args.hidden}-f{args.ffn}-b{args.blocks}"
    size = generate(model, args.hidden, args.ffn, args.blocks)
    CALIB.write_text(SOURCE.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    print(f"checkpoint {model}: {size / 1e9:.2f} GB of float32 weights ({args.blocks} blocks, hidden {args.hidden}, "
          f"FFN {args.ffn})", flush=True)
    rows = []
    for method in args.methods.split(","):
        runs = {}
        for stream in (True, False):
            out = RUNS / f"out-{method}-{'stream' if stream else 'memory'}"
            runs[stream] = prune(model, out, method, stream, args.nsamples, args.seqlen)
            print(f"{method} {'stream' if stream else 'memory'}: peak RSS {runs[stream]['peak_rss'] / 1e9:.2f} GB, "
                  f"wall {runs[stream]['wall']:.0f} s", flush=True)
        equal, tensors = same_tensors(RUNS / f"out-{method}-stream", RUNS / f"out-{method}-memory")
        rows.append((method, runs[True], runs[False], equal, tensors))
        if not args.keep:
            for stream in ("stream", "memory"):
                shutil.rmtree(RUNS / f"out-{method}-{stream}", ignore_errors=True)
    print("\n| method | checkpoint | streaming peak RSS | in-memory peak RSS | streaming / checkpoint | "
          "wall streaming / in-memory | outputs equal |")
    print("|---|---|---|---|---|---|---|")
    for method, s, m, equal, tensors in rows:
        print(f"| {method} | {size / 1e9:.2f} GB | {s['peak_rss'] / 1e9:.2f} GB | {m['peak_rss'] / 1e9:.2f} GB | "
              f"{s['peak_rss'] / size:.3f} | {s['wall'] / m['wall']:.2f} | "
              f"{'yes' if equal else 'NO'} ({tensors} tensors) |")
    for method, s, m, _, _ in rows:
        print(f"\n{method}: `{s['command']}` vs the same with --no-stream")


if __name__ == "__main__":
    main()
