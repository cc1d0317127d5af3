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
import logging
import math
import os
import re
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


def read_jsonl(path: str, task: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of each document in a --task-data file."""
    from .data import decode_text
    from .jsonl import jsonl_records

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise LmpruneError(f"lm-eval task {task!r}: no documents at {path} (expected --task-data DIR/{task}/"
                           f"{os.path.basename(path)}, one JSON object per line)") from None
    records = jsonl_records(decode_text(raw, path).split("\n"), path)
    if not records:
        raise LmpruneError(f"{path} holds no documents")
    return records


def documents(path: str, records: list[tuple[int, dict[str, Any]]]):
    """The records as a datasets.Dataset; a record whose field has another type than in the records before it
    (which Arrow cannot store in one column) is named by its line and field."""
    import datasets

    rows = [record for _, record in records]
    try:
        return datasets.Dataset.from_list(rows)
    except (TypeError, ValueError) as exc:  # pyarrow's ArrowTypeError / ArrowInvalid
        failure = _first_line(exc)
    good, bad = 0, len(rows)  # the shortest failing prefix, by bisection: its last record is the culprit
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (good, middle) if _not_one_table(rows[:middle]) else (middle, bad)
    line, record = records[bad - 1]
    fields = [key for key in record if _not_one_table([{key: r.get(key)} for r in rows[:bad]])]
    what = f"field {fields[0]!r}" if fields else "a field"
    raise LmpruneError(f"{path}:{line}: {what} has another type than in the lines before it ({failure})")


def _not_one_table(rows: list[dict]) -> bool:
    import datasets

    try:
        datasets.Dataset.from_list(rows)
    except (TypeError, ValueError):
        return True
    return False


def local_dataset(config, root: str):
    """A DatasetDict with the task's evaluation split read from ``root``, and that split's (path, records).

    The other splits the config names (train, validation, few-shot) are read when their file exists; else they
    are empty with the same features: lm-eval builds a few-shot sampler from them at construction even at zero
    shots, and an empty one is never drawn from.
    """
    import datasets

    split = eval_split(config)
    path = task_file(root, config.task, split)
    records = read_jsonl(path, config.task)
    docs = documents(path, records)
    splits = {split: docs}
    fewshot = config.fewshot_config.get("split") if isinstance(config.fewshot_config, dict) else None
    for other in (config.training_split, config.validation_split, config.test_split, fewshot):
        if other and other not in splits:
            other_path = task_file(root, config.task, other)
            splits[other] = (documents(other_path, read_jsonl(other_path, config.task)) if os.path.isfile(other_path)
                             else docs.select([]))
    return datasets.DatasetDict(splits), (path, records)


# What lm-eval's document functions raise on a record that lacks a field or has one of the wrong kind.
RECORD_ERRORS = (KeyError, TypeError, AttributeError, ValueError, IndexError, SyntaxError)


def check_documents(task, path: str, records: list[tuple[int, dict[str, Any]]]) -> None:
    """Every record goes through what the task reads (process_docs, doc_to_text, doc_to_target, doc_to_choice),
    so a missing or ill-typed field is named with its file and line instead of failing deep in lm-eval, or
    worse, being read as None ("Question: None").

    Arrow fills a field that some records lack with None; such records are checked on their own, as they
    are in the file, so lm-eval's lookup fails by name (KeyError, or Jinja's "'goal' is undefined").
    """
    import datasets
    from jinja2.exceptions import UndefinedError

    errors = RECORD_ERRORS + (UndefinedError,)
    fields = set().union(*(record.keys() for _, record in records))
    process = task.config.process_docs
    try:
        docs = list(task.eval_docs)
    except errors:
        docs = []  # some record breaks process_docs: the loop below finds which
    aligned = len(docs) == len(records)  # process_docs kept every record, in order
    with compiled_templates_cached():
        for index, (line, record) in enumerate(records):
            try:
                if aligned and record.keys() == fields:
                    own = [docs[index]]
                elif process is None:
                    own = [record]
                elif not record:
                    raise LmpruneError(f"{path}:{line}: an empty JSON object: lm-eval task {task.config.task!r} "
                                       "reads fields from each record")
                else:
                    own = process(datasets.Dataset.from_list([record]))
                    if not hasattr(task, "features"):  # lm-eval's constructor stopped before setting them
                        task.features = list(own.features)
                for doc in own:
                    task.doc_to_text(doc)
                    task.doc_to_target(doc)
                    if task.config.doc_to_choice is not None:
                        task.doc_to_choice(doc)
            except errors as exc:
                raise LmpruneError(f"{path}:{line}: lm-eval task {task.config.task!r} "
                                   f"{_record_problem(exc)}") from None


@contextlib.contextmanager
def compiled_templates_cached():
    """lm-eval compiles a task's Jinja prompt anew for every document (milliseconds each: most of a check's
    time); the same template compiles to the same thing, so while checking each is compiled once."""
    from lm_eval import utils

    render = utils.apply_template

    @functools.lru_cache(maxsize=64)
    def compiled(template: str):
        return utils.env.from_string(template)

    utils.apply_template = lambda template, doc: compiled(template).render(**doc)
    try:
        yield
    finally:
        utils.apply_template = render


def _record_problem(exc: BaseException) -> str:
    from jinja2.exceptions import UndefinedError

    if isinstance(exc, KeyError) and exc.args:
        return f"reads field {exc.args[0]!r}, which this record lacks"
    missing = re.fullmatch(r"'(.+)' is undefined", str(exc)) if isinstance(exc, UndefinedError) else None
    if missing:  # a Jinja prompt: lm-eval's templates fail on an undefined name
        return f"reads field {missing.group(1)!r}, which this record lacks"
    return f"cannot read this record ({_first_line(exc)})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


@contextlib.contextmanager
def task_documents(root: str | None):
    """While active, lm-eval tasks read their documents from ``root`` (or, with None, the hub with a clear error).

    lm-eval calls ``download`` from the task constructor, so it is replaced on the class for the duration:
    groups and tags expand to tasks built the same way, and no task config is copied or rewritten.
    """
    from lm_eval.api.task import ConfigurableTask

    hub_download, hub_init = ConfigurableTask.download, ConfigurableTask.__init__

    def from_files(task, dataset_kwargs=None, **kwargs):
        task.dataset, task._lmprune_documents = local_dataset(task.config, root)

    def checked_init(task, *args, **kwargs):
        # lm-eval's constructor reads the first document; the others are read only when requests are built
        try:
            hub_init(task, *args, **kwargs)
        except LmpruneError:
            raise
        except Exception as exc:
            source = getattr(task, "_lmprune_documents", None)
            if source is None:
                raise
            check_documents(task, *source)  # names the record that failed, where it can
            raise LmpruneError(f"lm-eval task {task.config.task!r} cannot read the documents in {source[0]} "
                               f"({_first_line(exc)})") from None
        source = getattr(task, "_lmprune_documents", None)
        if source is not None:
            check_documents(task, *source)

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

    if root is not None:
        ConfigurableTask.download, ConfigurableTask.__init__ = from_files, checked_init
    else:
        ConfigurableTask.download = from_hub
    try:
        yield
    finally:
        ConfigurableTask.download, ConfigurableTask.__init__ = hub_download, hub_init


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
        with quiet(), task_documents(task_data), no_git_probe(), contextlib.redirect_stdout(sys.stderr):
            results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=0, log_samples=False,
                                              bootstrap_iters=bootstrap_iters, task_manager=task_manager())
    finally:
        model.to(home)
    return results


@contextlib.contextmanager
def no_git_probe():
    """lm-eval runs `git describe` in the working directory to record a commit hash in its results; outside a
    repository git prints "fatal: not a git repository" on stderr. lmprune keeps no such hash (its report
    records the versions of the code that ran), so lm-eval is given none; nothing else is silenced."""
    import lm_eval.evaluator as evaluator

    probe = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = probe


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
