"""The compact sparse checkpoint: one writer, one reader, versioned.

A sparse checkpoint is a normal checkpoint directory (tokenizer, generation config, report) in which
each pruned weight `NAME` is stored packed (see packing.py) as `NAME.lmprune_values` plus
`NAME.lmprune_bitmask` or `NAME.lmprune_indices`; every other tensor is stored as is. Each shard's
safetensors metadata holds, under "lmprune_sparse", the JSON record of every packed weight in it (layout,
shape, dtype, counts, CRC-32). config.json records the format:

    "model_type": "lmprune_sparse",
    "lmprune_sparse": {"format": "lmprune-sparse", "version": 1, "model_type": "llama", ...}

A loader that does not know the format must fail, never build a model with random weights in place of
the packed ones. Two things make sure of that: `model_type` is one transformers does not know, so
AutoModel*/AutoConfig refuse it by name, and the shards and index have names transformers does not look
for (`sparse.safetensors.index.json`; shards `sparse-*.safetensors`, or a streamed run's
`model-*-of-*.safetensors`, which only an index names), so a model class's own from_pretrained finds no
weights and stops. `lmprune.load_model` reads it.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterator

import torch

from ..errors import LmpruneError
from ..tensor_checks import count_zeros
from ..model.loading import first_line
from ..report import REPORT_NAME, write_json
from .packing import BITMASK, NM, PackedWeight, as_dense, choose_layout, from_stored, pack

FORMAT = "lmprune-sparse"
VERSION = 1
CONFIG_KEY = "lmprune_sparse"  # config.json: the format record; each shard's metadata: its packed weights
MODEL_TYPE = "lmprune_sparse"  # what config.json's model_type says, so that transformers refuses it
INDEX = "sparse.safetensors.index.json"
VALUES, POSITIONS = ".lmprune_values", {BITMASK: ".lmprune_bitmask", NM: ".lmprune_indices"}
_DENSE_INDEX, _DENSE_SINGLE = "model.safetensors.index.json", "model.safetensors"
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_CONFIG = "config.json"


def read_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, _CONFIG)
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise LmpruneError(f"{path}: no config.json (not a checkpoint directory)") from None
    except (OSError, ValueError) as exc:
        raise LmpruneError(f"{file} cannot be read: {exc}") from None
    if not isinstance(config, dict):
        raise LmpruneError(f"{file} is not a JSON object")
    return config


def is_sparse_checkpoint(path: str) -> bool:
    """A directory whose config.json says it is in this format (any version)."""
    try:
        return CONFIG_KEY in read_config(path)
    except LmpruneError:
        return False


def format_record(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The format record of a sparse checkpoint's config, checked: this lmprune can read it."""
    record = config.get(CONFIG_KEY)
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("version"), int):
        raise LmpruneError(f"{path}: config.json's {CONFIG_KEY!r} entry is not an {FORMAT} record")
    if record["version"] > VERSION:
        raise LmpruneError(f"{path} is in {FORMAT} format version {record['version']}, newer than the version "
                           f"{VERSION} this lmprune reads: upgrade lmprune")
    if record["version"] < 1 or not isinstance(record.get("model_type"), str):
        raise LmpruneError(f"{path}: config.json's {CONFIG_KEY!r} entry is damaged")
    return record


def dense_config(config: dict[str, Any], path: str) -> dict[str, Any]:
    """The config.json of the dense model a sparse checkpoint holds."""
    record = format_record(config, path)
    dense = {k: v for k, v in config.items() if k != CONFIG_KEY}
    dense["model_type"] = record["model_type"]
    return dense


