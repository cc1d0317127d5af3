"""lmprune: one-shot post-training pruning of Hugging Face causal language models.

The command line (`lmprune prune|eval|report|methods`) is the main interface; for library use see
`lmprune.pipeline.prune_model`, `lmprune.methods.build_method` and `lmprune.solvers`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lmprune")
except PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0+unknown"
