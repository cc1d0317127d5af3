"""--stream: blocks read from disk one at a time, the output written as it goes, a killed run resumed.

Every streamed result is compared with the in-memory path's, tensor by tensor, after a reload in plain
transformers; faults leave one line on stderr, exit code 2 and no output directory.
"""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, byte_tokenizer, one_thread, prune_args, random_text, run_cli, snapshot
from zoo import MODEL_TYPES

WANDA = ("--method", "wanda", "--sparsity", "0.5")


def save_tiny(path, model_type="llama", dtype=torch.float32, tied=False, shard_size=None, seed=0):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from zoo import tiny_config

    hf_logging.disable_progress_bar()  # its shard-writing bar would land in the stderr the tests read
    config = tiny_config(model_type)
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    byte_tokenizer().save_pretrained(path)
    return path


def reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def report(path):
    return json.loads((path / "lmprune_report.json").read_text())


def layer_records(path):
    """The report's per-layer facts without their timings."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in report(path)["layers"]]


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(random_text(800))
    return path


@pytest.mark.parametrize("dtype, tied, method", [
    (torch.bfloat16, True, WANDA),
    (torch.bfloat16, False, ("--method", "sparsegpt", "--pattern", "2:4")),
    (torch.float32, True, ("--method", "sparsellm", "--sparsity", "0.5", "--opt", "epochs=1")),
    (torch.float32, False, ("--method", "sparsegpt", "--sparsity", "0.6", "--allocation", "depth",
                            "--sequential", "layer", "--dense-targets")),
])
def test_streamed_equals_in_memory(capsys, tmp_path, calib, dtype, tied, method):
    model = save_tiny(tmp_path / "model", dtype=dtype, tied=tied)
    code, _, err = run_cli(capsys, *prune_args(model, calib, tmp_path / "mem", *method))
    assert code == 0, err
    code, _, err = run_cli(capsys, *prune_args(model, calib, tmp_path / "str", *method, "--stream"))
    assert code == 0, err
    mem, streamed = reload(tmp_path / "mem"), reload(tmp_path / "str")
    assert_same_weights(mem, streamed)
    assert streamed.dtype == dtype
    assert (streamed.lm_head.weight is streamed.model.embed_tokens.weight) == tied
    assert layer_records(tmp_path / "mem") == layer_records(tmp_path / "str")
    assert report(tmp_path / "str")["settings"]["stream"] is True
    index = json.loads((tmp_path / "str" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == mem.config.num_hidden_layers + 1  # a shard per block
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial, no lock left


def checkpoint_keys(path):
    """The tensor names a checkpoint directory stores, over all its shards."""
    from safetensors import safe_open

    keys = set()
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            keys.update(f.keys())
    return keys


@pytest.mark.parametrize("model_type, expert_key", [
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
    ("qwen3_moe", "model.layers.1.mlp.experts.3.down_proj.weight"),
])
def test_per_expert_checkpoint_streams_as_in_memory(capsys, tmp_path, calib, monkeypatch, model_type, expert_key):
    """transformers saves MoE experts one tensor each and fuses them while loading: --stream applies the same
    conversion block by block and writes the same per-expert layout back, tensor for tensor; a resumed run
    reads its finished blocks back through the same conversion."""
    model = save_tiny(tmp_path / "model", model_type=model_type, shard_size="60KB")
    on_disk = checkpoint_keys(model)
    assert expert_key in on_disk and not [k for k in on_disk if "gate_up_proj" in k], sorted(on_disk)
    code, _, err = run_cli(capsys, *prune_args(model, calib, tmp_path / "mem", *WANDA))
    assert code == 0, err
    # Streamed, killed by a full disk at block 2, then resumed: the finished blocks are read back per expert.
    disk_full_at(monkeypatch, 2)
    code, _, err = run_cli(capsys, *prune_args(model, calib, tmp_path / "str", *WANDA, "--stream"))
    assert code == 2 and "2 finished block(s) are kept" in err[0], err
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *prune_args(model, calib, tmp_path / "str", *WANDA, "--stream"))
    assert code == 0 and any("pruning from block 2" in line for line in err), err
    assert checkpoint_keys(tmp_path / "str") == checkpoint_keys(tmp_path / "mem") == on_disk
    mem, streamed = reload(tmp_path / "mem"), reload(tmp_path / "str")
    assert_same_weights(mem, streamed)
    fused = [k for k in mem.state_dict() if k.endswith("experts.down_proj")]
    assert fused and all((mem.state_dict()[k] == 0).float().mean() == 0.5 for k in fused)  # the experts were pruned
    assert layer_records(tmp_path / "mem") == layer_records(tmp_path / "str")


@pytest.mark.parametrize("model_type, converted", [
    ("qwen3_moe", "model.layers.0.mlp.experts.11.up_proj.weight"),  # 12 experts: stacked 0, 1, ..., 11, not 0, 1, 10
    ("gpt_neox", "embed_out.weight"),  # a renamed weight outside the blocks
])
def test_layout_converts_as_from_pretrained(tmp_path, model_type, converted):
    """CheckpointLayout makes every model tensor from_pretrained makes, and gives back the checkpoint's own."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lmprune.model.layout import CheckpointLayout
    from zoo import tiny_config

    config = tiny_config(model_type)
    config.num_experts = 12
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert converted in on_disk
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    layout = CheckpointLayout(meta, on_disk)
    made = layout.to_model(list(layout.groups), lambda keys: {k: on_disk[k] for k in keys})
    assert made.keys() == loaded.keys()
    for k in made:
        assert torch.equal(made[k], loaded[k]), k
    back = layout.to_checkpoint(made)
    assert back.keys() == on_disk.keys() and all(torch.equal(back[k], on_disk[k]) for k in back)


