"""Solver registry: every method by name, and composition of one method's mask with another's update."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from ..config import SparsityPattern, settings_from_options
from ..errors import LmpruneError
from .base import InputStats, Solver, SolverResult, UpdateFn
from . import swaps
from .swaps import SwapSettings

REFINES = ("swaps",)  # --refine: what may follow every method's mask and update

# Modules that define solvers; each exposes SOLVERS, a list of Solver.
_MODULES = ("magnitude", "wanda", "sparsegpt", "admm", "alps", "dsnot", "reference")


def _load() -> dict[str, Solver]:
    registry: dict[str, Solver] = {}
    for module_name in _MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        for solver in module.SOLVERS:
            registry[solver.name] = solver
    return registry


SOLVERS: dict[str, Solver] = _load()


def method_names() -> list[str]:
    return sorted(name for name, s in SOLVERS.items() if s.solve is not None)


def update_names() -> list[str]:
    return ["none"] + sorted(name for name, s in SOLVERS.items() if s.update is not None)


def get_solver(name: str) -> Solver:
    if name not in SOLVERS:
        raise LmpruneError(f"unknown method {name!r} (choose from: {', '.join(method_names())})")
    return SOLVERS[name]


def check_refine(refine: str | None) -> None:
    if refine not in (None, "none", *REFINES):
        raise LmpruneError(f"unknown --refine {refine!r} (choose from: none, {', '.join(REFINES)})")


@dataclass
class LayerSolver:
    """What the pipeline calls per layer: a mask source, optionally followed by a weight update."""

    mask_solver: Solver
    mask_settings: Any
    update_solver: Solver | None = None
    update_settings: Any = None
    drop_update: bool = False  # "--update none": the mask alone, kept weights unchanged
    refine_settings: SwapSettings | None = None  # "--refine swaps": swaps after the mask and update, then a refit

    @property
    def name(self) -> str:
        name = self.mask_solver.name
        if self.update_solver is not None or self.drop_update:
            name += "+" + ("none" if self.drop_update else self.update_solver.name)
        return name + ("+swaps" if self.refine_settings is not None else "")

    def refit(self) -> tuple[UpdateFn | None, Any]:
        """The update that follows the mask, and its settings: what --refine applies again on the new mask.
        (None, None) where the kept weights keep their values (wanda, magnitude, dsnot, --update none)."""
        if self.drop_update:
            return None, None
        if self.update_solver is not None:
            return self.update_solver.update, self.update_settings
        if self.mask_solver.update is not None:
            return self.mask_solver.update, self.mask_settings
        if self.mask_solver.refit_with is not None:
            solver = SOLVERS[self.mask_solver.refit_with]
            shared = {f.name: getattr(self.mask_settings, f.name) for f in fields(solver.settings)}
            return solver.update, solver.settings(**shared)
        return None, None

    @property
    def per_row_default(self) -> bool:
        return self.mask_solver.per_row_default

    @property
    def statistics(self) -> str:
        """What of a layer's inputs the solve reads (base.STATISTICS): an update or a refit reads XᵀX."""
        if self.update_solver is not None or self.refine_settings is not None:
            return "gram"
        return self.mask_solver.statistics

    @property
    def needs_input_stats(self) -> bool:
        return self.mask_solver.needs_input_stats

    @property
    def solve_batch(self) -> Callable[[torch.Tensor, torch.Tensor, SparsityPattern], list[SolverResult]] | None:
        """Solve same-shape layers W [E, out, in], H [E, in, in] at once; None where the method cannot
        (no batched form, or a composed --update)."""
        solver = self.mask_solver
        if solver.solve_batch is None or self.update_solver is not None or self.drop_update:
            return None

        def solve_batch(W, H, pattern):
            results = solver.solve_batch(W, H, pattern, self.mask_settings)
            if self.refine_settings is None:
                return results
            return swaps.refine_batch(W, H, pattern, results, self.refine_settings, *self.refit())

        return solve_batch

    @property
    def takes_gram(self) -> bool:
        """Whether `solve_taking` can have XᵀX to overwrite: the mask's method can, and no update or refit
        reads XᵀX after it."""
        return (self.mask_solver.solve_taking is not None and self.update_solver is None
                and self.refine_settings is None and not self.needs_input_stats)

    def solve_taking(self, W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern,
                     reload: Callable[[], torch.Tensor]) -> SolverResult:
        """The same result as calling this solver, overwriting H; `reload()` gives XᵀX again (see base.py)."""
        result = self.mask_solver.solve_taking(W, H, pattern, self.mask_settings, reload)
        if self.drop_update:
            result = SolverResult(W * result.mask, result.mask, result.info)
        return result

    def settings_dict(self) -> dict[str, Any]:
        out = {}
        for settings in (self.mask_settings, self.update_settings, self.refine_settings):
            if settings is not None:
                out.update({f.name: getattr(settings, f.name) for f in fields(settings)})
        return out

    def __call__(self, W: torch.Tensor, H: torch.Tensor, pattern: SparsityPattern,
                 stats: InputStats | None = None) -> SolverResult:
        if self.needs_input_stats:
            if stats is None:
                raise LmpruneError(f"{self.mask_solver.name} needs the inputs' mean (InputStats), not only XᵀX")
            result = self.mask_solver.solve(W, H, pattern, self.mask_settings, stats)
        else:
            result = self.mask_solver.solve(W, H, pattern, self.mask_settings)
        if self.drop_update:
            result = SolverResult(W * result.mask, result.mask, result.info)
        elif self.update_solver is not None:
            weight, info = self.update_solver.update(W, H, result.mask, self.update_settings)
            result = SolverResult(weight * result.mask, result.mask, {**result.info, **info})
        if self.refine_settings is not None:
            return swaps.refine(W, H, pattern, result, self.refine_settings, *self.refit())
        return result


