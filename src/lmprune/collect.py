"""The collect step: run a block on every calibration batch and sum what its layers' solves need.

Each layer's Gram matrix XᵀX is a running float32 sum filled while the block runs: activations are never
stored per layer. Only what the method reads is summed (statistics.py): the whole XᵀX, its diagonal alone
(Σ x_j², for Wanda and DSnoT), or nothing but the token counts (magnitude). Linear layers are read by
forward hooks; layers fed the very same tensor in a call (q/k/v, gate/up) share its product, computed
once per batch and added to each of their sums (checked per call, so it is exact for any model). Expert slices of fused tensors are read by the block tracer
(model/tracing.py), which also finds the block's routers and selectors on the first batch.

A lever that needs more from the same pass (dense targets: X_pᵀX_d) takes part as a `BatchReader`: it is
told of every batch and of every hooked layer's input, so the block runs once per batch for all of them.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import LmpruneError
from .hooks import hooked
from .model import BlockCall, ExpertSlice, PrunableLayer, expert_count
from .model.tracing import BlockTracer, ExpertSums
from .sequential import GroupDone
from .solvers import InputStats
from .statistics import STATISTICS, add_batch, batch_sum, sums_kept, zero_sum

MOE_CALIBRATION = ("routed", "all")


@dataclass
class LayerInputs:
    """What the solve of one layer needs: its Gram matrix, input statistics and token count."""

    gram: torch.Tensor | None  # XᵀX [in, in], where the method, a lever or the error report reads it
    stats: InputStats | None
    tokens: int | None  # None where nothing reads the inputs (magnitude): the pass stops after the first batch
    # Tokens whose input row was not all zero (zero rows add nothing to the Gram): what determines an update.
    signal: int | None = None
    diagonal: torch.Tensor | None = None  # Σ x_j² [in], where the method reads the diagonal alone

    def __post_init__(self):
        if self.signal is None:
            self.signal = self.tokens

    def for_method(self, statistics: str) -> torch.Tensor | None:
        """The H a method declaring `statistics` is given (solvers/base.py)."""
        return {"gram": self.gram, "diagonal": self.diagonal, "none": None}[statistics]


@dataclass
class CollectedInputs:
    inputs: dict[str, LayerInputs]
    routers: set[str]
    problems: dict[str, str]  # fused tensor name -> why it could not be read (not pruned)
    selectors: set[str] = field(default_factory=set)  # weights whose selection chooses tokens, not experts


class BatchReader:
    """A lever's part in one collection pass; every method is optional."""

    keeps_rows = False  # it reads each hooked input's float32 rows (kept beside the shared product)
    runs_whole = False  # it needs the block's output on every batch: the pass never stops early

    def begin(self, prefix: str, layers: list[PrunableLayer], call: BlockCall, device: torch.device,
              stop_early: bool) -> None:
        """The pass starts on these hooked layers; `stop_early`: whether its forwards may end early."""

    def before_batch(self, j: int) -> None:
        """Batch j is about to run through the block."""

    def read(self, name: str, x: torch.Tensor, rows: torch.Tensor | None, output: torch.Tensor) -> None:
        """Layer `name` read input `x` (float32 `rows` if `keeps_rows`) and produced `output`."""

    def after_batch(self, j: int, output: torch.Tensor | None) -> None:
        """Batch j ran; `output` is the block's (None where the forward stopped early)."""


def fused_name(layer: ExpertSlice) -> str:
    """The fused expert tensor an expert slice is a part of."""
    return layer.name.rsplit("[", 1)[0]


