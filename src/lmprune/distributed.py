"""One pruning across several processes (`torchrun`): data-parallel calibration, layer-parallel solves.

Rank r holds the calibration batches r, r + N, r + 2N, … (N processes) and runs only those through
each block: activations never leave their rank. What a solve needs from the data are sums over tokens
(Gram matrices XᵀX, DSnoT's Σx, token counts), so they are all-reduced exactly, in float32 like the
sums themselves; only the summation order differs from one process. The block's layers and experts are
then dealt out to the ranks by estimated cost (∝ in² × out, a Hessian solve), solved in parallel, and
every rank receives every solved weight (a byte copy, so any dtype), so each holds the same pruned
block before it propagates its own batches. SparseLLM's block refinement needs every token of the block
in one place: rank 0 gathers the block's inputs (and their recorded calls), refines, and broadcasts the
block.

Failure: every exchange starts with a status round (each rank says "fine" or why it failed), so a rank
that raises tells the others at their next exchange and all stop with that rank's message; a rank that
dies (SIGKILL, a lost node) makes the others' next exchange fail on the closed connection or at the
collective timeout (LMPRUNE_DIST_TIMEOUT seconds, default 1800). Either way rank 0 raises one
LmpruneError, and only rank 0 ever creates the output directory.

With one process (no torchrun) `SINGLE` stands in and every helper is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from .errors import LmpruneError
from .levers import Lever

TIMEOUT_ENV = "LMPRUNE_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 1800.0  # seconds a collective may wait: rank 0 may generate calibration text meanwhile
# The other ranks wait at the end while rank 0 saves, evaluates and runs zero-shot tasks: that may take longer
# than any collective, so that last barrier has a group of its own (gloo, any device) with a longer timeout.
FAREWELL_TIMEOUT = timedelta(days=7)


class PeerFailure(LmpruneError):
    """Another rank failed and said why; this rank stops too (its own message is rank 0's to print)."""


class LostContact(LmpruneError):
    """A collective failed: a rank died, its node was lost, or nobody answered within the timeout."""


@dataclass
class Ranks:
    """This process's place in the run: rank, world size and the device its collectives use."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    failed: bool = field(default=False, repr=False)
    done: bool = field(default=False, repr=False)  # the collective part is over: no more status rounds
    farewell: Any = field(default=None, repr=False)  # the group of close()'s barrier (FAREWELL_TIMEOUT)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    # -- status rounds -----------------------------------------------------------------------------

    def check(self, failure: BaseException | None = None, what: str = "pruning") -> None:
        """A status round: every rank calls it at the same point; if any rank failed, all raise."""
        if not self.active:
            return
        message = None if failure is None else _describe(failure)
        statuses = [None] * self.world
        try:
            torch.distributed.all_gather_object(statuses, message)
        except Exception as exc:  # noqa: BLE001 - any collective failure means a lost peer
            raise self._lost(exc, what) from None
        failures = [(r, m) for r, m in enumerate(statuses) if m is not None]
        if failure is not None and statuses[0] is not None and not self.is_main:
            failure.quiet = True  # rank 0 failed too (the same check, say): its line is the run's
        if failures and failure is None:
            rank, message = failures[0]
            self.failed = True
            error = PeerFailure(f"rank {rank} of {self.world} failed: {message}")
            error.quiet = not self.is_main  # rank 0 prints it; the failing rank printed its own
            raise error

    def report_failure(self, failure: BaseException) -> None:
        """Called once by a rank whose own work raised: tell the others at their next status round."""
        if not self.active or self.failed or self.done:
            return
        if isinstance(failure, (PeerFailure, LostContact, KeyboardInterrupt)):
            return  # the others already know, or the launcher is stopping every rank anyway
        self.failed = True
        try:
            self.check(failure)
        except LmpruneError:
            pass

    def _lost(self, exc: BaseException, what: str) -> LostContact:
        self.failed = True
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return LostContact(f"rank {self.rank} lost contact with the other ranks while {what} (a rank stopped, or "
                           f"none answered within {self.timeout:g} s; {TIMEOUT_ENV} sets it): {first[:200]}")

    def collective(self, what: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), a torch.distributed collective, after a status round; a failure is a lost peer."""
        self.check(what=what)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            raise self._lost(exc, what) from None

    # -- data ----------------------------------------------------------------------------------------

    def shard(self, calibration: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[int]]:
        """This rank's calibration batches and their indices among all batches (rank r: r, r + N, r + 2N, …).

        The token ids are first taken from rank 0, so every rank shards the very same windows (self-generated
        text included, whatever the hardware's sampling does)."""
        batches = list(calibration.split(batch_size))
        if not self.active:
            return batches, list(range(len(batches)))
        if len(batches) < self.world:
            raise LmpruneError(f"{len(batches)} calibration batch(es) for {self.world} processes: every process "
                               "needs at least one (raise --nsamples, or lower --batch-size or the process count)")
        shared = calibration.to(self.comm_device).contiguous()
        self.collective("sharing the calibration windows", torch.distributed.broadcast, shared, 0)
        batches = list(shared.to(calibration.device).split(batch_size))
        indices = list(range(self.rank, len(batches), self.world))
        return [batches[i] for i in indices], indices

    def total(self, count: int) -> int:
        """The sum of an integer over the ranks."""
        if not self.active:
            return count
        t = torch.tensor([count], dtype=torch.int64, device=self.comm_device)
        self.collective("summing token counts", torch.distributed.all_reduce, t)
        return int(t.item())

    def all_reduce_sum(self, tensors: list[torch.Tensor], what: str = "summing Gram matrices") -> None:
        """Sum float32/float64 tensors over the ranks, in place."""
        if not self.active or not tensors:
            return
        for t in tensors:
            if t.dtype not in (torch.float32, torch.float64):
                raise LmpruneError(f"internal: all-reduce of a {t.dtype} sum would lose precision")
        self.check(what=what)
        try:
            for t in tensors:
                on_comm = t if t.device == self.comm_device else t.to(self.comm_device)
                torch.distributed.all_reduce(on_comm)
                if on_comm is not t:
                    t.copy_(on_comm)
        except Exception as exc:  # noqa: BLE001
            raise self._lost(exc, what) from None

    def gather_objects(self, obj: Any, what: str) -> list[Any]:
        """Every rank's `obj` (small, picklable), in rank order, on every rank."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        self.collective(what, torch.distributed.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any, what: str, src: int = 0) -> Any:
        """Rank `src`'s `obj` (small, picklable) on every rank."""
        if not self.active:
            return obj
        box = [obj]
        self.collective(what, torch.distributed.broadcast_object_list, box, src)
        return box[0]

    def gather_to_main(self, obj: Any, what: str) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (None elsewhere)."""
        if not self.active:
            return [obj]
        out = [None] * self.world if self.is_main else None
        self.collective(what, torch.distributed.gather_object, obj, out, dst=0)
        return out

    def broadcast_tensors(self, tensors: list[torch.Tensor], src: int, what: str) -> None:
        """Copy rank `src`'s values of `tensors` (any dtypes, same shapes everywhere) into every rank's, as one
        byte buffer."""
        if not self.active or not tensors:
            return
        parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
        if self.rank == src:
            buffer = torch.cat([p.to(self.comm_device) for p in parts])
        else:
            buffer = torch.empty(sum(p.numel() for p in parts), dtype=torch.uint8, device=self.comm_device)
        self.collective(what, torch.distributed.broadcast, buffer, src)
        if self.rank == src:
            return
        offset = 0
        with torch.no_grad():
            for t, p in zip(tensors, parts):
                # A copy starts at offset 0: viewing bytes at an odd offset as a wider dtype would fail.
                chunk = buffer[offset: offset + p.numel()].to(t.device, copy=True)
                t.copy_(chunk.view(t.dtype).reshape(t.shape))
                offset += p.numel()

    # -- work assignment -----------------------------------------------------------------------------

    def assign(self, costs: list[float]) -> list[int]:
        """The rank that does each job: longest first to the least loaded rank (ties: lowest index/rank).

        Deterministic, so every rank computes the same assignment without talking."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[job] = rank
            load[rank] += costs[job]
        return owner

    def close(self) -> None:
        """Leave the group in order: after a run every rank finished (`done`), each waits at a barrier until
        all are here (rank 0 after saving), then every rank destroys the group. A rank that tore down its
        connections and exited while another still used them could abort at interpreter exit ("terminate
        called without an active exception", SIGABRT), turning a saved, correct run into a failed one.
        After a failure the peers may be gone: no barrier, and no teardown that could wait on them."""
        if not (self.active and torch.distributed.is_initialized()) or self.failed:
            return
        if self.done and self.farewell is not None:
            try:
                torch.distributed.barrier(group=self.farewell)
            except Exception:  # noqa: BLE001 - a peer died after the work: this rank's result stands
                return
        torch.distributed.destroy_process_group()


SINGLE = Ranks()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, LmpruneError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def solve_cost(in_features: int, out_features: int) -> float:
    """Relative cost of one layer's solve: a Hessian-based update is in² per row, in³ for the inverse."""
    return float(in_features) * in_features * (out_features + in_features)


def launched() -> bool:
    """Started by torchrun (or anything setting its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def collective_timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise LmpruneError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


def from_environment(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    NCCL on CUDA, each rank on cuda:LOCAL_RANK; gloo on the CPU. Returns SINGLE and `device` unchanged
    when not launched with more than one process."""
    if not launched():
        return SINGLE, device
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise LmpruneError("WORLD_SIZE is set but RANK/LOCAL_RANK are not: launch with torchrun") from None
    timeout = collective_timeout()
    if device.type == "cuda":
        if device.index not in (None, local_rank):
            raise LmpruneError(f"--device {device} with torchrun: each process uses cuda:LOCAL_RANK; "
                               "give --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise LmpruneError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) here")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    ranks = Ranks(rank, world, local_rank, backend, timeout)
    try:
        kwargs = {"device_id": device} if backend == "nccl" else {}
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout), **kwargs)
        ranks.farewell = torch.distributed.new_group(backend="gloo", timeout=FAREWELL_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 - rendezvous failures come in many types
        ranks.failed = True
        raise ranks._lost(exc, "joining the process group") from None
    return ranks, device


# -- the pipeline's per-block steps --------------------------------------------------------------------


def merge_collected(ranks: Ranks, collected, layers: list) -> None:
    """Make every rank's collected inputs (pipeline.CollectedInputs) the sums over all ranks' batches, in place.

    Routers and unreadable expert tensors are unions (each rank traces its own first batch; they depend
    on the block's code, not its data, so they normally agree). Every rank must have seen an expert tensor
    in the same storage order."""
    if not ranks.active:
        return
    from .model import ExpertSlice

    experts = {layer.name: layer.transposed for layer in layers if isinstance(layer, ExpertSlice)}
    seen = ranks.gather_objects((sorted(collected.routers), collected.problems, experts, sorted(collected.inputs),
                                 sorted(collected.selectors)), "merging routers")
    for routers, problems, transposed, _, selectors in seen:
        collected.routers |= set(routers)
        collected.selectors |= set(selectors)
        for name, problem in problems.items():
            collected.problems.setdefault(name, problem)
        for name, value in transposed.items():
            if value != experts[name]:
                collected.problems.setdefault(name.rsplit("[", 1)[0], "multiplied in different storage orders "
                                                                      "on different processes")
    unreadable = set(collected.problems)
    for name in list(collected.inputs):
        if name.rsplit("[", 1)[0] in unreadable:
            del collected.inputs[name]
    names = [layer.name for layer in layers if layer.name in collected.inputs]
    if any(set(n for n in keys if n.rsplit("[", 1)[0] not in unreadable) != set(names) for *_, keys, _ in seen):
        raise LmpruneError("internal: processes collected inputs for different layers")
    sums = []
    for name in names:
        inputs = collected.inputs[name]
        sums += [moment for moment in (inputs.gram, inputs.diagonal) if moment is not None]
        if inputs.stats is not None:
            sums.append(inputs.stats.total)
    ranks.all_reduce_sum(sums)
    if names and collected.inputs[names[0]].tokens is None:
        return  # nothing read the inputs (collect.py): no counts to sum
    counts = torch.tensor([[collected.inputs[n].tokens, collected.inputs[n].signal] for n in names],
                          dtype=torch.int64, device=ranks.comm_device)
    ranks.collective("summing token counts", torch.distributed.all_reduce, counts)
    for name, (tokens, signal) in zip(names, counts.tolist()):
        inputs = collected.inputs[name]
        inputs.tokens, inputs.signal = tokens, signal
        if inputs.stats is not None:
            inputs.stats = type(inputs.stats)(inputs.stats.total, tokens)


def assign_layers(ranks: Ranks, layers: list) -> dict[str, int]:
    """Layer name -> the rank that solves it."""
    if not ranks.active:
        return {layer.name: 0 for layer in layers}
    owners = ranks.assign([solve_cost(layer.in_features, layer.out_features) for layer in layers])
    return {layer.name: owner for layer, owner in zip(layers, owners)}


def own_groups(ranks: Ranks, owners: dict[str, int], groups: list[list]) -> list[list]:
    """The pipeline's solve groups (lists of solves, each with its `.layer`) cut to this rank's solves."""
    if not ranks.active:
        return groups
    mine = [[solve for solve in group if owners[solve.layer.name] == ranks.rank] for group in groups]
    return [group for group in mine if group]


def share_solved(ranks: Ranks, layers: list, owners: dict[str, int], records: list[dict]) -> list[dict]:
    """After each rank solved its own layers: every rank gets every solved weight, and every record in the
    block's layer order (returned)."""
    if not ranks.active:
        return records
    everyone = [r for part in ranks.gather_objects(records, "sharing the solved layers") for r in part]
    solved = {r["name"] for r in everyone}
    for rank in range(ranks.world):
        mine = [layer.stored() for layer in layers if layer.name in solved and owners[layer.name] == rank]
        ranks.broadcast_tensors(mine, rank, "sharing the solved weights")
    order = {layer.name: i for i, layer in enumerate(layers)}
    return sorted(everyone, key=lambda r: order[r["name"]])


def refine_on_main(ranks: Ranks, refiner, context, batch_indices: list[int]) -> dict[str, Any]:
    """A block refiner (SparseLLM) sees every token of the block at once: with several ranks, rank 0 gathers
    the block's inputs and their recorded calls, refines, and sends the block to the others."""
    if not ranks.active:
        return refiner(context)
    from dataclasses import replace

    from .model.calls import BlockCall, BlockCalls

    cpu = torch.device("cpu")
    calls = context.inputs.calls
    mine = [(batch, h.to(cpu), context.inputs.arguments(j, cpu))
            for j, (batch, h) in enumerate(zip(batch_indices, context.hidden))]
    gathered = ranks.gather_to_main(mine, "gathering the block's inputs for its refinement")
    record: dict[str, Any] = {}
    if ranks.is_main:
        batches = sorted((b for part in gathered for b in part), key=lambda b: b[0])
        merged = BlockCalls([h for _, h, _ in batches], [c for _, _, c in batches], [list(range(len(batches)))],
                            calls.returns_tuple, calls.model_type)
        record = refiner(replace(context, inputs=BlockCall(merged, 0), hidden=merged.hidden))
    state = list(context.block.parameters()) + list(context.block.buffers())
    ranks.broadcast_tensors(state, 0, "sharing the refined block")
    return record


class RankShare(Lever):
    """Several processes as a lever of the block loop: the stage's sums merged over the ranks, its solves
    dealt out, and every solved weight shared before the next stage reads its inputs."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.owners: dict[str, int] = {}

    def replay(self, step, records) -> None:
        # The other ranks read the dense block: the pruned one is in rank 0's partial output.
        self.ranks.broadcast_tensors(list(step.block.parameters()) + list(step.block.buffers()), 0,
                                     "sharing a finished block")

    def collected(self, step, stage, collected) -> None:
        merge_collected(self.ranks, collected, stage)

    def assign(self, step, stage, groups):
        self.owners = assign_layers(self.ranks, stage)
        return own_groups(self.ranks, self.owners, groups)

    def solved(self, step, stage, records):
        return share_solved(self.ranks, stage, self.owners, records)
