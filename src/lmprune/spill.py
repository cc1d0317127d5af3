"""A tensor parked on disk while its memory serves something else, and read back when it is needed again.

A streamed prune is bounded by memory, and its largest object is an FFN down projection's XᵀX (8192² floats,
268 MB, as large as a 1B model's block). SparseGPT factorises a copy of it, and the error report reads it
after the solve, so both lived at once. Parked here, XᵀX gives its memory to the factor and comes back,
bit for bit, once the factor is freed. The file has no name (it goes when it is closed or the process dies)
and lives beside the output, not in /tmp, which may be memory itself.
"""

from __future__ import annotations

import tempfile

import torch


class SpilledTensor:
    """The bytes of a CPU tensor in an unnamed file in `directory`; `load()` makes the tensor again."""

    def __init__(self, tensor: torch.Tensor, directory: str):
        if tensor.device.type != "cpu":
            raise ValueError("only CPU tensors are spilled")
        self.shape, self.dtype = tensor.shape, tensor.dtype
        self.file = tempfile.TemporaryFile(dir=directory)
        try:
            self.file.write(memoryview(_bytes(tensor.contiguous())))
            self.file.flush()
        except BaseException:
            self.file.close()
            raise

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        view, done = memoryview(_bytes(out)), 0
        self.file.seek(0)
        while done < len(view):
            got = self.file.readinto(view[done:])
            if not got:
                raise OSError(f"spill file ended after {done} of {len(view)} bytes")
            done += got
        return out

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SpilledTensor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bytes(tensor: torch.Tensor):
    """A contiguous tensor's memory as a flat uint8 numpy array (no copy; any dtype)."""
    return tensor.reshape(-1).view(torch.uint8).numpy()
