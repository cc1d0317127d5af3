"""prune --stream --save-format sparse: each finished block is written packed, and the result is exactly
`lmprune pack` of the dense streamed output; a killed run resumes to the same files.

References: the dense streamed run's own output, packed by `lmprune pack` (an independent path: the whole
checkpoint read back from disk), and the tensors safetensors reads from the files."""

import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from conftest import prune_args, run_cli
from test_sparse import assert_same_tensors, tensors
from test_streaming import WANDA, disk_full_at, fault_case, report

TARGETS = {"50%": WANDA, "2:4": ("--method", "wanda", "--pattern", "2:4")}


def records(directory):
    """Every shard's record of its packed weights, by weight name."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update(json.loads((f.metadata() or {}).get("lmprune_sparse", "{}")))
    return out


def index(directory):
    return json.loads((directory / "sparse.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("tag", TARGETS)
def test_streamed_sparse_output_is_the_packed_streamed_output(capsys, tmp_path, tag):
    work, model, _ = fault_case(tmp_path)
    options = (*TARGETS[tag], "--stream", "--eval", work / "calib.txt", "--eval-max-windows", 2)
    assert run_cli(capsys, *prune_args(model, work / "calib.txt", work / "dense", *options))[0] == 0
    code, _, err = run_cli(capsys, *prune_args(model, work / "calib.txt", work / "sparse", *options,
                                               "--save-format", "sparse"))
    assert code == 0, err
    assert run_cli(capsys, "pack", work / "dense", "--out", work / "packed")[0] == 0
    sparse, packed = work / "sparse", work / "packed"
    # The very same packed tensors and records (shard files are cut differently: per block vs per source shard).
    assert_same_tensors(tensors(sparse), tensors(packed))
    assert records(sparse) == records(packed) and len(records(sparse)) == 4 * 7
    assert sorted(index(sparse)) == sorted(index(packed))
    assert all((sparse / shard).is_file() for shard in index(sparse).values())
    assert not (sparse / "model.safetensors.index.json").exists() and not (sparse / "lmprune_state.json").exists()
    assert json.loads((sparse / "config.json").read_text()) == json.loads((packed / "config.json").read_text())
    packed_record = {k: v for k, v in report(packed)["packed"].items() if k != "source"}  # pack names its input
    assert report(sparse)["packed"] == packed_record
    assert packed_record["layouts"] == ({"bitmask": 28, "nm": 0} if tag == "50%" else {"bitmask": 0, "nm": 28})
    # --eval reads the finished blocks back from the packed shards: the same perplexity as from dense ones
    assert report(sparse)["evaluation"] == report(work / "dense")["evaluation"]
    assert run_cli(capsys, "unpack", sparse, "--out", work / "unpacked")[0] == 0
    assert_same_tensors(tensors(work / "unpacked"), tensors(work / "dense"))
    if tag == "50%":
        assert plain_transformers_refuses(sparse)


UNAWARE = """
import sys
from transformers import AutoModelForCausalLM, LlamaForCausalLM
for loader, error, words in ((AutoModelForCausalLM, ValueError, "lmprune_sparse"),
                             (LlamaForCausalLM, OSError, "no file named model.safetensors")):
    try:
        loader.from_pretrained(sys.argv[1])
    except error as exc:
        assert words in str(exc), str(exc)
    else:
        raise SystemExit(f"{loader.__name__} built a model")
print("refused")
"""


def plain_transformers_refuses(directory) -> bool:
    """transformers without lmprune (another process that never imports it) refuses the packed directory
    a streamed run wrote (its shards keep the streamed names model-*-of-*.safetensors), never builds a
    model with random weights in place of the packed ones."""
    result = subprocess.run([sys.executable, "-c", UNAWARE, str(directory)], capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.strip() == "refused", result.stderr[-2000:]
    return True


def test_killed_streamed_sparse_run_resumes_to_the_same_files(capsys, tmp_path, monkeypatch):
    work, model, _ = fault_case(tmp_path)
    args = prune_args(model, work / "calib.txt", work / "out", *WANDA, "--stream", "--save-format", "sparse")
    disk_full_at(monkeypatch, 2)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "2 finished block(s) are kept" in err[0], err
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and any("pruning from block 2" in line for line in err), err
    code, _, err = run_cli(capsys, *prune_args(model, work / "calib.txt", work / "whole", *WANDA, "--stream",
                                               "--save-format", "sparse"))
    assert code == 0, err
    assert_same_tensors(tensors(work / "out"), tensors(work / "whole"))
    assert records(work / "out") == records(work / "whole")
    assert report(work / "out")["resumed"] == {"from_block": 2}
    assert report(work / "out")["packed"] == report(work / "whole")["packed"]


def test_a_dense_partial_run_is_not_continued_as_sparse(capsys, tmp_path, monkeypatch):
    """The save format is part of the run's identity: packed and dense block shards never mix."""
    work, model, _ = fault_case(tmp_path)
    args = prune_args(model, work / "calib.txt", work / "out", *WANDA, "--stream")
    disk_full_at(monkeypatch, 2)
    assert run_cli(capsys, *args)[0] == 2
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args, "--save-format", "sparse")
    assert code == 2 and len(err) == 1 and "a different settings (save_format)" in err[0], err
