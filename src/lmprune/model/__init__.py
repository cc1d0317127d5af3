"""Model plumbing, generic over decoder-only HF models.

Nothing here knows an architecture by name: `blocks` finds the decoder stack by position, `layers` sees
every prunable weight (Linear, Conv1D, expert slices) as an [out, in] matrix, `calls` records each block's
own call and replays it, `loading` turns a name into a model, `devices` says where work runs.
"""

from .blocks import find_blocks, move_outside_blocks, text_config
from .calls import BlockCall, BlockCalls, record_block_calls
from .devices import describe_device, device_clock, resolve_device
from .layers import ExpertSlice, LinearLayer, PrunableLayer, expert_count, is_prunable, prunable_layers
from .loading import DTYPES, load_model

__all__ = [
    "BlockCall", "BlockCalls", "DTYPES", "ExpertSlice", "LinearLayer", "PrunableLayer", "describe_device",
    "device_clock", "expert_count", "find_blocks", "is_prunable", "load_model", "move_outside_blocks",
    "prunable_layers", "record_block_calls", "resolve_device", "text_config",
]
