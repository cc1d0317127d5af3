"""Validated settings. Bad values fail here, before any model is loaded or file written."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from .errors import LmpruneError

if TYPE_CHECKING:
    from .methods import Method

SELF_CALIB = "self"  # --calib self: the model writes its own calibration text
DEFAULT_SEQLEN = 2048  # the papers' calibration window; capped at the model's context length


@dataclass(frozen=True)
class SparsityPattern:
    """What a layer's mask must look like.

    Either an unstructured fraction (`sparsity`, per layer or per output row) or N:M: at most `n`
    non-zeros in every `m` consecutive input weights of a row.

    `spread` (per row only; set by a non-uniform allocation): the matrix prunes exactly
    ⌊rows·cols·sparsity⌋ weights, every row ⌊that / rows⌋ and the first (that mod rows) rows one more,
    instead of ⌊cols·sparsity⌋ in every row. An allocation's per-layer counts need not be a multiple of
    the rows; rows still differ by at most one weight.
    """

    sparsity: float = 0.0
    n: int | None = None
    m: int | None = None
    per_row: bool = False
    spread: bool = False

    def __post_init__(self) -> None:
        if self.is_nm:
            if self.n is None or self.m is None or not (0 < self.n < self.m):
                raise LmpruneError(f"invalid N:M pattern {self.n}:{self.m}: need 0 < N < M")
        elif not (0.0 <= self.sparsity < 1.0):
            raise LmpruneError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.spread and not self.per_row:
            raise LmpruneError("a spread pattern is a per-row one: spread needs per_row")

    @property
    def is_nm(self) -> bool:
        return self.n is not None or self.m is not None

    @property
    def target_sparsity(self) -> float:
        """Fraction of weights that end up zero."""
        return 1.0 - self.n / self.m if self.is_nm else self.sparsity

    @classmethod
    def nm(cls, text: str) -> "SparsityPattern":
        """Parse '2:4'."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if not match:
            raise LmpruneError(f"invalid pattern {text!r}: expected N:M such as 2:4")
        return cls(n=int(match.group(1)), m=int(match.group(2)))

    @classmethod
    def parse(cls, text: str) -> "SparsityPattern":
        """Parse a target: '2:4' (N:M) or a sparsity such as '0.7'."""
        if ":" in text:
            return cls.nm(text)
        try:
            return cls(float(text))
        except ValueError:
            raise LmpruneError(f"invalid target {text!r}: expected a sparsity such as 0.7 or N:M such as 2:4") from None

    def check_width(self, in_features: int, layer_name: str) -> None:
        if self.is_nm and in_features % self.m:
            raise LmpruneError(
                f"{self.n}:{self.m} does not fit layer {layer_name}: its input width {in_features} "
                f"is not a multiple of {self.m} (skip it with --skip or choose another M)"
            )

    def describe(self) -> str:
        if self.is_nm:
            return f"{self.n}:{self.m}"
        return f"{self.sparsity:.0%}" + (" per row" if self.per_row else "")


ALLOCATIONS = ("uniform", "owl", "depth")
SEQUENTIAL = ("none", "layer")
# Sparsity of the last block minus the first's under --allocation depth, at most: by default the slope is
# min(0.3, 1 − target), so the last block (about target + slope/2) keeps at least half the density the
# target keeps. Chosen by measurement (bench/RESULTS.md, issue 18 section): 0.3 wins at 70%, and at 80% it
# drives the last block to 95% and loses to uniform where 0.2 wins.
DEFAULT_DEPTH_SLOPE = 0.3