def read_shard(file: str) -> dict[str, torch.Tensor | PackedWeight]:
    """Every weight of one shard by its model name: packed ones as checked PackedWeights (a dense shard's
    tensors as they are)."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise LmpruneError(f"cannot read {file}: {first_line(exc)}") from None
    try:
        records = json.loads(metadata.get(CONFIG_KEY, "{}"))
        if not isinstance(records, dict):
            raise ValueError
    except ValueError:
        raise LmpruneError(f"{file}: its record of packed weights is damaged") from None
    weights: dict[str, torch.Tensor | PackedWeight] = {}
    for name, meta in records.items():
        parts = [name + VALUES, name + POSITIONS.get(meta.get("layout") if isinstance(meta, dict) else None, "?")]
        if not isinstance(meta, dict) or any(part not in tensors for part in parts):
            raise LmpruneError(f"{file}: packed weight {name} lacks its tensors or its record")
        weights[name] = from_stored(meta, tensors.pop(parts[0]), tensors.pop(parts[1]), f"{file}: {name}")
    stray = [key for key in tensors if key.endswith((VALUES, *POSITIONS.values()))]
    if stray:
        raise LmpruneError(f"{file}: {stray[0]} is part of a packed weight with no record")
    weights.update(tensors)
    return weights


class SparseCheckpoint:
    """A sparse checkpoint directory, opened for reading: its config checked, its shards whole."""

    def __init__(self, path: str):
        from ..model.loading import check_safetensors_files

        self.path = path
        self.config = read_config(path)
        self.record = format_record(self.config, path)
        self.weight_map = _read_index(os.path.join(path, INDEX))
        for shard in sorted(set(self.weight_map.values())):
            if not os.path.isfile(os.path.join(path, shard)):
                raise LmpruneError(f"{path}: shard {shard} named in {INDEX} is missing")
        check_safetensors_files(path)

    @property
    def shards(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def read_shard(self, shard: str) -> dict[str, torch.Tensor | PackedWeight]:
        return read_shard(os.path.join(self.path, shard))

    def weights(self) -> Iterator[tuple[str, dict[str, torch.Tensor | PackedWeight]]]:
        for shard in self.shards:
            yield shard, self.read_shard(shard)

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: as_dense(w) for _, weights in self.weights() for name, w in weights.items()}


def shard_tensors(weights: dict[str, torch.Tensor | PackedWeight], sparse: bool
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one safetensors shard: packed weights as their parts and records (sparse)
    or all dense."""
    records, tensors = {}, {}
    for name, weight in weights.items():
        if isinstance(weight, PackedWeight) and sparse:
            records[name] = weight.meta()
            tensors[name + VALUES] = weight.values
            tensors[name + POSITIONS[weight.layout]] = weight.positions
        else:
            tensors[name] = weight.dense() if isinstance(weight, PackedWeight) else weight.contiguous()
    return tensors, {"format": "pt", **({CONFIG_KEY: json.dumps(records, sort_keys=True)} if sparse else {})}


