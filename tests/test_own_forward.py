"""A model's own forward failing is bad input (one line naming the model type, exit 2, nothing written);
an exception raised by lmprune's own code inside the same call is not: it passes through unchanged."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama import modeling_llama

from conftest import byte_tokenizer, prune_args, run_cli, snapshot
from lmprune.config import SparsityPattern
from lmprune.model import tracing
from lmprune.model.own_forward import ModelForwardError
from lmprune.pipeline import prune_model
from lmprune.safety import pruned_count
from lmprune.solvers import build_layer_solver
from sweep import sample_ids, tiny_kwargs
from zoo import tiny_model

CPU = torch.device("cpu")
WHY = "(its code rejects this config or input, not lmprune)"


def _prune(model):
    return prune_model(model, sample_ids(2), build_layer_solver("wanda"), SparsityPattern(0.5), CPU, progress=False)


def test_cli_names_the_model_and_writes_nothing(tmp_path, capsys):
    """DeepSeek-V3.2 with fewer key/value heads than query heads: its latent attention rejects the batch."""
    model_dir = tmp_path / "model"
    config = AutoConfig.for_model("deepseek_v32", **{**tiny_kwargs("deepseek_v32"), "num_key_value_heads": 2})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat and ran far away " * 40)
    before = snapshot(tmp_path)
    capsys.readouterr()  # save_pretrained's own progress bars
    code, out, err = run_cli(capsys, *prune_args(model_dir, calib, tmp_path / "out", "--method", "wanda",
                                                    "--sparsity", "0.5"))
    assert code == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith(
        "lmprune: error: model_type 'deepseek_v32': the model's own forward failed inside a DeepseekV32DecoderLayer "
        f"block on the calibration batch {WHY}: RuntimeError: The size of tensor a "), err
    assert snapshot(tmp_path) == before  # nothing written, nothing left beside the output


def test_forward_raising_in_the_models_code(monkeypatch):
    def rejecting_forward(self, x):
        raise RuntimeError("this MLP rejects the batch\nsecond line")

    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", rejecting_forward)
    with pytest.raises(ModelForwardError) as caught:
        _prune(tiny_model("llama"))
    assert str(caught.value) == (
        "model_type 'llama': the model's own forward failed inside a LlamaDecoderLayer block on the calibration "
        f"batch {WHY}: RuntimeError: this MLP rejects the batch")


def test_lmprune_errors_inside_the_block_pass_through(monkeypatch):
    """The block tracer runs inside the block's forward: its failures are lmprune's, traceback and all."""
    monkeypatch.setattr(tracing.BlockTracer, "_trace", lambda self, *args: pruned_count(1, 1, None))
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'is_nm'"):
        _prune(tiny_model("llama"))
