"""Content hashes that identify weights, configs and data in provenance.

``tensors_sha256`` is the adapter / model hash of the expert format: sha256 over the tensors in
sorted key order, each contributing ``key``, its dtype, its shape and its raw little-endian bytes,
so the hash does not depend on the file layout or on safetensors' header ordering.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the config and JSON hashes are imported where torch is not (flow runs)
    import torch


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    import torch

    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        header = f"{key}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}|"
        digest.update(header.encode("utf-8"))
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def json_sha256(obj: Any) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of a plain object."""
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
