"""`lmprune bench-decode DIR`: batch-1 greedy decode speed and memory, dense torch against the sparse path.

Three variants, each in its own subprocess so that their peak RSS do not mix: dense float32, dense
bfloat16 (the faster of the two is the baseline a user has today) and the packed model. DIR is a packed
checkpoint (the dense variants get its weights unpacked in memory) or a dense one with zeros (the sparse
variant packs its pruned layers in memory after loading).

Measured per variant: load time; decode time per token, the median over the new tokens after the first
(the first is the prompt's forward pass, reported as prefill; the median, so that a moment another process
takes the CPU does not decide the comparison; the mean is in the JSON), and tokens/s = its inverse; the model's share of peak RSS while
generating = the peak during generation minus the process's RSS before loading (Linux: the peak is reset
after loading, so the load's own transient peak is reported apart). The greedy tokens of the sparse
model are compared with the dense models'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from ..errors import LmpruneError

DEFAULT_PROMPT = "Once upon a time, in a small village by the sea, there lived"
VARIANTS = (("dense", "float32"), ("dense", "bfloat16"), ("sparse", "auto"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="DIR", help="a packed checkpoint, or a dense one with zeros")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every variant (default 2)")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens to generate (default 64)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--sparse-dtype", default="auto",
                        help="dtype of the sparse variant: auto (the checkpoint's), float32, bfloat16, float16")
    parser.add_argument("--json", metavar="FILE", help="also write the measurements as JSON")


def command(args) -> int:
    """The CLI command: run the three variants, print the table, optionally write JSON."""
    if args.threads < 1:
        raise LmpruneError(f"--threads must be at least 1, got {args.threads}")
    if args.tokens < 2:
        raise LmpruneError(f"--tokens must be at least 2 (the first new token is the prefill), got {args.tokens}")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise LmpruneError(f"{args.model} is not a checkpoint directory (no config.json)")
    result = compare(args.model, args.threads, args.tokens, args.prompt, args.sparse_dtype)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)
    return 0


def compare(model: str, threads: int, tokens: int, prompt: str, sparse_dtype: str = "auto",
            log=lambda message: print(f"lmprune: {message}", file=sys.stderr, flush=True)) -> dict:
    """Every variant measured in its own process; the baseline and the ratios."""
    runs = []
    for i, (kind, dtype) in enumerate(VARIANTS, 1):
        dtype = sparse_dtype if kind == "sparse" else dtype
        log(f"[{i}/{len(VARIANTS)}] {kind} {dtype}: loading and generating {tokens} tokens on {threads} thread(s)")
        runs.append(run_variant(model, kind, dtype, threads, tokens, prompt))
        run = runs[-1]
        log(f"[{i}/{len(VARIANTS)}] {kind} {run['dtype']}: {run['tokens_per_s']:.2f} tokens/s, "
            f"model share of peak RSS {run['model_rss_mb']:.0f} MB")
    dense = [r for r in runs if r["kind"] == "dense"]
    sparse = next(r for r in runs if r["kind"] == "sparse")
    baseline = max(dense, key=lambda r: r["tokens_per_s"])
    dense_bf16 = next(r for r in dense if r["dtype"] == "bfloat16")
    return dict(model=model, threads=threads, tokens=tokens, prompt=prompt, runs=runs,
                baseline=f"dense {baseline['dtype']}",
                speedup=sparse["tokens_per_s"] / baseline["tokens_per_s"],
                memory_vs_dense_bf16=sparse["model_rss_mb"] / dense_bf16["model_rss_mb"],
                agreement={f"dense {r['dtype']}": agreement(sparse["new_tokens"], r["new_tokens"]) for r in dense})


def agreement(tokens: list[int], reference: list[int]) -> dict:
    """How many leading tokens agree, and whether all do."""
    same = next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))
    return dict(identical=tokens == reference, leading_same=same, of=len(reference))


def run_variant(model: str, kind: str, dtype: str, threads: int, tokens: int, prompt: str) -> dict:
    """One variant in a fresh interpreter (same Python, same import path), its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "lmprune.sparse.decode_bench", model, "--kind", kind, "--dtype", dtype,
               "--threads", str(threads), "--tokens", str(tokens), "--prompt", prompt]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise LmpruneError(f"the {kind} {dtype} decode run failed (exit {done.returncode}; its stderr is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_table(result: dict) -> str:
    header = f"{'variant':<20} {'load s':>7} {'prefill s':>9} {'tokens/s':>9} {'ms/token':>9} {'model RSS MB':>13} " \
             f"{'load peak MB':>13} {'speed':>6}"
    base = next(r for r in result["runs"] if f"dense {r['dtype']}" == result["baseline"])
    lines = [f"batch-1 greedy decode of {result['model']}: {result['tokens']} new tokens, {result['threads']} thread(s)",
             header, "-" * len(header)]
    for r in result["runs"]:
        name = f"{r['kind']} {r['dtype']}" + (f" ({r['packed_layers']} packed)" if r["kind"] == "sparse" else "")
        lines.append(f"{name:<20} {r['load_s']:>7.2f} {r['prefill_s']:>9.3f} {r['tokens_per_s']:>9.2f} "
                     f"{r['ms_per_token']:>9.1f} {r['model_rss_mb']:>13.0f} {r['load_peak_mb']:>13.0f} "
                     f"{r['tokens_per_s'] / base['tokens_per_s']:>5.2f}x")
    lines.append(f"baseline: {result['baseline']} (the faster dense path); sparse: {result['speedup']:.2f}x its "
                 f"tokens/s, {result['memory_vs_dense_bf16']:.2f}x the model RSS of dense bfloat16")
    for name, a in result["agreement"].items():
        lines.append(f"greedy tokens, sparse vs {name}: " + ("identical" if a["identical"] else
                     f"DIFFER from new token {a['leading_same'] + 1} of {a['of']} on (summation order: see README)"))
    return "\n".join(lines)


# ---- the child process: one variant ----

def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Linux: the peak RSS (VmHWM) set back to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def measure(model_dir: str, kind: str, dtype: str, threads: int, tokens: int, prompt: str) -> dict:
    import torch
    import transformers  # noqa: F401  (imported before the baseline RSS: library code is not the model's share)

    from ..model import load_model, loading  # noqa: F401
    from .format import is_sparse_checkpoint
    from .kernel import gemv_kernel
    from .linear import SparseLinear, pack_model

    torch.set_num_threads(threads)
    if kind == "sparse":
        gemv_kernel()  # built (once) and loaded before the baseline: code, not the model's share
    before = _rss_kb("VmRSS")
    tick = time.perf_counter()
    packed = is_sparse_checkpoint(model_dir)
    model, tokenizer = load_model(model_dir, dtype, progress=False, sparse=kind == "sparse" and packed)
    if kind == "sparse" and not packed:
        pack_model(model)
    load_s = time.perf_counter() - tick
    load_peak = _rss_kb("VmHWM")
    layers = sum(isinstance(m, SparseLinear) for m in model.modules())
    if kind == "sparse" and not layers:
        raise LmpruneError(f"{model_dir} has no pruned layer to pack")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    greedy = dict(do_sample=False, temperature=None, top_k=None, top_p=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **greedy)  # warm-up: first-call costs
        reset = _reset_peak()
        stamps = _Stamps()
        tick = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, streamer=stamps, **greedy)
    new = out[0, ids.shape[1]:].tolist()
    decode_s = stamps.times[-1] - stamps.times[1]  # the first new token is the prefill
    steps = sorted(b - a for a, b in zip(stamps.times[1:], stamps.times[2:]))
    median_s = steps[len(steps) // 2]
    peak = _rss_kb("VmHWM") if reset else None
    return dict(kind=kind, dtype=str(next(model.parameters()).dtype).removeprefix("torch."), threads=threads,
                packed_layers=layers, load_s=load_s, prefill_s=stamps.times[1] - tick,
                tokens_per_s=1 / median_s, ms_per_token=1e3 * median_s, mean_tokens_per_s=(len(new) - 1) / decode_s,
                rss_before_mb=before / 1024, load_peak_mb=(load_peak - before) / 1024,
                model_rss_mb=((peak if peak is not None else load_peak) - before) / 1024,
                peak_reset=reset, new_tokens=new)


class _Stamps:
    """A generate() streamer that only notes when each put (the prompt, then every new token) arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) % 16 == 0:
            print(f"lmprune:   token {len(self.times) - 1}", file=sys.stderr, flush=True)

    def end(self) -> None:
        pass


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--kind", choices=("dense", "sparse"), required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--prompt", required=True)
    args = parser.parse_args(argv)
    try:
        result = measure(args.model, args.kind, args.dtype, args.threads, args.tokens, args.prompt)
    except LmpruneError as exc:
        print(f"lmprune: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
