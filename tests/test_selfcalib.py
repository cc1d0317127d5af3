"""`--calib self`: the model samples its own calibration windows, deterministically per seed."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

from conftest import byte_tokenizer, random_text
from lmprune.cli import main
from lmprune.errors import LmpruneError
from lmprune.selfcalib import self_calibration, start_token, stop_tokens

CPU = torch.device("cpu")


def tiny_llama():
    """A random tiny Llama: BOS 0, EOS 256 (the byte tokenizer's)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=256)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tiny():
    return tiny_llama(), byte_tokenizer()


def test_shape_start_and_determinism(tiny):
    model, tokenizer = tiny
    a, info = self_calibration(model, tokenizer, 5, 24, seed=3, device=CPU, batch_size=2, progress=False)
    b, _ = self_calibration(model, tokenizer, 5, 24, seed=3, device=CPU, batch_size=2, progress=False)
    c, _ = self_calibration(model, tokenizer, 5, 24, seed=4, device=CPU, batch_size=2, progress=False)
    assert a.shape == (5, 24) and a.dtype == torch.long and a.device == CPU
    assert (a[:, 0] == 0).all()  # the BOS token
    assert torch.equal(a, b)
    assert (a[:, 1:] != c[:, 1:]).float().mean() > 0.5  # another seed: mostly other tokens
    assert info["start_token"] == 0 and info["suppressed_tokens"] == [256] and info["seconds"] > 0


def test_stop_token_is_suppressed_and_rows_differ(tiny):
    model, tokenizer = tiny
    # Make EOS by far the most likely next token: it must still never be sampled.
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(257))
        model.lm_head.bias[256] = 1e4
    ids, _ = self_calibration(model, tokenizer, 4, 40, seed=0, device=CPU, batch_size=4, progress=False)
    assert not (ids == 256).any()
    assert len({tuple(row.tolist()) for row in ids}) == 4


def test_sampling_follows_the_model_distribution():
    """A model that always predicts the same distribution: sampled frequencies match it (temperature 1)."""

    class Fixed(torch.nn.Module):
        def __init__(self, probs):
            super().__init__()
            self.logits = torch.nn.Parameter(probs.log())
            self.config = LlamaConfig(bos_token_id=0, eos_token_id=None)

        def forward(self, input_ids, cache=None, use_cache=True):
            logits = self.logits.expand(*input_ids.shape, -1)
            return type("Out", (), {"logits": logits, "cache": (cache or 0) + 1})()

    class Tok:
        bos_token_id, eos_token_id = 0, None

        def __len__(self):
            return 4

    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    ids, _ = self_calibration(Fixed(probs), Tok(), 64, 201, seed=0, device=CPU, batch_size=16, progress=False)
    freq = torch.bincount(ids[:, 1:].flatten(), minlength=4).float() / ids[:, 1:].numel()
    assert torch.allclose(freq, probs, atol=0.01), freq


def test_start_token_falls_back_to_eos():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=257,
                                                        bos_token_id=None, eos_token_id=256))
    tokenizer = byte_tokenizer()  # has no BOS, EOS 256
    assert start_token(model, tokenizer) == 256 and stop_tokens(model, tokenizer) == [256]
    ids, _ = self_calibration(model, tokenizer, 2, 8, seed=0, device=CPU, progress=False)
    assert (ids[:, 0] == 256).all() and not (ids[:, 1:] == 256).any()


def test_no_start_token_is_a_clear_error():
    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=256,
                                                        bos_token_id=None, eos_token_id=None))
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = None

    class Tok:
        bos_token_id = eos_token_id = None

    with pytest.raises(LmpruneError, match="needs a BOS or EOS token"):
        start_token(model, Tok())


@pytest.mark.slow
def test_stories260k_writes_stories(stories_path):
    model = AutoModelForCausalLM.from_pretrained(stories_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories_path)
    ids, _ = self_calibration(model, tokenizer, 4, 128, seed=0, device=CPU, batch_size=4, progress=False)
    assert ids.shape == (4, 128) and (ids[:, 0] == tokenizer.bos_token_id).all()
    # A trained model's own text is likely under itself: far below the 512-token uniform perplexity.
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert loss.exp() < 20, loss.exp()
    words = tokenizer.decode(ids[0, 1:]).split()
    assert len(words) > 40 and sum(w.strip(".,!\"'").isalpha() for w in words) / len(words) > 0.8


def test_cli_without_calib_uses_self(capsys, tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    capsys.readouterr()  # drop what saving the model printed
    code = main([str(a) for a in ["prune", model_dir, "--method", "sparsegpt", "--sparsity", 0.5, "--nsamples", 3,
                                  "--seqlen", 16, "--gen-batch-size", 2, "--out", out, "--no-progress"]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 0, err
    assert err[0].startswith("lmprune: plan: prune ") and "calibration self-generated (3 × 16 tokens" in err[0]
    assert "no --calib given" in err[0]
    assert err[-1].startswith(f"lmprune: saved to {out}: sparsity 0.5000 of the block weights; none kept dense; "
                              "14 layers pruned") and "wall time" in err[-1]
    report = json.loads((out / "lmprune_report.json").read_text())
    assert report["settings"]["calib"] == "self"
    generation = report["settings"]["self_calibration"]
    assert generation["start_token"] == 0 and generation["batch_size"] == 2
    assert report["timings"]["generation"] == generation["seconds"] > 0


def test_cli_plan_and_headline_with_a_calibration_file(capsys, tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(400))
    out = tmp_path / "out"
    capsys.readouterr()
    code = main([str(a) for a in ["prune", model_dir, "--method", "wanda", "--sparsity", 0.5, "--calib", calib,
                                  "--nsamples", 2, "--seqlen", 16, "--eval", calib, "--eval-max-windows", 2,
                                  "--out", out, "--no-progress"]])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 0, err
    device = "cuda (auto)" if torch.cuda.is_available() else "cpu (auto)"
    assert err[0] == f"lmprune: plan: prune {model_dir} with wanda to 50% per row on {device}; " \
                     f"calibration {calib} (2 × 16 tokens)", err
    assert err[-1].startswith(f"lmprune: saved to {out}: sparsity ") and "14 layers pruned" in err[-1], err
    assert "perplexity " in err[-1], err
    report = json.loads((out / "lmprune_report.json").read_text())
    assert report["settings"]["calib"] == str(calib) and "generation" not in report["timings"]
