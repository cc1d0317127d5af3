"""The compiled batch-1 GEMV (gemv.cpp), built on first use into lmprune's cache.

`gemv_kernel()` is the loaded extension, or None where it cannot be built or is switched off
(LMPRUNE_SPARSE_KERNEL=0); then SparseLinear uses its portable path, after one line on stderr saying
why. The library is built for plain x86-64 and picks AVX-512 (BF16 + VBMI2, VBMI2 or F) or portable C++ at run time.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

_SOURCE = Path(__file__).with_name("gemv.cpp")
BEST = 99  # the path to ask the kernel for: it takes the best the CPU runs (3: AVX-512 BF16, 2: VBMI2, 1, 0)
_state: dict[str, object] = {}


def cache_dir() -> Path:
    root = os.environ.get("LMPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lmprune")
    return Path(root) / "kernels"


def gemv_kernel():
    """The extension module (bitmask_gemv, bitmask_linear, dense_linear, best_isa), or None; built and loaded once per process."""
    if "module" not in _state:
        _state["module"] = _build()
    return _state["module"]


def _build():
    if os.environ.get("LMPRUNE_SPARSE_KERNEL", "1") == "0":
        return None
    try:
        import torch
        from torch.utils import cpp_extension

        source = _SOURCE.read_bytes()
        cflags, ldflags = ["-O3", "-fopenmp"], ["-fopenmp"]  # at::parallel_for is OpenMP pragmas in a header:
        # without -fopenmp it runs on one thread (libgomp.so.1 is torch's own, already loaded)
        tag = hashlib.sha256(source + torch.__version__.encode() + " ".join(cflags + ldflags).encode()).hexdigest()[:12]
        build = cache_dir() / f"gemv-{tag}"
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            print(f"lmprune: building the sparse GEMV kernel into {build} (once; a minute or two)", file=sys.stderr)
        return cpp_extension.load(name=f"lmprune_sparse_gemv_{tag}", sources=[str(_SOURCE)], build_directory=str(build),
                                  extra_cflags=cflags, extra_ldflags=ldflags, verbose=False)
    except Exception as exc:  # no compiler, no headers, a failed build: the portable path gives the same results
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"lmprune: the compiled sparse kernel is unavailable ({reason[:200]}); using the portable path "
              "(same results, slower)", file=sys.stderr)
        return None
