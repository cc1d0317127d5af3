"""`lmprune prune | eval | report | methods | pack | unpack | generate | bench-decode`. Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time


def _huge_pages_for_large_tensors() -> None:
    """A prune makes many fresh layer-sized tensors (scores, masks, masked copies, activations); backed by 4 kB
    pages each costs more in page faults than in work (a 67 MB one, one thread: 30 ms to fault in, 5 ms to
    fill). Torch's allocator backs tensors of 2 MB and more with transparent huge pages when this variable is
    set before its first allocation; only where the kernel offers them (else torch would warn)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            offered = "[never]" not in f.read()
    except OSError:
        offered = False
    if offered:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


_huge_pages_for_large_tensors()

from . import __version__, log  # noqa: E402 (after the allocator's setting)
from .config import (ALLOCATIONS, DEFAULT_DEPTH_SLOPE, DEFAULT_SEQLEN, RECONSTRUCT_MODES, SELF_CALIB, SEQUENTIAL,
                     Allocation, PruneConfig, PruneOptions, SparsityPattern, build_reconstruct, check_windows,
                     parse_options, require_at_least, split_reconstruct_options)
from .errors import LmpruneError
from .log import logger
from .report import format_report, headline, load_report, plot_format, plot_layer_errors, summarize_layers

DEFAULT_GENERATION_BATCH = 16  # as selfcalib's; a literal here so `--help` does not import torch
SAVE_FORMATS = ("dense", "sparse")