@dataclass(frozen=True)
class Allocation:
    """How the target sparsity is spread over the blocks."""

    kind: str = "uniform"
    owl_m: float = 5.0  # a Wanda score is an outlier above M × its block's mean score (OWL paper: 5)
    owl_lambda: float = 0.08  # block sparsities span [s − λ, s + λ] before centring (OWL paper: 0.08)
    depth_slope: float | None = None  # None: min(DEFAULT_DEPTH_SLOPE, 1 − target), see slope_for

    def __post_init__(self) -> None:
        if self.kind not in ALLOCATIONS:
            raise LmpruneError(f"invalid --allocation {self.kind!r}: choose from {', '.join(ALLOCATIONS)}")
        if not self.owl_m > 0:
            raise LmpruneError(f"--owl-m must be positive, got {self.owl_m}")
        if not 0 <= self.owl_lambda < 1:
            raise LmpruneError(f"--owl-lambda must be in [0, 1), got {self.owl_lambda}")
        if self.depth_slope is not None and not -1 < self.depth_slope < 1:
            raise LmpruneError(f"--depth-slope must be in (-1, 1), got {self.depth_slope}")

    @property
    def uniform(self) -> bool:
        return self.kind == "uniform"

    def slope_for(self, target: float) -> float:
        """--allocation depth's slope at this target: the one given, else the default capped by 1 − target."""
        return self.depth_slope if self.depth_slope is not None else min(DEFAULT_DEPTH_SLOPE, 1.0 - target)

    def check(self, pattern: SparsityPattern) -> None:
        if self.uniform:
            return
        if pattern.is_nm:
            raise LmpruneError(f"--allocation {self.kind} needs an unstructured --sparsity: "
                               f"{pattern.describe()} fixes the sparsity of every group (use --allocation uniform)")

    def settings(self) -> dict:
        if self.kind == "owl":
            return {"kind": "owl", "owl_m": self.owl_m, "owl_lambda": self.owl_lambda}
        if self.kind == "depth":
            return {"kind": "depth", "depth_slope": self.depth_slope}
        return {"kind": "uniform"}


RECONSTRUCT_MODES = ("none", "block")
RECONSTRUCT_PREFIX = "reconstruct_"  # --opt reconstruct_steps=…: the rest of --opt belongs to the method


@dataclass(frozen=True)
class ReconstructSettings:
    """--reconstruct block (reconstruct.py): Adam on each pruned block's kept weights, masks fixed."""

    # Conservative first defaults, not tuned: on stories260K at 70% they lower perplexity in and out of domain
    # (bench/RESULTS.md, issue #33); a higher rate fits the calibration tokens faster.
    steps: int = 100  # Adam steps per block: each costs a forward and a backward of `batch` windows
    lr: float = 1e-4  # Adam moves a weight by about lr per step (cosine-decayed); kept weights are ~1e-2
    batch: int = 8  # calibration windows per step, rounded to whole --batch-size batches
    seed: int = 0  # draws the windows of each step (with the block's index): resumed runs replay it

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"reconstruct_steps must be at least 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"reconstruct_lr must be a positive number, got {self.lr}")
        if self.batch < 1:
            raise ValueError(f"reconstruct_batch must be at least 1, got {self.batch}")


def split_reconstruct_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the --opt reconstruct_* settings without their prefix, the method's options)."""
    mine = {k[len(RECONSTRUCT_PREFIX):]: v for k, v in options.items() if k.startswith(RECONSTRUCT_PREFIX)}
    return mine, {k: v for k, v in options.items() if not k.startswith(RECONSTRUCT_PREFIX)}


def build_reconstruct(mode: str, options: dict[str, Any], seed: int) -> ReconstructSettings | None:
    """--reconstruct MODE with its --opt reconstruct_* settings; None for no reconstruction."""
    if mode not in RECONSTRUCT_MODES:
        raise LmpruneError(f"invalid --reconstruct {mode!r}: choose from {', '.join(RECONSTRUCT_MODES)}")
    if mode == "none":
        if options:
            raise LmpruneError(f"--opt {RECONSTRUCT_PREFIX}{next(iter(options))} needs --reconstruct block")
        return None
    known = ("steps", "lr", "batch")  # the seed is --seed
    unknown = next((k for k in options if k.replace("-", "_") not in known), None)
    if unknown is not None:
        raise LmpruneError(f"unknown option {RECONSTRUCT_PREFIX + unknown!r} for --reconstruct (known: "
                           f"{', '.join(RECONSTRUCT_PREFIX + k for k in known)})")
    return settings_from_options(ReconstructSettings, {**options, "seed": seed}, "--reconstruct")


def settings_from_options(settings_cls: type, options: dict[str, Any], owner: str):
    """Build a solver's settings dataclass from `key=value` options, with clear errors.

    Values given as strings (from the CLI) are converted to the field's default's type.
    """
    known = {f.name: f for f in fields(settings_cls)}
    kwargs = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name not in known:
            choices = ", ".join(sorted(known)) or "none"
            raise LmpruneError(f"unknown option {key!r} for {owner} (known: {choices})")
        default = getattr(settings_cls(), name)
        kwargs[name] = _convert(value, default, key)
    try:
        return settings_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise LmpruneError(f"invalid options for {owner}: {exc}") from exc


