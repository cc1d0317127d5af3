"""Bad models and bad data, tried as a hostile user would: every one gives one `lmprune: error:` line,
exit code 2, inputs unchanged byte for byte and nothing written; no checkpoint ever holds a non-finite
weight or a layer off its target sparsity."""

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, BertConfig, BertModel, LlamaConfig, LlamaModel

from conftest import byte_tokenizer, prune_args, random_text, run_cli, snapshot
from lmprune.config import SparsityPattern
from lmprune.data import load_text
from lmprune.errors import LmpruneError
from lmprune.masks import topk_mask
from lmprune.model.loading import require_causal_decoder
from lmprune.report import format_report, load_report, write_json
from lmprune.safety import MASKED_FALLBACK, finite_layer_weight, require_finite_gram, verify_sparsity
from lmprune.solvers import SOLVERS, SolverResult
from lmprune.solvers.linalg import relative_error, relative_errors

WANDA = ("--method", "wanda", "--sparsity", "0.5")


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(random_text(800))
    return path


@pytest.fixture
def model_copy(tmp_path, tiny_llama):
    """A copy of the tiny Llama to damage."""
    return shutil.copytree(tiny_llama, tmp_path / "model")


def refused(capsys, tmp_path, *args, message: str, model=None) -> None:
    """`lmprune ARGS` fails with one error line holding `message` (after progress lines, if the work had
    begun), exit 2, and leaves tmp_path (and `model`) as it was."""
    before, model_before = snapshot(tmp_path), model and snapshot(model)
    code, _, err = run_cli(capsys, *args)
    errors = [line for line in err if not line.startswith("lmprune: pruning ")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("lmprune: error: ") and message in errors[0], err
    assert snapshot(tmp_path) == before and (model is None or snapshot(model) == model_before)


# --- non-finite weights --------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_weight_at_load_is_named(capsys, tmp_path, model_copy, calib, value):
    weights = load_file(model_copy / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
    message = "weight model.layers.1.mlp.up_proj.weight has 1 NaN/Inf value(s) of 11008"
    for method in ("magnitude", "sparsegpt"):
        refused(capsys, tmp_path, *prune_args(model_copy, calib, tmp_path / "out", "--method", method,
                                              "--sparsity", "0.5"), message=message)
    refused(capsys, tmp_path, "eval", model_copy, "--data", calib, "--seqlen", 32, "--no-progress", message=message)


def test_finite_layer_weight_falls_back_only_to_a_finite_result():
    W = torch.randn(4, 8)
    mask = topk_mask(W.abs(), SparsityPattern(0.5))
    good = W * mask
    weight, note = finite_layer_weight("l", W, good, mask)
    assert weight is good and note is None
    broken = good.clone()
    broken[0, 0] = math.nan
    weight, note = finite_layer_weight("l", W, broken, mask)
    assert note == MASKED_FALLBACK and torch.equal(weight, W * mask)
    row, col = mask.nonzero()[0].tolist()
    W[row, col] = math.inf  # a kept weight: the masked result is not finite either
    with pytest.raises(LmpruneError, match="layer l: the pruned weights are not finite"):
        finite_layer_weight("l", W, broken, mask)


def test_non_finite_update_falls_back_to_the_masked_weights(tiny_llama):
    """A solver whose update overflows: the masked weights are written, the report says so, the errors are finite."""
    from transformers import AutoModelForCausalLM

    from lmprune.pipeline import prune_model

    class OverflowingUpdate:
        needs_input_stats = False

        def __call__(self, W, H, pattern, stats=None):
            mask = topk_mask(W.abs(), pattern)
            return SolverResult(torch.full_like(W, math.inf) * mask, mask)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    pattern = SparsityPattern(0.5)
    result = prune_model(model, ids, OverflowingUpdate(), pattern, torch.device("cpu"), progress=False)
    assert all(r["fallback"] == MASKED_FALLBACK for r in result.layers)
    assert all(math.isfinite(r["error"]) and r["error"] == r["error_masked"] for r in result.layers)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_calibration_inputs_stop_with_a_clear_error(tiny_llama):
    """NaN activations (here from a damaged norm; in practice an fp16 overflow) would make SparseGPT's
    Cholesky fail with a traceback that never mentions NaN."""
    from transformers import AutoModelForCausalLM

    from lmprune.pipeline import prune_model
    from lmprune.solvers import build_layer_solver

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = math.nan
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(LmpruneError, match=r"layer model\.layers\.0\.self_attn\.q_proj: its calibration inputs "
                                           r"contain NaN/Inf"):
        prune_model(model, ids, build_layer_solver("sparsegpt"), SparsityPattern(0.5), torch.device("cpu"),
                    progress=False)
    with pytest.raises(LmpruneError, match="layer x: its calibration inputs contain NaN/Inf"):
        require_finite_gram("x", torch.tensor([[1.0, math.inf], [math.inf, 1.0]]))


def test_relative_errors_of_non_finite_layers_are_nan_not_zero():
    W, H = torch.randn(3, 4), torch.eye(4)
    assert relative_errors(W, [W * 0.5], H)[0] == pytest.approx(0.25)
    assert math.isnan(relative_errors(W, [torch.full_like(W, math.nan)], H)[0])
    assert math.isnan(relative_errors(torch.full_like(W, math.inf), [W], H)[0])
    assert relative_errors(torch.zeros(3, 4), [torch.zeros(3, 4)], H) == [0.0]  # nothing to lose
    assert math.isnan(relative_errors(torch.zeros(3, 4), [W], H)[0])  # from nothing to something: undefined
    assert math.isnan(relative_error(W, torch.full_like(W, math.nan), H))


def test_report_with_non_finite_numbers_stays_valid_json(tmp_path, capsys):
    report = {"method": "x", "pattern": "50%", "settings": {"model": "m"},
              "summary": {"layers": 2, "sparsity": 0.5, "mean_error": math.nan, "mean_error_masked": 0.1},
              "evaluation": [{"data": "d", "windows": 1, "seqlen": 8, "perplexity": math.inf}],
              "layers": [{"name": "a", "shape": [2, 2], "sparsity": 0.5, "error": math.nan, "error_masked": -math.inf},
                         {"name": "b", "shape": [2, 2], "sparsity": 0.5, "error": 0.1, "error_masked": 0.2}]}
    write_json(str(tmp_path / "lmprune_report.json"), report)
    text = (tmp_path / "lmprune_report.json").read_text()
    stored = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in the JSON"))
    assert stored["layers"][0]["error"] == "NaN" and stored["layers"][0]["error_masked"] == "-Infinity"
    assert math.isnan(float(stored["summary"]["mean_error"])) and stored["evaluation"][0]["perplexity"] == "Infinity"
    shown = format_report(load_report(str(tmp_path)))
    assert "mean rel. error: nan" in shown and "perplexity on d (1×8): inf" in shown
    code, out, _ = run_cli(capsys, "report", tmp_path)
    assert code == 0 and "nan" in out


# --- sparsity verification -----------------------------------------------------------------------------

def record(name, weight, sparsity=None):
    zeros = int((weight == 0).sum())
    return {"name": name, "shape": list(weight.shape), "sparsity": zeros / weight.numel() if sparsity is None else sparsity}


class Fixed:
    """A pruned layer as verify_sparsity reads it."""

    def __init__(self, weight):
        self.weight = weight

    def read_weight(self, device):
        return self.weight.clone()


def test_verify_sparsity_counts_exactly():
    per_layer, per_row, two_four = SparsityPattern(0.7), SparsityPattern(0.7, per_row=True), SparsityPattern.nm("2:4")
    W = torch.ones(3, 10)
    W[:, :7] = 0  # 21 zeros: per layer ⌊30·0.7⌋ = 21, per row ⌊10·0.7⌋ = 7 each
    verify_sparsity([record("a", W)], per_layer)
    verify_sparsity([record("a", W)], per_row, {"a": Fixed(W)})
    W[0, 0] = 1  # one zero short
    with pytest.raises(LmpruneError, match=r"layer a is off its target 70%: 20 of 30 weights are zero, 21 should be"):
        verify_sparsity([record("a", W)], per_layer)
    W2 = W.clone()
    W2[1, 9] = 0  # the count is back to 21, but row 0 still has only 6
    verify_sparsity([record("a", W2)], per_layer, {"a": Fixed(W2)})
    with pytest.raises(LmpruneError, match=r"21 should be \(not in every row\)"):
        verify_sparsity([record("a", W2)], per_row, {"a": Fixed(W2)})
    # More zeros than the target (inputs never active, an already sparse model) are fine.
    verify_sparsity([record("a", torch.zeros(3, 10))], per_row, {"a": Fixed(torch.zeros(3, 10))})

    N = torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    verify_sparsity([record("n", N)], two_four, {"n": Fixed(N)})
    N[1] = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # still 8 zeros, but 3 kept in one group
    with pytest.raises(LmpruneError, match=r"layer n is off its target 2:4: .* \(not in every group\)"):
        verify_sparsity([record("n", N)], two_four, {"n": Fixed(N)})
    with pytest.raises(LmpruneError, match="is off its target 2:4"):
        verify_sparsity([record("n", N, sparsity=0.25)], two_four)  # from the records alone


def test_wrongly_pruned_layer_is_never_written(capsys, tmp_path, tiny_llama, calib, monkeypatch):
    """A mask solver that silently leaves one layer dense (as NaN scores once did) fails the run."""
    magnitude = SOLVERS["magnitude"]

    def lazy(W, H, pattern, settings):
        if W.shape == (64, 172):  # down_proj
            return SolverResult(W, torch.ones_like(W, dtype=torch.bool))
        return magnitude.solve(W, H, pattern, settings)

    monkeypatch.setitem(SOLVERS, "magnitude", replace(magnitude, solve=lazy))
    refused(capsys, tmp_path, *prune_args(tiny_llama, calib, tmp_path / "out", "--method", "magnitude",
                                          "--sparsity", "0.5"),
            message="layer model.layers.0.mlp.down_proj is off its target 50%: 0 of 11008 weights are zero, "
                    "5504 should be", model=tiny_llama)


# --- only causal decoders ------------------------------------------------------------------------------

def test_encoder_checkpoint_is_refused_by_name(capsys, tmp_path, calib):
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    byte_tokenizer().save_pretrained(bert)
    message = ("BertModel (model_type 'bert') is an encoder (bidirectional attention: its config has is_decoder "
               "false); lmprune prunes decoder-only causal LMs only")
    refused(capsys, tmp_path, *prune_args(bert, calib, tmp_path / "out", *WANDA), message=message)
    refused(capsys, tmp_path, "eval", bert, "--data", calib, message=message)


@pytest.mark.parametrize("model_type, extra, message", [
    ("t5", {}, "T5ForConditionalGeneration (model_type 't5') is an encoder-decoder model"),
    ("bart", {}, "is an encoder-decoder model"),
    ("roberta", {}, "RobertaForMaskedLM (model_type 'roberta') is an encoder (bidirectional attention"),
    ("distilbert", {}, "is an encoder, with no causal-LM form in transformers"),
    ("vit", {}, "(model_type 'vit') is not a language model, with no causal-LM form in transformers"),
    ("bert-generation", {"architectures": ["BertGenerationEncoder"]}, "is an encoder (bidirectional attention"),
])
def test_non_causal_configs_are_refused(model_type, extra, message):
    config = AutoConfig.for_model(model_type, **extra)
    if model_type in ("t5", "roberta"):
        config.architectures = [{"t5": "T5ForConditionalGeneration", "roberta": "RobertaForMaskedLM"}[model_type]]
    with pytest.raises(LmpruneError, match="lmprune prunes decoder-only causal LMs only") as info:
        require_causal_decoder(config, "m")
    assert message in str(info.value)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt", "mistral", "mixtral", "qwen2_moe", "jamba", "falcon",
                                        "bloom", "phi3", "gemma2", "gpt_neox", "olmoe", "deepseek_v3", "mamba"])