class Parser(argparse.ArgumentParser):
    """argparse with lmprune's error form: one `lmprune: error: ...` line and exit code 2, no usage block (the
    subcommands' parsers are of this class too: add_subparsers makes them of the parent's class)."""

    def error(self, message: str):
        if speaks_for_run():
            print(f"lmprune: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lmprune", description="One-shot pruning of Hugging Face causal LMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    prune = sub.add_parser("prune", help="prune a model and save it")
    prune.add_argument("model", help="local checkpoint directory, hub id, or alias (smollm2-135m)")
    prune.add_argument("--method", help="magnitude, wanda, sparsegpt, ... (see `lmprune methods`)")
    prune.add_argument("--mask", help="take the mask from this method (with --update)")
    prune.add_argument("--update", help="then update the kept weights with this method, or 'none'")
    prune.add_argument("--refine", help="swaps: after the mask and update, greedy exact-gain weight swaps within "
                                        "rows or N:M groups, then the update again (rounds: --opt swap_rounds=K)")
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument("--sparsity", type=float, help="fraction of weights to prune, in [0, 1)")
    target.add_argument("--pattern", help="N:M semi-structured pattern, e.g. 2:4")
    granularity = prune.add_mutually_exclusive_group()
    granularity.add_argument("--per-row", dest="per_row", action="store_true", default=None,
                             help="same sparsity in every output row")
    granularity.add_argument("--per-layer", dest="per_row", action="store_false",
                             help="one threshold over the whole layer")
    prune.add_argument("--calib", default=None,
                       help="'self' (the model writes its own; the default), .txt, .jsonl (text field) "
                            "or wikitext2|ptb|c4")
    prune.add_argument("--gen-batch-size", type=int, default=DEFAULT_GENERATION_BATCH,
                       help=f"--calib self: sequences generated together (default {DEFAULT_GENERATION_BATCH})")
    prune.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    prune.add_argument("--seqlen", type=int, default=None,
                       help=f"tokens per window (default {DEFAULT_SEQLEN}, capped at the model's context)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--out", required=True, help="output directory for the pruned checkpoint")
    prune.add_argument("--overwrite", action="store_true", help="replace an earlier lmprune output in --out")
    prune.add_argument("--skip", action="append", default=[], metavar="REGEX",
                       help="do not prune layers whose full name matches (repeatable)")
    prune.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                       help="solver setting, e.g. iterations=30 (repeatable)")
    prune.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                       help="spread the sparsity over the blocks: the same everywhere (default), by outlier "
                            "ratio (owl) or rising with depth; the model's total stays exactly the target")
    prune.add_argument("--owl-m", type=float, default=Allocation.owl_m,
                       help=f"owl: a score is an outlier above M × its block's mean (default {Allocation.owl_m:g})")
    prune.add_argument("--owl-lambda", type=float, default=Allocation.owl_lambda,
                       help=f"owl: block sparsities within target ± λ (default {Allocation.owl_lambda:g})")
    prune.add_argument("--depth-slope", type=float, default=None,
                       help=f"depth: last block's sparsity minus the first's (default min({DEFAULT_DEPTH_SLOPE:g}, "
                            "1 − sparsity): the last block keeps at least half the density the target keeps)")
    prune.add_argument("--sequential", choices=SEQUENTIAL, default="none",
                       help="layer: prune a block's layers in data-flow order, each on inputs from the "
                            "already pruned ones (extra partial block passes)")
    prune.add_argument("--dense-targets", action="store_true",
                       help="each layer fits the dense model's outputs from the pruned model's inputs "
                            "(best with --sequential layer; costs two extra block passes per group)")
    prune.add_argument("--block-targets", action="store_true",
                       help="with --dense-targets and --sequential layer: each block's last layer (e.g. down_proj) "
                            "also fits the dense block's output, repairing the residual stream's error")
    prune.add_argument("--best-quality", action="store_true",
                       help="shorthand for --sequential layer --dense-targets --block-targets: the combination "
                            "that won every comparison in bench/RESULTS.md (issue 18), at about twice the prune time")
    prune.add_argument("--reconstruct", choices=RECONSTRUCT_MODES, default="none",
                       help="block: after each block is pruned, fit its kept weights (masks fixed) to the dense "
                            "block's output with Adam; --opt reconstruct_steps=, reconstruct_lr=, "
                            "reconstruct_batch= (windows per step)")
    prune.add_argument("--layer-errors", action="store_true",
                       help="report every layer's relative error ‖XW − XŴ‖²/‖XW‖² also for methods that read no "
                            "XᵀX (magnitude, wanda, dsnot): collects XᵀX, which costs time and memory")
    prune.add_argument("--moe-calibration", choices=("routed", "all"), default="routed",
                       help="MoE experts: calibrate each on the tokens routed to it (default), or on every token")
    prune.add_argument("--eval", dest="eval_data", help="perplexity on this text after pruning")
    prune.add_argument("--eval-seqlen", type=int, help="evaluation window (default: --seqlen)")
    prune.add_argument("--eval-max-windows", type=int, help="evaluate at most this many windows")
    prune.add_argument("--eval-tasks", help="lm-eval zero-shot tasks after pruning, e.g. piqa,arc_easy,boolq")
    _add_task_args(prune)
    _add_runtime_args(prune)
    prune.add_argument("--offload-activations", action="store_true",
                       help="keep calibration activations on the CPU when pruning on a GPU")
    stream = prune.add_mutually_exclusive_group()
    stream.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="read one block at a time from the checkpoint and write the output as it goes; "
                             "a killed run continues where it stopped (default: on when the weights exceed "
                             "half of the available memory)")
    stream.add_argument("--no-stream", dest="stream", action="store_false", help="load the whole model in memory")
    prune.add_argument("--fresh", action="store_true",
                       help="with --stream: discard a killed run's partial output instead of resuming it")
    prune.add_argument("--save-format", choices=SAVE_FORMATS, default="dense",
                       help="dense: a normal checkpoint with zeros (default); sparse: each pruned weight packed "
                            "(kept values + bitmask or N:M indices), read by `lmprune generate` and lmprune.load_model")

    ev = sub.add_parser("eval", help="perplexity (and lm-eval tasks) of a model")
    ev.add_argument("model")
    ev.add_argument("--data", help=".txt, .jsonl or wikitext2|ptb|c4")
    ev.add_argument("--seqlen", type=int, default=None, help=f"window length (default {DEFAULT_SEQLEN}, capped)")
    ev.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    ev.add_argument("--tasks", help="comma-separated lm-eval tasks, e.g. piqa,arc_easy")
    _add_task_args(ev)
    ev.add_argument("--json", dest="json_out", metavar="FILE",
                    help="write the task results as {task: {metric: value}} (lm-eval's metric names)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --json FILE (never an input)")
    _add_runtime_args(ev, auto_batch=True)
    ev.add_argument("--stream", action="store_true",
                    help="with --data: read one block at a time from a local checkpoint (models larger than memory)")

    rep = sub.add_parser("report", help="summarize a pruning report")
    rep.add_argument("paths", nargs="+", help="output directories or lmprune_report.json files")
    rep.add_argument("--plot", metavar="FILE",
                     help="write a per-layer error plot of the given reports (.png, .pdf, .svg, ...)")
    rep.add_argument("--overwrite", action="store_true", help="replace an existing --plot FILE (never an input)")

    sub.add_parser("methods", help="list pruning methods and weight updates")

    for command, help_text in (("pack", "store a pruned checkpoint's sparse weights compactly"),
                               ("unpack", "turn a packed checkpoint back into the dense checkpoint it came from")):
        conversion = sub.add_parser(command, help=help_text)
        conversion.add_argument("model", metavar="DIR", help="checkpoint directory (never modified)")
        conversion.add_argument("--out", required=True, help="output directory")
        conversion.add_argument("--overwrite", action="store_true", help="replace an earlier lmprune output in --out")

    gen = sub.add_parser("generate", help="generate text from a dense or packed checkpoint (prints tokens/s)")
    gen.add_argument("model", help="checkpoint directory, hub id or alias")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    sampling = gen.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="the most likely token each step (the default)")
    sampling.add_argument("--temperature", type=float, help="sample at this temperature (> 0)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    gen.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    gen.add_argument("--dense", action="store_true", help="a packed checkpoint: rebuild dense weights instead of "
                                                         "multiplying with the packed ones")
    from .sparse import decode_bench

    decode_bench.add_arguments(sub.add_parser(
        "bench-decode", help="batch-1 decode tokens/s and peak RSS: dense float32 and bfloat16 against the sparse path"))
    return parser


