"""Zero-shot accuracy (lm-eval's tasks, local documents) of SmolLM2-135M dense and pruned, like Boža's Table 4.

    python bench/zeroshot.py --check --limit 40          # acceptance: `lmprune eval` == simple_evaluate directly
    python bench/zeroshot.py --methods sparsegpt,wanda --targets 0.5,0.7,2:4 --limit 40
    python bench/zeroshot.py --methods llmc-sparsegpt,llmc-wanda --limit 40   # llm-compressor's models
    python bench/zeroshot.py --methods '' --tasks piqa --limit 500            # one row's cost, on one task
    python bench/zeroshot.py --count --limit 500      # requests and tokens per task: the cost of a table

Every row prunes a fresh copy of the dense model (calibration from the smollm2-135m preset, --nsamples
windows), then scores the seven tasks of ../shared/data/zeroshot with the first --limit documents each, and
the perplexity of the same pruned model on the first --ppl-windows windows of WikiText-2 test, so the two
orderings compare like for like. lm-eval's --limit takes the first N documents of a task (all of them where
it has fewer), so every row scores the same documents. Each finished row is written at once to its own file
in bench/results/zeroshot_smollm2-135m/ (the 20-document table's rows are in zeroshot_smollm2-135m.json); a
rerun skips rows already there (same method, target, limit, tasks, calibration). Every row records its cost
(seconds, log-likelihood requests, requests/s). The table, with lm-eval's standard errors and the orderings
they allow, goes to bench/RESULTS.md, one section per document limit.

llmc-sparsegpt and llmc-wanda are llm-compressor's SparseGPT and Wanda: bench/peers/run_llmcompressor.py
prunes the same calibration windows in its own venv (`bash bench/peers/setup.sh`) and saves the pruned block
weights; they are loaded into a fresh copy of the dense model, checked for the target's sparsity, and scored
by the same code as lmprune's rows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BENCH, PRESETS, SHARED, build_windows, git_commit, load_dense, load_json, prune, replace_section, require_shared,
    save_json, split_methods,
)
from lmprune.config import SparsityPattern  # noqa: E402
from lmprune.evaluate import perplexity  # noqa: E402
from lmprune.masks import is_nm  # noqa: E402
from lmprune.model import describe_device, resolve_device  # noqa: E402
from lmprune.model.loading import local_model_dir  # noqa: E402
from lmprune.zeroshot import run_tasks, summarize  # noqa: E402

TASKS = ["piqa", "arc_easy", "boolq", "sglue_rte", "openbookqa", "lambada_openai", "copa"]
TASK_DATA = SHARED / "data" / "zeroshot"
RESULTS = BENCH / "results" / "zeroshot_smollm2-135m.json"
ROWS = BENCH / "results" / "zeroshot_smollm2-135m"  # one file per row (the 20-document rows are in RESULTS)
TARGETS = ["0.5", "0.7", "2:4"]
PEERS = BENCH / "peers"
LLMC_PYTHON = PEERS / ".venv-llmc" / "bin" / "python"
PEER_PREFIX = "llmc-"  # llmc-sparsegpt, llmc-wanda: llm-compressor's methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="sparsegpt,wanda,admm-grad,alps", help="'' for the dense row only")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--tasks", default=",".join(TASKS), help="a subset, e.g. to measure one row's cost")
    parser.add_argument("--limit", type=int, default=40, help="first documents per task (0: the full sets)")
    parser.add_argument("--nsamples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--ppl-windows", type=int, default=8, help="WikiText-2 test windows of 512 tokens")
    parser.add_argument("--batch-size", default="16", help="lm-eval requests per forward ('auto' on a GPU)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--check", action="store_true",
                        help="run `lmprune eval` on the dense model and lm-eval's simple_evaluate directly; compare")
    parser.add_argument("--count", action="store_true",
                        help="count the requests and tokens of --tasks at --limit and in full, and project the "
                             "cost of a row from the measured rows; runs no model")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="rewrite the RESULTS.md tables from the results")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="the JSON of the 20-document table's rows (and the --check result)")
    parser.add_argument("--merge", type=Path, help="add this results file's new rows to --results, then the table")
    parser.add_argument("--rows", type=Path, default=ROWS, help="directory of the one-file-per-row results")
    args = parser.parse_args()
    args.limit = args.limit or None
    tasks = args.tasks.split(",")
    batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    data = load_json(args.results)
    if args.merge:
        data["runs"] += [r for r in load_json(args.merge)["runs"] if not any(done(data["runs"], r, r["setup"]))]
        save_json(args.results, data)
        write_tables(data, args.rows)
        return
    if args.table_only:
        write_tables(data, args.rows)
        return
    require_shared()
    torch.set_num_threads(args.threads)
    if args.count:
        print_cost(tasks, args.limit, load_rows(args.rows))
        return
    device = resolve_device(args.device)
    if args.check:
        data["check"] = check(args, batch_size, device)
        save_json(args.results, data)
        write_tables(data, args.rows)
        return

    preset = dict(PRESETS["smollm2-135m"], nsamples=args.nsamples, eval_windows=args.ppl_windows)
    dense, tokenizer = load_dense(preset)
    calibration, evaluation = build_windows(preset, tokenizer)
    setup = {"limit": args.limit, "nsamples": args.nsamples, "seqlen": preset["seqlen"],
             "ppl_windows": args.ppl_windows, **({"tasks": tasks} if tasks != TASKS else {})}
    finished = data["runs"] + load_rows(args.rows)
    # target-major: an interrupted run still compares every method at the first targets
    plan = [("dense", "-")] + [(m, t) for t in args.targets.split(",") for m in split_methods(args.methods)]
    for method, target in plan:
        if any(done(finished, {"method": method, "target": target}, setup)):
            print(f"skip {method} {target} (done)")
            continue
        model = copy.deepcopy(dense)
        tick = time.perf_counter()
        peer = None
        if method.startswith(PEER_PREFIX):
            peer = prune_with_llmcompressor(model, method, target, calibration, evaluation, preset["model"],
                                            args.threads)
        elif method != "dense":
            prune(model, method, target, calibration, device, progress=not args.no_progress)
        prune_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        with counting_requests() as requests:
            results = run_tasks(model, tokenizer, tasks, device, batch_size, args.limit, str(TASK_DATA),
                                progress=not args.no_progress)
        eval_seconds = time.perf_counter() - tick
        ppl = perplexity(model, evaluation, device, batch_size=4, progress=False)
        row = {"method": method, "target": target, "setup": setup, "perplexity": ppl,
               "zeroshot": summarize(results, args.limit, "../shared/data/zeroshot", batch_size),
               "prune_seconds": prune_seconds, "eval_seconds": eval_seconds, "requests": requests[0],
               "requests_per_second": requests[0] / eval_seconds, "commit": git_commit(),
               "device": describe_device(device), "threads": args.threads, **({"peer": peer} if peer else {})}
        save_json(args.rows / row_file(row), row)
        finished.append(row)
        print(f"{method} {target}: mean acc {row['zeroshot']['mean']['acc,none']:.4f}, ppl {ppl:.2f} "
              f"(prune {prune_seconds:.0f}s, eval {eval_seconds:.0f}s: {requests[0]} requests, "
              f"{row['requests_per_second']:.2f}/s)", flush=True)
        write_tables(data, args.rows)


def done(rows: list[dict], row: dict, setup: dict):
    """The rows with the row's method and target under the same setup (a rerun skips them)."""
    return (r for r in rows if r["method"] == row["method"] and r["target"] == row["target"] and r["setup"] == setup)


