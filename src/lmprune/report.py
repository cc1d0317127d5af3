"""The JSON report written beside a pruned checkpoint, and its human-readable summary."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
from importlib import metadata
from typing import Any

from .dense_reasons import NO_SIGNAL, DenseReason
from .errors import LmpruneError
from .paths import atomic_path
from .jsonl import json_type

REPORT_NAME = "lmprune_report.json"


def library_versions() -> dict[str, str]:
    """Versions of the code that ran, as the imported modules report them.

    A module's own ``__version__`` is preferred over installed-package metadata: it is right for code run
    from a source tree, and it keeps the build tag that says which CUDA a torch wheel was built for.
    """
    versions = {"python": platform.python_version()}
    for package in ("lmprune", "torch", "transformers", "safetensors", "numpy"):
        try:
            versions[package] = str(importlib.import_module(package).__version__)
        except (ImportError, AttributeError):
            try:
                versions[package] = metadata.version(package)
            except metadata.PackageNotFoundError:
                versions[package] = "not installed"
    return versions


def summarize_layers(layers: list[dict[str, Any]], kept_dense: list[dict[str, Any]] | None = None,
                     block_weights: int | None = None) -> dict[str, Any]:
    """Overall sparsity (weighted by size) and mean relative errors of the pruned layers; with `kept_dense`
    and `block_weights` (pipeline.PruneResult), the share of all block weights pruned and what was kept
    dense, by reason: what the headline says."""
    summary: dict[str, Any] = {"layers": 0}
    if layers:
        numel = [r["shape"][0] * r["shape"][1] for r in layers]
        zeros = sum(r["sparsity"] * n for r, n in zip(layers, numel))
        experts = [r for r in layers if "[" in r["name"]]
        fallbacks = [{"name": r["name"], "tokens": r.get("tokens"), "why": r["fallback"]} for r in layers
                     if r.get("tokens") is not None and "fallback" in r]
        summary = {
            "layers": len(layers),
            "expert_slices": len(experts),
            "layers_with_fallback": fallbacks,  # e.g. layers without calibration signal: magnitude mask
            "pruned_parameters": sum(numel),
            "sparsity": zeros / sum(numel),
        }
        measured = [r for r in layers if "error" in r]  # a method that reads no XᵀX reports none (statistics.py)
        if measured:
            summary.update(mean_error=sum(r["error"] for r in measured) / len(measured),
                           mean_error_masked=sum(r["error_masked"] for r in measured) / len(measured))
    if block_weights:
        zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers)
        by_reason: dict[str, dict[str, int]] = {}
        for entry in kept_dense or []:
            seen = by_reason.setdefault(entry["kind"], {"tensors": 0, "weights": 0})
            seen["tensors"] += 1
            seen["weights"] += entry["weights"]
        kept = sum(seen["weights"] for seen in by_reason.values())
        summary.update(block_weights=block_weights, block_sparsity=zeros / block_weights,
                       kept_dense={"weights": kept, "share": kept / block_weights, "by_reason": by_reason})
    return summary


def headline(summary: dict[str, Any]) -> str:
    """What share of all block weights was pruned, and what was kept dense and why, e.g.
    "sparsity 0.4943 of the block weights; 16,384 weights (1.2%) kept dense: 4 routers"."""
    if "block_sparsity" not in summary:  # a report from before block totals were kept
        return f"{summary.get('layers', 0)} layers at sparsity {_number(summary.get('sparsity', 0)):.4f}"
    text = f"sparsity {_number(summary['block_sparsity']):.4f} of the block weights"
    kept = summary["kept_dense"]
    if kept["weights"]:
        reasons = ", ".join(DenseReason(kind).plural(seen["tensors"]) for kind, seen in kept["by_reason"].items())
        text += f"; {kept['weights']:,} weights ({kept['share']:.1%}) kept dense: {reasons}"
    else:
        text += "; none kept dense"
    no_signal = [r for r in summary.get("layers_with_fallback", []) if r.get("why", "").startswith(NO_SIGNAL)]
    if no_signal:
        text += f"; {len(no_signal)} layer(s) without calibration signal under a magnitude mask"
    return text


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one.

    Non-finite numbers become the strings "NaN", "Infinity", "-Infinity": still valid JSON (json.dump
    would write bare NaN, which strict readers reject), still readable by `float()`.
    """
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite_json(data), f, indent=2, default=str, allow_nan=False)
        f.write("\n")


