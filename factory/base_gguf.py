"""A GGUF file as a base model: checked, then imported once into a plain safetensors HF folder.

transformers reads GGUF through the ``gguf`` package and dequantizes every tensor to float; the
model it returns still carries the GGUF quantizer and refuses ``save_pretrained``, so a plain
model of the same class is built from its config and given its state dict. The folder is cached
as ``<cache_root>/gguf-<sha256 of the GGUF file, 16 hex>`` (a committed folder: a torn import is
redone), with ``taas_base.json`` naming the source file, its hash, name and licence.

Weights are saved in float32: dequantized Q4/Q8 values are exact in float32, and LoRA training
on CPU runs in float32 (bf16 would round the base's weights a second time).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

BASE_INFO = "taas_base.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return default
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8", errors="replace")
    return value.tolist()[0] if isinstance(value, np.ndarray) else value


def gguf_info(path: Path) -> dict[str, str]:
    """Checks a GGUF file without dequantizing it: {architecture, name, licence}."""
    import gguf
    from gguf.quants import _type_traits
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path.name}: not a GGUF file (no GGUF magic)")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise ValueError(f"{path.name}: unreadable GGUF ({exc})") from None
    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *_type_traits}
    for tensor in reader.tensors:
        if tensor.tensor_type not in readable:
            raise ValueError(
                f"{path.name}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
                "which cannot be read (dequantized)"
            )
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path.name}: architecture {arch!r} is not one transformers reads")
    if not any(t.name.endswith("ffn_gate.weight") for t in reader.tensors):
        raise ValueError(
            f"{path.name}: architecture {arch!r} has no ffn_gate tensors "
            "(the factory's experts need gate/up/down MLP projections)"
        )
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"{path.name}: no tokenizer (tokenizer.ggml.tokens missing)")
    return {
        "architecture": str(arch),
        "name": str(_field(reader, "general.name", path.stem)),
        "licence": str(_field(reader, "general.license", "")),
    }


def import_gguf(path: Path, cache_root: Path, log=print, **info: str) -> Path:
    """The committed HF folder for a GGUF file, importing it first when absent or torn.

    ``info`` (name, licence, origin) is recorded in ``taas_base.json`` over the file's own
    metadata."""
    from infra.atomic import atomic_write_json, committed_dir, verify_committed

    path = Path(path).resolve()
    details = gguf_info(path)
    sha = file_sha256(path)
    folder = Path(cache_root) / f"gguf-{sha[:16]}"
    if verify_committed(folder):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from factory.base_model import _LOAD_LOCK

    log(f"[base] importing {path.name} (one time, cached in {folder})")
    started = time.time()
    with _LOAD_LOCK:
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    del loaded
    with committed_dir(folder, overwrite=True) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / BASE_INFO,
            {
                **details,
                **{k: v for k, v in info.items() if v},
                "gguf_file": path.name,
                "gguf_sha256": sha,
                "import_seconds": round(time.time() - started, 1),
            },
        )
    log(f"[base] imported {path.name} in {time.time() - started:.1f} s")
    return folder