def collect_inputs(block: nn.Module, prefix: str, layers: list[PrunableLayer], call: BlockCall, hidden,
                   device, with_stats: bool = False, moe_calibration: str = "routed",
                   stop_early: bool = False, reader: BatchReader | None = None,
                   statistics: str = "gram", full_gram: bool = False) -> CollectedInputs:
    """Run the block on every batch, adding to running float32 sums what each layer's method reads of its
    inputs (`statistics`: XᵀX, its diagonal, or nothing; XᵀX also where `full_gram`) and, `with_stats`, the
    sum of its inputs (for solvers that need the mean). Also finds the block's routers (first batch).

    `stop_early` (hooked layers only): after the first batch, which runs whole to find the routers, a
    batch's forward ends once every hooked layer has read its input. `reader`: a lever reading the same pass.
    Where nothing reads the inputs (statistics "none", no `full_gram`, `with_stats` or `reader`), only the
    first batch runs, for the routers, and token counts are None: counting them would cost a forward pass.
    """
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    kinds = sums_kept(statistics, full_gram)
    counted = bool(kinds) or with_stats or reader is not None
    linear = [layer for layer in layers if not isinstance(layer, ExpertSlice)]
    experts = [layer for layer in layers if isinstance(layer, ExpertSlice)]
    sums = {layer.name: {kind: zero_sum(layer.in_features, kind, device) for kind in kinds} for layer in linear}
    totals = {layer.name: torch.zeros(layer.in_features, device=device) for layer in linear} if with_stats else {}
    tokens = dict.fromkeys(sums, 0)
    signal = dict.fromkeys(sums, 0)  # tokens whose input row is not all zero
    # id(input) -> (input, {kind: batch sum, None where too large to form whole}, Σx, token count, float32 rows,
    # signal) this call
    products: dict[int, tuple] = {}
    fired: set[str] = set()  # hooked layers that read their input this call
    batch = [0]
    keep_rows = reader is not None and reader.keeps_rows
    if reader is not None:
        stop_early = stop_early and not reader.runs_whole
        reader.begin(prefix, linear, call, device, stop_early)

    def make_hook(name: str):
        def hook(module, args, output):
            x = args[0]  # the caller's object itself: a detached view would be a new one per layer
            seen = products.get(id(x))
            if seen is None or seen[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
                total = flat.sum(0) if with_stats else None
                formed = {kind: batch_sum(flat, kind) for kind in kinds}
                # The rows stay for this call only where a reader takes them or a sum is added in blocks.
                kept = flat if keep_rows or None in formed.values() else None
                seen = products[id(x)] = (x, formed, total, flat.shape[0], kept, int(flat.ne(0).any(1).sum()))
            for kind, product in seen[1].items():
                add_batch(sums[name][kind], seen[4], kind, product)
            if reader is not None:
                reader.read(name, x, seen[4] if keep_rows else None, output)
            tokens[name] += seen[3]
            if with_stats:
                totals[name].add_(seen[2])
            fired.add(name)
            signal[name] += seen[5]
            if stop_early and batch[0] > 0 and len(fired) == len(sums):
                raise GroupDone

        return hook

    fused_modules = {id(layer.module): layer.module for layer in experts}
    fused = {fused_name(layer): layer.param for layer in experts}
    params = {f"{prefix}.{name}": p for name, p in block.named_parameters() if p.dim() >= 2}
    # A router chooses experts: a block without any (no expert tensor, no module counting experts, no list
    # of modules such as Linear experts) has none.
    routes = bool(experts) or any(expert_count(m) or (isinstance(m, nn.ModuleList) and len(m) > 1)
                                  for m in block.modules())
    tracer = BlockTracer(fused, params, device, with_stats, routes, kinds)
    tracer.collect_experts = moe_calibration == "routed"
    every_expert = [(m, _all_experts_hook(tracer)) for m in fused_modules.values()] if moe_calibration == "all" else []
    with hooked([(layer.module, make_hook(layer.name)) for layer in linear], every_expert, before_with_kwargs=True), \
            torch.no_grad():
        for j, h in enumerate(hidden if counted else itertools.islice(hidden, 1)):
            # The tracer costs Python work on every torch call: it watches only the first batch (routers)
            # and, in blocks with fused experts, every batch (their Grams).
            watched = j == 0 or bool(fused)
            if j == 0:
                tracer.start_router_trace()
            batch[0] = j
            if reader is not None:
                reader.before_batch(j)
            output = None
            try:
                with tracer if watched else contextlib.nullcontext():
                    output = call.call(block, j, h.to(device), device)
            except GroupDone:
                pass
            if reader is not None:
                reader.after_batch(j, output)
            if j == 0:
                tracer.stop_router_trace()
            products.clear()
            fired.clear()

    if not counted:
        tokens = signal = dict.fromkeys(sums)
    inputs = {name: LayerInputs(moments.get("gram"), InputStats(totals[name], tokens[name]) if with_stats else None,
                                tokens[name], signal[name], moments.get("diagonal"))
              for name, moments in sums.items()}
    problems = {}
    for layer in experts:
        seen = tracer.fused[fused_name(layer)]
        if seen.transposed is None and not seen.problem:
            # Not one product of any of its experts was read: its use is unknown, so it cannot be pruned.
            seen.problem = "never multiplied by its experts' inputs in a way lmprune can read"
        if seen.problem:
            problems[seen.name] = seen.problem
            continue
        if seen.transposed is not None:
            layer.transposed = seen.transposed  # the model's own product decides the storage order
        expert = seen.sums.pop(layer.expert, None) or ExpertSums(layer.in_features, kinds, device)
        inputs[layer.name] = LayerInputs(expert.moments.get("gram"),
                                         InputStats(expert.total, expert.tokens) if with_stats else None,
                                         expert.tokens if counted else None, diagonal=expert.moments.get("diagonal"))
    return CollectedInputs(inputs, tracer.routers, problems, tracer.selectors)


def _all_experts_hook(tracer: BlockTracer):
    """--moe-calibration all: before the experts run on their routed tokens, run every token through every
    expert once, with the tracer collecting; the routed call that follows is not collected."""

    def hook(module, args, kwargs):
        params = list(args) + list(kwargs.values())
        if len(params) < 3 or not (isinstance(params[1], torch.Tensor) and not params[1].is_floating_point()):
            raise LmpruneError(
                f"--moe-calibration all needs experts called as (hidden states, top-k indices, top-k weights); "
                f"{type(module).__name__} is not: use --moe-calibration routed")
        x, index, weights = params[0], params[1], params[2]
        tokens = x.reshape(-1, x.shape[-1]).shape[0]
        count = module_experts(module)
        every = torch.arange(count, device=index.device).expand(tokens, count).contiguous()
        ones = torch.ones(tokens, count, dtype=weights.dtype, device=weights.device)
        tracer.collect_experts = True
        try:
            module.forward(x, every, ones)
        finally:
            tracer.collect_experts = False

    return hook


def module_experts(module: nn.Module) -> int:
    count = expert_count(module)
    if count is None:
        raise LmpruneError(f"cannot tell how many experts {type(module).__name__} holds")
    return count
