"""One `lmprune prune` run, from its checked options: load → calibrate → prune → evaluate → save → report.

The command line (cli.py) parses and checks the flags into a PruneOptions, calls `prune`, and prints the
outcome; everything between is here. `load` and `checked_seqlen` serve `lmprune eval` too."""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from .config import DEFAULT_SEQLEN, PruneOptions
from .errors import LmpruneError
from .log import logger


@dataclass(frozen=True)
class Pruned:
    """What a finished run hands back to rank 0's command line: the report as saved, and its wall time."""

    report: dict[str, Any]
    seconds: float


def prune(options: PruneOptions) -> Pruned | None:
    """Prune, evaluate and save as `options` say; None on a torchrun rank other than 0, which saves nothing.

    Under torchrun every process joins the group; rank 0 alone owns the output and shows progress."""
    from .distributed import from_environment
    from .model import resolve_device
    from .model.saving import Destination, checkpoint_bytes

    ranks, device = from_environment(resolve_device(options.config.device))
    try:
        # Rank 0 decides (it alone sees a killed run's partial output): every process streams, or none does.
        options = replace(options, stream=ranks.broadcast_object(options.stream, "deciding whether to stream"),
                          progress=options.progress and ranks.is_main)
        # The destination is locked, checked and its temporary directory made before the model loads:
        # a destination that cannot take the result fails now, not after the pruning.
        destination = Destination(options.config.out, options.config.overwrite,
                                  checkpoint_bytes(options.model_dir, options.dtype), resumable=options.stream) \
            if ranks.is_main else contextlib.nullcontext()
        with terminate_as_interrupt(), destination:
            return _prune_on_this_rank(options, destination if ranks.is_main else None, ranks, device)
    except BaseException as exc:
        ranks.report_failure(exc)  # the other processes stop at their next exchange, with this message
        raise
    finally:
        ranks.close()


def _prune_on_this_rank(options: PruneOptions, destination, ranks, device) -> Pruned | None:
    from .data import load_text
    from .model.loading import require_finite_weights
    from .pipeline import plan_layers, prune_model

    wall = time.perf_counter()
    config = options.config
    calib_text = None if options.self_calibration else load_text(config.calib, "calibration")
    eval_text = load_text(config.eval_data, "evaluation") if config.eval_data else None  # before the model loads
    model, tokenizer, shards = load(config.model, options.dtype, options.stream, options.progress)
    options = options.with_seqlen(checked_seqlen(config.seqlen, model, "--seqlen"))
    config = options.config
    plan_layers(model, options.pattern, config.skip)  # N:M widths and --skip, before any work
    calibration, generation = _calibrate(options, model, tokenizer, calib_text, device)
    eval_windows = None
    if eval_text is not None:
        from .data import evaluation_windows, tokenize

        eval_seqlen = checked_seqlen(config.eval_seqlen or config.seqlen, model, "--eval-seqlen")
        eval_windows = evaluation_windows(tokenize(tokenizer, eval_text), eval_seqlen, config.eval_max_windows)

    block_store = _block_store(options, model, shards, device, calibration, destination, ranks) \
        if options.stream else None
    activation_device = _cpu() if options.offload_activations else None
    with keep_finished_blocks(block_store if ranks.is_main else None, destination):
        result = prune_model(model, calibration, options.method.layer_solver, options.pattern, device, config.skip,
                             config.batch_size, store_device=activation_device, refiner=options.method.refiner,
                             progress=options.progress, moe_calibration=config.moe_calibration, ranks=ranks,
                             store=block_store, allocation=config.allocation, sequential=config.sequential,
                             dense_targets=config.dense_targets, block_targets=config.block_targets,
                             reconstruct=config.reconstruct, layer_errors=config.layer_errors)
    ranks.done = True  # every process holds the pruned model; evaluation and saving are rank 0's alone
    if not ranks.is_main:
        return None
    if block_store is None:
        require_finite_weights(model, "the pruned model")  # the last word before anything is written
    if generation is not None:
        result.timings["generation"] = generation["seconds"]
    evaluation = _perplexity(options, model, block_store, eval_windows, device, result.timings)
    # On the pruned model in memory, before saving: a failure here loses no saved files.
    zeroshot = _zeroshot(options, model, tokenizer, device, result.timings) if options.eval_tasks else None
    report = prune_report(options, result, device, ranks, evaluation, zeroshot, generation, block_store)
    _save(options, model, tokenizer, report, result, block_store, destination)
    return Pruned(report, time.perf_counter() - wall)


