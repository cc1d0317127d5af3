"""A killed streamed run resumed: every lever combination continues bit for bit, and a partial run that
cannot be trusted (other weights, a corrupt state, a damaged finished shard) is refused or redone.

A kill is simulated as in test_streaming.py: the disk fills while block 2 is written, after blocks 0–1
are durable; the same command then continues from block 2.
"""

import json

import pytest

from conftest import prune_args, run_cli, snapshot
from test_streaming import assert_same_weights, disk_full_at, fault_case, layer_records, reload, report

METHODS = {
    "wanda": ("--method", "wanda", "--sparsity", "0.5"),
    "sparsegpt": ("--method", "sparsegpt", "--sparsity", "0.5"),
    "alps": ("--method", "alps", "--sparsity", "0.5", "--opt", "max_iterations=30"),
}
LEVERS = {  # (sequential, targets) as the command line says them
    "plain": (),
    "seq": ("--sequential", "layer"),
    "dense": ("--dense-targets",),
    "seq+dense": ("--sequential", "layer", "--dense-targets"),
    "seq+dense+block": ("--best-quality",),
}


def inputs(work):
    """The run's inputs, byte for byte: the model's files and the calibration text."""
    return snapshot(work / "model"), (work / "calib.txt").read_bytes()


def kill_at_block_2(capsys, monkeypatch, args):
    disk_full_at(monkeypatch, 2)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1 and "2 finished block(s) are kept" in err[0], err
    monkeypatch.undo()


def resumes_bit_identical(capsys, monkeypatch, tmp_path, options):
    """A streamed run killed while writing block 2, then run again, continues from block 2 with its inputs
    untouched and ends with the weights of an uninterrupted run; the folder holding both outputs (out, whole)."""
    work, model, _ = fault_case(tmp_path)
    args = prune_args(model, work / "calib.txt", work / "out", *options)
    before = inputs(work)
    kill_at_block_2(capsys, monkeypatch, args)
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and any("pruning from block 2" in line for line in err), err
    assert inputs(work) == before
    code, _, err = run_cli(capsys, *prune_args(model, work / "calib.txt", work / "whole", *options))
    assert code == 0, err
    assert report(work / "out")["resumed"] == {"from_block": 2} and "resumed" not in report(work / "whole")
    assert_same_weights(reload(work / "out"), reload(work / "whole"))
    return work


def covering_cases():
    """Every (levers, method) pair once, the allocation alternating so that every (allocation, levers) and
    every (allocation, method) pair occurs too: 15 of the 30 combinations (the full product passed once,
    at about 11 s of CPU a case: too slow to run on every change)."""
    return [(allocation, levers, method)
            for i, levers in enumerate(LEVERS) for j, method in enumerate(METHODS)
            for allocation in [("depth", "uniform")[(i + j) % 2]]]


@pytest.mark.parametrize("allocation, levers, method", covering_cases())
def test_every_lever_combination_resumes_bit_identical(capsys, tmp_path, monkeypatch, method, levers, allocation):
    work = resumes_bit_identical(capsys, monkeypatch, tmp_path,
                                 (*METHODS[method], *LEVERS[levers], "--allocation", allocation, "--stream"))
    assert layer_records(work / "out") == layer_records(work / "whole")
    for key in ("allocation", "block_targets", "routers", "blocks"):
        assert report(work / "out").get(key) == report(work / "whole").get(key), key


# -- partial runs that cannot be trusted ------------------------------------------------------------------