def _add_task_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task-data", metavar="DIR",
                        help="read each task's documents from DIR/<task>/<split>.jsonl instead of the hub")
    parser.add_argument("--limit", type=int, help="lm-eval: score only the first N documents of each task")


def _add_runtime_args(parser: argparse.ArgumentParser, auto_batch: bool = False) -> None:
    from .zeroshot import parse_batch_size

    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    if auto_batch:
        parser.add_argument("--batch-size", type=parse_batch_size, default=1,
                            help="windows (perplexity) or requests (tasks) per forward pass; 'auto': lm-eval "
                                 "finds the largest that fits (tasks only; on the CPU a fixed 16)")
    else:
        parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(argv: list[str] | None = None) -> int:
    log.configure(rank0=speaks_for_run())
    args = build_parser().parse_args(argv)
    try:
        return {"prune": cmd_prune, "eval": cmd_eval, "report": cmd_report, "methods": cmd_methods, "pack": cmd_pack,
                "unpack": cmd_unpack, "generate": cmd_generate, "bench-decode": cmd_bench_decode}[args.command](args)
    except LmpruneError as exc:
        if not getattr(exc, "quiet", False):  # another process's failure, or one every process found: rank 0's
            logger.error(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        # Under torchrun a stopped process makes the launcher stop all the others: it names the first.
        why = " (torchrun stops every process when one fails: its report names the first)" if \
            int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        logger.error(f"interrupted{why}")
        return 130


def _pattern(args) -> SparsityPattern:
    if args.pattern is not None:
        return SparsityPattern.nm(args.pattern)
    return SparsityPattern(sparsity=args.sparsity)


def _check_source(source: str, flag: str) -> None:
    from .data import NAMED_DATASETS

    if source not in NAMED_DATASETS and not os.path.isfile(source):
        raise LmpruneError(
            f"{flag} {source!r}: no such file (give a .txt/.jsonl file or one of {', '.join(NAMED_DATASETS)})"
        )


def cmd_prune(args) -> int:
    from .pipeline import format_duration
    from .run import prune

    with _found_by_every_process():
        options = prune_options(args)
    pruned = prune(options)
    if pruned is not None:  # rank 0 speaks for the run
        summary = pruned.report["summary"]
        ppl = "".join(f", perplexity {e['perplexity']:.2f} on {e['data']}" for e in pruned.report["evaluation"])
        error = f", mean relative error {summary['mean_error']:.4g}" if "mean_error" in summary else ""
        logger.info(f"saved to {options.config.out}: {headline(summary)}; {summary['layers']} layers pruned{error}"
                    f"{ppl}; wall time {format_duration(pruned.seconds)}")
    return 0


@contextlib.contextmanager
def _found_by_every_process():
    """Under torchrun every process checks the same command line and files before they join: a bad input is
    found by each, and said once, by rank 0."""
    try:
        yield
    except LmpruneError as exc:
        exc.quiet = getattr(exc, "quiet", False) or not speaks_for_run()
        raise


def prune_options(args) -> PruneOptions:
    """The prune command's options, checked before any process joins the group or loads the model: bad input
    writes nothing. What a flag implies is decided here, once (--best-quality, --calib's default, streaming)."""
    from .methods import build_method
    from .model.loading import local_model_dir
    from .paths import check_output_dir, run_inputs
    from .sparse.format import is_sparse_checkpoint

    calib = args.calib or SELF_CALIB  # no dataset needed: the model writes its own calibration text
    sequential, dense_targets, block_targets = ("layer", True, True) if args.best_quality else \
        (args.sequential, args.dense_targets, args.block_targets)
    pattern = _pattern(args)
    reconstruct_options, method_options = split_reconstruct_options(parse_options(args.opt))
    reconstruct = build_reconstruct(args.reconstruct, reconstruct_options, args.seed)
    method = build_method(args.method, args.mask, args.update, method_options, args.refine)
    config = PruneConfig(
        model=args.model, method=method.name, pattern=pattern, calib=calib, out=args.out,
        nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        device=args.device, mask=args.mask, update=args.update, options=method.settings, skip=args.skip,
        eval_data=args.eval_data, eval_seqlen=args.eval_seqlen, eval_max_windows=args.eval_max_windows,
        batch_size=args.batch_size, overwrite=args.overwrite, moe_calibration=args.moe_calibration,
        allocation=Allocation(args.allocation, args.owl_m, args.owl_lambda, args.depth_slope),
        sequential=sequential, dense_targets=dense_targets, block_targets=block_targets,
        reconstruct=reconstruct, layer_errors=args.layer_errors,
    )
    if calib != SELF_CALIB:
        _check_source(calib, "--calib")
    if args.eval_data:
        _check_source(args.eval_data, "--eval")
    model_dir = local_model_dir(args.model)
    _check_tasks(args.eval_tasks, args, "--eval-tasks")  # first: --task-data without --eval-tasks is the error
    check_output_dir(args.out, run_inputs([model_dir or _hub_cache()], [calib, args.eval_data], args.task_data))
    stream, why = _streaming(args, calib, model_dir)
    if stream and model_dir and is_sparse_checkpoint(model_dir):
        raise LmpruneError(f"--stream reads dense checkpoints; {args.model} is packed: `lmprune unpack` it first, "
                           "or prune with --no-stream")
    options = PruneOptions(
        config=config, method=method, pattern=method.pattern(pattern, args.per_row), model_dir=model_dir,
        dtype=args.dtype, stream=stream, fresh=args.fresh, save_format=args.save_format,
        gen_batch_size=args.gen_batch_size, eval_tasks=args.eval_tasks, task_data=args.task_data, limit=args.limit,
        offload_activations=args.offload_activations, progress=not args.no_progress,
    )
    if why:
        logger.info(why)
    seqlen = args.seqlen or f"{DEFAULT_SEQLEN} (at most the model's context)"
    source = (f"{calib} ({args.nsamples} × {seqlen} tokens)" if args.calib is not None and calib != SELF_CALIB
              else f"self-generated ({args.nsamples} × {seqlen} tokens sampled from the model"
                   f"{'' if args.calib is not None else '; no --calib given'})")
    logger.info(f"plan: prune {args.model} with {method.name} to {options.pattern.describe()} on "
                f"{_describe(args.device)}; calibration {source}")
    return options


def _streaming(args, calib: str, model_dir: str | None) -> tuple[bool, str]:
    """(stream?, the note that says why when it was not asked for): --stream, --no-stream, or on by default for
    a checkpoint too large for memory (or a killed streamed run to continue); options that need the whole
    model in memory are refused with --stream, and turn the default off."""
    from .model.saving import Destination
    from .model.memory import stream_by_default
    from .run import require_local

    needs_memory = (["--eval-tasks"] if args.eval_tasks else []) + (
        ["self-generated calibration (each generated token passes through every block, so streaming would "
         "read the whole checkpoint once per token; give --calib FILE)"] if calib == SELF_CALIB else [])
    if args.stream is False:
        return False, ""
    if args.stream:
        if needs_memory:
            raise LmpruneError(f"--stream keeps one block in memory: {', '.join(needs_memory)} need(s) the whole "
                               "model")
        require_local(model_dir, args.model)
        return True, ""
    stream, why = stream_by_default(model_dir)
    partial = Destination(args.out, resumable=True).tmp
    if not stream and os.path.isdir(partial) and model_dir:
        stream, why = True, f"{partial} holds a streamed run to continue"
    if stream and needs_memory:
        return False, (f"warning: not streaming although {why}: {', '.join(needs_memory)} need(s) the whole model "
                       "in memory")
    if stream:
        return True, f"streaming blocks from disk: {why} (--no-stream loads the whole model)"
    return False, ""


def _hub_cache() -> str:
    from huggingface_hub.constants import HF_HUB_CACHE

    return HF_HUB_CACHE


def _check_tasks(tasks: str | None, args, flag: str) -> None:
    """Task names, --task-data files and --limit are checked before the model is loaded or pruned."""
    if not tasks:
        for option, value in (("--task-data", args.task_data), ("--limit", args.limit)):
            if value is not None:
                raise LmpruneError(f"{option} needs {flag}")
        return
    from .zeroshot import build_tasks, parse_tasks

    require_at_least(args.limit, 1, "--limit")
    build_tasks(parse_tasks(tasks), args.task_data)  # loads every document: a missing file fails now


def cmd_eval(args) -> int:
    from .evaluate import evaluate_perplexity
    from .model import resolve_device
    from .run import checked_seqlen, load

    if not args.data and not args.tasks:
        raise LmpruneError("nothing to evaluate: give --data and/or --tasks")
    if args.data:
        _check_source(args.data, "--data")
    check_windows(args.seqlen, args.max_windows, "--seqlen", "--max-windows")  # --batch-size: its argparse type
    if args.data and args.batch_size == "auto":
        raise LmpruneError("--batch-size auto applies to --tasks; give a number of windows with --data")
    if args.json_out is not None and not args.tasks:
        raise LmpruneError("--json needs --tasks")
    if args.stream and args.tasks:
        raise LmpruneError("--stream evaluates perplexity (--data) one block at a time; --tasks needs the whole model")
    if args.overwrite and args.json_out is None:
        raise LmpruneError("--overwrite replaces an existing --json FILE: it needs --json")
    json_out = _json_output(args) if args.json_out is not None else None
    _check_tasks(args.tasks, args, "--tasks")
    device = resolve_device(args.device)
    model, tokenizer, shards = load(args.model, args.dtype, args.stream, progress=not args.no_progress)
    block_store = None
    if shards is not None:
        from .model.block_store import StreamedBlocks

        block_store = StreamedBlocks(model, shards)  # reads each block, writes nothing
    if args.data:
        seqlen = checked_seqlen(args.seqlen, model, "--seqlen")
        result = evaluate_perplexity(model, tokenizer, args.data, seqlen, args.max_windows, device, args.batch_size,
                                     progress=not args.no_progress, store=block_store)
        print(f"perplexity {result['perplexity']:.4f} ({result['windows']} windows × {seqlen} tokens of {args.data})")
    if args.tasks:
        from .report import format_zeroshot
        from .zeroshot import parse_tasks, run_tasks, summarize, task_metrics

        results = run_tasks(model, tokenizer, parse_tasks(args.tasks), device, args.batch_size, args.limit,
                            args.task_data, progress=not args.no_progress)
        print(format_zeroshot(summarize(results, args.limit, args.task_data, args.batch_size)))
        if json_out is not None:
            json_out(task_metrics(results))
    return 0


def _json_output(args):
    """`eval --json FILE` checked before the model loads; returns the function that writes it at the end."""
    from .model.loading import local_model_dir
    from .paths import check_output_file, run_inputs, write_errors
    from .report import write_json

    def check() -> None:
        inputs = run_inputs([local_model_dir(args.model) or _hub_cache()], [args.data], args.task_data)
        check_output_file(args.json_out, inputs, args.overwrite, "--json")

    def write(results: dict) -> None:
        check()  # again: whatever appeared there during the evaluation passes the same test
        with write_errors(f"--json {args.json_out!r}"):
            write_json(args.json_out, results)

    check()
    return write


def cmd_report(args) -> int:
    from .paths import atomic_path, check_output_file, run_inputs, write_errors

    if args.overwrite and args.plot is None:
        raise LmpruneError("--overwrite replaces an existing --plot FILE: it needs --plot")
    if args.plot is not None:
        check_output_file(args.plot, run_inputs(reports=args.paths), args.overwrite, "--plot")
        image_format = plot_format(args.plot)
    reports = {path: load_report(path) for path in args.paths}
    for path, report in reports.items():
        if len(reports) > 1:
            print(f"== {path}")
        print(format_report(report))
    if args.plot is not None:
        with write_errors(f"--plot {args.plot!r}"), atomic_path(args.plot) as tmp:
            plot_layer_errors({f"{r['method']} {r['pattern']}": r for r in reports.values()}, tmp, image_format)
        print(f"plot written to {args.plot}")
    return 0


def cmd_methods(args) -> int:
    from dataclasses import fields

    from .solvers import SOLVERS

    import importlib

    from .methods import BLOCK_METHODS

    entries = [(name, "/".join(k for k, fn in (("mask", s.solve), ("update", s.update)) if fn), s.description,
                s.settings) for name, s in SOLVERS.items()]
    for name, module_name in BLOCK_METHODS.items():
        module = importlib.import_module(module_name)
        entries.append((name, "block", module.DESCRIPTION, module.SETTINGS))
    for name, kinds, description, settings in sorted(entries):
        print(f"{name:<12} [{kinds}] {description}")
        for f in fields(settings):
            print(f"{'':<14}--opt {f.name}={getattr(settings(), f.name)}")
    return 0


def cmd_pack(args) -> int:
    from .sparse.format import pack_checkpoint, packed_record

    def convert(tmp: str, report: dict | None) -> dict:
        counts = pack_checkpoint(args.model, tmp, report)
        logger.info(f"packed {counts['bitmask']} weight(s) as bitmask and {counts['nm']} as N:M")
        record = packed_record(counts, os.path.abspath(args.model))
        # A checkpoint pruned elsewhere gets a report all the same: it marks the output as lmprune's.
        return {**(report or _unknown_report()), "packed": record}

    return _convert_checkpoint(args, convert)


def cmd_unpack(args) -> int:
    from .sparse.format import is_sparse_checkpoint, unpack_checkpoint

    if not is_sparse_checkpoint(args.model):
        raise LmpruneError(f"{args.model} is not a packed checkpoint (its config.json has no lmprune_sparse entry)")

    def convert(tmp: str, report: dict | None) -> dict:
        unpack_checkpoint(args.model, tmp)
        report = dict(report or _unknown_report())
        report.pop("packed", None)
        return report

    return _convert_checkpoint(args, convert)


def _unknown_report() -> dict:
    """The report of a checkpoint pruned elsewhere: what `lmprune report` reads, with nothing known."""
    return {"method": "unknown", "pattern": "unknown", "settings": {}, "layers": [], "summary": summarize_layers([])}


def _convert_checkpoint(args, convert) -> int:
    """pack/unpack: DIR read only, the result written beside --out and swapped in whole."""
    from .model.saving import Destination, checkpoint_bytes
    from .paths import check_output_dir, os_reason, run_inputs
    from .report import REPORT_NAME, write_json

    if not os.path.isdir(args.model):
        raise LmpruneError(f"{args.model!r} is not a checkpoint directory")
    check_output_dir(args.out, run_inputs([args.model]))
    report = load_report(args.model) if os.path.isfile(os.path.join(args.model, REPORT_NAME)) else None
    with Destination(args.out, args.overwrite, checkpoint_bytes(args.model)) as destination:
        try:
            write_json(os.path.join(destination.tmp, REPORT_NAME), convert(destination.tmp, report))
        except OSError as exc:
            raise LmpruneError(f"cannot write to {destination.tmp!r}: {os_reason(exc)}") from None
        destination.commit()
    logger.info(f"wrote {args.out}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .model import load_model
    from .sparse.linear import SparseLinear

    require_at_least(args.max_new_tokens, 1, "--max-new-tokens")
    if args.temperature is not None and not args.temperature > 0:
        raise LmpruneError(f"--temperature must be above 0, got {args.temperature} (use --greedy)")
    if args.threads is not None:
        require_at_least(args.threads, 1, "--threads")
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.dtype, sparse=not args.dense)
    sparse = sum(isinstance(m, SparseLinear) for m in model.modules())
    text, new_tokens, seconds = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                                              args.seed, stream=True)
    logger.info(f"{new_tokens} new tokens in {seconds:.2f} s: {new_tokens / seconds:.2f} tokens/s on "
         f"{torch.get_num_threads()} thread(s), {sparse} packed layer(s)")
    return 0


def cmd_bench_decode(args) -> int:
    from .sparse.decode_bench import command

    return command(args)


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float | None = None,
                  seed: int = 0, stream: bool = False) -> tuple[str, int, float]:
    """(the prompt and its continuation, new tokens, seconds spent generating); greedy unless a temperature
    is given. `stream`: print the text to stdout as it comes."""
    import torch
    from transformers import TextStreamer

    torch.manual_seed(seed)
    inputs = tokenizer(prompt, return_tensors="pt")
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tick = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling,
                                streamer=TextStreamer(tokenizer, skip_special_tokens=True) if stream else None)
    seconds = time.perf_counter() - tick
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    return tokenizer.decode(output[0], skip_special_tokens=True), int(new_tokens), seconds


def _describe(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda (auto)" if torch.cuda.is_available() else "cpu (auto)"


def speaks_for_run() -> bool:
    """Whether this process prints the run's messages: yes, unless it is one of torchrun's other ranks."""
    return os.environ.get("RANK", "0") == "0"


if __name__ == "__main__":
    sys.exit(main())