def load(name: str, dtype: str, stream: bool, progress: bool = True):
    """(model, tokenizer, shards): the whole model in memory (shards None), or streamed: its blocks left on
    the meta device, read from the local checkpoint's shards one at a time."""
    from .model import load_model
    from .model.loading import local_model_dir

    if not stream:
        model, tokenizer = load_model(name, dtype, progress=progress)
        return model, tokenizer, None
    from .model.loading import load_streamed_model
    from .sparse.format import is_sparse_checkpoint

    path = require_local(local_model_dir(name), name)
    if is_sparse_checkpoint(path):
        raise LmpruneError(f"{name} is packed: evaluate it without --stream (its blocks are read "
                           "from packed shards only by the run that writes them)")
    return load_streamed_model(path, name, dtype)


def require_local(model_dir: str | None, model: str) -> str:
    """The local checkpoint directory a streamed run reads; a hub id is refused."""
    if not model_dir:
        raise LmpruneError(f"--stream reads a local checkpoint directory; {model!r} is not one (download it first)")
    return model_dir


def checked_seqlen(requested: int | None, model, flag: str) -> int:
    """The window length: the one asked for, which the model's context must hold, else the default capped
    at that context."""
    context = _context_length(model)
    if requested is None:
        return min(DEFAULT_SEQLEN, context) if context else DEFAULT_SEQLEN
    if context and requested > context:
        raise LmpruneError(f"{flag} {requested} exceeds the model's context length {context}")
    return requested


def _context_length(model) -> int | None:
    from .model import text_config

    config = text_config(model)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _cpu():
    import torch

    return torch.device("cpu")


def _calibrate(options: PruneOptions, model, tokenizer, calib_text: str | None, device):
    """(calibration windows, the self-generation record or None)."""
    config = options.config
    if calib_text is None:
        from .selfcalib import self_calibration

        return self_calibration(model, tokenizer, config.nsamples, config.seqlen, config.seed, device,
                                options.gen_batch_size, progress=options.progress)
    from .data import calibration_windows, tokenize

    return calibration_windows(tokenize(tokenizer, calib_text), config.nsamples, config.seqlen, config.seed), None


def _block_store(options: PruneOptions, model, shards, device, calibration, destination, ranks):
    """Rank 0: the streamed blocks, writing into the destination's partial output; continues a killed run
    there when settings, calibration and model all match. Other ranks read each block from the checkpoint
    too, and write nothing."""
    from .model.block_store import StreamedBlocks, run_identity

    if not ranks.is_main:
        return StreamedBlocks(model, shards)  # the reading role: no output directory, nothing written
    settings = {k: v for k, v in asdict(options.config).items()
                if k not in ("model", "calib", "out", "overwrite", "eval_data", "eval_seqlen", "eval_max_windows")}
    if not settings["layer_errors"]:  # only then: partial runs of earlier versions, which had no such flag, resume
        del settings["layer_errors"]
    settings.update(device=str(device), dtype=options.dtype)
    if options.save_format == "sparse":  # only then: dense partial runs of earlier versions still resume
        settings["save_format"] = "sparse"
    blocks = StreamedBlocks(model, shards, destination.tmp, run_identity(settings, calibration, shards))
    if options.save_format == "sparse":  # each finished block is packed as it is written
        from .sparse.format import BlockPacker

        blocks.packer = BlockPacker(blocks.blocks_name, asdict(options.pattern))
    blocks.open_partial(options.fresh)
    destination.keep_partial = bool(blocks.done)
    if blocks.redone:
        logger.warning(f"warning: {blocks.redone}")
    if blocks.resume_from:
        logger.info(f"resuming {destination.tmp}: block(s) 0–{blocks.resume_from - 1} of {blocks.count} were "
                    f"finished by an earlier run; pruning from block {blocks.resume_from}")
    return blocks


@contextlib.contextmanager
def keep_finished_blocks(blocks, destination):
    """A streamed run that stops keeps the blocks it finished (a rerun continues from there); a run that
    finished none leaves nothing. A partial run that cannot be continued is kept for the user to discard
    (--fresh), without advice to rerun that would only meet the same error."""
    from .model.block_store import CannotResume

    if blocks is None:
        yield
        return
    try:
        yield
    except BaseException as exc:
        destination.keep_partial = bool(blocks.done)
        if blocks.done and not isinstance(exc, CannotResume):
            note = (f"{len(blocks.done)} finished block(s) are kept in {destination.tmp}: run the same command "
                    "again to continue")
            if isinstance(exc, LmpruneError):
                raise LmpruneError(f"{exc} ({note})") from None
            logger.info(note)
        raise
    destination.keep_partial = bool(blocks.done)


