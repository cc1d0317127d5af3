"""A checkpoint's tensor names and the model's: transformers' own conversion, applied a block at a time.

Many checkpoints store weights under other names or in other shapes than the model holds them: most MoE
checkpoints (Mixtral, Qwen3-MoE, DeepSeek-V3, ...) keep one tensor per expert (`experts.0.w1.weight`),
which `from_pretrained` stacks into the model's fused expert tensors, and `save_pretrained` splits back.
`CheckpointLayout` asks transformers for the very conversion `from_pretrained` applies to this model
(`get_model_conversion_mapping`: renames and converters, so a layout transformers learns is streamed
without a change here), works out once which checkpoint tensors make each model tensor, and converts
any subset of them with transformers' own operations, in the order `from_pretrained` collects them: a
streamed block gets the tensors an in-memory load gives it, bit for bit. Going out, `to_checkpoint` applies
the reverse conversion `save_pretrained` applies to a model loaded from this checkpoint.
"""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import LmpruneError


@dataclass
class _Group:
    """The checkpoint tensors that make one model tensor (several for a one-to-many converter)."""

    targets: list[str]  # the model tensors it makes; the first names the group
    sources: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint key, converter pattern)
    converter: Any = None  # transformers' WeightConverter; None: a plain rename (or the name itself)


class CheckpointLayout:
    """Which checkpoint tensors make which model tensors, as `from_pretrained` maps them for `model`."""

    def __init__(self, model: nn.Module, checkpoint_keys: Iterable[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key
        from transformers.core_model_loading import rename_source_key as rename

        self.model = model
        transforms = list(get_model_conversion_mapping(model))
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", None)
        self.groups: dict[str, _Group] = {}
        for key in sorted(checkpoint_keys, key=dot_natural_key):  # from_pretrained's order: experts 0, 1, ..., 10
            target, pattern = rename(key, renamings, converters, prefix, meta)
            if target not in meta and key in meta:  # as from_pretrained: a renaming that misses is undone
                target, pattern = rename(key, [], [], prefix, meta)
            if target not in meta:
                continue  # a checkpoint tensor the model does not hold (from_pretrained ignores it too)
            if pattern is None:
                self.groups.setdefault(target, _Group([target])).sources.append((key, key))
                continue
            template = next(c for c in converters if pattern in c.source_patterns)
            group = self.groups.setdefault(target, _Group(
                [target.replace(template.target_patterns[0], t) for t in template.target_patterns],
                converter=template))
            group.sources.append((key, pattern))
        # What save_pretrained reverts for a model from_pretrained loaded from this checkpoint.
        self.used = [t for t in transforms if t.was_used()]

    def groups_under(self, prefix: str) -> list[str]:
        """The groups whose model tensors all lie under `prefix` (e.g. `model.layers.3.`)."""
        return [name for name, g in self.groups.items() if all(t.startswith(prefix) for t in g.targets)]

    def sources(self, groups: list[str]) -> list[str]:
        """The checkpoint tensors `groups` are made of."""
        return [key for name in groups for key, _ in self.groups[name].sources]

    def targets(self, groups: list[str]) -> list[str]:
        """The model tensors `groups` make."""
        return [t for name in groups for t in self.groups[name].targets]

    def to_model(self, groups: list[str],
                 read: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The model tensors of `groups`, from the checkpoint tensors `read(keys)` returns."""
        tensors = read(self.sources(groups))
        out: dict[str, torch.Tensor] = {}
        for name in groups:
            group = self.groups[name]
            if group.converter is None:
                out[name] = tensors[group.sources[0][0]]
                continue
            converter = deepcopy(group.converter)
            for key, pattern in group.sources:
                converter.add_tensor(name, key, pattern, tensors[key])
            made = converter.convert(name, model=self.model, config=self.model.config)
            made = {k: v[0] if isinstance(v, list) else v for k, v in made.items()}
            if sorted(made) != sorted(group.targets):
                raise LmpruneError(f"transformers' conversion of the checkpoint made {sorted(made)[:3]} where "
                                   f"{type(self.model).__name__} holds {group.targets[:3]}: use --no-stream")
            out.update(made)
        return out

    def to_checkpoint(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (model names) in the checkpoint's layout, as save_pretrained writes it."""
        if not self.used:
            return state
        from transformers.core_model_loading import revert_weight_conversion

        self.model._weight_conversions = self.used  # what from_pretrained leaves on the model it loads
        return revert_weight_conversion(self.model, state)



def converted_on_load(config) -> bool:
    """Whether transformers renames or converts this model type's checkpoint tensors while loading (most MoE
    checkpoints): then only its own loading, or a `CheckpointLayout`, gives the model's tensors."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return False
    return get_checkpoint_conversion_mapping(getattr(config, "model_type", None)) is not None
