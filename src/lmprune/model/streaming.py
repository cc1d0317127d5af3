"""Models larger than memory: blocks read from the checkpoint one at a time, written out as they finish.

`load_streamed_model` builds the model with its weights on the meta device (no memory), loads only the
parts outside the decoder blocks (embeddings, final norm, lm_head; buffers such as rotary tables are
built for real) and returns a `StreamedBlocks` store. The pipeline asks the store for block i just
before pruning it (`load`: that block's tensors read from the safetensors shards) and hands it back
when done (`save`: written to its own shard in the partial output, made durable, then freed).

The partial output `.OUT.partial` is a stable path, so a killed run can be continued: it holds one shard
per finished block and `lmprune_state.json` (settings, calibration and model fingerprints, the report
records of each finished block, and digests of the weight values). A shard is fsync'ed before the state
names it. A run with the same fingerprints skips the finished blocks: it reads each back from the partial
output and runs the calibration windows through it, which rebuilds the next block's inputs bit for bit.
Recomputing costs one forward pass per finished block; saving the activations instead would cost a
nsamples × seqlen × hidden float tensor of disk per block (8.6 GB per block for 128 × 2048 tokens of a
8192-wide model).

Every tensor read from the checkpoint is hashed as it is read (`CheckpointShards.digests`), so the state
records the values each finished block was pruned from and those outside the blocks, at no extra read.
A resume compares them when it opens the partial output, before any work: the parts outside the blocks
(read anyway), and each finished block's checkpoint weights and its shard in the partial output (both
read once more: the pruned copy alone cannot tell whether the checkpoint changed). Changed weights never
give a mixed checkpoint, and the refusal is one line.

Without streaming the same pipeline loop runs with `BlockStore`, whose every method does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import shutil
from typing import Any

import torch
from torch import nn

from ..errors import LmpruneError
from ..report import write_json
from .blocks import find_blocks
from .layout import CheckpointLayout

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
STATE_NAME = "lmprune_state.json"
STATE_VERSION = 2  # 2: digests of the weight values ("weights")


class CannotResume(LmpruneError):
    """The partial output cannot be continued (other weights, a damaged shard): only --fresh gets out, so
    no "run the same command again" is ever added to this error."""


class BlockStore:
    """In-memory blocks: all loaded already, nothing written until the whole model is saved."""

    resume_from = 0  # the first block to prune; earlier ones were finished by a killed run
    streams = False  # blocks are loaded, written and freed one at a time

    def load(self, index: int, block: nn.Module) -> None:
        pass

    def release(self, index: int, block: nn.Module) -> None:
        pass

    def load_original(self, index: int, block: nn.Module) -> None:
        raise LmpruneError("internal: in-memory blocks are never resumed")

    def save(self, index: int, block: nn.Module, records: dict[str, Any]) -> None:
        pass

    def records(self, index: int) -> dict[str, Any]:
        raise IndexError(index)

    @contextlib.contextmanager
    def loaded(self, indices: list[int], blocks: nn.ModuleList):
        yield


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
        """The named tensors, each shard opened once and closed after (its pages leave the process); each
        tensor's digest is noted as it is read."""
        from safetensors import safe_open

        from .loading import _first_line

        by_shard: dict[str, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.weight_map[name], []).append(name)
        tensors = {}
        for shard, keys in by_shard.items():
            file = os.path.join(self.path, shard)
            try:
                with safe_open(file, "pt") as f:
                    for key in keys:
                        tensors[key] = f.get_tensor(key)
                        self.digests[key] = tensor_digest(tensors[key])
            except Exception as exc:  # safetensors raises its own error types for damaged files
                raise LmpruneError(f"cannot read {file}: {_first_line(exc)}") from None
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
    """sha256 of a tensor's dtype, shape and bytes as they are (no conversion)."""
    digest = hashlib.sha256(f"{tensor.dtype} {list(tensor.shape)} ".encode())
    digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def combined_digest(digests: dict[str, str]) -> str:
    """One digest for named tensors' digests, independent of their order."""
    return hashlib.sha256(json.dumps(sorted(digests.items())).encode()).hexdigest()