def test_fused_expert_checkpoint_streams_as_in_memory(capsys, tmp_path, calib):
    """A checkpoint already in the model's fused layout streams as any, and stays fused, as save_pretrained keeps it."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = save_tiny(tmp_path / "model", model_type="mixtral")
    weights = AutoModelForCausalLM.from_pretrained(model).state_dict()  # the per-expert tensors, fused
    save_file({k: v.contiguous() for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
    for out, extra in (("mem", ()), ("str", ("--stream",))):
        code, _, err = run_cli(capsys, *prune_args(model, calib, tmp_path / out, *WANDA, *extra))
        assert code == 0, err
    assert checkpoint_keys(tmp_path / "str") == checkpoint_keys(tmp_path / "mem") == set(weights)
    assert_same_weights(reload(tmp_path / "mem"), reload(tmp_path / "str"))
    assert layer_records(tmp_path / "mem") == layer_records(tmp_path / "str")


def test_large_checkpoint_streams_by_default(capsys, tmp_path, calib, monkeypatch):
    import lmprune.model.memory as memory

    model = save_tiny(tmp_path / "model")
    monkeypatch.setattr(memory, "available_memory", lambda: 1000)
    code, _, err = run_cli(capsys, *prune_args(model, calib, tmp_path / "out", *WANDA, "--eval", calib))
    assert code == 0 and any("streaming blocks from disk: the checkpoint's weights" in line for line in err), err
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    # Options that need the whole model load it into memory, with a warning.
    code, _, err = run_cli(capsys, "prune", model, "--nsamples", 2, "--seqlen", 32, "--out", tmp_path / "out2",
                           "--no-progress", *WANDA)
    assert code == 0 and any("warning: not streaming" in line and "self-generated calibration" in line
                             for line in err), err


def test_options_needing_the_whole_model_are_refused(capsys, tmp_path, calib):
    model = save_tiny(tmp_path / "model")
    capsys.readouterr()  # transformers' own saving bar, when no earlier test has turned its bars off
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, "prune", model, "--out", tmp_path / "out", *WANDA, "--stream", "--no-progress")
    assert err == ["lmprune: error: --stream keeps one block in memory: self-generated calibration (each generated "
                   "token passes through every block, so streaming would read the whole checkpoint once per token; "
                   "give --calib FILE) need(s) the whole model"] and code == 2
    code, _, err = run_cli(capsys, "eval", model, "--data", calib, "--tasks", "piqa", "--stream")
    assert err == ["lmprune: error: --stream evaluates perplexity (--data) one block at a time; --tasks needs the "
                   "whole model"] and code == 2
    code, _, err = run_cli(capsys, *prune_args(model, calib, tmp_path / "out", "--method", "sparsegpt",
                                               "--sparsity", "0.5", "--allocation", "owl", "--stream"))
    assert code == 2 and len(err) == 1 and "--allocation owl does not combine with --stream" in err[0], err
    assert snapshot(tmp_path) == before


# -- perplexity, one block at a time ----------------------------------------------------------------------

def blocks_held(model):
    """How many decoder blocks hold real (not meta) weights."""
    from lmprune.model import find_blocks

    return sum(any(not p.is_meta for p in block.parameters()) for block in find_blocks(model)[1])


def spy_on_loads(monkeypatch):
    """The number of blocks in memory each time a streamed block is loaded."""
    from lmprune.model.block_store import StreamedBlocks

    held, real = [], StreamedBlocks.load

    def load(self, index, block):
        real(self, index, block)
        held.append(blocks_held(self.model))

    monkeypatch.setattr(StreamedBlocks, "load", load)
    return held


EVAL = ("--seqlen", 32, "--max-windows", 3, "--batch-size", 2, "--no-progress")


@pytest.mark.parametrize("model_type", ["llama", "mixtral"])
def test_prune_stream_eval_equals_eval_of_the_saved_checkpoint(capsys, tmp_path, calib, monkeypatch, model_type):
    from lmprune.evaluate import evaluate_perplexity
    from lmprune.model import load_model

    model = save_tiny(tmp_path / "model", model_type=model_type, shard_size="60KB")
    held = spy_on_loads(monkeypatch)
    code, _, err = run_cli(capsys, *prune_args(model, calib, tmp_path / "out", *WANDA, "--stream", "--eval", calib,
                                               "--eval-max-windows", 3, "--batch-size", 2))
    assert code == 0, err
    assert held and max(held) == 1  # pruning and evaluating: one block in memory at a time
    streamed = report(tmp_path / "out")["evaluation"][0]
    assert streamed["windows"] == 3 and streamed["seqlen"] == 32
    assert err[-1].startswith(f"lmprune: saved to {tmp_path / 'out'}: ") and \
        f"perplexity {streamed['perplexity']:.2f} on {calib}" in err[-1]
    code, out, err = run_cli(capsys, "eval", tmp_path / "out", "--data", calib, *EVAL)
    assert code == 0 and out == f"perplexity {streamed['perplexity']:.4f} (3 windows × 32 tokens of {calib})\n", err
    # Exactly: the same operations on the same batches as the saved checkpoint evaluated in memory.
    pruned, tokenizer = load_model(str(tmp_path / "out"))
    in_memory = evaluate_perplexity(pruned, tokenizer, str(calib), 32, 3, torch.device("cpu"), 2, progress=False)
    assert in_memory["perplexity"] == streamed["perplexity"]


@pytest.mark.parametrize("model_type", ["gemma2", "qwen3_moe"])  # logit soft-capping after the blocks; experts
def test_eval_stream_equals_eval(capsys, tmp_path, calib, monkeypatch, model_type):
    from lmprune.evaluate import evaluate_perplexity
    from lmprune.model import load_model
    from lmprune.model.block_store import StreamedBlocks
    from lmprune.model.loading import load_streamed_model

    model = save_tiny(tmp_path / "model", model_type=model_type, shard_size="60KB")
    code, whole, err = run_cli(capsys, "eval", model, "--data", calib, *EVAL)
    assert code == 0 and whole.startswith("perplexity "), err
    held = spy_on_loads(monkeypatch)
    code, streamed, err = run_cli(capsys, "eval", model, "--data", calib, *EVAL, "--stream")
    assert code == 0 and streamed == whole, err
    assert len(held) == 4 + 1 and max(held) == 1  # block 0 to record the calls, then each block once
    loaded, tokenizer = load_model(str(model))
    args = (str(calib), 32, 3, torch.device("cpu"), 2, False)
    reference = evaluate_perplexity(loaded, tokenizer, *args)["perplexity"]
    meta, tokenizer, shards = load_streamed_model(str(model), "tiny")
    assert evaluate_perplexity(meta, tokenizer, *args, store=StreamedBlocks(meta, shards))["perplexity"] == reference
    assert blocks_held(meta) == 0


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_block_by_block_perplexity_is_the_models_own(model_type):
    """Every architecture of the zoo: windows through block 0, then block 1, ..., then the model's own head
    (final norm, lm_head, soft-capping) give perplexity()'s number exactly (here without disk: BlockStore)."""
    from lmprune.evaluate import perplexity, streamed_perplexity
    from lmprune.model.block_store import BlockStore
    from zoo import SEQLEN, tiny_model

    model = tiny_model(model_type)
    windows = torch.randint(0, 256, (5, SEQLEN), generator=torch.Generator().manual_seed(0))
    reference = perplexity(model, windows, torch.device("cpu"), 2, progress=False)
    assert streamed_perplexity(model, BlockStore(), windows, torch.device("cpu"), 2, progress=False) == reference


