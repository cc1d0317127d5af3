"""lmprune's method on the saved SmolLM2 windows, under whichever Python runs this script.

Run with llm-compressor's venv to compare the two tools with every library identical:

    PYTHONPATH=src bench/peers/.venv-llmc/bin/python bench/peers/run_ours.py --method wanda --target 0.7

The windows are the ones `bench/quality.py --peers` saved for llm-compressor (bench/results/windows_<preset>.pt).

--peer-norms (Wanda only, a diagnostic) replaces the Gram diagonal that our Wanda scores with the input
norms summed the way llm-compressor sums them: a running mean over calibration samples of per-batch
squared norms, in float32. Everything else (masks, pipeline, evaluation) stays ours, so a change in
perplexity is due to that arithmetic alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import BENCH, PRESETS, load_dense, run_once  # noqa: E402


def use_peer_norms() -> None:
    """Patch the pipeline's Gram collection so each Gram's diagonal holds llm-compressor's row scalars."""
    import lmprune.pipeline as pipeline

    from lmprune.hooks import hooked

    collect = pipeline.collect_inputs

    def collect_with_peer_norms(block, prefix, layers, call, hidden, device, *args, **kwargs):
        scalars = {layer.name: torch.zeros(layer.in_features, device=device) for layer in layers}
        counts = dict.fromkeys(scalars, 0)

        def make_hook(name):
            def hook(module, args):
                x = args[0].detach().to(torch.float32)
                x = x.unsqueeze(0) if x.dim() == 2 else x
                added = x.shape[0]  # samples in this batch, as llm-compressor counts them
                flat = x.reshape(-1, x.shape[-1]).t()
                scalars[name] *= counts[name] / (counts[name] + added)
                counts[name] += added
                scalars[name] += torch.norm(flat, p=2, dim=1) ** 2 / counts[name]

            return hook

        with hooked(before=[(layer.module, make_hook(layer.name)) for layer in layers]):
            collected = collect(block, prefix, layers, call, hidden, device, *args, **kwargs)
        for name, scalar in scalars.items():
            collected.inputs[name].gram.diagonal().copy_(scalar)
        return collected

    pipeline.collect_inputs = collect_with_peer_norms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2-135m")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--target", default="0.7")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peer-norms", action="store_true", help="Wanda with llm-compressor's norm arithmetic")
    args = parser.parse_args()
    if args.peer_norms:
        if args.method != "wanda":
            parser.error("--peer-norms applies to wanda only")
        use_peer_norms()
    torch.set_num_threads(args.threads)
    windows = torch.load(BENCH / "results" / f"windows_{args.preset}.pt")
    dense, _ = load_dense(PRESETS[args.preset])
    row = run_once(dense, args.method, args.target, windows["calibration"], windows["evaluation"], torch.device("cpu"))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}: {args.method} {args.target}"
          + (" (llm-compressor's norms)" if args.peer_norms else "") + ": "
          f"perplexity {row['perplexity']:.4f}, prune {row['prune_seconds']:.0f} s")


if __name__ == "__main__":
    main()
