"""Module hooks that live exactly as long as a `with` block: registered on entry, removed on exit.

Every pass that reads a block's layers (Gram collection, group ordering, OWL's input norms, a dense copy's
inputs, SparseLLM's taps) registers hooks for one forward and must remove them whatever happens, a hook
raising to end the pass early included.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

from torch import nn

Hook = Callable[..., object]


@contextlib.contextmanager
def hooked(after: Iterable[tuple[nn.Module, Hook]] = (), before: Iterable[tuple[nn.Module, Hook]] = (),
           before_with_kwargs: bool = False):
    """Forward hooks (`after`: hook(module, args, output)) and forward pre-hooks (`before`: hook(module, args),
    or hook(module, args, kwargs) with `before_with_kwargs`) on the given modules, for the `with` block."""
    handles = []
    try:
        handles += [module.register_forward_hook(hook) for module, hook in after]
        handles += [module.register_forward_pre_hook(hook, with_kwargs=before_with_kwargs) for module, hook in before]
        yield
    finally:
        for handle in handles:
            handle.remove()
