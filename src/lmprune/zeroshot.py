"""Zero-shot accuracy through lm-eval's own task definitions, optionally with documents read from local files.

lm-eval builds each task from its YAML (prompts, choices, metrics) and fetches the documents from the Hugging
Face hub in ``ConfigurableTask.download``. With ``task_data`` that one step is swapped for a reader of
``<task_data>/<task>/<split>.jsonl``, where ``<split>`` is the split the task's own config evaluates on
(``test_split`` if set, else ``validation_split``: lm-eval's rule). Everything after the documents exist —
``process_docs``, ``doc_to_text``/``doc_to_choice``/``doc_to_target``, metrics — is lm-eval's, unchanged.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import math
import os
import sys
from functools import lru_cache
from typing import Any

from .errors import LmpruneError

AUTO_BATCH_ON_CPU = 16  # lm-eval's "auto" probe runs 5 forwards of 64 × longest request: minutes on a CPU
QUIET_LOGGERS = ("lm_eval", "datasets", "evaluate", "absl", "sqlitedict", "httpx", "huggingface_hub")


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise LmpruneError(f"no task names in {text!r}: give a comma-separated list, e.g. piqa,arc_easy")
    return tasks


def parse_batch_size(text: str) -> int | str:
    """argparse type of `--batch-size`: a positive int, or "auto" (lm-eval finds the largest that fits)."""
    import argparse

    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise LmpruneError("zero-shot tasks need lm-eval: pip install 'lmprune[eval]'") from None
    import lm_eval

    return lm_eval


def lm_eval_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=1)
def task_manager():
    """One TaskManager per process: indexing lm-eval's ~15k task YAMLs takes seconds."""
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    with quiet():
        return TaskManager()


def check_task_names(tasks: list[str]) -> None:
    """Unknown names fail here with suggestions, not deep inside lm-eval with a KeyError."""
    known = set(task_manager().all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise LmpruneError(f"unknown lm-eval task {name!r}{hint}")


def eval_split(config) -> str:
    """The split lm-eval evaluates a task on: its test split when the config names one, else validation."""
    split = config.test_split or config.validation_split
    if not split:
        raise LmpruneError(f"lm-eval task {config.task!r} names neither a test nor a validation split")
    return split


def task_file(root: str, task: str, split: str) -> str:
    return os.path.join(root, task, f"{split}.jsonl")


def read_jsonl(path: str, task: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise LmpruneError(f"lm-eval task {task!r}: no documents at {path} (expected --task-data DIR/{task}/"
                           f"{os.path.basename(path)}, one JSON object per line)") from None
    except json.JSONDecodeError as exc:
        raise LmpruneError(f"{path}: not JSON lines ({exc})") from None
    if not records:
        raise LmpruneError(f"{path} holds no documents")
    return records


def local_dataset(config, root: str):
    """A DatasetDict with the task's evaluation split read from ``root``.

    The other splits the config names (train, validation, few-shot) are read when their file exists; else they
    are empty with the same features: lm-eval builds a few-shot sampler from them at construction even at zero
    shots, and an empty one is never drawn from.
    """
    import datasets

    split = eval_split(config)
    docs = datasets.Dataset.from_list(read_jsonl(task_file(root, config.task, split), config.task))
    splits = {split: docs}
    fewshot = config.fewshot_config.get("split") if isinstance(config.fewshot_config, dict) else None
    for other in (config.training_split, config.validation_split, config.test_split, fewshot):
        if other and other not in splits:
            path = task_file(root, config.task, other)
            splits[other] = (datasets.Dataset.from_list(read_jsonl(path, config.task)) if os.path.isfile(path)
                             else docs.select([]))
    return datasets.DatasetDict(splits)


@contextlib.contextmanager
def task_documents(root: str | None):
    """While active, lm-eval tasks read their documents from ``root`` (or, with None, the hub with a clear error).

    lm-eval calls ``download`` from the task constructor, so it is replaced on the class for the duration:
    groups and tags expand to tasks built the same way, and no task config is copied or rewritten.
    """
    from lm_eval.api.task import ConfigurableTask

    hub_download = ConfigurableTask.download

    def from_files(task, dataset_kwargs=None, **kwargs):
        task.dataset = local_dataset(task.config, root)

    def from_hub(task, dataset_kwargs=None, **kwargs):
        try:
            hub_download(task, dataset_kwargs, **kwargs)
        except LmpruneError:
            raise
        except Exception as exc:  # connection, offline mode, missing dataset: all mean "bring the data yourself"
            name, split = task.config.task, task.config.test_split or task.config.validation_split
            raise LmpruneError(
                f"lm-eval task {name!r}: could not load {task.config.dataset_path!r} from the Hugging Face hub "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); to run offline pass "
                f"--task-data DIR with the documents in DIR/{name}/{split}.jsonl"
            ) from None

    ConfigurableTask.download = from_files if root is not None else from_hub
    try:
        yield
    finally:
        ConfigurableTask.download = hub_download


@contextlib.contextmanager
def quiet():
    """Third-party INFO/WARNING chatter (lm-eval's per-task notices, datasets' map bars) off; errors still show."""
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    bars = None
    try:
        import lm_eval.api.task as lm_task

        # one "building requests" bar per task is noise beside the log-likelihood bar, which stays
        lm_task.tqdm, task_bar = functools.partial(lm_task.tqdm, disable=True), lm_task.tqdm
    except ImportError:
        lm_task = None
    try:
        import datasets

        bars = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()
        if lm_task is not None:
            lm_task.tqdm = task_bar


def check_task_data(tasks: list[str], root: str | None) -> None:
    """Cheap checks before any model work: task names exist and --task-data is a directory."""
    check_task_names(tasks)
    if root is not None and not os.path.isdir(root):
        raise LmpruneError(f"--task-data {root!r}: no such directory (expected DIR/<task>/<split>.jsonl)")


def build_tasks(tasks: list[str], root: str | None) -> dict:
    """lm-eval's task objects with their documents loaded (used to fail early, before pruning)."""
    check_task_data(tasks, root)
    with quiet(), task_documents(root):
        return task_manager().load(tasks)["tasks"]


def make_lm(model, tokenizer, device, batch_size: int | str, progress: bool = True):
    """lm-eval's HF wrapper around a model already in memory (pruned weights are never re-read from disk)."""
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if batch_size == "auto" and device.type == "cpu":
        batch_size = AUTO_BATCH_ON_CPU

    class LmpruneLM(HFLM):
        # lm-eval's evaluator never passes disable_tqdm; this is how --no-progress reaches its bars.
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not progress)

    model.to(device)
    with quiet():
        return LmpruneLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))