# -- faults: one line, exit code 2, no output directory ------------------------------------------------

def fault_case(tmp_path):
    model = save_tiny(tmp_path / "work" / "model", shard_size="40KB")
    shards = sorted(p.name for p in model.iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) > 2
    (tmp_path / "work" / "calib.txt").write_text(random_text(800))
    return tmp_path / "work", model, shards


def assert_fails(capsys, work, message, *extra):
    before = snapshot(work)
    code, _, err = run_cli(capsys, *prune_args(work / "model", work / "calib.txt", work / "out", *WANDA,
                                               "--stream", *extra))
    assert code == 2 and len(err) == 1 and err[0].startswith("lmprune: error: ") and message in err[0], err
    assert not (work / "out").exists() and snapshot(work) == before
    return err[0]


def test_missing_shard(capsys, tmp_path):
    work, model, shards = fault_case(tmp_path)
    (model / shards[1]).unlink()
    assert_fails(capsys, work, f"shard {shards[1]} named in model.safetensors.index.json is missing")


def test_truncated_shard(capsys, tmp_path):
    work, model, shards = fault_case(tmp_path)
    data = (model / shards[1]).read_bytes()
    (model / shards[1]).write_bytes(data[: len(data) - 100])
    assert_fails(capsys, work, f"{shards[1]} is truncated")


