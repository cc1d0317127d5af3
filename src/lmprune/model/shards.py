"""Safetensors shards on disk: where a checkpoint's tensors live, reading them, writing durable shards.

Every tensor read through `CheckpointShards` is hashed as it is read (`digests`), so a streamed run can
record the values it pruned from at no extra read (model/block_store.py compares them on resume).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import zlib

import torch

from ..errors import LmpruneError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class ShardReadError(LmpruneError):
    """A safetensors file that cannot be read; `reason` is the first line of safetensors' own error."""

    def __init__(self, file: str, reason: str):
        super().__init__(f"cannot read {file}: {reason}")
        self.reason = reason


def read_tensors(file: str, keys: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file."""
    from safetensors import safe_open

    from .loading import first_line

    try:
        with safe_open(file, "pt") as f:
            return {key: f.get_tensor(key) for key in keys}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise ShardReadError(file, first_line(exc)) from None


class CheckpointShards:
    """Where each tensor of a local safetensors checkpoint lives: name -> shard file."""

    def __init__(self, path: str):
        from .loading import check_safetensors_files

        self.path = path
        index = os.path.join(path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError):
                raise LmpruneError(f"{index} is not a valid safetensors index") from None
        elif os.path.isfile(os.path.join(path, SINGLE_NAME)):
            from safetensors import safe_open

            with safe_open(os.path.join(path, SINGLE_NAME), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_NAME)
        else:
            raise LmpruneError(f"{path}: streaming needs safetensors weights ({SINGLE_NAME} or {INDEX_NAME})")
        for shard in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(path, shard)):
                raise LmpruneError(f"{path}: shard {shard} named in {INDEX_NAME} is missing")
        check_safetensors_files(path)  # truncated shards are named before any work
        self.weight_map: dict[str, str] = weight_map
        self.digests: dict[str, str] = {}  # tensor name -> tensor_digest of its values, as last read

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once and closed after; each tensor's digest is noted."""
        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for shard, keys in by_shard.items():
            tensors.update(read_tensors(os.path.join(self.path, shard), keys))
        self.digests.update({key: tensor_digest(tensor) for key, tensor in tensors.items()})
        return tensors

    def fingerprint(self) -> str:
        """sha256 of config.json, the index and every shard's header and size: cheap, and any other model
        (other weights, other shapes, another conversion) differs."""
        digest = hashlib.sha256()
        for name in ("config.json", INDEX_NAME):
            file = os.path.join(self.path, name)
            if os.path.isfile(file):
                with open(file, "rb") as f:
                    digest.update(f.read())
        for shard in sorted(set(self.weight_map.values())):
            file = os.path.join(self.path, shard)
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                digest.update(shard.encode() + f.read(header_len) + str(os.path.getsize(file)).encode())
        return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """A tensor's dtype, shape and a CRC-32 of its bytes as they are (no conversion).

    The digests are there to catch weights that changed or were damaged between a killed run and its
    resume, not an adversary: CRC-32 (zlib) reads 4 GB/s here against sha256's 1.8, and every block is
    digested twice (as read and as written), which cost 8% of a streamed Wanda prune with sha256.
    """
    data = tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy()
    return f"{tensor.dtype} {list(tensor.shape)} crc32 {zlib.crc32(data):08x}"


def combined_digest(digests: dict[str, str]) -> str:
    """One digest for named tensors' digests, independent of their order."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def checkpoint_weight_bytes(path: str) -> int:
    """Bytes of all safetensors files in a checkpoint directory."""
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file() and e.name.endswith(".safetensors"))


def shard_data_bytes(file: str) -> int:
    """Bytes of tensor data in a shard (what an index's total_size adds up), from its header."""
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def write_shard(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """One safetensors file, on disk (fsync'ed) when this returns."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata or {"format": "pt"})
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a file just renamed into it) durable, where the file system can."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot sync a directory
            raise
    finally:
        os.close(fd)
