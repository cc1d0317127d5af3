"""Model plumbing, generic over decoder-only HF models.

Nothing here knows an architecture by name: `blocks` finds the decoder stack by position, `layers` sees
every prunable weight (Linear, Conv1D, expert slices) as an [out, in] matrix, `calls` records each block's
own call and replays it, `loading` turns a name into a model, `devices` says where work runs.
"""

from .blocks import find_blocks, move_outside_blocks
from .calls import BlockInputs, capture_block_inputs
from .devices import describe_device, device_clock, resolve_device
from .layers import PrunableLayer, is_prunable, prunable_layers
from .loading import DTYPES, load_model

__all__ = [
    "BlockInputs", "DTYPES", "PrunableLayer", "capture_block_inputs", "describe_device", "device_clock",
    "find_blocks", "is_prunable", "load_model", "move_outside_blocks", "prunable_layers", "resolve_device",
]
