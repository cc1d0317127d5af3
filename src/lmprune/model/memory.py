"""The process's memory: whether a checkpoint should stream by default, and handing freed pages back."""

from __future__ import annotations

import ctypes
import os


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def stream_by_default(model_dir: str | None) -> tuple[bool, str]:
    """(stream?, why): a local checkpoint whose weights take more than half of the available memory."""
    from .shards import checkpoint_weight_bytes

    if not model_dir or not os.path.isdir(model_dir):
        return False, ""
    size, free = checkpoint_weight_bytes(model_dir), available_memory()
    if free is None or size <= free / 2:
        return False, ""
    return True, (f"the checkpoint's weights ({size / 2**30:.1f} GiB) exceed half of the available memory "
                  f"({free / 2**30:.1f} GiB)")


def return_freed_memory() -> None:
    """Hand the freed heap pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    glibc raises its mmap threshold each time a large block is freed, so later block-sized tensors come
    from the heap, whose freed pages it keeps: without this a streamed run's RSS grew by ~60% of a block
    per block (measured: 10 MB per 16.8 MB block), defeating the point of streaming.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
