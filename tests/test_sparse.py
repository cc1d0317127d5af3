"""The compact sparse checkpoint (pack/unpack, --save-format sparse) and the sparse inference path.

References are independent of the code under test: the dense-with-zeros checkpoint's own tensors (read by
safetensors), and the dense-with-zeros model's own outputs."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lmprune
from conftest import REPO, byte_tokenizer, prune_args, random_text, run_cli, snapshot
from lmprune.cli import generate_text, main
from lmprune.masks import nm_mask
from lmprune.sparse.format import INDEX, is_sparse_checkpoint
from lmprune.sparse.linear import SparseLinear

PATTERNS = {"50%": ("--sparsity", "0.5"), "2:4": ("--pattern", "2:4")}
PROMPTS = ["Once upon a time", "The cat", "Lily and Tom", "One day, a little", "The sun was", "Tim had a big",
           "She liked to", "In the park", "A bird", "Mom said", "The dog ran", "He was very", "They went to",
           "The little girl", "Ben saw a", "It was a", "The tree", "Sam wanted", "At night", "The boy and"]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def cli(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def stories(tmp_path_factory, stories_path, tinystories_path) -> dict[str, tuple[Path, Path]]:
    """stories260K pruned by magnitude (dense with zeros) and its packed form, for 50% and 2:4."""
    root = tmp_path_factory.mktemp("stories")
    out = {}
    for tag, target in PATTERNS.items():
        dense, packed = root / f"{tag[:2]}-dense", root / f"{tag[:2]}-packed"
        assert cli(*prune_args(stories_path, tinystories_path, dense, "--method", "magnitude", *target)) == 0
        assert cli("pack", dense, "--out", packed) == 0
        out[tag] = dense, packed
    return out


@pytest.mark.parametrize("tag", PATTERNS)
def test_pack_then_unpack_gives_back_every_tensor(capsys, tmp_path, stories, tag):
    dense, _ = stories[tag]
    before = snapshot(dense)
    code, _, err = run_cli(capsys, "pack", dense, "--out", tmp_path / "packed")
    assert code == 0, err
    assert snapshot(dense) == before  # pack never touches its input
    layouts = json.loads((tmp_path / "packed" / "lmprune_report.json").read_text())["packed"]["layouts"]
    assert layouts == ({"bitmask": 35, "nm": 0} if tag == "50%" else {"bitmask": 0, "nm": 35})
    assert run_cli(capsys, "unpack", tmp_path / "packed", "--out", tmp_path / "unpacked")[0] == 0
    assert_same_tensors(tensors(dense), tensors(tmp_path / "unpacked"))
    config = json.loads((tmp_path / "unpacked" / "config.json").read_text())
    assert config == json.loads((dense / "config.json").read_text())


@pytest.mark.parametrize("tag", PATTERNS)
def test_pack_without_a_report_finds_the_pruned_weights(capsys, tmp_path, stories, tag):
    """A checkpoint pruned elsewhere: the block weights with zeros are packed, N:M found from the weights."""
    dense = copy_of(stories[tag][0], tmp_path)
    (dense / "lmprune_report.json").unlink()
    assert run_cli(capsys, "pack", dense, "--out", tmp_path / "packed")[0] == 0
    layouts = json.loads((tmp_path / "packed" / "lmprune_report.json").read_text())["packed"]["layouts"]
    assert layouts == ({"bitmask": 35, "nm": 0} if tag == "50%" else {"bitmask": 0, "nm": 35})
    assert run_cli(capsys, "unpack", tmp_path / "packed", "--out", tmp_path / "unpacked")[0] == 0
    assert_same_tensors(tensors(dense), tensors(tmp_path / "unpacked"))


@pytest.mark.parametrize("tag", PATTERNS)
def test_packed_weights_take_about_half_the_bytes(stories, tag):
    """float32 at 50%: half the values plus one bit per weight (bitmask), or per kept value two bits (2:4)."""
    dense, packed = stories[tag]
    original = tensors(dense)
    packed_bytes = dense_bytes = 0
    for file in packed.glob("*.safetensors"):
        for name, t in load_file(file).items():
            if name.endswith((".lmprune_values", ".lmprune_bitmask", ".lmprune_indices")):
                packed_bytes += t.nbytes
                if name.endswith(".lmprune_values"):
                    dense_bytes += original[name.removesuffix(".lmprune_values")].nbytes
    assert dense_bytes > 0
    assert packed_bytes / dense_bytes == pytest.approx((0.5 * 4 + 1 / 8) / 4, abs=0.002)


def greedy(model, tokenizer, prompts, tokens=6) -> list[list[int]]:
    return [tokenizer(generate_text(model, tokenizer, p, tokens)[0])["input_ids"] for p in prompts]


def decode_logits(model, tokenizer, prompt: str, steps: int = 6) -> torch.Tensor:
    """Logits of greedy decoding, stacked: after the prompt, one token at a time (the batch-1 path)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False, temperature=None, top_k=None,
                             top_p=None, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.eos_token_id)
    return torch.cat(out.logits).float()