def checkpoint_weight_bytes(path: str) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file() and e.name.endswith(".safetensors"))


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
    if not model_dir or not os.path.isdir(model_dir):
        return False, ""
    size, free = checkpoint_weight_bytes(model_dir), available_memory()
    if free is None or size <= free / 2:
        return False, ""
    return True, (f"the checkpoint's weights ({size / 2**30:.1f} GiB) exceed half of the available memory "
                  f"({free / 2**30:.1f} GiB)")


def load_streamed_model(path: str, name: str, dtype: str = "auto"):
    """(model with meta blocks, tokenizer, shards): like load_model, without reading any block's weights."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.utils import logging as hf_logging

    from .loading import DTYPES, _first_line, _load_tokenizer, require_causal_decoder, require_finite_weights

    hf_logging.set_verbosity_error()
    if dtype not in DTYPES:
        raise LmpruneError(f"invalid --dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    if not os.path.isdir(path):
        raise LmpruneError(f"--stream needs a local checkpoint directory, not {name!r}")
    shards = CheckpointShards(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise LmpruneError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    require_causal_decoder(config, name)
    tokenizer = _load_tokenizer(AutoTokenizer, path, name, True)
    torch_dtype = DTYPES[dtype] if dtype != "auto" else (_config_dtype(config) or torch.float32)
    # Parameters on meta; buffers (rotary tables, masks) built for real, as from_pretrained builds them.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        with contextlib.suppress(OSError, ValueError):
            model.generation_config = GenerationConfig.from_pretrained(path)

    blocks_name, _ = find_blocks(model)
    expected = model.state_dict(keep_vars=True)
    tied = _tied_targets(model)
    layout = CheckpointLayout(model, shards.weight_map)  # names as from_pretrained converts them
    provided = set(layout.targets(list(layout.groups)))
    missing = [k for k in expected if k not in provided and k not in tied and _persistent(model, k)]
    if missing:
        where = "in its index" if os.path.isfile(os.path.join(path, INDEX_NAME)) else f"in {SINGLE_NAME}"
        raise LmpruneError(
            f"{name}: {len(missing)} weight(s) of {type(model).__name__} are not {where} (e.g. {missing[0]}), "
            "under their own names or any that transformers converts while loading: a damaged index?")
    inside = blocks_name + "."
    outside = [g for g in layout.groups if not g.startswith(inside)]
    _assign(model, layout.to_model(outside, shards.read))
    for target, source in tied.items():
        if target not in provided:  # tied as from_pretrained ties it: one tensor, two names
            owner, attr = _owner(model, target)
            owner._parameters[attr] = model.get_parameter(source)
    require_finite_weights(_OutsideBlocks(model, inside), f"model {name!r}")
    return model, tokenizer, shards


class _OutsideBlocks:
    """named_parameters() of the loaded (non-meta) part of a model, for the finiteness check."""

    def __init__(self, model: nn.Module, inside: str):
        self.model, self.inside = model, inside

    def named_parameters(self):
        return ((n, p) for n, p in self.model.named_parameters() if not n.startswith(self.inside))


def _config_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _tied_targets(model: nn.Module) -> dict[str, str]:
    """tied weight name -> the name it shares its tensor with (e.g. lm_head.weight -> embed_tokens.weight)."""
    from .blocks import text_config

    if not (getattr(model.config, "tie_word_embeddings", False) or getattr(text_config(model), "tie_word_embeddings", False)):
        return {}
    keys = getattr(model, "get_expanded_tied_weights_keys", None)
    tied = keys() if callable(keys) else getattr(model, "_tied_weights_keys", None)
    return dict(tied) if isinstance(tied, dict) else {}


def _persistent(model: nn.Module, name: str) -> bool:
    owner, attr = _owner(model, name)
    return attr in owner._parameters or attr not in getattr(owner, "_non_persistent_buffers_set", set())


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _assign(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put each tensor in place of the meta parameter (or buffer) of that name, in that slot's dtype."""
    for name, tensor in tensors.items():
        owner, attr = _owner(root, name)
        current = owner._parameters.get(attr)
        if current is not None:
            if tuple(tensor.shape) != tuple(current.shape):
                raise LmpruneError(f"weight {name} has shape {list(tensor.shape)} in the checkpoint, "
                                   f"the model expects {list(current.shape)}")
            owner._parameters[attr] = nn.Parameter(tensor.to(current.dtype), requires_grad=current.requires_grad)
        else:
            buffer = owner._buffers[attr]
            owner._buffers[attr] = tensor.to(buffer.dtype) if buffer is not None else tensor


