"""The compiled one-token kernels (bitmask_linear, dense_linear), the in-memory packing of a dense model with
zeros, and `lmprune bench-decode`.

References: exact float64 products (the kernels sum in fp32: within 1e-6 of the sum of |terms|, the order of
summation being the only difference between paths), and the dense model's own greedy tokens."""

import itertools
import json

import pytest
import torch

from conftest import run_cli
from lmprune.masks import layer_mask, nm_mask
from lmprune.sparse.packing import pack_bitmask, row_offsets

SHAPES = [(7, 13), (33, 100), (64, 172), (40, 256), (24, 2048 + 37)]  # row tails of every kind, a long row
ISAS = (0, 1, 2, 3)  # portable, AVX-512F, VBMI2 (lane-ordered x for bf16), BF16 dot (bf16 x): clamped to the CPU's best


@pytest.fixture(scope="module")
def kernel():
    from lmprune.sparse.kernel import gemv_kernel

    module = gemv_kernel()
    if module is None:
        pytest.skip("the compiled kernel cannot be built here")
    return module


def sparse_weight(rows: int, cols: int, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=g)
    w = w * (nm_mask(w.abs(), 2, 4) if cols % 4 == 0 else layer_mask(w.abs(), 0.7))
    w[rows // 2] = 0  # a row with nothing kept
    return w.to(dtype)


def assert_fp32_sums(y: torch.Tensor, w: torch.Tensor, x: torch.Tensor, what) -> None:
    exact = w.double() @ x.double()
    scale = (w.double().abs() @ x.double().abs()).clamp_min(1e-30)
    assert float(((y.double() - exact).abs() / scale).max()) < 1e-6, what


def test_bitmask_kernel_every_path_every_dtype_and_x_dtype(kernel):
    """Every path, values bf16/fp16/fp32, x in each dtype (widened in the kernel): fp32 sums of the exact
    products; bitmask_linear is those sums plus the bias, rounded once to x's dtype (bit-exact)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for rows, cols in SHAPES:
            w = sparse_weight(rows, cols, dtype, g)
            packed = pack_bitmask(w)
            offsets = row_offsets(packed)
            bias = torch.randn(rows, generator=g).to(dtype)
            for x_dtype in (torch.float32, dtype):
                x = torch.randn(cols, generator=g).to(x_dtype)
                for isa in ISAS:
                    sums = kernel.bitmask_gemv(x, packed.positions, packed.values, offsets, cols, isa)
                    assert sums.dtype == torch.float32
                    assert_fp32_sums(sums, w, x, (dtype, x_dtype, rows, cols, isa))
                    y = kernel.bitmask_linear(x, packed.positions, packed.values, offsets, bias, cols, isa)
                    assert y.dtype == x_dtype and torch.equal(y, (sums + bias.float()).to(x_dtype))
                    y = kernel.bitmask_linear(x, packed.positions, packed.values, offsets, None, cols, isa)
                    assert torch.equal(y, sums.to(x_dtype))


def test_bitmask_kernel_rows_of_every_count_in_groups(kernel):
    """The bf16 paths (BF16 dot for a bf16 x, VBMI2 for an fp32 x) take rows four at a time (one row from each
    of four runs): rows kept from none to all, side by side, in row counts that leave 0-3 rows over. Every
    path gives the fp32 sums of the exact products, and each row's result is bit-identical to the same row
    multiplied alone (a row's summation order does not depend on its group)."""
    g = torch.Generator().manual_seed(2)
    for rows, cols in [(203, 100), (64, 2048 + 37), (9, 64), (130, 96)]:
        w = torch.randn(rows, cols, generator=g)
        kept = torch.arange(rows).remainder(11).float().div(10).unsqueeze(1)  # 0%, 10%, ..., 100% kept
        w = (w * (torch.rand(rows, cols, generator=g) < kept)).to(torch.bfloat16)
        packed = pack_bitmask(w)
        offsets = row_offsets(packed)
        for x_dtype, isa in itertools.product((torch.bfloat16, torch.float32), ISAS):
            x = torch.randn(cols, generator=g).to(x_dtype)
            sums = kernel.bitmask_gemv(x, packed.positions, packed.values, offsets, cols, isa)
            assert_fp32_sums(sums, w, x, (rows, cols, x_dtype, isa))
            for r in range(0, rows, 7):
                start, end = int(offsets[r]), int(offsets[r + 1])
                alone = kernel.bitmask_gemv(x, packed.positions[r:r + 1], packed.values[start:end],
                                            torch.tensor([0, end - start]), cols, isa)
                assert torch.equal(alone, sums[r:r + 1]), (rows, cols, x_dtype, isa, r)


def test_dense_bf16_kernel_every_path(kernel):
    """The LM head's dense bf16 GEMV (four runs of rows a step, then the rows left over; 259 rows: split over
    threads): fp32 sums of the exact
    products; with a bias and a bf16 x, the sums plus the bias rounded once to bf16 (within half a bf16 ulp, at most
    2^-8 relative, of the exact value, beyond the fp32 summation's 1e-6)."""
    g = torch.Generator().manual_seed(1)
    for rows, cols in [(1, 5), (7, 13), (9, 64), (66, 100), (259, 100), (13, 2048 + 37)]:
        w = torch.randn(rows, cols, generator=g).to(torch.bfloat16)
        bias = torch.randn(rows, generator=g).to(torch.bfloat16)
        for x_dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(cols, generator=g).to(x_dtype)
            for isa in ISAS:
                if x_dtype == torch.float32:
                    plain = kernel.dense_linear(x, w, None, isa)
                    assert plain.dtype == torch.float32
                    assert_fp32_sums(plain, w, x, (rows, cols, isa))
                y = kernel.dense_linear(x, w, bias, isa)
                assert y.dtype == x_dtype
                exact = w.double() @ x.double() + bias.double()
                scale = w.double().abs() @ x.double().abs() + bias.double().abs()
                rounding = exact.abs() * (2 ** -8 if x_dtype == torch.bfloat16 else 0)
                assert bool(((y.double() - exact).abs() <= 1e-6 * scale + rounding).all()), (rows, cols, x_dtype, isa)


def test_kernels_refuse_inconsistent_arguments(kernel):
    packed = pack_bitmask(torch.eye(8))
    with pytest.raises(RuntimeError, match="offsets do not span the values"):
        kernel.bitmask_gemv(torch.ones(8), packed.positions, packed.values[:-1].contiguous(), row_offsets(packed), 8, 2)
    with pytest.raises(RuntimeError, match="x: \\[cols\\]"):
        kernel.bitmask_gemv(torch.ones(9), packed.positions, packed.values, row_offsets(packed), 8, 2)
    with pytest.raises(RuntimeError, match="weight: bf16"):
        kernel.dense_linear(torch.ones(8), torch.eye(8), None, 2)


def pruned_tiny_llama(path, out, dtype=torch.float32):
    """tiny_llama with every block Linear magnitude-pruned to 60%, saved dense with zeros."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.mul_(layer_mask(module.weight.abs().float(), 0.6).to(dtype))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)
    return out


def test_pack_model_packs_the_block_layers_and_keeps_greedy_tokens(tiny_llama, tmp_path):
    """A dense model with zeros packed in memory: every block Linear becomes a SparseLinear, the head stays
    (float32: no head kernel), and greedy decoding gives the dense model's tokens."""
    from lmprune.model import load_model
    from lmprune.sparse.linear import DenseHeadLinear, SparseLinear, pack_model

    path = pruned_tiny_llama(tiny_llama, tmp_path / "pruned")
    dense, tokenizer = load_model(str(path), progress=False)
    sparse, _ = load_model(str(path), progress=False)
    assert pack_model(sparse) == 14  # 2 blocks × (q, k, v, o, gate, up, down)
    assert sum(isinstance(m, SparseLinear) for m in sparse.modules()) == 14
    assert type(sparse.lm_head) is torch.nn.Linear
    ids = tokenizer("the cat sat", return_tensors="pt")["input_ids"]
    greedy = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    with torch.inference_mode():
        assert torch.equal(sparse.generate(ids, **greedy), dense.generate(ids, **greedy))
    bf16, _ = load_model(str(path), "bfloat16", progress=False)
    pack_model(bf16)
    assert type(bf16.lm_head) is DenseHeadLinear
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    with torch.inference_mode():
        head = bf16.lm_head(x)
        exact = x.double() @ bf16.lm_head.weight.double().t()
    # one rounding to bf16 of an fp32 sum: within a bf16 ulp (2^-7 relative) of the exact product
    assert float(((head.double() - exact).abs() / exact.abs().clamp_min(1e-3)).max()) < 2 ** -7


def test_bench_decode_reports_three_variants_and_token_agreement(tiny_llama, tmp_path, capsys):
    """On a packed checkpoint: three subprocess runs, a table, the JSON, agreement stated."""
    path = pruned_tiny_llama(tiny_llama, tmp_path / "pruned")
    code, _, err = run_cli(capsys, "pack", path, "--out", tmp_path / "packed")
    assert code == 0, err
    code, out, err = run_cli(capsys, "bench-decode", tmp_path / "packed", "--tokens", 6, "--threads", 1,
                             "--sparse-dtype", "float32", "--prompt", "the cat", "--json", tmp_path / "r.json")
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert [(r["kind"], r["dtype"]) for r in result["runs"]] == [("dense", "float32"), ("dense", "bfloat16"),
                                                                ("sparse", "float32")]
    sparse = result["runs"][2]
    assert sparse["packed_layers"] == 14 and len(sparse["new_tokens"]) == 6
    assert result["agreement"]["dense float32"]["identical"]
    assert "greedy tokens, sparse vs dense float32: identical" in out
    assert all(r["model_rss_mb"] > 0 and r["tokens_per_s"] > 0 for r in result["runs"])
    assert [line for line in err if line.startswith("lmprune: [")][0].startswith("lmprune: [1/3] dense float32")


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "lmprune: error: --threads must be at least 1, got 0"),
    (["--tokens", "1"], "lmprune: error: --tokens must be at least 2 (the first new token is the prefill), got 1"),
])
def test_bench_decode_bad_input(tiny_llama, capsys, args, message):
    code, out, err = run_cli(capsys, "bench-decode", tiny_llama, *args)
    assert (code, out, err) == (2, "", [message])


def test_bench_decode_refuses_a_dir_without_config(tmp_path, capsys):
    code, out, err = run_cli(capsys, "bench-decode", tmp_path)
    assert (code, err) == (2, [f"lmprune: error: {tmp_path} is not a checkpoint directory (no config.json)"])