def _convert(value: Any, default: Any, key: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise LmpruneError(f"option {key}={value!r}: expected {type(default).__name__}") from None
    return value


def parse_options(pairs: list[str] | None) -> dict[str, str]:
    """Parse repeated `--opt key=value` arguments."""
    options: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LmpruneError(f"invalid --opt {pair!r}: expected KEY=VALUE")
        options[key.strip()] = value.strip()
    return options


def require_at_least(value: int | None, minimum: int, flag: str) -> None:
    """An integer option below its minimum is refused (None: not given, nothing to check)."""
    if value is not None and value < minimum:
        raise LmpruneError(f"{flag} must be at least {minimum}, got {value}")


def check_windows(seqlen: int | None, count: int | None, seqlen_flag: str, count_flag: str) -> None:
    """A window length (None: the default) needs 2 tokens, one to read and one to predict; a window
    count (None: all) at least 1."""
    require_at_least(seqlen, 2, seqlen_flag)
    require_at_least(count, 1, count_flag)


@dataclass(frozen=True)
class PruneConfig:
    """The settings a `lmprune prune` run records: its report's "settings" and, streamed, the identity a
    resumed run must match. Validated on construction. `seqlen` None: the default, DEFAULT_SEQLEN capped at
    the model's context, known once the model is loaded (PruneOptions.with_seqlen)."""

    model: str
    method: str
    pattern: SparsityPattern
    calib: str
    out: str
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0
    device: str = "auto"
    mask: str | None = None
    update: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    skip: list[str] = field(default_factory=list)
    eval_data: str | None = None
    eval_seqlen: int | None = None
    eval_max_windows: int | None = None
    batch_size: int = 1
    overwrite: bool = False
    moe_calibration: str = "routed"
    allocation: Allocation = field(default_factory=Allocation)
    sequential: str = "none"
    dense_targets: bool = False
    block_targets: bool = False
    reconstruct: ReconstructSettings | None = None
    layer_errors: bool = False  # every layer's relative error, even for a method that reads no XᵀX

    def __post_init__(self) -> None:
        check_windows(self.seqlen, self.nsamples, "--seqlen", "--nsamples")
        check_windows(self.eval_seqlen, self.eval_max_windows, "--eval-seqlen", "--eval-max-windows")
        require_at_least(self.batch_size, 1, "--batch-size")
        if self.moe_calibration not in ("routed", "all"):
            raise LmpruneError(f"invalid --moe-calibration {self.moe_calibration!r}: choose routed or all")
        if self.sequential not in SEQUENTIAL:
            raise LmpruneError(f"invalid --sequential {self.sequential!r}: choose from {', '.join(SEQUENTIAL)}")
        if self.block_targets and not (self.dense_targets and self.sequential == "layer"):
            raise LmpruneError("--block-targets needs --dense-targets and --sequential layer "
                               "(--best-quality sets all three)")
        self.allocation.check(self.pattern)
        for regex in self.skip:
            try:
                re.compile(regex)
            except re.error as exc:
                raise LmpruneError(f"invalid --skip regex {regex!r}: {exc}") from None


@dataclass(frozen=True)
class PruneOptions:
    """Everything one `lmprune prune` run needs, checked and decided once from the command line (cli.py);
    run.py reads it and changes nothing in it. What a flag implies is already applied: --best-quality's
    three levers are in `config`, the streaming decision in `stream`."""

    config: PruneConfig
    method: "Method"  # the built solver and refiner (methods.build_method)
    pattern: SparsityPattern  # config.pattern with the method's per-row/per-layer default resolved
    model_dir: str | None  # the local checkpoint directory; None for a hub id (never streamed)
    dtype: str = "auto"
    stream: bool = False  # decided: --stream/--no-stream, else by the checkpoint's size or a run to continue
    fresh: bool = False  # with stream: discard a killed run's partial output
    save_format: str = "dense"
    gen_batch_size: int = 16  # --calib self
    eval_tasks: str | None = None
    task_data: str | None = None
    limit: int | None = None
    offload_activations: bool = False  # calibration activations on the CPU while the blocks run on a GPU
    progress: bool = True

    def __post_init__(self) -> None:
        require_at_least(self.gen_batch_size, 1, "--gen-batch-size")
        if self.fresh and not self.stream:
            raise LmpruneError("--fresh discards a streamed run's partial output: it needs --stream")

    @property
    def self_calibration(self) -> bool:
        return self.config.calib == SELF_CALIB

    def with_seqlen(self, seqlen: int) -> "PruneOptions":
        """These options with the calibration window resolved against the loaded model (run.checked_seqlen)."""
        return replace(self, config=replace(self.config, seqlen=seqlen))