def run_tasks(model, tokenizer, tasks: list[str], device, batch_size: int | str = 1,
              limit: int | None = None, task_data: str | None = None, progress: bool = True,
              bootstrap_iters: int = 100000) -> dict:
    """lm-eval's `simple_evaluate` on the model in memory; returns its full results dict.

    Zero-shot, fixed seeds and bootstrap size (lm-eval's defaults; the bootstrap only serves stderrs of
    non-mean metrics such as lambada's perplexity), no per-sample logs kept.
    """
    lm_eval = _import_lm_eval()
    check_task_data(tasks, task_data)
    home = next(model.parameters()).device
    lm = make_lm(model, tokenizer, device, batch_size, progress)
    try:
        # lm-eval print()s notices (e.g. "bootstrapping for stddev"): stdout is kept for lmprune's table
        with quiet(), task_documents(task_data), contextlib.redirect_stdout(sys.stderr):
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=0, log_samples=False,
                                              bootstrap_iters=bootstrap_iters, task_manager=task_manager())
    finally:
        model.to(home)
    return results


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` with lm-eval's metric names ("acc,none": metric,filter); "N/A" stderrs dropped."""
    return {
        task: {k: float(v) for k, v in metrics.items()
               if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for task, metrics in results["results"].items()
    }


def summarize(results: dict, limit: int | None, task_data: str | None, batch_size: int | str) -> dict:
    """What a report stores: per-task metrics (lm-eval's names) with "n", the documents scored, and the means.

    `mean` averages each metric over the (leaf) tasks that report it, `mean_over` says how many: acc over all,
    acc_norm over those defining it; the papers' "average accuracy" column.
    """
    metrics = task_metrics(results)
    samples = results.get("n-samples", {})
    tasks = {}
    for task, values in metrics.items():
        n = samples.get(task, {}).get("effective")
        tasks[task] = {**values, **({"n": int(n)} if n is not None else {})}
    groups = {name for name, members in results.get("group_subtasks", {}).items() if members}
    mean, counts = {}, {}
    for key in ("acc,none", "acc_norm,none"):  # over leaf tasks: a group's row already averages its members
        values = [m[key] for t, m in metrics.items() if t not in groups and key in m and math.isfinite(m[key])]
        if values:
            mean[key] = sum(values) / len(values)
            counts[key] = len(values)
    return {"tasks": tasks, "mean": mean, "mean_over": counts, "limit": limit, "task_data": task_data,
            "batch_size": batch_size, "num_fewshot": 0, "lm_eval": lm_eval_version()}
