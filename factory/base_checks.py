"""Checks on a base model folder that read no weights: files, safetensors headers, architecture.

A base model folder is a Hugging Face folder: ``config.json``, tokenizer files, and either
``model.safetensors`` or shards ``model-XXXXX-of-YYYYY.safetensors`` listed by
``model.safetensors.index.json``. :func:`check_model_folder` raises a one-line ``ValueError``
naming the file or module at fault, or returns the files that identify the model (the ones
:func:`factory.base_model.base_model_sha256` hashes):

- a safetensors file is read only as far as its header (8-byte little-endian length + JSON); its
  size must equal ``8 + header length + the largest tensor end offset``, so a truncated shard is
  found without loading it;
- the architecture is instantiated on the meta device (no memory, no weights) from config.json,
  and every decoder layer must have ``model.layers.<i>.mlp.{gate,up,down}_proj`` Linear modules:
  the factory's LoRA experts, routers and merges address exactly those;
- every parameter of that meta model must be in the weight files' headers (a tied ``lm_head`` may
  be absent), so an index that forgets a tensor is refused as well.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from factory.commission import MLP_TARGETS

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tokenizer files a folder may carry; at least one of the complete sets below must be present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKENIZER_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
_SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
_LAYER_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(\w+)$")


def safetensors_header(path: Path) -> dict:
    """The tensor entries of a safetensors file's header, after checking the file's length."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path.name}: truncated ({size} bytes, no safetensors header)")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise ValueError(f"{path.name}: truncated (header of {length} bytes, file {size})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path.name}: not a safetensors file (unreadable header)") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    if size != 8 + length + end:
        raise ValueError(
            f"{path.name}: truncated or padded ({size} bytes, header says {8 + length + end})"
        )
    return tensors


def weight_files(folder: Path) -> dict[str, list[str]]:
    """{weight file name: tensor names in it}, checked against the index when sharded."""
    index_path = folder / INDEX_FILE
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{INDEX_FILE}: no weight_map in {folder}") from None
        named = sorted(set(weight_map.values()))
        for name in named:
            if not (folder / name).is_file():
                raise ValueError(f"{INDEX_FILE}: names {name}, which is not in {folder}")
        for name in shards:
            if name not in named:
                raise ValueError(f"{name}: a shard {INDEX_FILE} does not list")
        expected = {int(m.group(2)) for m in map(_SHARD.match, named) if m}
        if len(expected) == 1 and len(named) != expected.pop():
            raise ValueError(f"{INDEX_FILE}: lists {len(named)} shards, the file names say more")
        headers = {name: safetensors_header(folder / name) for name in named}
        files: dict[str, list[str]] = {name: [] for name in named}
        for tensor, name in weight_map.items():
            if tensor not in headers[name]:
                raise ValueError(f"{name}: lacks tensor {tensor} that {INDEX_FILE} puts there")
            files[name].append(tensor)  # what a loader reads is what the index lists
        return files
    if shards:
        raise ValueError(f"{INDEX_FILE}: missing in {folder}, which holds shards {shards[0]}...")
    if (folder / SINGLE_FILE).is_file():
        return {SINGLE_FILE: list(safetensors_header(folder / SINGLE_FILE))}
    other = sorted(p.name for p in folder.glob("*.bin")) + sorted(
        p.name for p in folder.glob("*.pt")
    )
    why = f" ({other[0]} is not accepted: weights are read from safetensors only)" if other else ""
    raise ValueError(f"{SINGLE_FILE}: missing in {folder}{why}")


def check_architecture(folder: Path, tensors: set[str]) -> str:
    """The model's class name, after checking its MLP projections on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"config.json: not a configuration transformers reads ({first})") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0]
        raise ValueError(f"config.json: {config.model_type} is not a causal LM ({first})") from None
    arch = type(model).__name__
    found: dict[int, set[str]] = {}
    for name, module in model.named_modules():
        match = _LAYER_MLP.match(name)
        if match and isinstance(module, torch.nn.Linear):
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    layers = config.num_hidden_layers
    for layer in range(layers):
        missing = [t for t in MLP_TARGETS if t not in found.get(layer, set())]
        if missing:
            raise ValueError(
                f"config.json: {arch} has no model.layers.{layer}.mlp.{missing[0]} "
                f"(the factory's experts need {'/'.join(MLP_TARGETS)} in every decoder layer)"
            )
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, _ in model.named_parameters():
        if name not in tensors and not (tied and name == "lm_head.weight"):
            raise ValueError(f"weights: no tensor {name}, which {arch} needs")
    return arch


def hashed_files(folder: Path, weights: list[str] | None = None) -> list[str]:
    """The files that identify a model folder (sorted): weights, index, config, tokenizer."""
    folder = Path(folder)
    names = list(weights if weights is not None else weight_files(folder))
    extra = [INDEX_FILE] if (folder / INDEX_FILE).is_file() else []
    present = [n for n in ("config.json", *TOKENIZER_FILES) if (folder / n).is_file()]
    return sorted([*names, *extra, *present])


def check_model_folder(folder: Path) -> str:
    """Checks a base model folder without loading weights; returns the model's class name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise ValueError(f"config.json: missing in {folder}")
    if not any(all((folder / n).is_file() for n in s) for s in _TOKENIZER_SETS):
        raise ValueError(f"tokenizer.json: missing in {folder} (no tokenizer files)")
    files = weight_files(folder)
    return check_architecture(folder, {t for names in files.values() for t in names})