def write_shards(out: str, shards: Iterator[tuple[str, dict[str, torch.Tensor | PackedWeight]]],
                 sparse: bool) -> None:
    """Write each (shard, weights) and the index: packed weights as their parts (sparse) or all dense."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for position, (_, weights) in enumerate(shards):
        tensors, metadata = shard_tensors(weights, sparse)
        shard = f"{'sparse' if sparse else 'model'}-{position + 1:05d}.safetensors"
        save_file(tensors, os.path.join(out, shard), metadata=metadata)
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nbytes for t in tensors.values())
    write_json(os.path.join(out, INDEX if sparse else _DENSE_INDEX),
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def write_sparse_config(out: str, config: dict[str, Any], packed: dict[str, int]) -> None:
    record = {"format": FORMAT, "version": VERSION, "model_type": config.get("model_type"), "packed": packed}
    write_json(os.path.join(out, _CONFIG), {**config, "model_type": MODEL_TYPE, CONFIG_KEY: record})


def copy_other_files(src: str, out: str) -> None:
    """Everything but weights, index, config and report: tokenizer, generation config, ..."""
    for entry in os.scandir(src):
        if entry.is_file() and not entry.name.endswith(_WEIGHT_FILES) and not entry.name.endswith(".index.json") \
                and entry.name not in (_CONFIG, REPORT_NAME):
            shutil.copy2(entry.path, os.path.join(out, entry.name))


# ---- packing a dense-with-zeros checkpoint ----------------------------------------------------------------

class DenseCheckpoint:
    """A dense safetensors checkpoint, read shard by shard (never written to)."""

    def __init__(self, path: str):
        from ..model.shards import CheckpointShards

        self.path = path
        self.config = read_config(path)
        if not any(os.path.isfile(os.path.join(path, f)) for f in (_DENSE_INDEX, _DENSE_SINGLE)):
            raise LmpruneError(f"{path}: packing reads safetensors checkpoints ({_DENSE_SINGLE} or {_DENSE_INDEX}); "
                               "load and save_pretrained other formats with transformers first")
        self.shards = CheckpointShards(path)

    def weights(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.shards.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard in sorted(by_shard):
            yield shard, self.shards.read(by_shard[shard])


class PackPlan:
    """Which weights a checkpoint's packing packs, and what its report claims about each.

    With a report (lmprune's output), its pruned layers are packed and each must be as sparse as the
    report says (and fit its N:M pattern); without, every ≥2-D floating-point weight inside the decoder
    blocks with zeros, when packing makes it smaller. Block weights the report names differently from the
    file (per-expert tensors transformers fuses while loading) are packed by the second rule.
    """

    def __init__(self, blocks_name: str, report: dict[str, Any] | None, path: str):
        self.path = path
        self.blocks_prefix = blocks_name + "."
        self.claims: dict[str, list[tuple[int | None, dict]]] = {}
        self.nm: tuple[int, int] | None = None
        if report is not None:
            pattern = (report.get("settings") or {}).get("pattern") or {}
            if pattern.get("n") is not None and pattern.get("m") is not None:
                self.nm = (int(pattern["n"]), int(pattern["m"]))
            for record in report.get("layers") or []:
                name, expert = _record_param(record["name"])
                self.claims.setdefault(name, []).append((expert, record))

    def pack(self, name: str, weight: torch.Tensor) -> torch.Tensor | PackedWeight:
        if not name.startswith(self.blocks_prefix) or weight.dim() < 2 or not weight.is_floating_point():
            return weight
        claims = self.claims.get(name)
        if claims is None:
            if not bool((weight == 0).any()):
                return weight
            layout, args = choose_layout(weight)
            packed = pack(weight, layout, **args)
            return packed if packed.nbytes < weight.nbytes else weight
        for expert, record in claims:
            self._check_claim(name, weight if expert is None else weight[expert], record)
        nm = self.nm
        if nm is not None:
            try:
                layout, args = choose_layout(weight, nm)
            except ValueError:
                raise LmpruneError(f"{self.path}: {name} is not {nm[0]}:{nm[1]} sparse, as its report says "
                                   "it was pruned: not the checkpoint the report describes") from None
        else:
            layout, args = choose_layout(weight)
        return pack(weight, layout, **args)

    def _check_claim(self, name: str, weight: torch.Tensor, record: dict) -> None:
        need = round(float(record["sparsity"]) * weight.numel())
        zeros = count_zeros(weight)
        if zeros < need:
            raise LmpruneError(
                f"{self.path}: {record['name']} has {zeros} zeros of {weight.numel()} weights, but its report "
                f"says {float(record['sparsity']):.2%} were pruned: not the checkpoint the report describes")


def pack_checkpoint(src: str, out: str, report: dict[str, Any] | None) -> dict[str, int]:
    """Write src (a dense safetensors checkpoint, with zeros) packed into the empty directory out.
    Returns how many weights took each layout. `report` is src's own, or None."""
    if is_sparse_checkpoint(src):
        raise LmpruneError(f"{src} is already a sparse checkpoint")
    source = DenseCheckpoint(src)
    plan = PackPlan(_blocks_prefix(source.config, src), report, src)
    counts = {BITMASK: 0, NM: 0}

    def packed_shards():
        for shard, tensors in source.weights():
            weights = {name: plan.pack(name, tensor) for name, tensor in tensors.items()}
            for weight in weights.values():
                if isinstance(weight, PackedWeight):
                    counts[weight.layout] += 1
            yield shard, weights

    write_shards(out, packed_shards(), sparse=True)
    write_sparse_config(out, source.config, counts)
    copy_other_files(src, out)
    return counts


def unpack_checkpoint(src: str, out: str) -> None:
    """Write the sparse checkpoint src as the dense checkpoint it was packed from, into out."""
    checkpoint = SparseCheckpoint(src)
    write_shards(out, checkpoint.weights(), sparse=False)
    write_json(os.path.join(out, _CONFIG), dense_config(checkpoint.config, src))
    copy_other_files(src, out)


def packed_record(counts: dict[str, int], source: str | None = None) -> dict[str, Any]:
    """What a report says about the packing of its checkpoint."""
    return {"format": FORMAT, "version": VERSION, "layouts": counts, **({"source": source} if source else {})}


def pack_in_place(directory: str, report: dict[str, Any]) -> None:
    """A checkpoint just saved (dense) into a run's own temporary directory, replaced by its packed form;
    the report (written after) records the packing."""
    staging = os.path.join(directory, ".lmprune-packing")
    os.mkdir(staging)
    counts = pack_checkpoint(directory, staging, report)
    report["packed"] = packed_record(counts)
    for entry in os.scandir(directory):
        if entry.is_file():
            os.remove(entry.path)
    for entry in os.scandir(staging):
        os.replace(entry.path, os.path.join(directory, entry.name))
    os.rmdir(staging)


# ---- a streamed run's blocks, packed as they finish (prune --stream --save-format sparse) ------------------

class BlockPacker:
    """Packs each finished block of a streamed run into its shard, with the plan `pack` follows for the
    dense output (the block's report records, the run's N:M pattern), so that both give the same packed
    tensors; `seal` then makes the finished partial output a sparse checkpoint."""

    def __init__(self, blocks_name: str, pattern: dict[str, Any]):
        self.blocks_name = blocks_name
        self.settings = {"pattern": pattern}  # as the report records it (settings.pattern)

    def pack(self, tensors: dict[str, torch.Tensor], records: dict[str, Any]
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
        """One block's tensors (checkpoint names) -> (the tensors as reading the shard gives them back, the
        shard's tensors, its metadata). Read back, a packed weight's pruned zeros are +0.0 (packing.py)."""
        plan = PackPlan(self.blocks_name, {"settings": self.settings, "layers": records["layers"]}, "the pruned block")
        weights = {name: plan.pack(name, tensor) for name, tensor in tensors.items()}
        read_back = {name: as_dense(w) for name, w in weights.items()}
        return (read_back, *shard_tensors(weights, sparse=True))

    @staticmethod
    def seal(out: str, dense_index: str, report: dict[str, Any]) -> None:
        """The partial output, all shards, its dense index and config.json written, as a sparse checkpoint:
        the index renamed and naming the packed parts, config.json with the format record, and the report
        (written after) with the packing's record."""
        from safetensors import safe_open

        index_file = os.path.join(out, dense_index)
        with open(index_file, encoding="utf-8") as f:
            metadata = json.load(f)["metadata"]
        weight_map: dict[str, str] = {}
        counts = {BITMASK: 0, NM: 0}
        for shard in sorted(set(_read_index(index_file).values())):
            with safe_open(os.path.join(out, shard), "pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), shard))
                for record in json.loads((f.metadata() or {}).get(CONFIG_KEY, "{}")).values():
                    counts[record["layout"]] += 1
        write_json(os.path.join(out, INDEX), {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))})
        os.remove(index_file)
        write_sparse_config(out, read_config(out), counts)
        report["packed"] = packed_record(counts)


def read_block(file: str, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a streamed run's block shard, dense or packed (unpacked, every record checked)."""
    weights = read_shard(file)
    missing = [name for name in names if name not in weights]
    if missing:
        raise LmpruneError(f"{file} lacks {missing[0]}")
    return {name: as_dense(weights[name]) for name in names}


def _record_param(layer_name: str) -> tuple[str, int | None]:
    """A report's layer name as (the stored tensor's name, expert index or None)."""
    if layer_name.endswith("]") and "[" in layer_name:
        base, expert = layer_name[:-1].rsplit("[", 1)
        return base, int(expert)
    return f"{layer_name}.weight", None


def _blocks_prefix(config: dict[str, Any], path: str) -> str:
    """The decoder blocks' name (e.g. model.layers), from a weightless instance of the model."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..model import find_blocks

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config_object(config, path))
    return find_blocks(model)[0]


def config_object(config: dict[str, Any], path: str):
    """A transformers config from a dense config.json's contents, checked to be a causal decoder's."""
    from transformers import CONFIG_MAPPING

    from ..model.loading import require_causal_decoder

    try:
        hf_config = CONFIG_MAPPING[config["model_type"]].from_dict(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise LmpruneError(f"{path}: cannot read its config.json: {first_line(exc)}") from None
    require_causal_decoder(hf_config, path)
    return hf_config


def _read_index(file: str) -> dict[str, str]:
    try:
        with open(file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except FileNotFoundError:
        raise LmpruneError(f"{os.path.dirname(file)}: {INDEX} is missing") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise LmpruneError(f"{file} is not a valid safetensors index") from None
    return weight_map