def assert_logits_agree(actual: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    """Within `tolerance` × the largest |logit|. The portable path multiplies the very same values with the
    same op as the dense layer, yet is not always bit-identical: the kernels torch picks (and so their
    summation order) depend on the tensors' memory alignment, which differs between a model loaded from
    a file and one built from tensors in memory (a tiny GraniteMoE: last-bit differences). 1e-5 of the
    scale for the portable path; 1e-4 for the compiled one, which sums in its own order throughout."""
    assert torch.allclose(actual.float(), reference.float(), rtol=0, atol=tolerance * float(reference.abs().max()))


def set_compiled(model, compiled: bool) -> int:
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    for layer in layers:
        layer.compiled = compiled
    return len(layers)


@pytest.mark.parametrize("tag", PATTERNS)
def test_sparse_model_generates_what_the_dense_model_does(stories, tag):
    """Portable path: the dense layer's own op on the same values, so logits agree to the last bits and 20
    greedy generations are identical. Compiled batch-1 path: fp32 sums in another order, so logits agree to
    rounding (1e-4 of their scale) and the generations too."""
    from transformers import AutoTokenizer

    dense_dir, packed_dir = stories[tag]
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    dense = lmprune.load_model(str(dense_dir))
    sparse = lmprune.load_model(str(packed_dir), sparse=True)
    assert set_compiled(sparse, False) == 35
    batch = tokenizer(" ".join(PROMPTS), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert_logits_agree(sparse(batch).logits, dense(batch).logits, 1e-5)
    expected = greedy(dense, tokenizer, PROMPTS)
    assert greedy(sparse, tokenizer, PROMPTS) == expected
    set_compiled(sparse, True)
    for prompt in PROMPTS[:5]:
        assert_logits_agree(decode_logits(sparse, tokenizer, prompt), decode_logits(dense, tokenizer, prompt), 1e-4)
    assert greedy(sparse, tokenizer, PROMPTS) == expected


def test_plain_transformers_refuses_a_packed_checkpoint(stories):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    _, packed = stories["50%"]
    with pytest.raises(ValueError, match="lmprune_sparse"):
        AutoModelForCausalLM.from_pretrained(packed)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        LlamaForCausalLM.from_pretrained(packed)


def test_transformers_loads_a_packed_checkpoint_once_registered(stories):
    """lmprune.register_transformers(): the public AutoConfig/AutoModel extension point; plain transformers
    (above) refuses. Run in a subprocess, so the registration does not leak into the other tests."""
    dense, packed = stories["2:4"]
    script = f"""
import torch, lmprune
from transformers import AutoModelForCausalLM
lmprune.register_transformers()
model = AutoModelForCausalLM.from_pretrained({str(packed)!r}, sparse=True)
dense = AutoModelForCausalLM.from_pretrained({str(dense)!r})
assert type(model) is type(dense), type(model)
ids = torch.tensor([[1, 300, 40, 7]])
with torch.inference_mode():
    for m in model.modules():
        if hasattr(m, "compiled"):
            m.compiled = False  # the portable path: bit-identical
    a, b = model(ids).logits, dense(ids).logits
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
print("same")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert result.stdout.strip() == "same", result.stderr[-2000:]


def test_generate_command_prints_text_and_speed(capsys, stories):
    _, packed = stories["2:4"]
    code, out, err = run_cli(capsys, "generate", packed, "--prompt", "Once upon a time", "--max-new-tokens", 5,
                             "--threads", 1)
    assert code == 0
    assert out.startswith("Once upon a time")
    assert err[-1].startswith("lmprune: 5 new tokens in ") and "tokens/s on 1 thread(s), 35 packed layer(s)" in err[-1]


# ---- bad input: one line, exit 2, nothing written -------------------------------------------------------------

def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "in"
    shutil.copytree(src, dst)
    return dst


def the_shard(packed: Path) -> Path:
    (shard,) = sorted(packed.glob("sparse-*.safetensors"))
    return shard


def rewrite_shard(shard: Path, change) -> None:
    """Load a packed shard, let `change(tensors, records)` edit it, write it back."""
    with safe_open(shard, "pt") as f:
        metadata = f.metadata()
    data = load_file(shard)
    records = json.loads(metadata["lmprune_sparse"])
    change(data, records)
    save_file(data, shard, metadata={**metadata, "lmprune_sparse": json.dumps(records)})


def refuse(capsys, tmp_path, message: str, *args) -> None:
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, *args)
    assert code == 2 and len(err) == 1 and err[0].startswith("lmprune: error: "), err
    assert message in err[0], err[0]
    assert snapshot(tmp_path) == before


def unpack_and_load_refuse(capsys, tmp_path, packed: Path, message: str) -> None:
    """Every command that reads a packed checkpoint: one line naming the problem, exit 2, nothing written;
    `pack` refuses any packed input (before reading its weights)."""
    data = tmp_path / "eval.txt"
    data.write_text(random_text(200))
    refuse(capsys, tmp_path, message, "unpack", packed, "--out", tmp_path / "out")
    refuse(capsys, tmp_path, message, "generate", packed, "--prompt", "Hi", "--max-new-tokens", 1)
    refuse(capsys, tmp_path, message, "generate", packed, "--prompt", "Hi", "--max-new-tokens", 1, "--dense")
    refuse(capsys, tmp_path, message, "eval", packed, "--data", data, "--seqlen", 16, "--max-windows", 1)
    refuse(capsys, tmp_path, "is packed: evaluate it without --stream", "eval", packed, "--data", data,
           "--seqlen", 16, "--max-windows", 1, "--stream")
    refuse(capsys, tmp_path, "already a sparse checkpoint", "pack", packed, "--out", tmp_path / "out")


def test_truncated_packed_file_is_refused(capsys, tmp_path, stories):
    packed = copy_of(stories["50%"][1], tmp_path)
    shard = the_shard(packed)
    shard.write_bytes(shard.read_bytes()[:-100])
    unpack_and_load_refuse(capsys, tmp_path, packed, "is truncated")


def test_corrupted_packed_values_are_refused(capsys, tmp_path, stories):
    packed = copy_of(stories["50%"][1], tmp_path)
    shard = the_shard(packed)
    raw = bytearray(shard.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    start, _ = header["model.layers.2.mlp.up_proj.weight.lmprune_values"]["data_offsets"]
    raw[8 + header_len + start + 5] ^= 0x10
    shard.write_bytes(bytes(raw))
    unpack_and_load_refuse(capsys, tmp_path, packed, "model.layers.2.mlp.up_proj.weight: its packed bytes fail "
                                                     "their CRC-32 check")


def test_bitmask_disagreeing_with_the_values_is_refused(capsys, tmp_path, stories):
    """A bit flipped in a mask and the CRC made to match: the count check still catches it."""
    from lmprune.sparse.packing import PackedWeight

    packed = copy_of(stories["50%"][1], tmp_path)
    name = "model.layers.0.self_attn.q_proj.weight"

    def flip(data, records):
        mask = data[name + ".lmprune_bitmask"]
        byte = int(mask[0, 0])
        mask[0, 0] = byte | 1 << next(j for j in range(8) if not byte >> j & 1)  # one more kept weight than values
        records[name]["crc32"] = PackedWeight("bitmask", (), torch.float32, data[name + ".lmprune_values"], mask).crc32()

    rewrite_shard(the_shard(packed), flip)
    unpack_and_load_refuse(capsys, tmp_path, packed, "its bitmask marks")


def test_format_version_from_the_future_is_refused(capsys, tmp_path, stories):
    packed = copy_of(stories["2:4"][1], tmp_path)
    config = json.loads((packed / "config.json").read_text())
    config["lmprune_sparse"]["version"] = 2
    (packed / "config.json").write_text(json.dumps(config))
    unpack_and_load_refuse(capsys, tmp_path, packed, "format version 2, newer than the version 1")


def test_pack_refuses_a_weight_denser_than_its_report_says(capsys, tmp_path, stories):
    dense = copy_of(stories["50%"][0], tmp_path)
    data = load_file(dense / "model.safetensors")
    data["model.layers.1.mlp.down_proj.weight"] = torch.randn_like(data["model.layers.1.mlp.down_proj.weight"])
    save_file(data, dense / "model.safetensors", metadata={"format": "pt"})
    refuse(capsys, tmp_path, "model.layers.1.mlp.down_proj has 0 zeros of", "pack", dense, "--out", tmp_path / "o")


def test_pack_refuses_a_weight_off_its_reported_nm_pattern(capsys, tmp_path, stories):
    """As many zeros as the report says, but one group of 4 with three non-zeros."""
    dense = copy_of(stories["2:4"][0], tmp_path)
    data = load_file(dense / "model.safetensors")
    weight = data["model.layers.3.self_attn.o_proj.weight"]
    zero = int((weight[0, :4] == 0).nonzero()[0])
    weight[0, zero] = 1.0
    weight[1, (weight[1] != 0).nonzero()[0]] = 0.0
    save_file(data, dense / "model.safetensors", metadata={"format": "pt"})
    refuse(capsys, tmp_path, "model.layers.3.self_attn.o_proj.weight is not 2:4 sparse", "pack", dense,
           "--out", tmp_path / "o")


def test_a_pack_that_fails_midway_leaves_no_output(capsys, tmp_path, stories, monkeypatch):
    """The disk fills while the shard is written: nothing appears at --out, an existing output is kept whole,
    no temporary files are left, and the input is untouched (refuse() compares the whole tree)."""
    import safetensors.torch

    dense = copy_of(stories["50%"][0], tmp_path)
    assert run_cli(capsys, "pack", dense, "--out", tmp_path / "old")[0] == 0

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a shard")
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    refuse(capsys, tmp_path, "no space left on device", "pack", dense, "--out", tmp_path / "new")
    refuse(capsys, tmp_path, "no space left on device", "pack", dense, "--out", tmp_path / "old", "--overwrite")


def test_pack_output_rules(capsys, tmp_path, stories):
    dense = copy_of(stories["50%"][0], tmp_path)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("precious")
    refuse(capsys, tmp_path, "not written by lmprune", "pack", dense, "--out", tmp_path / "foreign", "--overwrite")
    refuse(capsys, tmp_path, "is the model directory", "pack", dense, "--out", dense, "--overwrite")
    refuse(capsys, tmp_path, "is not a packed checkpoint", "unpack", dense, "--out", tmp_path / "o")
    assert run_cli(capsys, "pack", dense, "--out", tmp_path / "p")[0] == 0
    refuse(capsys, tmp_path, "already a sparse checkpoint", "pack", tmp_path / "p", "--out", tmp_path / "q")
    refuse(capsys, tmp_path, "is not empty (use --overwrite", "pack", dense, "--out", tmp_path / "p")
    assert run_cli(capsys, "pack", dense, "--out", tmp_path / "p", "--overwrite")[0] == 0


# ---- prune --save-format sparse ---------------------------------------------------------------------------------

def test_prune_saves_the_sparse_format_directly(capsys, tmp_path, tiny_llama, text_file):
    args = prune_args(tiny_llama, text_file, tmp_path / "dense", "--method", "magnitude", "--pattern", "2:4")
    assert run_cli(capsys, *args)[0] == 0
    sparse_args = prune_args(tiny_llama, text_file, tmp_path / "sparse", "--method", "magnitude", "--pattern", "2:4",
                             "--save-format", "sparse")
    assert run_cli(capsys, *sparse_args)[0] == 0
    assert is_sparse_checkpoint(str(tmp_path / "sparse")) and (tmp_path / "sparse" / INDEX).is_file()
    report = json.loads((tmp_path / "sparse" / "lmprune_report.json").read_text())
    assert report["packed"]["layouts"] == {"bitmask": 0, "nm": 14}
    assert run_cli(capsys, "unpack", tmp_path / "sparse", "--out", tmp_path / "unpacked")[0] == 0
    assert_same_tensors(tensors(tmp_path / "dense"), tensors(tmp_path / "unpacked"))


# ---- other architectures ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type, target", [
    ("gpt2", ("--pattern", "2:4")),  # Conv1D: its 2:4 groups run along the stored [in, out]'s first dimension
    ("gpt2", ("--sparsity", "0.5")),
    ("mistral", ("--sparsity", "0.5")),  # sliding window
    ("mixtral", ("--pattern", "2:4")),  # experts fused in memory, one tensor per expert on disk
    ("qwen3_moe", ("--sparsity", "0.5")),
    ("gpt_oss", ("--pattern", "2:4")),  # fused [experts, in, out] tensors on disk: each expert slice packed
    ("granitemoe", ("--sparsity", "0.5")),  # fused [experts, out, in] on disk
])
def test_architectures_round_trip_and_run_sparse(capsys, tmp_path, model_type, target):
    import zoo
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    zoo.tiny_model(model_type).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    (tmp_path / "calib.txt").write_text(random_text(400))
    pruned = tmp_path / "pruned"
    assert run_cli(capsys, *prune_args(model_dir, tmp_path / "calib.txt", pruned, "--method", "magnitude",
                                       *target))[0] == 0
    assert run_cli(capsys, "pack", pruned, "--out", tmp_path / "packed")[0] == 0
    assert run_cli(capsys, "unpack", tmp_path / "packed", "--out", tmp_path / "unpacked")[0] == 0
    assert_same_tensors(tensors(pruned), tensors(tmp_path / "unpacked"))

    tokenizer = AutoTokenizer.from_pretrained(pruned)
    dense = lmprune.load_model(str(pruned))
    sparse = lmprune.load_model(str(tmp_path / "packed"), sparse=True)
    assert set_compiled(sparse, False) >= 4 * 4  # at least the attention projections of every block
    ids = tokenizer(random_text(8, seed=1), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert_logits_agree(sparse(ids).logits, dense(ids).logits, 1e-5)
    prompts = ["the cat", "a dog ran", "red mat"]
    expected = greedy(dense, tokenizer, prompts, tokens=5)
    assert greedy(sparse, tokenizer, prompts, tokens=5) == expected
    set_compiled(sparse, True)
    assert_logits_agree(decode_logits(sparse, tokenizer, "the cat sat"), decode_logits(dense, tokenizer, "the cat sat"),
                        1e-4)
    # Saved from memory, the sparse model is a normal dense checkpoint again, equal to the pruned one.
    sparse.save_pretrained(tmp_path / "resaved")
    resaved = tensors(tmp_path / "resaved")
    assert_same_tensors({k: v for k, v in tensors(pruned).items() if k in resaved}, resaved)
    assert set(tensors(pruned)) - set(resaved) <= {"lm_head.weight"}  # a tied head is saved once


def test_compiled_kernel_matches_the_portable_path():
    """Every dispatch path (AVX-512 VBMI2, AVX-512F, portable C++) on every dtype, with row tails of every
    length: within fp32 rounding (1e-6 of the sum of |terms|) of an exact float64 product."""
    from lmprune.sparse.kernel import gemv_kernel
    from lmprune.sparse.packing import as_row_bitmask, choose_layout, pack, row_offsets

    kernel = gemv_kernel()
    if kernel is None:
        pytest.skip("the compiled kernel cannot be built here")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rows, cols in [(7, 13), (33, 100), (64, 172), (40, 256)]:
            w = torch.randn(rows, cols, generator=g)
            w = (w * nm_mask(w.abs(), 2, 4) if cols % 4 == 0 else w * (torch.rand(rows, cols, generator=g) > 0.6))
            w = w.to(dtype)
            layout, options = choose_layout(w)
            packed = as_row_bitmask(pack(w, layout, **options))
            x = torch.randn(cols, generator=g)
            exact = w.double() @ x.double()
            scale = (w.double().abs() @ x.double().abs()).clamp_min(1e-30)
            for isa in (0, 1, 2):
                y = kernel.bitmask_gemv(x, packed.positions, packed.values, row_offsets(packed), cols, isa)
                assert float(((y.double() - exact).abs() / scale).max()) < 1e-6, (dtype, rows, cols, isa)
