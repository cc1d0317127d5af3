"""SparseLinear: a pruned Linear or Conv1D that keeps its weight packed in memory (and DenseHeadLinear: the
unpruned bf16 LM head of such a model, on the compiled dense GEMV for one token).

Every layer is held in one form: a bitmask along its inputs, rows = outputs (packing.as_row_bitmask),
which is what the compiled kernel reads. Two paths compute the product:
- compiled (kernel.py), for one token at a time (batch-1 decoding, the memory-bound case it is for), and
  row by row for up to PROMPT_ROWS tokens (a short prompt):
  reads only the kept values and the mask, takes x in its own dtype, fp32 products and sums, the bias added
  in fp32 and the result rounded once to x's dtype. It agrees with the dense product up to summation
  order: fp32 rounding, about 1e-6 of the sum of |terms|, before the output's own rounding.
- portable, for everything else (long prompts, batches, no kernel): the weight is unpacked for the call and
  multiplied exactly as the replaced layer did (the same torch op on the same values), so its outputs
  are the dense-with-zeros model's; at most the last bits can differ, as they do between two copies of
  one dense model at other memory alignments (torch's kernels pick their summation order by it). It
  saves memory, not time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Conv1D
from .kernel import BEST, gemv_kernel
from .packing import BITMASK, PackedWeight, as_row_bitmask, pack_bitmask, packed_bytes, row_offsets


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _one_token_kernel(x: torch.Tensor, in_features: int, max_rows: int = 1):
    """The compiled kernel where it applies: up to `max_rows` tokens (1: batch-1 decoding) on the CPU, no
    autograd; else None."""
    if x.numel() == 0 or x.numel() % in_features or x.numel() // in_features > max_rows \
            or x.device.type != "cpu" or x.dtype not in _KERNEL_DTYPES or (torch.is_grad_enabled() and x.requires_grad):
        return None
    return gemv_kernel()


# A short prompt runs the kernel once per token rather than unpacking every layer's dense weight: measured on
# the 1B shape at 70%, one kernel pass over the model costs about 1/60 of an unpacking pass, and the unpacked
# weights' heap pages raised the model's peak RSS (bench/RESULTS.md, issue #31). Longer prompts unpack.
PROMPT_ROWS = 32


class SparseLinear(nn.Module):
    """y = x Wᵀ + b (nn.Linear) or x W + b (Conv1D, W stored [in, out]) with W held packed."""

    def __init__(self, module: nn.Module, packed: PackedWeight, compiled: bool = True):
        super().__init__()
        weight = module.weight
        if tuple(packed.shape) != tuple(weight.shape):
            raise ValueError(f"packed shape {packed.shape} is not the layer's {tuple(weight.shape)}")
        if packed.dtype != weight.dtype:  # the model was loaded in another dtype: zeros stay zeros
            packed = PackedWeight(**{**packed.__dict__, "values": packed.values.to(weight.dtype),
                                     "dtype": weight.dtype})
        self.conv1d = bool(Conv1D) and isinstance(module, Conv1D)
        rows = as_row_bitmask(packed, transpose=self.conv1d)
        self.out_features, self.in_features = rows.shape
        self.dtype = weight.dtype
        # Buffers, so that .to() moves them; state_dict() shows the dense weight instead (_dense_state).
        self.register_buffer("values", rows.values)
        self.register_buffer("mask", rows.positions)
        self.register_buffer("offsets", row_offsets(rows))
        self.bias = module.bias
        self.compiled = compiled
        self.register_state_dict_post_hook(_dense_state)

    def dense_weight(self) -> torch.Tensor:
        """[out, in], unpacked."""
        return PackedWeight(BITMASK, (self.out_features, self.in_features), self.values.dtype, self.values,
                            self.mask).dense().to(self.values.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _one_token_kernel(x, self.in_features, PROMPT_ROWS) if self.compiled else None
        if kernel is not None:  # x in its own dtype (no conversion copies); y rounded once to it, bias added in fp32
            rows = [kernel.bitmask_linear(row, self.mask, self.values, self.offsets, self.bias, self.in_features, BEST)
                    for row in x.reshape(-1, self.in_features)]
            y = rows[0] if len(rows) == 1 else torch.stack(rows)
            return y.reshape(*x.shape[:-1], self.out_features)
        weight = self.dense_weight()
        if self.conv1d:  # Conv1D.forward's own ops on its own [in, out] layout, for the same bits
            size_out = x.size()[:-1] + (self.out_features,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), weight.t().contiguous()).view(size_out)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kept={self.values.numel()}, "
                f"bias={self.bias is not None}, compiled={self.compiled}")


def _dense_state(module: SparseLinear, state: dict, prefix: str, local_metadata) -> None:
    """state_dict() (and so save_pretrained) gives the layer's own dense `weight`, as the layer it replaced
    stored it: a saved model is a normal checkpoint, never one whose weights a loader would miss."""
    for key in ("values", "mask", "offsets"):
        state.pop(prefix + key, None)
    weight = module.dense_weight()
    state[prefix + "weight"] = weight.t().contiguous() if module.conv1d else weight


class DenseHeadLinear(nn.Linear):
    """An unpruned bf16 Linear (the LM head, the largest dense read of a decode step) whose one-token
    product goes through the compiled dense GEMV: torch's bf16 GEMV on this CPU reads well below the memory
    bandwidth. Same parameters (a tied head stays tied); the same product up to summation order (fp32 sums,
    rounded once to bf16, as torch's); anything but one bf16 token on the CPU is nn.Linear's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = _one_token_kernel(x, self.in_features) if self.weight.dtype == torch.bfloat16 else None
        if kernel is None or not self.weight.is_contiguous():
            return super().forward(x)
        return kernel.dense_linear(x.reshape(-1), self.weight, self.bias, BEST).reshape(*x.shape[:-1], self.out_features)


def use_dense_head_kernel(model: nn.Module) -> bool:
    """Give the model's output layer, when it is a plain bf16 nn.Linear, the compiled one-token path (in place:
    its class only; parameters, ties and state_dict stay). Whether it was changed."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.dtype != torch.bfloat16:
        return False
    head.__class__ = DenseHeadLinear
    return True


def replaceable(module: nn.Module) -> bool:
    """Layers whose forward SparseLinear reproduces: nn.Linear itself and Conv1D (not subclasses that may
    multiply differently)."""
    return type(module) is nn.Linear or (bool(Conv1D) and type(module) is Conv1D)


def sparsify(model: nn.Module, packed: dict[str, PackedWeight], compiled: bool = True) -> set[str]:
    """Replace every layer whose weight `packed` holds (by parameter name) with a SparseLinear; the names of
    the weights replaced. Weights of other layers (fused expert tensors) stay dense."""
    replaced = set()
    for name, module in list(model.named_modules()):
        weight = packed.get(f"{name}.weight")
        if weight is None or not replaceable(module):
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, SparseLinear(module, weight, compiled))
        replaced.add(f"{name}.weight")
    if replaced and compiled:
        use_dense_head_kernel(model)
    return replaced


def pack_model(model: nn.Module, compiled: bool = True) -> int:
    """Pack in memory every Linear/Conv1D of the decoder blocks whose weight takes fewer bytes as a bitmask
    (a dense-with-zeros model made sparse without a packed checkpoint); how many were packed."""
    from ..model import find_blocks

    prefix, blocks = find_blocks(model)
    packed = {}
    for i, block in enumerate(blocks):
        for name, module in block.named_modules():
            if replaceable(module) and packed_bytes(module.weight, BITMASK) < module.weight.nbytes:
                packed[f"{prefix}.{i}.{name}.weight"] = pack_bitmask(module.weight.detach())
    return len(sparsify(model, packed, compiled))