@contextlib.contextmanager
def terminate_as_interrupt():
    """SIGTERM (kill, a job scheduler's stop) unwinds like Ctrl-C, so the run cleans up after itself."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _perplexity(options: PruneOptions, model, block_store, windows, device, timings: dict) -> list[dict]:
    """The report's "evaluation": perplexity of the pruned model on --eval's windows, if any."""
    if windows is None:
        return []
    from .evaluate import perplexity, streamed_perplexity

    config = options.config
    tick = time.perf_counter()
    if block_store is None:
        ppl = perplexity(model, windows, device, config.batch_size, progress=options.progress)
    else:  # the pruned blocks, read back from the partial output one at a time
        ppl = streamed_perplexity(model, block_store, windows, device, config.batch_size, progress=options.progress)
    timings["evaluation"] = time.perf_counter() - tick
    logger.info(f"perplexity on {config.eval_data}: {ppl:.3f}")
    return [{"data": config.eval_data, "seqlen": int(windows.shape[1]), "windows": int(windows.shape[0]),
             "perplexity": ppl}]


def _zeroshot(options: PruneOptions, model, tokenizer, device, timings: dict) -> dict:
    """The report's "zeroshot": --eval-tasks through lm-eval on the pruned model."""
    from .zeroshot import parse_tasks, run_tasks, summarize

    tick = time.perf_counter()
    results = run_tasks(model, tokenizer, parse_tasks(options.eval_tasks), device, options.config.batch_size,
                        options.limit, options.task_data, progress=options.progress)
    timings["zeroshot"] = time.perf_counter() - tick
    zeroshot = summarize(results, options.limit, options.task_data, options.config.batch_size)
    mean = zeroshot["mean"].get("acc,none", float("nan"))
    logger.info(f"zero-shot mean acc over {zeroshot['mean_over'].get('acc,none', 0)} tasks: {mean:.4f}")
    return zeroshot


def prune_report(options: PruneOptions, result, device, ranks, evaluation: list[dict], zeroshot: dict | None,
                 generation: dict | None, block_store) -> dict[str, Any]:
    """The JSON report saved beside the pruned checkpoint (report.py reads it back)."""
    from .model import describe_device
    from .report import library_versions, summarize_layers

    config = options.config
    settings = asdict(config)
    settings["pattern"] = asdict(options.pattern)  # as the layers got it, granularity resolved
    if generation is not None:
        settings["self_calibration"] = generation
    if block_store is not None:
        settings["stream"] = True
    report = {
        "method": config.method,
        "pattern": options.pattern.describe(),
        "device": describe_device(device),
        **({"processes": ranks.world} if ranks.active else {}),
        "settings": settings,
        "summary": summarize_layers(result.layers, result.kept_dense, result.block_weights),
        "evaluation": evaluation,
        "timings": result.timings,
        "layers": result.layers,
        "routers": result.routers,
        "selectors": result.selectors,
        "kept_dense": result.kept_dense,
        "unpruned": result.unpruned,
        "blocks": result.blocks,
        "allocation": result.allocation,
        **({"block_targets": result.block_targets} if config.block_targets else {}),
        "versions": library_versions(),
    }
    if zeroshot is not None:
        report["zeroshot"] = zeroshot
    if block_store is not None and block_store.resume_from:
        report["resumed"] = {"from_block": block_store.resume_from}
    return report


def _save(options: PruneOptions, model, tokenizer, report: dict, result, block_store, destination) -> None:
    """The checkpoint, tokenizer and report into --out, checked as written before they replace anything."""
    from .safety import verify_saved_zeros

    def check_saved(directory: str) -> None:
        verify_saved_zeros(directory, result.layers, options.pattern)

    if block_store is None:
        from .sparse.format import pack_in_place

        destination.save(model, tokenizer, report, check=check_saved,
                         finish=(lambda tmp: pack_in_place(tmp, report)) if options.save_format == "sparse" else None)
        return
    with keep_finished_blocks(block_store, destination):
        block_store.finish(tokenizer, report)
        check_saved(destination.tmp)
        destination.commit()
