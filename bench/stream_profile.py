"""Where a streamed prune's resident memory goes: RSS sampled through one `lmprune prune` run, by step.

Runs `python -m lmprune prune ARGS...` inside this process with a thread that reads /proc/self/smaps_rollup
every few milliseconds (tracemalloc does not see tensors) and notes which step of the pipeline is running
(block load, statistics collection, each solve, propagation, save, release), by wrapping those functions.
Prints, per step, the highest RSS seen (anonymous and file-backed apart) and what it was when the step
began, then the process peak (ru_maxrss).

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/stream_profile.py MODEL --method wanda --sparsity 0.5 \\
        --calib FILE --nsamples 4 --seqlen 128 --out OUT --stream --no-progress

What it does not show: a spike shorter than the sampling interval (ru_maxrss, printed last, catches it).
"""

from __future__ import annotations

import functools
import os
import resource
import sys
import threading
import time

def rollup() -> dict[str, int]:
    """Rss, Anonymous and file-backed resident bytes of this process."""
    values = {}
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].rstrip(":") in ("Rss", "Anonymous", "Pss_File"):
                values[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return values


class Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.step, self.stop = interval, "start", False
        self.peaks: dict[str, dict[str, int]] = {}  # step -> the sample with the highest Rss during it
        self.order: list[str] = []

    def run(self) -> None:
        while not self.stop:
            self.note()
            time.sleep(self.interval)

    def note(self) -> None:
        step, sample = self.step, rollup()
        best = self.peaks.get(step)
        if best is None:
            self.order.append(step)
        if best is None or sample["Rss"] > best["Rss"]:
            self.peaks[step] = sample


def wrap(sampler: Sampler, owner, name: str, label) -> None:
    real = getattr(owner, name, None)
    if real is None:  # a seam renamed by a later restructuring: that step is simply not labelled
        return

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        step = label(*args, **kwargs)
        sampler.step = step
        sampler.note()
        try:
            return real(*args, **kwargs)
        finally:
            sampler.note()
            sampler.step = f"after {step}"  # until the next labelled step begins

    setattr(owner, name, wrapper)


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    import lmprune.pipeline as pipeline
    from lmprune.cli import main as cli_main
    from lmprune.hidden import HiddenStates
    from lmprune.model.block_store import StreamedBlocks

    sampler = Sampler(0.005)
    wrap(sampler, StreamedBlocks, "load", lambda self, i, block: "load block")
    wrap(sampler, StreamedBlocks, "save", lambda self, i, block, records: "save block")
    wrap(sampler, pipeline, "collect_inputs", lambda *a, **k: "collect statistics")
    wrap(sampler, pipeline, "prune_group", lambda group, *a, **k: f"solve {group[0].layer.name.rsplit('.', 1)[-1]}")
    wrap(sampler, HiddenStates, "advance", lambda *a, **k: "propagate")
    sampler.start()
    code = cli_main(["prune", *sys.argv[1:]])
    sampler.stop = True
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("| step | peak RSS | anonymous | file-backed |\n|---|---|---|---|")
    for step in sampler.order:
        p = sampler.peaks[step]
        print(f"| {step} | {p['Rss'] / 1e9:.3f} GB | {p['Anonymous'] / 1e9:.3f} GB | {p['Pss_File'] / 1e9:.3f} GB |")
    print(f"\nprocess peak RSS (ru_maxrss): {peak / 1e9:.3f} GB; exit code {code}")


if __name__ == "__main__":
    main()
