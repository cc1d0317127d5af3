#!/usr/bin/env bash
# Build bench/peers/.venv-llmc: a separate venv holding llm-compressor (the maintained peer).
# It cannot share lmprune's venv: llmcompressor 0.14.0.1 pins transformers <= 5.17.
# torch==2.13.0 goes in FIRST so that llmcompressor's bare `torch` requirement is already
# satisfied (otherwise pip would pull a multi-GB default CUDA build).
# Idempotent: does nothing when the venv exists and imports llmcompressor at the pinned version.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${LLMC_VENV:-$HERE/.venv-llmc}"  # override only to test a fresh build elsewhere
PY="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
LLMC_VERSION="0.14.0.1"

# pip here may warn about missing local index folders; drop that noise, keep real errors.
quiet_pip() {
    "$VENV/bin/pip" install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

check() {
    "$VENV/bin/python" - "$LLMC_VERSION" <<'PYEOF' >/dev/null 2>&1
import sys
import importlib.metadata as md
import torch, transformers, llmcompressor  # noqa: F401
from llmcompressor import oneshot  # noqa: F401
from llmcompressor.modifiers.pruning import WandaPruningModifier  # noqa: F401
from llmcompressor.modifiers.obcq import SparseGPTModifier  # noqa: F401
sys.exit(0 if md.version("llmcompressor") == sys.argv[1] else 1)
PYEOF
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "[setup] $VENV already built and importable:"
    "$VENV/bin/python" -c "import importlib.metadata as m; print('  torch', m.version('torch'), '| transformers', m.version('transformers'), '| llmcompressor', m.version('llmcompressor'))"
    exit 0
fi

echo "[setup] creating venv $VENV with $($PY --version)"
"$PY" -m venv "$VENV"
echo "[setup] pip install torch==$TORCH_VERSION (CPU wheel; first, so no CUDA build is pulled)"
quiet_pip "torch==$TORCH_VERSION"
echo "[setup] pip install llmcompressor==$LLMC_VERSION (brings its pinned transformers, compressed-tensors, ...)"
quiet_pip "torch==$TORCH_VERSION" "llmcompressor==$LLMC_VERSION"

if ! check; then
    echo "[setup] ERROR: $VENV built but llmcompressor $LLMC_VERSION does not import" >&2
    "$VENV/bin/python" -c "import llmcompressor" || true
    exit 1
fi
echo "[setup] done:"
"$VENV/bin/python" -c "import importlib.metadata as m; print('  torch', m.version('torch'), '| transformers', m.version('transformers'), '| llmcompressor', m.version('llmcompressor'))"
echo "[setup] run: $VENV/bin/python $HERE/run_llmcompressor.py --help"