def build_layer_solver(
    method: str | None = None,
    mask: str | None = None,
    update: str | None = None,
    options: dict[str, Any] | None = None,
    refine: str | None = None,
) -> LayerSolver:
    """Resolve `--method`, `--mask`, `--update`, `--refine` and `--opt` into a LayerSolver, or fail clearly."""
    check_refine(refine)
    if mask and method and mask != method:
        raise LmpruneError("give either --method or --mask, not both")
    mask_name = mask or method
    if not mask_name:
        raise LmpruneError("no method: give --method, or --mask with --update")
    mask_solver = get_solver(mask_name)
    if mask_solver.solve is None:
        raise LmpruneError(f"{mask_name!r} only updates weights; use it as --update with a --mask method")
    update_solver = None
    if update and update != "none":
        update_solver = get_solver(update)
        if update_solver.update is None:
            raise LmpruneError(
                f"{update!r} cannot update a given mask (updates: {', '.join(update_names())})"
            )
    options = dict(options or {})
    used: set[str] = set()

    def settings_for(solver: Solver):
        return own_settings(solver.settings, solver.name)

    def own_settings(settings_cls: type, owner: str):
        known = {f.name for f in fields(settings_cls)}
        mine = {k: v for k, v in options.items() if k.replace("-", "_") in known}
        used.update(mine)
        return settings_from_options(settings_cls, mine, owner)

    layer_solver = LayerSolver(
        mask_solver,
        settings_for(mask_solver),
        update_solver,
        settings_for(update_solver) if update_solver else None,
        drop_update=update == "none",
    )
    if refine == "swaps":
        layer_solver.refine_settings = own_settings(SwapSettings, "--refine swaps")
    elif any(k.replace("-", "_") == "swap_rounds" for k in options):
        raise LmpruneError("swap_rounds is a setting of --refine swaps: add --refine swaps, or leave it out")
    unknown = sorted(set(options) - used)
    if unknown:
        raise LmpruneError(f"unknown option(s) {', '.join(unknown)} for {layer_solver.name}")
    return layer_solver