def row_file(row: dict) -> str:
    """One row's file name: what it is and under which setup (the setup itself is inside)."""
    setup = row["setup"]
    name = (f"{row['method']}@{row['target']}_limit{setup['limit'] or 'all'}_n{setup['nsamples']}"
            + (f"_{'+'.join(setup['tasks'])}" if "tasks" in setup else ""))
    return re.sub(r"[^A-Za-z0-9@._:+=-]", "_", name) + ".json"


def load_rows(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []


@contextlib.contextmanager
def counting_requests():
    """Counts the log-likelihood requests lm-eval sends to the model (a row's cost is measured per request)."""
    from lm_eval.models.huggingface import HFLM

    count, original = [0], HFLM.loglikelihood

    def counted(self, requests, *args, **kwargs):
        count[0] += len(requests)
        return original(self, requests, *args, **kwargs)

    HFLM.loglikelihood = counted
    try:
        yield count
    finally:
        HFLM.loglikelihood = original


def count_requests(tasks: list[str], limit: int | None, tokenizer) -> dict[str, dict]:
    """Per task: documents, log-likelihood requests and their tokens (context + continuation) up to `limit`."""
    from lmprune.zeroshot import build_tasks, quiet

    counts = {}
    with quiet():
        built = build_tasks(tasks, str(TASK_DATA))
        for name in tasks:
            task = built[name]
            task.build_all_requests(limit=limit)
            tokens = sum(len(tokenizer(ctx + cont)["input_ids"]) for ctx, cont in (i.args for i in task.instances))
            counts[name] = {"documents": len({i.doc_id for i in task.instances}), "requests": len(task.instances),
                            "tokens": tokens}
    return counts


def print_cost(tasks: list[str], limit: int | None, rows: list[dict]) -> None:
    """Requests and tokens of a row at `limit` and in full, and what a row costs at the measured rates."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(local_model_dir("smollm2-135m"))
    at_limit, full = count_requests(tasks, limit, tokenizer), count_requests(tasks, None, tokenizer)
    print("| task | documents | requests | tokens | full: documents | requests | tokens |\n" + "|---" * 7 + "|")
    for t in tasks:
        a, f = at_limit[t], full[t]
        print(f"| {t} | {a['documents']} | {a['requests']} | {a['tokens']} | {f['documents']} | {f['requests']} | "
              f"{f['tokens']} |")
    print(f"| all | | {sum(at_limit[t]['requests'] for t in tasks)} | {sum(at_limit[t]['tokens'] for t in tasks)} "
          f"| | {sum(full[t]['requests'] for t in tasks)} | {sum(full[t]['tokens'] for t in tasks)} |")

    def hours(counts: dict, tokens_per_second: float) -> float:
        return sum(counts[t]["tokens"] for t in tasks) / tokens_per_second / 3600

    for row in rows:  # measured rows: their own rate, applied to this count
        setup = row["setup"]
        measured = count_requests(setup.get("tasks", TASKS), setup["limit"], tokenizer)
        tokens = sum(c["tokens"] for c in measured.values())
        rate = tokens / row["eval_seconds"]
        print(f"{row['method']}@{row['target']} ({'+'.join(setup.get('tasks', TASKS))}, limit {setup['limit']}, "
              f"{row['threads']} thread(s), {row['device']}): {row['eval_seconds']:.0f} s for {row['requests']} "
              f"requests / {tokens} tokens = {row['requests_per_second']:.2f} requests/s, {rate:.0f} tokens/s; "
              f"a row of {'+'.join(tasks)} at limit {limit}: {hours(at_limit, rate):.2f} h, "
              f"in full: {hours(full, rate):.2f} h")


def prune_with_llmcompressor(model, method: str, target: str, calibration, evaluation, model_name: str,
                             threads: int) -> dict:
    """Prune `model` in place with llm-compressor's method on the same calibration windows.

    bench/peers/run_llmcompressor.py runs in its own venv (llm-compressor pins an older transformers) and
    saves the pruned block weights, which replace this dense copy's; the model is then scored like ours.
    Returns the peer's own summary (its perplexity on the same evaluation windows, versions, checks).
    """
    if not LLMC_PYTHON.exists():
        sys.exit(f"{LLMC_PYTHON} not found: build it with `bash bench/peers/setup.sh`")
    with tempfile.TemporaryDirectory() as tmp:
        windows, result, weights = (Path(tmp) / name for name in ("windows.pt", "result.json", "weights.pt"))
        torch.save({"calibration": calibration, "evaluation": evaluation}, windows)
        command = [str(LLMC_PYTHON), str(PEERS / "run_llmcompressor.py"), "--model", local_model_dir(model_name),
                   "--windows", str(windows), "--method", method.removeprefix(PEER_PREFIX),
                   *(["--pattern", target] if ":" in target else ["--sparsity", target]),
                   "--out", str(result), "--save-weights", str(weights), "--threads", str(threads)]
        # check=True: the peer exits 1 when its own checks fail (sparsity, lm_head, calibration tokens)
        subprocess.run(command, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        peer = json.loads(result.read_text())
        load_pruned_weights(model, torch.load(weights), SparsityPattern.parse(target))
    return {k: peer[k] for k in ("tool", "version", "transformers", "torch", "perplexity", "prune_seconds",
                                 "sparsity", "calibration_tokens_match", "lm_head_untouched")}


def load_pruned_weights(model, weights: dict, pattern: SparsityPattern, tolerance: float = 0.01) -> None:
    """Copy the peer's block Linear weights into `model`; every block Linear must come, at the target sparsity."""
    linears = {name: module for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}
    if set(weights) != set(linears):
        missing, unknown = sorted(set(linears) - set(weights)), sorted(set(weights) - set(linears))
        sys.exit(f"peer weights name {len(weights)} layers, the model has {len(linears)} block Linears: "
                 f"missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for name, module in linears.items():
            module.weight.copy_(weights[name])
            kept = module.weight != 0
            sparsity = 1 - kept.float().mean().item()
            if pattern.is_nm and not is_nm(kept, pattern.n, pattern.m):
                sys.exit(f"peer weights of {name} are not {pattern.n}:{pattern.m} sparse")
            if not pattern.is_nm and abs(sparsity - pattern.sparsity) > tolerance:
                sys.exit(f"peer weights of {name} have sparsity {sparsity:.4f}, not {pattern.sparsity}")


def check(args, batch_size, device) -> dict:
    """The acceptance check: the CLI's printed/JSON metrics equal lm-eval's simple_evaluate on the same model."""
    import json

    from lm_eval_direct import direct_results

    from lmprune.cli import main as lmprune_main
    from lmprune.model import load_model
    from lmprune.zeroshot import task_manager

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cli.json"
        command = ["eval", "smollm2-135m", "--tasks", ",".join(TASKS), "--task-data", str(TASK_DATA),
                   "--limit", str(args.limit), "--batch-size", str(batch_size), "--device", str(device),
                   "--json", str(out)]
        tick = time.perf_counter()
        if lmprune_main(command + (["--no-progress"] if args.no_progress else [])) != 0:
            sys.exit("lmprune eval failed")
        cli_seconds = time.perf_counter() - tick
        ours = json.loads(out.read_text())
        model, tokenizer = load_model("smollm2-135m")
        tick = time.perf_counter()
        direct = direct_results(model, tokenizer, TASKS, str(TASK_DATA), args.limit, batch_size, str(device),
                                str(Path(tmp) / "cache"), task_manager())
        direct_seconds = time.perf_counter() - tick
    diffs = {f"{t}/{k}": (ours.get(t, {}).get(k), v) for t, m in direct.items() for k, v in m.items()
             if ours.get(t, {}).get(k) != v}
    diffs.update({t: "missing from direct" for t in ours if t not in direct})
    print("identical" if not diffs else f"DIFFERENT: {diffs}")
    shown = " ".join(command).replace(str(TASK_DATA), "../shared/data/zeroshot").replace(str(out), "FILE")
    return {"command": "lmprune " + shown, "identical": not diffs, "differences": diffs,
            "lmprune": ours, "direct": direct, "cli_seconds": cli_seconds, "direct_seconds": direct_seconds,
            "commit": git_commit(), "device": describe_device(device), "threads": args.threads}


def write_tables(data: dict, rows_dir: Path) -> None:
    """The 20-document table (rows in the JSON, with the --check result) and one table per setup of the row files."""
    sections = [("zeroshot-smollm2-135m", data["runs"], data.get("check"))]
    rows = load_rows(rows_dir)
    for setup in unique(r["setup"] for r in rows):
        marker = f"zeroshot-smollm2-135m-limit{setup['limit'] or 'all'}" + (
            f"-{'-'.join(setup['tasks'])}" if "tasks" in setup else "")
        sections.append((marker, [r for r in rows if r["setup"] == setup], None))
    for marker, runs, check in sections:
        text = table(runs, check)
        replace_section(BENCH / "RESULTS.md", marker, text)
        print(text)


def unique(items) -> list:
    out = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def mean_with_error(row: dict, key: str = "acc") -> tuple[float, float]:
    """The mean over the row's tasks and its standard error from lm-eval's per-task ones (tasks independent)."""
    tasks = row["zeroshot"]["tasks"].values()
    errors = [t[f"{key}_stderr,none"] for t in tasks]
    return row["zeroshot"]["mean"][f"{key},none"], sum(e * e for e in errors) ** 0.5 / len(errors)


def orderings(rows: list[dict]) -> list[str]:
    """Pairs of rows at one target (and each against dense) whose mean accuracies differ by more than two
    standard errors of the difference, the errors taken as independent."""
    dense = [r for r in rows if r["method"] == "dense"]
    found = []
    for target in unique(r["target"] for r in rows if r["method"] != "dense"):
        group = dense + [r for r in rows if r["target"] == target]
        pairs = [(a, b) for i, a in enumerate(group) for b in group[i + 1:]]
        for a, b in pairs:
            (ma, sa), (mb, sb) = mean_with_error(a), mean_with_error(b)
            se = (sa * sa + sb * sb) ** 0.5
            if abs(ma - mb) > 2 * se:
                hi, lo = (a, b) if ma > mb else (b, a)
                found.append(f"{target}: {hi['method']} > {lo['method']} (Δ {abs(ma - mb):.3f}, 2 SE {2 * se:.3f})")
    return found


def table(runs: list[dict], check: dict | None) -> str:
    lines = []
    if runs:
        setup = runs[-1]["setup"]
        rows = [r for r in runs if r["setup"] == setup]
        tasks = setup.get("tasks", TASKS)
        order = {t: i for i, t in enumerate(["-", *TARGETS])}
        # llm-compressor's rows right below ours of the same method
        rows.sort(key=lambda r: (order.get(r["target"], 99), r["method"] != "dense",
                                 r["method"].removeprefix(PEER_PREFIX), r["method"].startswith(PEER_PREFIX)))
        limit = setup["limit"]
        with_errors = limit is None or limit > 20  # the 20-document table is kept as it was published
        lines += [
            f"### Zero-shot accuracy: smollm2-135m, {f'first {limit}' if limit else 'all'} documents per task",
            "",
            f"lm-eval {rows[0]['zeroshot']['lm_eval']}, 0-shot, `acc` (`acc_norm` is in the JSON); calibration "
            f"{setup['nsamples']} × {setup['seqlen']} tokens of WikiText-2 valid (seed 0); ppl: WikiText-2 test, "
            f"first {setup['ppl_windows']} windows × 512 of the same pruned model. {rows[0]['device']}, "
            f"{rows[0]['threads']} thread(s)."
            + (" Each cell: accuracy ± lm-eval's standard error; the mean's error assumes independent tasks."
               if with_errors else ""),
            "",
            "| target | method | " + " | ".join(tasks) + " | mean acc | ppl |"
            + (" eval s | requests/s |" if with_errors else ""),
            "|---|---|" + "---|" * (len(tasks) + 2 + 2 * with_errors),
        ]
        for r in rows:
            cells = r["zeroshot"]["tasks"]
            acc = [(f"{cells[t]['acc,none']:.3f}" + (f" ± {cells[t]['acc_stderr,none']:.3f}" if with_errors else ""))
                   if t in cells else "" for t in tasks]
            mean, error = mean_with_error(r)
            lines.append(f"| {r['target']} | {r['method']} | " + " | ".join(acc)
                         + f" | **{mean:.3f}**" + (f" ± {error:.3f}" if with_errors else "")
                         + f" | {r['perplexity']:.2f} |"
                         + (f" {r['eval_seconds']:.0f} | {r.get('requests_per_second', float('nan')):.2f} |"
                            if with_errors else ""))
        if with_errors:
            found = orderings(rows)
            lines += ["", "Orderings of the mean the errors allow (difference > 2 standard errors of the difference, "
                          "errors taken as independent: conservative, since every row scores the same documents): "
                      + ("; ".join(found) if found else "none") + "."]
        elif limit:
            se = (0.25 / (limit - 1)) ** 0.5
            lines += ["", f"With {limit} documents a task's accuracy near 0.5 has a standard error of about {se:.3f}; "
                          f"the mean over 7 tasks about {se / 7 ** 0.5:.3f} (if independent)."]
    if check:
        lines += ["", f"Acceptance check (`bench/zeroshot.py --check`): `{check['command']}` against "
                      f"`lm_eval.simple_evaluate` called directly (bench/lm_eval_direct.py): "
                      + ("**identical** on every metric of every task" if check["identical"]
                         else f"**different**: {check['differences']}") + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