def change_value(model, name):
    """Add 1 to one value of weight `name` in its shard: same names, shapes and header, other values."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shard = model / json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][name]
    head = header(shard)
    with safe_open(shard, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(shard)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, shard, metadata=metadata)
    assert header(shard) == head  # the old fingerprint (config, index, headers, sizes) cannot see it


def header(path):
    data = path.read_bytes()
    return data[: 8 + int.from_bytes(data[:8], "little")]


def killed_case(capsys, tmp_path, monkeypatch, *options):
    work, model, _ = fault_case(tmp_path)
    args = prune_args(model, work / "calib.txt", work / "out", *options, "--stream")
    kill_at_block_2(capsys, monkeypatch, args)
    return work, model, args


def assert_refused(capsys, work, args, *message):
    """One line naming the problem and --fresh, exit code 2, and nothing changed: inputs and partial run alike."""
    before = snapshot(work)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("lmprune: error: "), err
    assert all(part in err[0] for part in message) and "add --fresh" in err[0], err
    assert "run the same command" not in err[0], err  # advice that would only lead back here
    assert snapshot(work) == before
    return err[0]


def assert_fresh_gets_out(capsys, work, args):
    code, _, err = run_cli(capsys, *args, "--fresh")
    assert code == 0 and "resumed" not in report(work / "out"), err


OUTSIDE = "the weights outside the blocks"


@pytest.mark.parametrize("name, where, method", [
    ("model.embed_tokens.weight", OUTSIDE, "wanda"),
    ("lm_head.weight", OUTSIDE, "wanda"),
    ("model.norm.weight", OUTSIDE, "wanda"),
    ("model.layers.1.mlp.down_proj.weight", "block 1 differs", "wanda"),
    ("model.layers.0.input_layernorm.weight", "block 0 differs", "wanda"),
    # --best-quality also reads the finished blocks' checkpoint weights for its dense stream
    ("model.embed_tokens.weight", OUTSIDE, "best-quality"),
    ("model.layers.1.mlp.down_proj.weight", "block 1 differs", "best-quality"),
])
def test_changed_weight_values_refuse_to_resume(capsys, tmp_path, monkeypatch, name, where, method):
    options = METHODS["wanda"] if method == "wanda" else (*METHODS["sparsegpt"], "--best-quality")
    work, model, args = killed_case(capsys, tmp_path, monkeypatch, *options)
    change_value(model, name)
    assert_refused(capsys, work, args, "the model's weights changed since the partial run in", where)
    assert_fresh_gets_out(capsys, work, args)


def test_changed_values_of_an_unfinished_block_resume(capsys, tmp_path, monkeypatch):
    """Block 3 was not pruned yet: the resumed run reads its new values, exactly as a whole run on them."""
    work, model, args = killed_case(capsys, tmp_path, monkeypatch, *METHODS["sparsegpt"])
    change_value(model, "model.layers.3.self_attn.q_proj.weight")
    before = inputs(work)
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and any("pruning from block 2" in line for line in err), err
    assert inputs(work) == before
    code, _, err = run_cli(capsys, *[a if a != work / "out" else work / "whole" for a in args])
    assert code == 0, err
    assert_same_weights(reload(work / "out"), reload(work / "whole"))


STATE = ".out.partial/lmprune_state.json"


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "is corrupt (not JSON)"),
    (lambda text: "[]", "is corrupt (not a JSON object)"),
    (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "version"}), "is corrupt (no version)"),
    (lambda text: json.dumps({**json.loads(text), "blocks": [{"layers": 3}]}),
     "is corrupt (the records of block 0 are malformed)"),
    (lambda text: json.dumps({**json.loads(text), "weights": {"outside": "x", "blocks": []}}),
     "is corrupt (the weight digests are malformed)"),
    (lambda text: json.dumps({**json.loads(text), "calibration": None}), "is corrupt ('calibration' is not a str)"),
    (lambda text: json.dumps({**json.loads(text), "version": 1}), "holds a partial run of another lmprune version"),
])
def test_a_corrupt_state_file_is_named_as_such(capsys, tmp_path, monkeypatch, damage, message):
    work, _, args = killed_case(capsys, tmp_path, monkeypatch, *METHODS["wanda"])
    state = work / STATE
    state.write_text(damage(state.read_text()))
    error = assert_refused(capsys, work, args, message)
    assert "different settings" not in error
    assert_fresh_gets_out(capsys, work, args)


@pytest.mark.parametrize("damage", ["truncated", "missing", "no header"])
def test_a_damaged_finished_shard_is_pruned_again(capsys, tmp_path, monkeypatch, damage):
    """The state names a finished shard that cannot be read back: that block and the later ones are redone,
    with a warning, and the result is a whole run's."""
    options = (*METHODS["sparsegpt"], "--allocation", "depth")
    work, model, args = killed_case(capsys, tmp_path, monkeypatch, *options)
    shard = work / ".out.partial" / "model-00002-of-00005.safetensors"
    data = shard.read_bytes()
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(data[:-100] if damage == "truncated" else b"\xff" * 8 + data[8:])
    before = inputs(work)
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert any(line.startswith("lmprune: warning: ") and str(shard) in line
               and "finished block 1 and the later ones are pruned again" in line for line in err), err
    assert any("pruning from block 1" in line for line in err), err
    assert inputs(work) == before
    assert report(work / "out")["resumed"] == {"from_block": 1}
    code, _, err = run_cli(capsys, *prune_args(model, work / "calib.txt", work / "whole", *options, "--stream"))
    assert code == 0, err
    assert_same_weights(reload(work / "out"), reload(work / "whole"))
    assert layer_records(work / "out") == layer_records(work / "whole")


def test_a_finished_shard_with_other_values_is_refused(capsys, tmp_path, monkeypatch):
    """Intact in form but not what was written (a flipped byte): only --fresh can get out, and says so."""
    work, _, args = killed_case(capsys, tmp_path, monkeypatch, *METHODS["wanda"])
    shard = work / ".out.partial" / "model-00002-of-00005.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert_refused(capsys, work, args, f"{shard} (finished block 1) changed since it was written")
    assert_refused(capsys, work, args, f"{shard} (finished block 1) changed since it was written")  # no loop
    assert_fresh_gets_out(capsys, work, args)