def test_real_decoders_pass(model_type):
    require_causal_decoder(AutoConfig.for_model(model_type), model_type)
    architecture = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM"}.get(model_type)
    if architecture:  # GPT-NeoX's config carries is_decoder=False, yet it is a decoder
        require_causal_decoder(AutoConfig.for_model(model_type, architectures=[architecture]), model_type)


def test_encoder_family_trained_as_a_decoder_passes():
    require_causal_decoder(BertConfig(is_decoder=True, architectures=["BertLMHeadModel"]), "bert-decoder")


def test_checkpoint_missing_weights_is_refused(capsys, tmp_path, calib):
    """A base model without its LM head: transformers would invent one at random and save it."""
    base = tmp_path / "base"
    LlamaModel(LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, tie_word_embeddings=False)).save_pretrained(base)
    byte_tokenizer().save_pretrained(base)
    refused(capsys, tmp_path, *prune_args(base, calib, tmp_path / "out", *WANDA),
            message="the checkpoint lacks 1 weight(s) of LlamaForCausalLM (e.g. lm_head.weight) that would be "
                    "initialised at random")


# --- damaged checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("damage, message", [
    ("truncate", "model.safetensors is truncated: "),
    ("garbage", "model.safetensors is not a valid safetensors file (damaged or truncated)"),
    ("no tokenizer", "no tokenizer files in the checkpoint (none of tokenizer.json, tokenizer.model, vocab.json, ...)"),
])
def test_damaged_checkpoint(capsys, tmp_path, model_copy, calib, damage, message):
    weights = model_copy / "model.safetensors"
    if damage == "truncate":
        size = weights.stat().st_size
        with open(weights, "r+b") as f:
            f.truncate(size // 2)
        message += f"{size // 2} bytes, its header describes {size}"
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
    else:
        for path in model_copy.iterdir():
            if path.name.startswith(("tokenizer", "special_tokens")):
                path.unlink()
    refused(capsys, tmp_path, *prune_args(model_copy, calib, tmp_path / "out", *WANDA), message=message)
    refused(capsys, tmp_path, "eval", model_copy, "--data", calib, "--seqlen", 32, message=message)


# --- bad text ------------------------------------------------------------------------------------------

TEXT = "the café sat on the mat\n" * 200
BAD_TEXT = {
    "utf-16 with BOM": (TEXT.encode("utf-16"), "is UTF-16 or UTF-32 text (it starts with a byte-order mark): "
                                               "convert it to UTF-8"),
    "utf-16 without BOM": (TEXT.encode("utf-16-le"), "contains NUL bytes: it is binary, or UTF-16/32 text without "
                                                     "a byte-order mark"),
    "latin-1": (TEXT.encode("latin-1"), "is not UTF-8 text: byte 0xe9 at offset 7 is invalid (Latin-1 or another "
                                        "legacy encoding?"),
    "binary": (bytes(range(256)) * 20, "contains NUL bytes"),
}


@pytest.mark.parametrize("kind", sorted(BAD_TEXT))
def test_text_that_is_not_utf8_is_named(capsys, tmp_path, tiny_llama, calib, kind):
    raw, message = BAD_TEXT[kind]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(raw)
    out = tmp_path / "out"
    refused(capsys, tmp_path, *prune_args(tiny_llama, bad, out, *WANDA),
            message=f"calibration data {str(bad)!r} {message}")
    refused(capsys, tmp_path, *prune_args(tiny_llama, calib, out, *WANDA, "--eval", bad),
            message=f"evaluation data {str(bad)!r} {message}")
    refused(capsys, tmp_path, "eval", tiny_llama, "--data", bad, "--seqlen", 32,
            message=f"evaluation data {str(bad)!r} {message}")


def test_jsonl_text_must_be_a_string(capsys, tmp_path, tiny_llama):
    for value, kind in ((5, "a number"), (None, "null"), (["a"], "an array"), ({"a": 1}, "an object")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": random_text(400)}) + "\n" + json.dumps({"text": value}) + "\n")
        refused(capsys, tmp_path, *prune_args(tiny_llama, bad, tmp_path / "out", *WANDA),
                message=f"bad.jsonl:2: \"text\" must be a string, not {kind}")


def test_byte_order_mark_and_crlf_are_read_as_text_mode_would(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"text": "first"}\r\n{"text": "second"}\r\n')
    assert load_text(str(tmp_path / "bom.jsonl")) == "first\n\nsecond"
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\rthree")
    assert load_text(str(tmp_path / "bom.txt")) == "line one\nline two\nthree"
    (tmp_path / "sep.jsonl").write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n")
    assert load_text(str(tmp_path / "sep.jsonl")) == "a\u2028b"  # a line separator inside a string is text


def test_jsonl_with_byte_order_mark_prunes(capsys, tmp_path, tiny_llama):
    data = tmp_path / "calib.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps({"text": random_text(200, seed=i)})
                                                  for i in range(4)).encode())
    code, _, err = run_cli(capsys, *prune_args(tiny_llama, data, tmp_path / "out", *WANDA))
    assert code == 0, err


@pytest.mark.parametrize("extra, message", [
    (("--seqlen", 0), "--seqlen must be at least 2, got 0"),
    (("--seqlen", 1), "--seqlen must be at least 2, got 1"),
    (("--max-windows", 0), "--max-windows must be at least 1, got 0"),
    (("--max-windows", -2), "--max-windows must be at least 1, got -2"),
])
def test_bad_eval_windows(capsys, tmp_path, tiny_llama, calib, extra, message):
    refused(capsys, tmp_path, "eval", tiny_llama, "--data", calib, *extra, message=message, model=tiny_llama)