def _finite_json(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(v) for v in value]
    return value


def _number(value: Any) -> float:
    """A report number as a float: non-finite ones are stored as strings, a missing one is NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_report(path: str) -> dict[str, Any]:
    """A report as written by `lmprune prune`, checked against what `lmprune report` reads: a file that is not
    one (not JSON, a list, a summary that is not an object, a layer without its numbers) is refused in one
    line rather than printed as zeros."""
    if os.path.isdir(path):
        path = os.path.join(path, REPORT_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise LmpruneError(f"no report at {path}") from None
    except json.JSONDecodeError as exc:
        raise LmpruneError(f"{path} is not a valid JSON report: {exc}") from None
    except UnicodeDecodeError:
        raise LmpruneError(f"{path} is not a valid JSON report: it is not UTF-8 text") from None
    except OSError as exc:
        raise LmpruneError(f"cannot read {path}: {exc.strerror or exc}") from None
    problem = report_problem(report)
    if problem:
        raise LmpruneError(f"{path} is not an lmprune report: {problem}")
    return report


# What `lmprune report` reads, field by field: (kind, required). Kinds: a JSON type, "number" (finite, or
# the strings write_json stores non-finite numbers as), "integer"; a list of kinds accepts any of them.
REPORT_FIELDS = {"method": ("string", True), "pattern": ("string", True), "settings": ("object", True),
                 "summary": ("object", True), "layers": ("array", True), "timings": ("object", False),
                 "evaluation": ("array", False), "allocation": (["object", "null"], False),
                 "unpruned": ("array", False), "routers": ("array", False), "zeroshot": (["object", "null"], False),
                 "block_targets": ("object", False)}
SUMMARY_FIELDS = {"layers": ("integer", True), "expert_slices": ("integer", False),
                  "layers_with_fallback": ("array", False)}
# Present whenever a layer was pruned (True), or where the layers' errors were computed (False).
SUMMARY_NUMBERS = {"sparsity": ("number", True), "mean_error": ("number", False),
                   "mean_error_masked": ("number", False)}
LAYER_FIELDS = {"name": ("string", True), "shape": ("array", True), "sparsity": ("number", True),
                "error": ("number", False), "error_masked": ("number", False), "tokens": (["integer", "null"], False)}
EVALUATION_FIELDS = {"data": ("string", True), "windows": ("integer", True), "seqlen": ("integer", True),
                     "perplexity": ("number", True)}
UNPRUNED_FIELDS = {"name": ("string", True), "shape": ("array", True), "reason": ("string", True)}
FALLBACK_FIELDS = {"name": ("string", True)}
ALLOCATION_FIELDS = {"kind": ("string", False), "block_sparsities": ("array", False)}
BLOCK_TARGETS_FIELDS = {"layers": ("array", False), "not_applied": ("object", False)}
ZEROSHOT_FIELDS = {"tasks": ("object", False), "mean": ("object", False), "mean_over": ("object", False)}
NON_FINITE = ("NaN", "Infinity", "-Infinity")


def report_problem(report: Any) -> str | None:
    """What makes `report` unreadable as an lmprune report (a path to the field and what is wrong), or None."""
    checks = [(report, "", REPORT_FIELDS)]
    if isinstance(report, dict):
        checks.append((report.get("summary"), "summary.", SUMMARY_FIELDS))
        summary = report.get("summary")
        if isinstance(summary, dict) and isinstance(summary.get("layers"), int) and summary["layers"] > 0:
            checks.append((summary, "summary.", SUMMARY_NUMBERS))
        for key, fields in (("layers", LAYER_FIELDS), ("evaluation", EVALUATION_FIELDS),
                            ("unpruned", UNPRUNED_FIELDS)):
            items = report.get(key)
            checks += [(item, f"{key}[{i}].", fields) for i, item in enumerate(items if isinstance(items, list) else [])]
        fallbacks = summary.get("layers_with_fallback") if isinstance(summary, dict) else None
        checks += [(item, f"summary.layers_with_fallback[{i}].", FALLBACK_FIELDS)
                   for i, item in enumerate(fallbacks if isinstance(fallbacks, list) else [])]
        for key, fields in (("allocation", ALLOCATION_FIELDS), ("block_targets", BLOCK_TARGETS_FIELDS),
                            ("zeroshot", ZEROSHOT_FIELDS)):
            if isinstance(report.get(key), dict):
                checks.append((report[key], f"{key}.", fields))
    for value, where, fields in checks:
        problem = _fields_problem(value, where, fields)
        if problem:
            return problem
    return _numbers_problem(report)


def _numbers_problem(report: dict) -> str | None:
    """The arrays and maps of numbers: layer shapes, timings, block sparsities, zero-shot metrics."""
    groups = [(f"layers[{i}].shape", layer["shape"], "integer") for i, layer in enumerate(report["layers"])]
    groups.append(("timings", list(report.get("timings", {}).values()), "number"))
    allocation = report.get("allocation") or {}
    groups.append(("allocation.block_sparsities", allocation.get("block_sparsities", []), "number"))
    zeroshot = report.get("zeroshot") or {}
    for task, metrics in zeroshot.get("tasks", {}).items():
        if not isinstance(metrics, dict):
            return f"zeroshot.tasks.{task} is {json_type(metrics)}, not an object"
        groups.append((f"zeroshot.tasks.{task}", [v for k, v in metrics.items() if "," in k or k == "n"], "number"))
    groups.append(("zeroshot.mean", list(zeroshot.get("mean", {}).values()), "number"))
    for where, values, kind in groups:
        for value in values:
            if not _is_kind(value, kind):
                return f"{where} holds {json_type(value)}, not only {kind}s"
    return None


def _fields_problem(value: Any, where: str, fields: dict[str, tuple]) -> str | None:
    if not isinstance(value, dict):
        return f"{where.rstrip('.') or 'its top level'} is {json_type(value)}, not an object"
    for key, (kinds, required) in fields.items():
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if key not in value:
            if required:
                return f"{where}{key} is missing"
        elif not any(_is_kind(value[key], kind) for kind in kinds):
            return f"{where}{key} is {json_type(value[key])}, not {' or '.join(_article(k) for k in kinds)}"
    return None


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "number":
        return value in NON_FINITE or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return json_type(value) == _article(kind)


def _article(kind: str) -> str:
    return "null" if kind == "null" else f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def format_report(report: dict[str, Any]) -> str:
    settings = report.get("settings", {})
    summary = report.get("summary", {})
    lines = [
        f"model:    {settings.get('model')}",
        f"method:   {report.get('method')}  pattern: {report.get('pattern')}",
        f"summary:  {headline(summary)}",
        f"layers:   {summary.get('layers')}  sparsity: {_number(summary.get('sparsity')):.4f}  "
        + (f"mean rel. error: {_number(summary['mean_error']):.4g} "
           f"(mask only: {_number(summary.get('mean_error_masked')):.4g})" if "mean_error" in summary
           else "rel. errors: not computed (the method reads no XᵀX; --layer-errors computes them)"),
    ]
    timings = report.get("timings", {})
    if timings:
        lines.append("time (s): " + "  ".join(f"{k} {_number(v):.1f}" for k, v in timings.items()))
    for result in report.get("evaluation", []):
        lines.append(f"perplexity on {result['data']} ({result['windows']}×{result['seqlen']}): "
                     f"{_number(result['perplexity']):.3f}")
    allocation = report.get("allocation") or {}
    if allocation.get("kind", "uniform") != "uniform":
        knobs = "  ".join(f"{k} {v:g}" for k, v in allocation.items() if isinstance(v, (int, float)))
        spread = ", ".join(f"{_number(v):.3f}" for v in allocation.get("block_sparsities", []))
        lines.append(f"allocation: {allocation['kind']}  {knobs}  block sparsities: {spread}")
    sequential = settings.get("sequential", "none")
    if sequential != "none" or settings.get("dense_targets"):
        line = f"sequential: {sequential}  dense targets: {'yes' if settings.get('dense_targets') else 'no'}"
        if settings.get("block_targets"):
            targets = report.get("block_targets") or {}
            applied, missed = len(targets.get("layers", [])), len(targets.get("not_applied", {}))
            line += f"  block targets: {applied} of {applied + missed} blocks"
        lines.append(line)
    if summary.get("expert_slices"):
        lines.append(f"experts:  {summary['expert_slices']} expert slices pruned")
    for r in summary.get("layers_with_fallback", []):
        lines.append(f"fallback: {r['name']} ({r['tokens']} calibration tokens)" + (f": {r['why']}" if r.get("why") else ""))
    if report.get("routers"):
        lines.append(f"routers (never pruned): {len(report['routers'])}")
    if report.get("selectors"):
        lines.append(f"selectors (never pruned): {len(report['selectors'])}")
    for u in report.get("unpruned", []):
        lines.append(f"left dense: {u['name']} {tuple(u['shape'])}: {u['reason']}")
    if report.get("zeroshot"):
        lines.append("")
        lines.append(format_zeroshot(report["zeroshot"]))
    lines.append("")
    lines.append(f"{'layer':<48} {'shape':>12} {'sparsity':>9} {'error':>10} {'mask only':>10} {'tokens':>8}")
    for r in report.get("layers", []):
        shape = "x".join(str(s) for s in r["shape"])
        errors = (f"{_number(r['error']):>10.4g} {_number(r.get('error_masked')):>10.4g}" if "error" in r
                  else f"{'—':>10} {'—':>10}")
        tokens = "—" if r.get("tokens") is None else r["tokens"]  # None: the method read no data (magnitude)
        lines.append(f"{r['name']:<48} {shape:>12} {_number(r['sparsity']):>9.4f} {errors} {tokens:>8}")
    return "\n".join(lines)


MAIN_METRICS = ("acc", "acc_norm")  # the papers' columns; any other metric a task defines goes to "other"


def format_zeroshot(zeroshot: dict[str, Any]) -> str:
    """The zero-shot table: per task n, acc and acc_norm with their standard errors, other metrics, the mean."""
    limit = zeroshot.get("limit")
    scope = f"first {limit} documents per task" if limit else "full evaluation splits"
    source = zeroshot.get("task_data") or "the Hugging Face hub"
    lines = [f"zero-shot accuracy (lm-eval {zeroshot.get('lm_eval', '?')}, {zeroshot.get('num_fewshot', 0)}-shot, "
             f"{scope}, documents from {source})",
             f"{'task':<20} {'n':>6} {'acc':>17} {'acc_norm':>17}  other"]

    def cell(values: dict, metric: str, width: int = 17) -> str:
        key = f"{metric},none"
        if key not in values:
            return f"{'-':>{width}}"
        stderr = values.get(f"{metric}_stderr,none")
        text = f"{_number(values[key]):.4f}" + (f" ± {_number(stderr):.4f}" if stderr is not None else "")
        return f"{text:>{width}}"

    for task, values in zeroshot.get("tasks", {}).items():
        others = [k for k in values if "," in k and "_stderr," not in k and k.split(",")[0] not in MAIN_METRICS]
        other = "  ".join(f"{k.split(',')[0]} {_number(values[k]):.4g}" for k in others)
        lines.append(f"{task:<20} {values.get('n', ''):>6} {cell(values, 'acc')} {cell(values, 'acc_norm')}  {other}")
    mean = zeroshot.get("mean", {})
    if mean:
        lines.append(f"{'mean':<20} {'':>6} {cell(mean, 'acc')} {cell(mean, 'acc_norm')}")
        counts = {m: zeroshot.get("mean_over", {}).get(f"{m},none") for m in MAIN_METRICS}
        lines.append("mean: " + ", ".join(f"{m} over {n} task{'s' * (n != 1)}" for m, n in counts.items() if n))
    return "\n".join(lines)


def plot_format(path: str) -> str:
    """The image format a plot at `path` is written in, from its extension; one matplotlib cannot write
    is refused before any work."""
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    _pyplot()
    from matplotlib.backend_bases import FigureCanvasBase

    supported = sorted(FigureCanvasBase.get_supported_filetypes())
    if extension not in supported:
        what = f"extension .{extension}" if extension else "no extension"
        raise LmpruneError(f"--plot {path!r} has {what}: name a format matplotlib writes ({', '.join(supported)})")
    return extension


def plot_layer_errors(reports: dict[str, dict[str, Any]], path: str, image_format: str | None = None) -> None:
    """Per-layer relative reconstruction error, one line per report (method)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for label, report in reports.items():
        errors = [_number(r.get("error")) for r in report.get("layers", [])]
        ax.plot(range(len(errors)), errors, label=label, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("layer (in pruning order)")
    ax.set_ylabel("relative reconstruction error")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=image_format)
    plt.close(fig)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmpruneError("plots need matplotlib: pip install 'lmprune[plots]'") from None
    return plt
