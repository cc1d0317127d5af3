"""lmprune: one-shot post-training pruning of Hugging Face causal language models.

The command line (`lmprune prune|eval|report|methods|pack|unpack|generate`) is the main interface; for
library use see `lmprune.load_model`, `lmprune.pipeline.prune_model`, `lmprune.methods.build_method` and
`lmprune.solvers`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lmprune")
except PackageNotFoundError:  # run from a source tree without installing
    __version__ = "0+unknown"


def load_model(path: str, dtype: str = "auto", sparse: bool = False):
    """A transformers causal LM from a checkpoint lmprune wrote, dense or packed (`lmprune pack`,
    `--save-format sparse`): a packed one's weights are rebuilt dense, or with `sparse=True` its packed
    Linear layers stay packed in memory (SparseLinear, for inference). Bad input raises LmpruneError."""
    from .model.loading import load_model as load

    return load(path, dtype, progress=False, sparse=sparse)[0]


def register_transformers() -> None:
    """Let transformers' AutoModelForCausalLM.from_pretrained read packed checkpoints (see
    lmprune.sparse.autoload; opt-in, since importing transformers takes seconds)."""
    from .sparse.autoload import register_transformers as register

    register()
