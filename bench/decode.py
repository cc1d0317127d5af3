"""Issue #31: the packed checkpoint's size and the sparse decode path's speed and memory, dense against sparse.

    python bench/decode.py --part make      # checkpoints into bench/runs/decode/ (no timing; run it niced)
    flock /tmp/lmprune-cpu.lock python bench/decode.py --part gemv
    flock /tmp/lmprune-cpu.lock python bench/decode.py --part decode --model llama1b [--targets 0.7]
    python bench/decode.py --part report    # plots into bench/results/, markdown tables on stdout

Models: SmolLM2-135M (the cached alias, its weights in bf16) and a ~1.26B Llama shape with random weights
(hidden 2048, FFN 5632, 22 blocks, 32 heads, vocab 32000, untied head: TinyLlama's shape without GQA; the speed
does not depend on the values). Every block Linear is magnitude-pruned per layer to 50% or 70%, or to 2:4,
saved dense with zeros, packed with lmprune's own packer, and the dense copy deleted. Measurements merge into
bench/results/decode.json. Timings: 2 threads (torch.set_num_threads and OMP_NUM_THREADS), batch 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, SHARED, git_commit, load_json, save_json  # noqa: E402

RUNS = BENCH / "runs" / "decode"
RESULTS = BENCH / "results" / "decode.json"
TARGETS = ("0.5", "0.7", "2:4")
THREADS = 2
LLAMA1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=5632,
               num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
               max_position_embeddings=2048, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
               bos_token_id=1, eos_token_id=2, dtype="bfloat16", rope_theta=10000.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("make", "gemv", "decode", "report"), required=True)
    parser.add_argument("--model", choices=("smollm2", "llama1b"), action="append")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    models = args.model or ["smollm2", "llama1b"]
    targets = args.targets.split(",")
    results = load_json(RESULTS) if RESULTS.exists() else {}
    if args.part == "make":
        for model in models:
            for target in targets:
                results.setdefault("sizes", {}).setdefault(model, {})[target] = make(model, target)
                save_json(RESULTS, results)
    elif args.part == "gemv":
        results["gemv"] = gemv_sweep()
    elif args.part == "decode":
        from lmprune.sparse.decode_bench import compare, format_table

        for model in models:
            for target in targets:
                run = compare(str(checkpoint(model, target)), THREADS, args.tokens, "Once upon a time, there was")
                print(format_table(run), flush=True)
                results.setdefault("decode", {}).setdefault(model, {})[target] = run
                save_json(RESULTS, results)
    else:
        report(results)
        return
    results.setdefault("commits", {})[args.part] = git_commit()
    save_json(RESULTS, results)


def checkpoint(model: str, target: str) -> Path:
    return RUNS / f"{model}-{target.replace(':', 'of')}"


# ---- make: the checkpoints and their sizes ----

def source_weights(model: str):
    """(config dict, tokenizer dir, {name: bf16 tensor} made one at a time)."""
    if model == "smollm2":
        from safetensors import safe_open

        from lmprune.aliases import resolve_model

        path = resolve_model("smollm2-135m", False)
        config = json.loads(Path(path, "config.json").read_text())
        config["dtype"] = "bfloat16"

        def tensors():
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name).to(torch.bfloat16)
        return config, path, tensors()
    config = dict(LLAMA1B)
    g = torch.Generator().manual_seed(0)
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]

    def tensors():
        yield "model.embed_tokens.weight", (torch.randn(v, h, generator=g) * 0.02).to(torch.bfloat16)
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)),
                                ("self_attn.v_proj", (h, h)), ("self_attn.o_proj", (h, h)),
                                ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)), ("mlp.down_proj", (h, f))):
                yield p + name + ".weight", (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
            yield p + "input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
            yield p + "post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield "model.norm.weight", torch.ones(h, dtype=torch.bfloat16)
        yield "lm_head.weight", (torch.randn(v, h, generator=g) * 0.02).to(torch.bfloat16)
    return config, str(SHARED / "models" / "stories260K"), tensors()


def magnitude(weight: torch.Tensor, target: str) -> torch.Tensor:
    """Per-layer magnitude pruning (lmprune's own masks) to a fraction or to N:M."""
    from lmprune.masks import layer_mask, nm_mask

    scores = weight.float().abs()
    if ":" in target:
        n, m = (int(s) for s in target.split(":"))
        keep = nm_mask(scores, n, m)
    else:
        keep = layer_mask(scores, float(target))
    return weight * keep.to(weight.dtype)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def make(model: str, target: str) -> dict:
    """Write the packed checkpoint; sizes of the pruned weights (dense bf16 vs packed) and of both dirs."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from lmprune.sparse.format import SparseCheckpoint, pack_checkpoint
    from lmprune.sparse.packing import PackedWeight

    out = checkpoint(model, target)
    dense = out.with_name(out.name + "-dense")
    for path in (out, dense):
        shutil.rmtree(path, ignore_errors=True)
    dense.mkdir(parents=True)
    config, tokenizer_dir, tensors = source_weights(model)
    state = {}
    for name, weight in tensors:
        pruned = name.startswith("model.layers.") and name.endswith("_proj.weight")
        state[name] = magnitude(weight, target) if pruned else weight.contiguous()
    save_file(state, str(dense / "model.safetensors"), metadata={"format": "pt"})
    del state
    (dense / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(str(dense))
    tick = time.perf_counter()
    out.mkdir()
    pack_checkpoint(str(dense), str(out), None)
    pack_s = time.perf_counter() - tick
    dense_dir = dir_bytes(dense)
    shutil.rmtree(dense)
    pruned_dense = pruned_packed = 0
    for _, weights in SparseCheckpoint(str(out)).weights():
        for weight in weights.values():
            if isinstance(weight, PackedWeight):
                pruned_dense += 2 * int(torch.Size(weight.shape).numel())
                pruned_packed += weight.nbytes
    sizes = dict(pruned_dense_bf16=pruned_dense, pruned_packed=pruned_packed, pruned_ratio=pruned_packed / pruned_dense,
                 dir_dense=dense_dir, dir_packed=dir_bytes(out), dir_ratio=dir_bytes(out) / dense_dir, pack_s=pack_s)
    print(f"{model} {target}: pruned weights {pruned_packed / 2**20:.0f} MiB packed / {pruned_dense / 2**20:.0f} MiB "
          f"dense bf16 = {sizes['pruned_ratio']:.3f}x; whole dir {sizes['dir_ratio']:.3f}x", flush=True)
    return sizes


# ---- gemv: per-layer time against density, with the bandwidth limit ----

ROTATION_BYTES = 256 * 2**20  # each timed GEMV reads a layer that 8x the 32 MiB L3 evicted since its last call


def timed(fn, repeats: int) -> float:
    """Fastest seconds of fn() over repeats, after two warm-up calls: on a shared 2-core machine a call that
    another process interrupts takes a scheduler slice longer (8 ms seen), so the minimum is the kernel's."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tick)
    return min(times)


def copies(tensors: tuple, total_bytes: int = ROTATION_BYTES) -> list[tuple]:
    """Enough separate copies of a layer's tensors to span total_bytes (at least two): the speed of a GEMV
    does not depend on the values, only on where its bytes come from."""
    size = sum(t.nbytes for t in tensors)
    return [tuple(t.clone() for t in tensors) for _ in range(max(2, -(-total_bytes // size)))]


def rotated(fn, layers: list[tuple], passes: int = 5) -> float:
    """Seconds of one fn(*layer) read from DRAM: passes over all the layers in turn, so that each call's layer
    was evicted by the others; per layer the fastest of its calls (a call another process interrupts takes
    a scheduler slice longer), then the median over layers."""
    best = [float("inf")] * len(layers)
    fn(*layers[-1])
    for _ in range(passes):
        for i, layer in enumerate(layers):
            tick = time.perf_counter()
            fn(*layer)
            best[i] = min(best[i], time.perf_counter() - tick)
    return statistics.median(best)


def sum_bandwidth(big: torch.Tensor) -> float:
    """Bytes/s of a large contiguous read (a sum over a tensor far beyond the caches)."""
    return big.nbytes / timed(lambda: big.sum(), 8)


def gemv_sweep(rows: int = 5632, cols: int = 2048) -> dict:
    """The 1B model's up_proj shape, bf16 values: kernel time per kept fraction, each call on a layer read
    from DRAM (a rotation over ROTATION_BYTES of copies) and, for the kernel's own cost, on one layer called
    repeatedly (cached in L3); the bytes limit beside them. This VM's read bandwidth moves with its
    neighbours' traffic (23-61 GB/s for the same sum within minutes), so a sum over 512 MiB is timed next to
    every point, and the limit takes the fastest read rate seen anywhere in the run (those sums, the dense
    GEMVs, the sparse kernel's own points): the strictest limit the run supports."""
    from lmprune.masks import layer_mask
    from lmprune.sparse.kernel import BEST, gemv_kernel
    from lmprune.sparse.packing import pack_bitmask, row_offsets

    kernel = gemv_kernel()
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=g)
    x = torch.randn(cols, generator=g).to(torch.bfloat16)
    big = torch.rand(128 * 2**20)
    bandwidths = {"sum": sum_bandwidth(big)}
    dense = {}
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype).reshape(1, -1)
        dense[str(dtype).removeprefix("torch.")] = rotated(lambda w: torch.nn.functional.linear(xd, w),
                                                           copies((weight.to(dtype),)))
    wb = weight.to(torch.bfloat16)
    dense["kernel bfloat16"] = rotated(lambda w: kernel.dense_linear(x, w, None, BEST), copies((wb,)))
    bandwidths["dense kernel GEMV"] = wb.nbytes / dense["kernel bfloat16"]
    bandwidths["dense torch bfloat16"] = wb.nbytes / dense["bfloat16"]
    print("dense, from DRAM: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in dense.items()), flush=True)
    points = []
    for kept in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        w = (weight * layer_mask(weight.abs(), 1 - kept)).to(torch.bfloat16) if kept < 1 else wb
        packed = pack_bitmask(w)
        layer = (packed.positions, packed.values, row_offsets(packed))

        def call(mask, values, offsets):
            kernel.bitmask_linear(x, mask, values, offsets, None, cols, BEST)
        layers = copies(layer)
        sum_rate = sum_bandwidth(big)
        seconds = rotated(call, layers)
        del layers
        cached = timed(lambda: call(*layer), 30)
        points.append(dict(kept=kept, seconds=seconds, cached_s=cached, bytes=packed.nbytes, sum_bandwidth=sum_rate))
        print(f"kept {kept:.0%}: {seconds * 1e3:.3f} ms from DRAM ({packed.nbytes / seconds / 1e9:.1f} GB/s; a sum "
              f"just before: {sum_rate / 1e9:.1f} GB/s), {cached * 1e3:.3f} ms cached", flush=True)
    bandwidths["sum"] = max([bandwidths["sum"]] + [p["sum_bandwidth"] for p in points])
    bandwidths["sparse kernel"] = max(p["bytes"] / p["seconds"] for p in points)
    bandwidth = max(bandwidths.values())
    for p in points:
        p["limit_s"] = p["bytes"] / bandwidth
        print(f"kept {p['kept']:.0%}: {p['seconds'] / p['limit_s']:.2f}x the bytes limit", flush=True)
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, the fastest of (GB/s): " +
          ", ".join(f"{k} {v / 1e9:.1f}" for k, v in bandwidths.items()), flush=True)
    at70 = next(p for p in points if p["kept"] == 0.3)
    print(f"70% sparsity: {at70['seconds'] / at70['limit_s']:.2f}x the bytes limit (target: within 1.4x): "
          f"{'met' if at70['seconds'] <= 1.4 * at70['limit_s'] else 'not met'}", flush=True)
    return dict(rows=rows, cols=cols, threads=THREADS, isa=kernel.best_isa(), bandwidth=bandwidth,
                bandwidths=bandwidths, rotation_bytes=ROTATION_BYTES, dense_s=dense, points=points,
                dense_bf16_bytes=rows * cols * 2)


# ---- report: plots and tables ----

def report(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = BENCH / "results"
    gemv = results.get("gemv")
    if gemv:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        kept = [100 * p["kept"] for p in gemv["points"]]
        ax.plot(kept, [1e3 * p["seconds"] for p in gemv["points"]], marker="o",
                label="sparse kernel (bf16 + bitmask), from DRAM")
        ax.plot(kept, [1e3 * p["cached_s"] for p in gemv["points"]], marker=".", linestyle=":",
                label="sparse kernel, one layer cached in L3")
        ax.plot(kept, [1e3 * p["limit_s"] for p in gemv["points"]], linestyle="--",
                label=f"bytes limit ({gemv['bandwidth'] / 1e9:.1f} GB/s read)")
        for name, seconds in gemv["dense_s"].items():
            ax.axhline(1e3 * seconds, linewidth=0.8, color={"float32": "gray", "bfloat16": "black"}.get(name, "green"),
                       label=(f"dense {name}" if "kernel" not in name else "dense bf16 (lmprune kernel)") + ", from DRAM")
        ax.set_xlabel("weights kept (%)")
        ax.set_ylabel("ms per GEMV")
        ax.set_title(f"batch-1 GEMV [{gemv['rows']} x {gemv['cols']}], {gemv['threads']} threads")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "decode_gemv.png", dpi=120)
        plt.close(fig)
        print("| kept | kernel ms (DRAM) | bytes limit ms | ratio | kernel ms (cached) |\n|---|---|---|---|---|")
        for p in gemv["points"]:
            print(f"| {p['kept']:.0%} | {1e3 * p['seconds']:.3f} | {1e3 * p['limit_s']:.3f} | "
                  f"{p['seconds'] / p['limit_s']:.2f}x | {1e3 * p['cached_s']:.3f} |")
        print(f"\nbandwidth {gemv['bandwidth'] / 1e9:.1f} GB/s; dense: " +
              ", ".join(f"{k} {1e3 * v:.3f} ms" for k, v in gemv["dense_s"].items()) + "\n")
    for model, sizes in results.get("sizes", {}).items():
        print(f"| {model} | pruned weights packed / dense bf16 | whole dir packed / dense |\n|---|---|---|")
        for target, s in sizes.items():
            print(f"| {target} | {s['pruned_packed'] / 2**20:.0f} / {s['pruned_dense_bf16'] / 2**20:.0f} MiB = "
                  f"{s['pruned_ratio']:.3f}x | {s['dir_packed'] / 2**20:.0f} / {s['dir_dense'] / 2**20:.0f} MiB = "
                  f"{s['dir_ratio']:.3f}x |")
        print()
    decode = results.get("decode", {})
    if decode:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        labels, width = [], 0.25
        for i, (model, runs) in enumerate(decode.items()):
            print(f"| {model} | load s (f32 / bf16 / sparse) | tokens/s f32 | bf16 | sparse | speed-up | model RSS MB "
                  "(f32 / bf16 / sparse) | vs bf16 | tokens |\n|---|---|---|---|---|---|---|---|---|")
            for target, run in runs.items():
                r = {f"{x['kind']} {x['dtype']}" if x["kind"] == "dense" else "sparse": x for x in run["runs"]}
                same = all(a["identical"] for a in run["agreement"].values())
                loads = " / ".join(f"{x['load_s']:.1f}" for x in run["runs"])
                rss = " / ".join(f"{x['model_rss_mb']:.0f}" for x in run["runs"])
                print(f"| {target} | {loads} | "
                      f"{r['dense float32']['tokens_per_s']:.2f} | {r['dense bfloat16']['tokens_per_s']:.2f} | "
                      f"{r['sparse']['tokens_per_s']:.2f} | {run['speedup']:.2f}x | "
                      f"{rss} | "
                      f"{run['memory_vs_dense_bf16']:.2f}x | {'identical' if same else 'differ'} |")
                labels.append(f"{model}\n{target}")
                for j, name in enumerate(("dense float32", "dense bfloat16", "sparse")):
                    ax.bar(len(labels) - 1 + (j - 1) * width, r[name]["tokens_per_s"], width,
                           color=("gray", "black", "tab:blue")[j], label=name if len(labels) == 1 else None)
            print()
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("tokens/s (batch 1, greedy)")
        ax.set_title(f"decode speed, {THREADS} threads")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "decode_speed.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()
