"""Old import path of the streaming names, kept until the branches that still import it are merged.

Streaming is split by concern: shard I/O in shards.py, the memory heuristic in memory.py, the meta-device
loader in loading.py (helpers in meta_weights.py), the block store and resume state in block_store.py.
"""

from .block_store import (  # noqa: F401
    STATE_NAME, STATE_VERSION, BlockStore, CannotResume, StreamedBlocks, first_of_each_class, run_identity,
)
from .loading import load_streamed_model  # noqa: F401
from .memory import available_memory, return_freed_memory, stream_by_default  # noqa: F401
from .shards import (  # noqa: F401
    INDEX_NAME, SINGLE_NAME, CheckpointShards, checkpoint_weight_bytes, combined_digest, tensor_digest, write_shard,
)


def StreamedReader(model, shards) -> StreamedBlocks:  # noqa: N802 (the old class name)
    """A streamed store that reads and writes nothing (torchrun's ranks other than 0)."""
    return StreamedBlocks(model, shards)
