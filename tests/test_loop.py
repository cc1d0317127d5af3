"""The block loop's parts: the hook helper, the hidden states, and the named points where levers take part."""

import pytest
import torch
from torch import nn

from conftest import byte_tokenizer, random_text
from lmprune.config import SparsityPattern
from lmprune.data import calibration_windows, tokenize
from lmprune.hidden import HiddenStates
from lmprune.hooks import hooked
from lmprune.levers import Lever
from lmprune.model import find_blocks, record_block_calls
from lmprune.pipeline import prune_model
from lmprune.solvers import build_layer_solver
from zoo import tiny_model

CPU = torch.device("cpu")


class Stop(Exception):
    pass


def test_hooks_are_removed_when_the_pass_raises():
    layer = nn.Linear(4, 4)
    seen = []

    def after(module, args, output):
        seen.append("after")
        raise Stop

    with pytest.raises(Stop), hooked([(layer, after)], [(layer, lambda module, args: seen.append("before"))]):
        layer(torch.ones(1, 4))
    assert seen == ["before", "after"]
    assert not layer._forward_hooks and not layer._forward_pre_hooks
    layer(torch.ones(1, 4))  # no hook left to raise
    assert seen == ["before", "after"]


def test_advancing_hidden_states_runs_each_batch_through_the_block():
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    ids = calibration_windows(tokenize(byte_tokenizer(), random_text(500)), 4, 16, 0)
    calls = record_block_calls(model, blocks, list(ids.split(2)), CPU, CPU)
    inputs = [h.clone() for h in calls.hidden]
    hidden = HiddenStates(calls.hidden, CPU)
    before = hidden.copy()
    hidden.advance(blocks[0], calls.for_block(0), CPU)
    with torch.no_grad():
        expected = [calls.for_block(0).call(blocks[0], j, h, CPU) for j, h in enumerate(inputs)]
    assert all(torch.equal(a, b) for a, b in zip(hidden, expected))
    assert calls.hidden is hidden.tensors  # owned, not copied: the inputs are freed as they are replaced
    assert all(torch.equal(a, b) for a, b in zip(before, inputs))  # a copy keeps its own list


class Recorder(Lever):
    """A lever that changes nothing and notes every point it is called at."""

    def __init__(self):
        self.points = []

    def begin(self, run):
        self.points.append("begin")

    def start_block(self, step):
        self.points.append(("start_block", step.index))

    def block_planned(self, step):
        self.points.append("block_planned")

    def start_stage(self, step, stage, last):
        self.points.append(("start_stage", len(stage), last))

    def reader(self, step, stage):
        self.points.append("reader")

    def collected(self, step, stage, collected):
        self.points.append(("collected", sorted(collected.inputs) == sorted(layer.name for layer in stage)))

    def assign(self, step, stage, groups):
        self.points.append("assign")
        return groups

    def retarget(self, step, solve, W):
        self.points.append("retarget")
        return W

    def solved(self, step, stage, records):
        self.points.append(("solved", [r["name"] for r in records] == [layer.name for layer in stage]))
        return records

    def refine(self, step):
        self.points.append("refine")

    def end_block(self, step):
        self.points.append("end_block")

    def record(self, step):
        self.points.append("record")
        return {}


def test_a_lever_takes_part_at_every_point_and_a_lever_that_changes_nothing_changes_nothing():
    calibration = calibration_windows(tokenize(byte_tokenizer(), random_text(3000)), 8, 24, 0)
    solver, pattern = build_layer_solver("sparsegpt"), SparsityPattern(0.5)
    plain, watched, recorder = tiny_model("llama"), tiny_model("llama"), Recorder()
    prune_model(plain, calibration, solver, pattern, CPU, batch_size=4, progress=False, sequential="layer")
    prune_model(watched, calibration, solver, pattern, CPU, batch_size=4, progress=False, sequential="layer",
                levers=[recorder])
    a, b = plain.state_dict(), watched.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    def stage(size, last, first=False):
        return [("start_stage", size, last), "reader", ("collected", True), *(["block_planned"] if first else []),
                "assign", *["retarget"] * size, ("solved", True)]

    # llama's data-flow groups: q/k/v, o, gate/up, down
    block = lambda i: [("start_block", i), *stage(3, False, True), *stage(1, False), *stage(2, False),
                       *stage(1, True), "refine", "end_block", "record"]
    assert recorder.points == ["begin", *[point for i in range(4) for point in block(i)]]
