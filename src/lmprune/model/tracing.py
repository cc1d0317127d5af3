"""Watching a block's own arithmetic: expert inputs for fused expert tensors, and which weights route.

Both are read from the torch calls the block really makes (a TorchFunctionMode), not from class or
attribute names, so they hold for any model that multiplies by its weights in the usual ways.

Experts. transformers 5 stores experts as fused 3-D tensors and multiplies by one expert's slice
(`F.linear(x, w[e])`, `x @ w[e]`) or by the whole tensor at once (`torch.bmm(x, w)` with x [experts,
tokens, in]). Each such product tells which expert's slice it uses (from the view's storage offset), how
the slice is stored ([out, in] or [in, out]) and exactly which tokens reached it: the expert's Gram
matrix sums those, in the same pass as every other layer's.

Routers and selectors are told apart by what a selection's indices do. A product by a weight starts
a fresh "logits of W" mark; elementwise steps (softmax, sigmoid, a bias, xIELU's min/max against a
constant) carry it. A selection (top-k, sort, argmax, max/min over a dim) turns the logits' marks into
"chosen by W" marks on its indices, which every later non-product step carries (one_hot, where,
indexing, scatter, split, …). W is a router when such a mark reaches a product by a weight: its indices
picked the tokens that weight multiplies or the slice of the weight used, i.e. they dispatch tokens to
experts. Indices that are used but never reach a weight's product (a sparse-attention indexer masking
or gathering keys) make W a selector, kept dense but never called a router; indices nothing uses (a
stable softmax's max) make nothing. A router chooses experts: in a block without experts (`routes`
False) no weight is a router, and indices that reach a weight's product (Doge's dynamic mask: its top-k
keys mask the scores that weigh the values on their way to o_proj) make W a selector. A product of two activations (q·kᵀ) carries no mark at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..statistics import batch_sum, zero_sum
from .own_forward import run_op

# name -> operand layout: "linear" takes (x, w [out, in]); "matmul" takes (x, w [in, out])
_PRODUCTS = {
    F.linear: "linear",
    torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.Tensor.__matmul__: "matmul",
    torch.mm: "matmul", torch.Tensor.mm: "matmul", torch.bmm: "matmul", torch.Tensor.bmm: "matmul",
}
_OTHER_PRODUCTS = {torch.addmm, torch.Tensor.addmm, torch.einsum, torch.baddbmm, torch.Tensor.__rmatmul__}
_SELECTIONS = {torch.topk, torch.Tensor.topk, torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort,
               torch.argmax, torch.Tensor.argmax}
_MAX_MIN = {torch.max, torch.Tensor.max, torch.min, torch.Tensor.min}  # selections only over a dim (PhiMoE)


class ExpertSums:
    """Running sums over the tokens that reached one expert slice: XᵀX and/or its diagonal (the `kinds` of
    statistics.py the collection keeps), Σx, and the count of tokens with a nonzero input."""

    def __init__(self, width: int, kinds: tuple[str, ...], device: torch.device):
        self.moments = {kind: zero_sum(width, kind, device) for kind in kinds}
        self.total = torch.zeros(width, device=device)
        self.tokens = 0


@dataclass
class FusedParam:
    """What was learnt about one fused expert tensor while watching the block."""

    name: str
    param: torch.nn.Parameter
    transposed: bool | None = None  # None until a product shows the storage order
    problem: str | None = None  # set when a product could not be read: the tensor is then not pruned
    sums: dict[int, ExpertSums] = field(default_factory=dict)


class BlockTracer(TorchFunctionMode):
    """Collects expert sums (while `collect_experts`) and router marks (while `trace_routers`)."""

    def __init__(self, fused: dict[str, torch.nn.Parameter], params: dict[str, torch.Tensor], device: torch.device,
                 with_totals: bool, routes: bool = True, kinds: tuple[str, ...] = ("gram",)):
        super().__init__()
        self.routes = routes  # whether the block holds experts: only then can a weight be a router
        self.fused = {name: FusedParam(name, p) for name, p in fused.items()}
        self._by_storage = {_storage(f.param): f for f in self.fused.values()}
        self.device = device
        self.with_totals = with_totals
        self.kinds = kinds  # the sums of XᵀX the experts' sums hold (statistics.sums_kept)
        self.collect_experts = True
        self.trace_routers = False
        self.routers: set[str] = set()  # weights whose selection dispatched tokens to a weight's product
        self.selections: set[str] = set()  # weights whose selection's indices were used
        self._params = params
        self._derived: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> params it is a view/cast of
        self._logits: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> params whose product it carries
        self._chosen: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> params whose selection chose it

    def start_router_trace(self) -> None:
        self.trace_routers = True
        for name, p in self._params.items():
            self._derived[p] = frozenset([name])

    def stop_router_trace(self) -> None:
        self.trace_routers = False
        self._derived = WeakIdKeyDictionary()
        self._logits = WeakIdKeyDictionary()
        self._chosen = WeakIdKeyDictionary()

    @property
    def selectors(self) -> set[str]:
        """Weights whose logits chose something other than experts (tokens, for a sparse-attention indexer)."""
        return self.selections - self.routers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = run_op(func, args, kwargs)
        layout = _PRODUCTS.get(func)
        if layout is not None and self.collect_experts and self._by_storage:
            x, w = _operands(layout, args, kwargs)
            if isinstance(w, torch.Tensor):
                fused = self._by_storage.get(_storage(w))
                if fused is not None:
                    self._expert_product(fused, layout, x, w)
        elif func in _OTHER_PRODUCTS and self._by_storage:
            for t in tree_flatten((args, kwargs))[0]:
                fused = self._by_storage.get(_storage(t)) if isinstance(t, torch.Tensor) else None
                if fused is not None:
                    fused.problem = f"multiplied through {getattr(func, '__name__', func)}, which lmprune cannot read"
        if self.trace_routers:
            if func is torch.Tensor.__iter__ and args and args[0] in self._chosen:
                out = list(out)  # a loop over chosen indices (`for e in expert_hit`) hands out chosen rows
                self._trace(func, layout, args, kwargs, out)
                return iter(out)
            self._trace(func, layout, args, kwargs, out)
        return out

    # -- experts ---------------------------------------------------------------------------------

    def _expert_product(self, fused: FusedParam, layout: str, x: torch.Tensor, w: torch.Tensor) -> None:
        p = fused.param
        offset = w.storage_offset() - p.storage_offset()
        experts = range(p.shape[0])
        if w.dim() == 3 and offset == 0 and w.shape[0] == p.shape[0] and x.dim() == 3:
            slice_shape, slice_stride, chosen = tuple(w.shape[1:]), tuple(w.stride()[1:]), list(experts)
            inputs = [x[e] for e in chosen]
        elif w.dim() == 2 and offset % p.stride(0) == 0 and offset // p.stride(0) in experts:
            slice_shape, slice_stride, chosen = tuple(w.shape), tuple(w.stride()), [offset // p.stride(0)]
            inputs = [x]
        else:
            fused.problem = f"multiplied as a {tuple(w.shape)} view that is not one expert's slice"
            return
        stored_shape, stored_stride = tuple(p.shape[1:]), tuple(p.stride()[1:])
        if (slice_shape, slice_stride) == (stored_shape, stored_stride):
            flipped = False
        elif (slice_shape, slice_stride) == (stored_shape[::-1], stored_stride[::-1]):
            flipped = True
        else:
            fused.problem = f"multiplied through a {slice_shape} view of its {stored_shape} slices"
            return
        # F.linear reads its weight as [out, in], a matmul as [in, out].
        transposed = flipped if layout == "linear" else not flipped
        if fused.transposed is None:
            fused.transposed = transposed
        elif fused.transposed != transposed:
            fused.problem = "multiplied in both storage orders"
            return
        width = stored_shape[0] if transposed else stored_shape[1]
        for e, xe in zip(chosen, inputs):
            flat = xe.detach().reshape(-1, width).to(self.device, torch.float32)
            sums = fused.sums.get(e)
            if sums is None:
                sums = fused.sums[e] = ExpertSums(width, self.kinds, self.device)
            for kind, moment in sums.moments.items():
                if kind == "gram":
                    moment.addmm_(flat.t(), flat)  # in place: no [in, in] temporary per expert and batch
                else:
                    moment.add_(batch_sum(flat, kind))
            if self.with_totals:
                sums.total.add_(flat.sum(0))
            # Rows of zeros are tokens the router gave this expert no share of (Llama 4 feeds every token
            # to every expert, scaled by its routing weight); they add nothing to the Gram matrix.
            sums.tokens += int(flat.ne(0).any(1).sum())

    # -- routers ---------------------------------------------------------------------------------

    def _trace(self, func, layout, args, kwargs, out) -> None:
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        chosen = _union(self._chosen, inputs)
        self.selections |= chosen  # a selection counts once its indices are used (a stable softmax's max: never)
        if _is_selection(func, args, kwargs):
            sources = self._logits.get(inputs[0], frozenset()) if inputs else frozenset()
            # The indices carry the choice; the values (routing weights, a stable softmax's max) do not.
            for t in outputs:
                if not t.is_floating_point() and (sources or chosen):
                    self._chosen[t] = sources | chosen
            return
        derived = [self._derived[t] for t in inputs if t in self._derived]
        if layout is not None or func in _OTHER_PRODUCTS:
            if derived and chosen and self.routes:
                # Indices picked the tokens this weight multiplies, or the weight's slice: they dispatch.
                self.routers |= chosen
            # A product by a weight starts a fresh mark: what it computes are that weight's logits. A product
            # of two activations (attention scores q·kᵀ) carries no weight's logits: its max or top-k (a
            # stable softmax, sparse attention) never makes q_proj a router.
            if derived:
                for t in outputs:
                    self._logits[t] = frozenset().union(*derived)
            return
        if chosen:
            for t in outputs:
                self._chosen[t] = chosen | self._chosen.get(t, frozenset())
        activations = [t for t in inputs if t not in self._derived and t.is_floating_point()]
        if derived and not activations:
            # A cast, transpose or slice of weights is still those weights.
            for t in outputs:
                self._derived[t] = frozenset().union(*derived)
            return
        sources = _union(self._logits, inputs)
        if sources:
            for t in outputs:
                self._logits[t] = sources | self._logits.get(t, frozenset())


def _is_selection(func, args: tuple, kwargs: dict) -> bool:
    """top-k, sort, argmax; max/min only over a dim (PhiMoE): against a tensor or a number they are
    elementwise (xIELU's min(x, eps)), and carry logits like any other elementwise step."""
    if func in _SELECTIONS:
        return True
    if func not in _MAX_MIN:
        return False
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    return isinstance(dim, int) and not isinstance(dim, bool)


def _union(marks: WeakIdKeyDictionary, tensors: list[torch.Tensor]) -> frozenset:
    found = [marks[t] for t in tensors if t in marks]
    return frozenset().union(*found) if found else frozenset()


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, functional wrappers)
        return -1


def _operands(layout: str, args: tuple, kwargs: dict):
    if layout == "linear":
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("weight")
    else:
        x = args[0] if args else kwargs.get("input")
        w = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    return x, w