class StreamedBlocks(BlockStore):
    """Blocks read from `shards` on demand, each finished one written to `out` (the partial output)."""

    def __init__(self, model: nn.Module, shards: CheckpointShards, out: str, state: dict[str, Any]):
        self.model, self.shards, self.out = model, shards, out
        self.blocks_name, self.blocks = find_blocks(model)
        self.state = state  # the identity of the run: settings and fingerprints
        self.done: list[dict[str, Any]] = []  # report records of each finished block, in order
        self.resume_from = 0
        self.streams = True
        self.count = len(self.blocks)
        self.layout = CheckpointLayout(model, shards.weight_map)
        # Block i's model tensors (groups) and the checkpoint tensors they are made of (also the names its
        # output shard holds: written in the checkpoint's layout, as save_pretrained writes it).
        self._groups = {i: self.layout.groups_under(f"{self.blocks_name}.{i}.") for i in range(self.count)}
        self._keys = {i: self.layout.sources(self._groups[i]) for i in range(self.count)}
        self._written: dict[str, str] = {}  # tensor name -> output shard
        # What the values were: outside the blocks (all read by now), and per finished block the
        # checkpoint's ("read") and the pruned shard's ("written").
        inside = self.blocks_name + "."
        self.outside_weights = combined_digest({k: d for k, d in shards.digests.items() if not k.startswith(inside)})
        self.weights: list[dict[str, str]] = []
        self.redone: str | None = None  # why finished blocks are pruned again (a damaged shard)
        self.packer = None  # sparse.format.BlockPacker: block shards written packed (--save-format sparse)

    # -- the partial output -------------------------------------------------------------------------
    def shard_name(self, position: int) -> str:
        """Shard k of the output: one per block, then one for everything outside the blocks."""
        return f"model-{position + 1:05d}-of-{self.count + 1:05d}.safetensors"

    def open_partial(self, fresh: bool) -> None:
        """Continue the partial output left by a killed run with the same identity, or start an empty one."""
        state_file = os.path.join(self.out, STATE_NAME)
        if fresh or not os.path.isfile(state_file):
            if os.listdir(self.out):
                _clear(self.out)
            return
        saved = _read_state(state_file, self.out)
        mine = self.state
        theirs = {k: saved.get(k) for k in mine}
        if theirs != mine:
            differ = [k for k in mine if theirs.get(k) != mine[k]]
            detail = ""
            if "settings" in differ:
                keys = sorted(k for k in set(mine["settings"]) | set(theirs["settings"])
                              if mine["settings"].get(k) != theirs["settings"].get(k))
                detail = f" ({', '.join(keys)})"
            raise LmpruneError(
                f"{self.out} holds a partial run with a different {', '.join(differ)}{detail}: run the same "
                "command to resume it, or add --fresh to discard it and start afresh")
        if saved["weights"]["outside"] != self.outside_weights:
            raise self._changed("the weights outside the blocks (embeddings, norms, lm_head) differ")
        done, weights = saved["blocks"][: self.count], saved["weights"]["blocks"][: self.count]
        for i in range(len(done)):
            damage = self._shard_damage(i)
            if damage:  # redone from there: its state entry (and the later ones) are dropped below
                self.redone = f"{damage}: finished block {i} and the later ones are pruned again"
                done, weights = done[:i], weights[:i]
                break
        self.done, self.weights = done, weights
        self.resume_from = len(done)
        for i in range(self.resume_from):
            self._check_finished(i)
            self._written.update(dict.fromkeys(self._keys[i], self.shard_name(i)))
        if self.redone:
            self._write_state()

    def _shard_damage(self, index: int) -> str | None:
        """Why finished block `index`'s shard cannot be read back (missing, truncated, no header), or None."""
        from .loading import check_safetensors_file

        path = os.path.join(self.out, self.shard_name(index))
        if not os.path.isfile(path):
            return f"{path} is missing"
        try:
            check_safetensors_file(path)
        except LmpruneError as exc:
            return str(exc)
        return None

    def _changed(self, what: str) -> CannotResume:
        return CannotResume(f"the model's weights changed since the partial run in {self.out} was started ({what}): "
                            "add --fresh to discard it and start afresh")

    def _check_finished(self, index: int) -> None:
        """Finished block `index`'s checkpoint weights are those it was pruned from, and its shard holds what
        was written. Both are read here, once more, so that a resume fails in one line before any work."""
        self.shards.read(self._keys[index])  # for its digests only
        if combined_digest({k: self.shards.digests[k] for k in self._keys[index]}) != self.weights[index]["read"]:
            raise self._changed(f"block {index} differs")
        path = os.path.join(self.out, self.shard_name(index))
        written = _read_file(path, self._keys[index])
        if combined_digest({k: tensor_digest(v) for k, v in written.items()}) != self.weights[index]["written"]:
            raise CannotResume(f"{path} (finished block {index}) changed since it was written: add --fresh to "
                               "discard the partial run and start afresh")

    def _write_state(self) -> None:
        """Replace the state file atomically, durable when this returns (the shards it names already are)."""
        path = os.path.join(self.out, STATE_NAME)
        tmp = f"{path}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({**self.state, "version": STATE_VERSION, "blocks": self.done,
                           "weights": {"outside": self.outside_weights, "blocks": self.weights}}, f, default=str)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(self.out)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            reason = exc.strerror.lower() if exc.strerror else str(exc)
            raise LmpruneError(f"cannot write the run's state to {path!r}: {reason}") from None

    # -- the pipeline's view ------------------------------------------------------------------------
    def load(self, index: int, block: nn.Module) -> None:
        """Block `index`: its pruned weights from the partial output once finished (by this run or a killed
        one: what --eval reads back), else the checkpoint's own."""
        if index < len(self.done):
            shard = os.path.join(self.out, self.shard_name(index))
            self._assign_block(index, block, lambda keys: _read_file(shard, keys))
        else:
            self.load_original(index, block)

    def load_original(self, index: int, block: nn.Module) -> None:
        """Block `index` with the checkpoint's own (dense) weights, even where a killed run finished it."""
        self._assign_block(index, block, self.shards.read)

    def _assign_block(self, index: int, block: nn.Module, read) -> None:
        prefix = f"{self.blocks_name}.{index}."
        tensors = self.layout.to_model(self._groups[index], read)
        _assign(block, {k[len(prefix):]: v for k, v in tensors.items()})

    def release(self, index: int, block: nn.Module) -> None:
        for module in block.modules():
            for attr, param in module._parameters.items():
                if param is not None and not param.is_meta:
                    module._parameters[attr] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                            requires_grad=param.requires_grad)
        return_freed_memory()

    @contextlib.contextmanager
    def loaded(self, indices: list[int], blocks: nn.ModuleList):
        for i in indices:
            self.load(i, blocks[i])
        try:
            yield
        finally:
            for i in indices:
                self.release(i, blocks[i])

    def records(self, index: int) -> dict[str, Any]:
        return self.done[index]

    def save(self, index: int, block: nn.Module, records: dict[str, Any]) -> None:
        """Write the pruned block to its shard, fsync it, then record it in the state; free the block."""
        from .loading import require_finite_weights

        require_finite_weights(block, f"the pruned block {index}")
        tensors, stored, metadata = self._checkpoint_tensors(index, block), None, None
        if self.packer is not None:  # `tensors` then as read back: what the digest below must describe
            tensors, stored, metadata = self.packer.pack(tensors, records)
        shard = self.shard_name(index)
        self._write_shard(shard, tensors if stored is None else stored, f"block {index}", metadata)
        self._written.update(dict.fromkeys(tensors, shard))
        self.done.append(records)
        self.weights.append({"read": combined_digest({k: self.shards.digests[k] for k in self._keys[index]}),
                             "written": combined_digest({k: tensor_digest(v) for k, v in tensors.items()})})
        self._write_state()
        self.release(index, block)

    def _checkpoint_tensors(self, index: int, block: nn.Module) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors under the checkpoint's names and in its layout (per-expert tensors split
        back), as save_pretrained writes them: the names `load` reads back when a killed run resumes."""
        prefix = f"{self.blocks_name}.{index}."
        state = {prefix + k: v for k, v in block.state_dict().items()}
        tensors = self.layout.to_checkpoint({k: state[k] for k in self.layout.targets(self._groups[index])})
        if sorted(tensors) != sorted(self._keys[index]):
            raise LmpruneError(f"block {index}: transformers' saving conversion names its tensors otherwise than "
                               f"the checkpoint does (e.g. {sorted(set(tensors) ^ set(self._keys[index]))[0]}): "
                               "use --no-stream")
        return {k: v.contiguous() for k, v in tensors.items()}

    def _write_shard(self, shard: str, tensors: dict[str, torch.Tensor], what: str,
                     metadata: dict[str, str] | None = None) -> None:
        path = os.path.join(self.out, shard)
        try:
            write_shard(path, tensors, metadata)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.remove(path)
            reason = exc.strerror.lower() if exc.strerror else str(exc)
            raise LmpruneError(f"cannot write {what} to {path!r}: {reason}") from None

    def finish(self, tokenizer, report: dict[str, Any]) -> None:
        """Write what lies outside the blocks, the index, config, tokenizer and (last) the report."""
        from ..report import REPORT_NAME

        state = self.model.state_dict()
        inside = self.blocks_name + "."
        groups = [g for g in self.layout.groups if not g.startswith(inside)]
        outside = self.layout.to_checkpoint({k: state[k] for k in self.layout.targets(groups)})
        outside = {k: v.contiguous() for k, v in outside.items()}
        shard = self.shard_name(self.count)
        self._write_shard(shard, outside, "the weights outside the blocks")
        self._written.update(dict.fromkeys(outside, shard))
        total = sum(_nbytes(self.out, shard) for shard in set(self._written.values()))
        try:
            write_json(os.path.join(self.out, INDEX_NAME),
                       {"metadata": {"total_size": total}, "weight_map": dict(sorted(self._written.items()))})
            self.model.config.save_pretrained(self.out)
            if getattr(self.model, "generation_config", None) is not None and self.model.can_generate():
                self.model.generation_config.save_pretrained(self.out)
            tokenizer.save_pretrained(self.out)
            if self.packer is not None:
                self.packer.seal(self.out, INDEX_NAME, report)
            write_json(os.path.join(self.out, REPORT_NAME), report)  # it marks a complete checkpoint
            os.remove(os.path.join(self.out, STATE_NAME))  # until now a kill leaves a resumable partial output
        except OSError as exc:
            reason = exc.strerror.lower() if exc.strerror else str(exc)
            raise LmpruneError(f"cannot write the checkpoint to {self.out!r}: {reason}") from None


class StreamedReader(StreamedBlocks):
    """A streamed run's blocks on a rank other than 0 (torchrun): each is read from the checkpoint as on
    rank 0 and freed when done, but nothing is written; rank 0 alone owns the output and its resume state."""

    def __init__(self, model: nn.Module, shards: CheckpointShards):
        super().__init__(model, shards, out="", state={})

    def open_partial(self, fresh: bool) -> None:
        raise LmpruneError("internal: only rank 0 opens the partial output")

    def save(self, index: int, block: nn.Module, records: dict[str, Any]) -> None:
        self.done.append(records)
        self.release(index, block)

    def finish(self, tokenizer, report: dict[str, Any]) -> None:
        raise LmpruneError("internal: only rank 0 writes the checkpoint")


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


def _nbytes(directory: str, shard: str) -> int:
    """Bytes of tensor data in a shard (the index's total_size), from its header."""
    with open(os.path.join(directory, shard), "rb") as f:
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


def _read_file(path: str, keys: list[str]) -> dict[str, torch.Tensor]:
    from ..sparse.format import read_block
    from .loading import _first_line

    try:
        return read_block(path, keys)  # dense, or packed by --save-format sparse
    except Exception as exc:
        raise CannotResume(f"cannot read the finished block in {path}: {_first_line(exc)}; add --fresh to discard "
                           "the partial run and start afresh") from None


def _read_state(path: str, out: str) -> dict[str, Any]:
    """A partial run's state file, checked for every field a resume reads."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except OSError as exc:
        reason = exc.strerror.lower() if exc.strerror else str(exc)
        raise LmpruneError(f"cannot read the state file {path}: {reason}: add --fresh to discard the partial run "
                           "and start afresh") from None
    except ValueError:
        saved, problem = None, "not JSON"
    else:
        problem = _state_problem(saved)
    if problem is None and saved["version"] != STATE_VERSION:
        raise LmpruneError(f"{out} holds a partial run of another lmprune version (state version {saved['version']}, "
                           f"this one writes {STATE_VERSION}): add --fresh to discard it and start afresh")
    if problem is not None:
        raise LmpruneError(f"the state file {path} is corrupt ({problem}): add --fresh to discard the partial run "
                           "and start afresh")
    return saved


def _state_problem(saved: Any) -> str | None:
    """What is wrong with a parsed state file's structure, or None (an older version: only its version)."""
    if not isinstance(saved, dict):
        return "not a JSON object"
    if not isinstance(saved.get("version"), int) or isinstance(saved["version"], bool):
        return "no version"
    if saved["version"] != STATE_VERSION:
        return None
    for key, kind in (("settings", dict), ("calibration", str), ("model", str), ("blocks", list), ("weights", dict)):
        if not isinstance(saved.get(key), kind):
            return f"{key!r} is not a {kind.__name__}"
    for i, block in enumerate(saved["blocks"]):
        if not (isinstance(block, dict) and isinstance(block.get("layers"), list)
                and isinstance(block.get("routers"), list) and isinstance(block.get("problems"), dict)
                and isinstance(block.get("blocks"), list)
                and all(isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("shape"), list)
                        and isinstance(r.get("sparsity"), (int, float)) for r in block["layers"])):
            return f"the records of block {i} are malformed"
    weights = saved["weights"]
    blocks = weights.get("blocks")
    if not (isinstance(weights.get("outside"), str) and isinstance(blocks, list) and len(blocks) == len(saved["blocks"])
            and all(isinstance(b, dict) and isinstance(b.get("read"), str) and isinstance(b.get("written"), str)
                    for b in blocks)):
        return "the weight digests are malformed"
    return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot sync a directory
            raise
    finally:
        os.close(fd)


def _clear(directory: str) -> None:
    for entry in os.scandir(directory):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path)
        else:
            os.remove(entry.path)


def first_of_each_class(blocks: nn.ModuleList) -> list[int]:
    """record_block_calls runs one real block per block class: these must hold their weights then."""
    seen: dict[type, int] = {}
    for i, block in enumerate(blocks):
        seen.setdefault(type(block), i)
    return sorted(seen.values())


def run_identity(settings: dict[str, Any], calibration: torch.Tensor, shards: CheckpointShards) -> dict[str, Any]:
    """What a resumed run must share with the run it continues."""
    ids = calibration.to(torch.int64).contiguous()
    digest = hashlib.sha256(str(list(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()
    return {"settings": json.loads(json.dumps(settings, default=str)), "calibration": digest,
            "model": shards.fingerprint()}
