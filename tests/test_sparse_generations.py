"""Greedy generations of the sparse path against the dense-with-zeros model's, over 20 prompts (issue #31,
item 4): a sliding-window model, a GPT-2 (Conv1D) and a MoE, random-init, pruned at 50% by the CLI.

The reference is the dense-with-zeros checkpoint `prune` wrote, loaded by lmprune as a normal checkpoint.
- Portable path: the dense layer's own op on the same values, so every generation is identical.
- Compiled batch-1 kernel: fp32 sums in another order (kernel.py), so its logits differ from the dense
  ones by rounding. A random-init model's logits are nearly flat, so two candidates can lie closer than
  that rounding; a generation must then be identical, or first differ at a step where the dense model's
  two best tokens lie within the tolerance (1e-4 of the largest |logit|), the only place rounding can
  change an argmax. The tests also assert how many are identical, so a drift cannot hide as "ties".
"""

import pytest
import torch

import lmprune
from conftest import byte_tokenizer, prune_args, random_text
from test_sparse import set_compiled

PROMPTS = [random_text(n, seed=s).strip() for s, n in zip(range(20), [2, 3, 4, 5] * 5)]
TOKENS = 12  # with the prompts' bytes, past the zoo's sliding window (8) on every prompt
TOLERANCE = 1e-4


def greedy_with_logits(model, tokenizer, prompt):
    """(the new token ids, the logits of each step)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, temperature=None, top_k=None,
                             top_p=None, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.eos_token_id)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), torch.cat(out.logits).float()


def compare(sparse, dense, tokenizer) -> tuple[int, list[str]]:
    """(identical generations, why each other one differs); a difference not at a near-tie fails."""
    identical, ties = 0, []
    for prompt in PROMPTS:
        expected, logits = greedy_with_logits(dense, tokenizer, prompt)
        actual, _ = greedy_with_logits(sparse, tokenizer, prompt)
        if actual == expected:
            identical += 1
            continue
        step = next(i for i, (a, b) in enumerate(zip(actual, expected)) if a != b)
        gap = float(logits[step, expected[step]] - logits[step, actual[step]])
        scale = float(logits.abs().max())
        assert 0 <= gap <= TOLERANCE * scale, (prompt, step, gap, scale)
        ties.append(f"{prompt!r} step {step}: gap {gap:.2e}")
    return identical, ties


@pytest.fixture(scope="module", params=["mistral", "gpt2", "qwen2_moe"])
def pruned(request, tmp_path_factory):
    """(dense-with-zeros dir, packed dir, model type) for a sliding-window model, a GPT-2 and a MoE with a
    shared expert (nn.Linear layers inside the MoE block; its routed experts are fused 3-D tensors)."""
    import zoo

    root = tmp_path_factory.mktemp(request.param)
    zoo.tiny_model(request.param).save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text(random_text(400))
    args = prune_args(root / "model", root / "calib.txt", root / "pruned", "--method", "wanda", "--sparsity", "0.5")
    assert lmprune.cli.main([str(a) for a in args]) == 0
    assert lmprune.cli.main(["pack", str(root / "pruned"), "--out", str(root / "packed")]) == 0
    return root / "pruned", root / "packed", request.param


def test_sparse_greedy_generations_equal_the_dense_models(pruned):
    from transformers import AutoTokenizer

    dense_dir, packed_dir, model_type = pruned
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    dense = lmprune.load_model(str(dense_dir))
    sparse = lmprune.load_model(str(packed_dir), sparse=True)
    layers = set_compiled(sparse, False)
    assert layers == {"mistral": 28, "gpt2": 16, "qwen2_moe": 28}[model_type]  # 4 blocks × 7, 4 × 4, 4 × 7
    assert compare(sparse, dense, tokenizer) == (20, [])  # portable: identical, all 20
    set_compiled(sparse, True)
    identical, ties = compare(sparse, dense, tokenizer)
    assert identical >= 18, ties


def test_fused_experts_are_named_as_staying_dense(capsys, pruned):
    dense_dir, packed_dir, model_type = pruned
    lmprune.load_model(str(packed_dir), sparse=True)
    err = [line for line in capsys.readouterr().err.splitlines() if "stay dense in memory" in line]
    if model_type != "qwen2_moe":
        assert err == []
        return
    # 4 blocks × 4 experts × (gate, up, down): one tensor each on disk, fused into [experts, ...] ones in memory
    assert err == ["lmprune: 48 packed weight(s) stay dense in memory (e.g. model.layers.0.mlp.experts.0.down_proj"
                   ".weight): "
                   "the model multiplies them itself (fused expert tensors), not through a Linear or Conv1D "
                   "layer the sparse path replaces"]