def test_block_weight_missing_from_the_index(capsys, tmp_path):
    work, model, _ = fault_case(tmp_path)
    index_file = model / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    index_file.write_text(json.dumps(index))
    assert_fails(capsys, work, "1 weight(s) of LlamaForCausalLM are not in its index "
                               "(e.g. model.layers.2.mlp.down_proj.weight)")


def test_unwritable_out(capsys, tmp_path, monkeypatch):
    work, _, _ = fault_case(tmp_path)
    real_mkdir = os.mkdir

    def read_only_mkdir(path, *rest, **kwargs):  # root ignores chmod: a refusing parent is simulated
        if str(path).endswith(".out.partial"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *rest, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    assert_fails(capsys, work, f"cannot write beside --out {str(work / 'out')!r}: permission denied")


def disk_full_at(monkeypatch, block: int):
    import lmprune.model.shards as shards

    real = shards.write_shard

    def write_shard(path, tensors, *metadata):
        if f"model-{block + 1:05d}-of" in path:
            with open(path, "wb") as f:
                f.write(b"half a shard")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        real(path, tensors, *metadata)

    monkeypatch.setattr(shards, "write_shard", write_shard)


def test_disk_full_before_any_block_is_done(capsys, tmp_path, monkeypatch):
    work, _, _ = fault_case(tmp_path)
    disk_full_at(monkeypatch, 0)
    assert_fails(capsys, work, "cannot write block 0 to")
    assert "no space left on device" in assert_fails(capsys, work, "no space left on device")


@pytest.mark.parametrize("method", [WANDA, ("--method", "sparsegpt", "--sparsity", "0.5", "--best-quality")])
def test_disk_full_keeps_finished_blocks_and_the_rerun_continues(capsys, tmp_path, monkeypatch, method):
    # --best-quality: a resumed run must also carry the dense stream through the finished blocks' dense weights.
    work, model, _ = fault_case(tmp_path)
    args = prune_args(model, work / "calib.txt", work / "out", *method, "--stream")
    disk_full_at(monkeypatch, 2)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1, err
    assert "cannot write block 2" in err[0] and "no space left on device" in err[0]
    assert "2 finished block(s) are kept" in err[0] and "run the same command again to continue" in err[0]
    partial = work / ".out.partial"
    assert not (work / "out").exists() and not (partial / "model-00003-of-00005.safetensors").exists()
    assert len(json.loads((partial / "lmprune_state.json").read_text())["blocks"]) == 2
    monkeypatch.undo()
    code, _, err = run_cli(capsys, *args)
    assert code == 0 and any("pruning from block 2" in line for line in err), err
    assert report(work / "out")["resumed"] == {"from_block": 2}
    code, _, err = run_cli(capsys, *prune_args(model, work / "calib.txt", work / "whole", *method, "--stream"))
    assert code == 0, err
    assert_same_weights(reload(work / "out"), reload(work / "whole"))
    assert layer_records(work / "out") == layer_records(work / "whole")
    # the finished blocks' block-target entries come back from the partial run's records
    assert report(work / "out").get("block_targets") == report(work / "whole").get("block_targets")
    if "--best-quality" in method:
        assert len(report(work / "out")["block_targets"]["layers"]) == 4  # all blocks, 2 of them replayed


def test_different_settings_refuse_to_resume_and_fresh_starts_afresh(capsys, tmp_path, monkeypatch):
    work, model, _ = fault_case(tmp_path)
    disk_full_at(monkeypatch, 1)
    code, _, err = run_cli(capsys, *prune_args(model, work / "calib.txt", work / "out", *WANDA, "--stream"))
    assert code == 2
    monkeypatch.undo()
    before = snapshot(work)
    changed = prune_args(model, work / "calib.txt", work / "out", "--method", "wanda", "--sparsity", "0.6", "--stream")
    code, _, err = run_cli(capsys, *changed)
    assert code == 2 and len(err) == 1 and "holds a partial run with a different settings (pattern)" in err[0], err
    assert "add --fresh to discard it and start afresh" in err[0]
    # The blocks it finished have no layer errors: --layer-errors cannot continue it either.
    code, _, err = run_cli(capsys, *prune_args(model, work / "calib.txt", work / "out", *WANDA, "--stream",
                                               "--layer-errors"))
    assert code == 2 and len(err) == 1 and "different settings (layer_errors)" in err[0], err
    (work / "other.txt").write_text(random_text(800, seed=1))
    code, _, err = run_cli(capsys, *prune_args(model, work / "other.txt", work / "out", *WANDA, "--stream"))
    assert code == 2 and len(err) == 1 and "holds a partial run with a different calibration:" in err[0], err
    (work / "other.txt").unlink()
    assert snapshot(work) == before  # the partial run is kept as it was
    code, _, err = run_cli(capsys, *changed, "--fresh")
    assert code == 0 and not any("resuming" in line for line in err), err
    assert "resumed" not in report(work / "out") and not (work / ".out.partial").exists()


# -- a real kill ----------------------------------------------------------------------------------------

@pytest.mark.slow  # two more Python processes, each importing torch
def test_sigkill_after_block_2_then_rerun_is_bit_identical(capsys, tmp_path, stories_path, tinystories_path):
    """A real `kill -9` once block 2 is durable; the same command continues and matches a whole run."""
    calib = tmp_path / "calib.txt"
    calib.write_text(tinystories_path.read_text(encoding="utf-8")[:20000], encoding="utf-8")
    command = ["prune", str(stories_path), "--calib", str(calib), "--nsamples", "4", "--seqlen", "64",
               "--method", "sparsegpt", "--sparsity", "0.5", "--stream", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    out, whole = tmp_path / "out", tmp_path / "whole"
    # Killed from inside, right after block 2's state write returns: exactly "block 2 is durable".
    script = (
        "import os, signal, sys\n"
        "import lmprune.model.block_store as s\n"
        "real = s.StreamedBlocks._write_state\n"
        "def write_state(self):\n"
        "    real(self)\n"
        "    if len(self.done) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "s.StreamedBlocks._write_state = write_state\n"
        "from lmprune.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, *command, "--out", str(out)], env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads((tmp_path / ".out.partial" / "lmprune_state.json").read_text())
    assert len(state["blocks"]) == 3 and not out.exists()

    with one_thread():
        changed = [a if a != "0.5" else "0.6" for a in command]
        code, _, err = run_cli(capsys, *changed, "--out", out)
        assert code == 2 and len(err) == 1 and "different settings (pattern)" in err[0], err
        code, _, err = run_cli(capsys, *command, "--out", whole)
        assert code == 0, err

    resumed = subprocess.run([sys.executable, "-m", "lmprune", *command, "--out", str(out)], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0 and "pruning from block 3" in resumed.stderr, resumed.stderr
    assert report(out)["resumed"] == {"from_block": 3} and "resumed" not in report(whole)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in whole.iterdir())
    for name in files:
        if name != "lmprune_report.json":  # timings and the resume note differ
            assert (out / name).read_bytes() == (whole / name).read_bytes(), name
    assert layer_records(out) == layer_records(whole)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
