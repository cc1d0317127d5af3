"""lm-eval called directly, without lmprune: the reference that `lmprune eval --tasks --task-data` must equal.

Local data goes through lm-eval's own documented route, not lmprune's: each task's YAML config (as lm-eval
loads it, `!function` prompts resolved) is passed inline to `simple_evaluate` with `dataset_path: json` and
`data_files` pointing at DIR/<task>/<split>.jsonl, so `datasets`' json builder reads the files and lm-eval's
`download` runs unchanged. Used by tests/test_zeroshot.py and `bench/zeroshot.py --check`.
"""

from __future__ import annotations

import os


def direct_configs(tasks: list[str], root: str, cache_dir: str, task_manager) -> list[dict]:
    """Each task's full lm-eval config with its documents redirected to the local json file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    configs = []
    for name in tasks:
        cfg = load_yaml(task_manager.task_index[name].yaml_path, resolve_func=True)
        split = cfg.get("test_split") or cfg.get("validation_split")
        path = os.path.abspath(os.path.join(root, name, f"{split}.jsonl"))
        # every split the config names reads the same file: only `split` is scored, the rest feed the
        # (unused at zero shots) few-shot sampler
        names = {cfg.get(k) for k in ("training_split", "validation_split", "test_split")} - {None}
        cfg.update(dataset_path="json", dataset_name=None,
                   dataset_kwargs={"data_files": {s: path for s in names}, "cache_dir": cache_dir})
        configs.append(cfg)
    return configs


def direct_results(model, tokenizer, tasks: list[str], root: str, limit: int | None, batch_size, device: str,
                   cache_dir: str, task_manager=None, bootstrap_iters: int = 100000) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` from `lm_eval.simple_evaluate` on an HFLM wrapping the model in memory."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task_manager = task_manager or TaskManager()
    model.to(device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=lm, tasks=direct_configs(tasks, root, cache_dir, task_manager),
                                      limit=limit, task_manager=task_manager, log_samples=False,
                                      bootstrap_iters=bootstrap_iters)
    return {task: {k: v for k, v in metrics.items() if "," in k and isinstance(v, float)}
            for task, metrics in results["results"].items()}
