"""Shared fixtures: the ../shared data (skipped cleanly when absent) and tiny models built from configs."""

from __future__ import annotations

import contextlib
import hashlib
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
TINYSTORIES = SHARED / "data" / "tinystories.valid.txt"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@contextlib.contextmanager
def one_thread():
    """Run in-process work on one thread, as the subprocesses do: the same kernels, the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found: ../shared (beside the repo) holds the real model and data")
    return path


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return require_shared(STORIES)


@pytest.fixture(scope="session")
def tinystories_path() -> Path:
    return require_shared(TINYSTORIES)


def model_linears(model):
    """Every prunable Linear of every decoder block, named as the pipeline names them."""
    from lmprune.model import find_blocks, prunable_layers

    name, blocks = find_blocks(model)
    return [layer for i, block in enumerate(blocks) for layer in prunable_layers(block, f"{name}.{i}")]


def byte_tokenizer():
    """A self-contained byte-level tokenizer (256 ids + eos): no hub, no shared files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def random_text(words: int, seed: int = 0) -> str:
    """Pseudo-English with some repetition, so a model has something to compress."""
    rng = random.Random(seed)
    vocab = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "home", "to", "big", "red"]
    return " ".join(rng.choice(vocab) for _ in range(words)) + "\n"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A saved tiny Llama whose MLP width (172) is not a multiple of 8, like stories260K's."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=0, eos_token_id=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def run_cli(capsys, *args) -> tuple[int, str, list[str]]:
    """`lmprune ARGS` in-process: (exit code, stdout, the non-blank lines of stderr)."""
    from lmprune.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    # The plan line comes before the model is loaded, so errors found by loading it follow the plan.
    return code, captured.out, [line for line in captured.err.splitlines()
                                if line.strip() and not line.startswith("lmprune: plan: ")]


def prune_args(model, calib, out, *extra) -> list:
    """A fast `prune` command line: 2 windows of 32 tokens, no progress bars."""
    return ["prune", model, "--calib", calib, "--nsamples", 2, "--seqlen", 32, "--out", out, "--no-progress", *extra]


def snapshot(root: Path) -> dict[str, str]:
    """Every file and directory under `root`, hidden ones included: relative path -> sha256 of its bytes
    ("dir" for a directory). Equal snapshots: nothing changed, appeared or disappeared."""
    state = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        state[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "calib.txt"
    path.write_text(random_text(3000))
    return path


def correlated_problem(rows: int = 96, cols: int = 192, tokens: int = 2048, seed: int = 0, scales: str = "linear",
                       offset: float = 0.0, with_stats: bool = False):
    """A layer least-squares problem with correlated inputs X = G(I + 2A) and uneven input scales.

    Returns (W, H = XᵀX), or (W, H, InputStats) `with_stats`. Column scales run 0.2–3 ("linear") or
    over two decades ("log") and are permuted, so large features are spread over the columns as real
    LLM outlier features are. `offset` > 0 gives every feature a mean offset·N(0, 1), as real inputs have.
    """
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(tokens, cols, generator=g)
    A = torch.randn(cols, cols, generator=g) / cols**0.5
    X = G @ (torch.eye(cols) + 2.0 * A)
    scale = torch.linspace(0.2, 3.0, cols) if scales == "linear" else torch.logspace(-1, 1, cols)
    X = X * scale[torch.randperm(cols, generator=g)]
    if offset:
        X = X + offset * torch.randn(cols, generator=g)
    W = torch.randn(rows, cols, generator=g)
    if with_stats:
        from lmprune.solvers import InputStats

        return W, X.T @ X, InputStats(X.sum(0), tokens)
    return W, X.T @ X


def block_outputs(model, blocks, ids):
    """What each block really returns inside the model's own forward pass, and the model's hidden states."""
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, (tuple, list)) else out))
             for b in blocks]
    try:
        with torch.no_grad():
            hidden_states = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        for h in hooks:
            h.remove()
    return seen, hidden_states


def check_replay(model, ids, against_hidden_states: bool = True):
    """The pipeline's recorded block calls, replayed block by block on batches of 2, reproduce every block's
    output in the model's own forward pass (and, `against_hidden_states`, its hidden states: models differ
    in what those hold, e.g. Mamba's are taken after each block and CPM-Ant's include its prompt tokens)."""
    from lmprune.model import find_blocks, record_block_calls, text_config

    cpu = torch.device("cpu")
    _, blocks = find_blocks(model)
    expected, hidden_states = block_outputs(model, blocks, ids)
    assert len(expected) == len(blocks) == text_config(model).num_hidden_layers
    calls = record_block_calls(model, blocks, list(ids.split(2)), cpu, cpu)
    hidden = list(calls.hidden)
    with torch.no_grad():
        for i, block in enumerate(blocks):
            hidden = [calls.for_block(i).call(block, j, h, cpu) for j, h in enumerate(hidden)]
            got = torch.cat(hidden)
            scale = expected[i].abs().max()
            assert float((got - expected[i]).abs().max() / scale) < 1e-5, f"block {i}"
            if against_hidden_states and i < len(blocks) - 1:  # the last hidden state is taken after the final norm
                assert torch.allclose(got, hidden_states[i + 1], rtol=0, atol=1e-5 * float(scale)), f"block {i}"
