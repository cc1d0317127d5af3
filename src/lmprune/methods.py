"""From a user's method choice to what the pipeline runs: a layer solver, plus a block refiner for
block-level methods (SparseLLM), and the mask granularity that method defaults to.

The CLI and the benchmarks both build methods here, so the two cannot drift apart.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from .config import SparsityPattern
from .pipeline import BlockRefiner
from .errors import LmpruneError
from .solvers import SOLVERS, LayerSolver, build_layer_solver, check_refine, method_names

# Methods that refine whole blocks after the layer-wise pass: name -> module exposing DESCRIPTION,
# SETTINGS and build_block_method(options) -> object with .layer_method, .layer_options, .refiner, .settings.
BLOCK_METHODS = {"sparsellm": "lmprune.refiners.sparsellm"}


def all_method_names() -> list[str]:
    """Every --method: the layer-wise ones and the block-level ones."""
    return sorted([*method_names(), *BLOCK_METHODS])


@dataclass
class Method:
    name: str
    layer_solver: LayerSolver
    refiner: BlockRefiner | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # every setting, for the report

    def pattern(self, pattern: SparsityPattern, per_row: bool | None = None) -> SparsityPattern:
        """The pattern with its granularity resolved: the user's choice, else the method's default."""
        if pattern.is_nm:
            return pattern
        row = self.layer_solver.per_row_default if per_row is None else per_row
        return SparsityPattern(pattern.sparsity, per_row=row)


def build_method(method: str | None, mask: str | None = None, update: str | None = None,
                 options: dict[str, Any] | None = None, refine: str | None = None) -> Method:
    """Resolve --method/--mask/--update/--refine/--opt; bad names or options raise LmpruneError."""
    options = dict(options or {})
    if method is not None and method not in BLOCK_METHODS and method not in SOLVERS:
        raise LmpruneError(f"unknown method {method!r} (choose from: {', '.join(all_method_names())})")
    check_refine(refine)
    if method in BLOCK_METHODS:
        if refine not in (None, "none"):
            # Its block refinement re-prunes the layers after the layer-wise pass: swaps would be undone.
            raise LmpruneError(f"--refine {refine} cannot follow {method}, which re-chooses the masks block by block")
        block = importlib.import_module(BLOCK_METHODS[method]).build_block_method(options)
        layer_solver = build_layer_solver(block.layer_method, mask, update, block.layer_options)
        return Method(method, layer_solver, block.refiner, {**layer_solver.settings_dict(), **block.settings})
    layer_solver = build_layer_solver(method, mask, update, options, refine)
    return Method(layer_solver.name, layer_solver, None, layer_solver.settings_dict())
