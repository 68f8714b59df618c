"""The expert module format: a PEFT LoRA adapter on the MLP projections, router rows, a manifest.

An expert folder (committed: see :mod:`infra.atomic`) holds

- ``adapter_config.json`` + ``adapter_model.safetensors``: a PEFT LoRA adapter, loadable with
  ``PeftModel.from_pretrained(base, folder)``; keys as PEFT saves them, for example
  ``base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight``;
- ``router.safetensors``: tensor ``router`` of shape [num_layers, hidden_size], one routing row per
  MoE layer (see :mod:`factory.mixture`);
- ``expert.json``: the :class:`ExpertManifest`;
- optional ``null_route.safetensors``: the routed mixture's own router state at the time this
  expert was composed (``null_rows`` [L, H], ``null_bias`` [L], ``router_center`` [L, H]; see
  :meth:`factory.mixture.MixtureModel.null_route`). Every expert's rows are relative to that
  center, so a mixture loaded from folders takes it from the last folder that carries one
  (:func:`factory.mixture.load_mixture`);
- optional ``replay.jsonl``: a sample of the expert's training rows (``{"text": ...}`` per line),
  replayed when a later expert is composed so this one's domain does not regress. This is the
  customer's own text: :mod:`factory.replay` keeps new samples in the factory's object store
  instead, reads this file only from folders composed before it, and :mod:`factory.bundle`
  leaves it out of every bundle.

These file names are defined here only (:data:`EXPERT_FILES`); :func:`save_expert` and
:func:`load_expert` are the one writer and reader. Weights are only ever read from
safetensors. ``adapter_sha256`` is :func:`factory.hashing.tensors_sha256` over the adapter
tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes

from factory.hashing import tensors_sha256
from infra.atomic import atomic_write_json, committed_dir, verify_committed

LORA_TARGETS = ("gate_proj", "up_proj", "down_proj")
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ROUTER_FILE = "router.safetensors"
MANIFEST_FILE = "expert.json"
NULL_ROUTE_FILE = "null_route.safetensors"
REPLAY_FILE = "replay.jsonl"
OPTIONAL_FILES = (NULL_ROUTE_FILE, REPLAY_FILE)
EXPERT_FILES = (ADAPTER_CONFIG, ADAPTER_FILE, ROUTER_FILE, MANIFEST_FILE, *OPTIONAL_FILES)
NULL_ROUTE_KEYS = ("null_rows", "null_bias", "router_center")  # router_center: optional
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.mlp\.(\w+)\.lora_([AB])\.weight$")


class ExpertManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expert_id: str
    domain: str
    version: int = Field(ge=0)
    base_model: str
    base_model_sha256: str
    adapter_sha256: str
    rank: int = Field(ge=1)
    lora_alpha: float
    target_modules: list[str]
    num_layers: int = Field(ge=1)
    provenance: dict[str, Any] = Field(default_factory=dict)


@dataclass
class Expert:
    manifest: ExpertManifest
    adapter: dict[str, torch.Tensor]
    adapter_config: dict[str, Any]
    router: torch.Tensor  # [num_layers, hidden_size]
    path: Path | None = None
    # The mixture's router state saved with this expert (NULL_ROUTE_FILE), None when absent.
    null_route: dict[str, torch.Tensor] | None = None


def lora_config_dict(
    rank: int,
    alpha: float,
    targets: tuple[str, ...] = LORA_TARGETS,
    base_model_name_or_path: str | None = None,
) -> dict:
    """The adapter_config.json content for a LoRA on the MLP projections (no dropout, no bias).

    ``task_type`` is always CAUSAL_LM, so ``AutoPeftModelForCausalLM`` knows the model class;
    ``base_model_name_or_path`` (a local base folder or the base's name) is set on the folders
    that leave the factory (a library expert and its bundles), where peft loads the base from it.
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    data = config.to_dict()
    data["target_modules"] = sorted(data["target_modules"])
    return json.loads(json.dumps(data, default=str))


def parse_adapter_key(key: str) -> tuple[int, str, str]:
    """Returns (layer, projection, 'A' or 'B') for a PEFT LoRA key; ValueError otherwise."""
    match = _KEY.match(key)
    if not match:
        raise ValueError(f"not a LoRA MLP key: {key}")
    return int(match.group(1)), match.group(2), match.group(3)


def adapter_key(layer: int, projection: str, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.mlp.{projection}.lora_{part}.weight"


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    """Reads an adapter from safetensors (never pickle)."""
    return load_file(str(path))


def write_adapter_files(folder: Path, adapter: dict[str, torch.Tensor], config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.items()}
    save_file(tensors, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, config)


def save_expert(
    folder: Path,
    expert: Expert,
    overwrite: bool = False,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Writes an expert as a committed folder; the manifest's adapter hash must match.

    ``expert.null_route``, when set, is written as :data:`NULL_ROUTE_FILE`. ``extra_files``
    (name -> bytes, names from :data:`OPTIONAL_FILES`) travel with the expert under the same
    commit marker, for example a replay sample of the expert's domain.
    """
    actual = tensors_sha256(expert.adapter)
    assert actual == expert.manifest.adapter_sha256, "manifest adapter_sha256 does not match"
    extra = dict(extra_files or {})
    assert set(extra) <= set(OPTIONAL_FILES), f"extra_files: use names from {OPTIONAL_FILES}"
    if expert.null_route is not None:
        assert NULL_ROUTE_FILE not in extra, "null route given twice"
        check_null_route(expert.null_route, tuple(expert.router.shape), "null_route")
        extra[NULL_ROUTE_FILE] = safetensors_bytes(
            {k: v.detach().to("cpu").contiguous() for k, v in expert.null_route.items()}
        )
    with committed_dir(Path(folder), overwrite=overwrite) as tmp:
        for name, data in extra.items():
            (tmp / name).write_bytes(data)
        write_adapter_files(tmp, expert.adapter, expert.adapter_config)
        save_file({"router": expert.router.detach().to("cpu").contiguous()}, str(tmp / ROUTER_FILE))
        atomic_write_json(tmp / MANIFEST_FILE, expert.manifest.model_dump(mode="json"))
    return Path(folder)


def check_null_route(state: dict[str, torch.Tensor], router_shape: tuple, where: str) -> None:
    """ValueError naming ``where`` unless ``state`` holds null_rows [L, H], null_bias [L] and
    optionally router_center [L, H] for a router of shape [L, H]."""
    num_layers = router_shape[0]
    wanted = {"null_rows": router_shape, "null_bias": (num_layers,), "router_center": router_shape}
    for key, shape in wanted.items():
        if key not in state:
            if key == "router_center":  # saved before centering existed: no centering
                continue
            raise ValueError(f"{where}: tensor {key!r} is missing")
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(
                f"{where}: tensor {key!r} has shape {list(state[key].shape)}, "
                f"expected {list(shape)}"
            )


def read_manifest(folder: Path) -> ExpertManifest:
    """The manifest of a committed expert folder, without reading its weights (for choosing the
    base model before loading); :func:`load_expert` verifies the adapter against it."""
    folder = Path(folder)
    if not verify_committed(folder):
        raise ValueError(f"{folder}: not a committed expert folder (marker missing or mismatched)")
    return ExpertManifest.model_validate_json((folder / MANIFEST_FILE).read_text())


def load_expert(folder: Path) -> Expert:
    """Loads a committed expert folder and checks its adapter hash; ValueError when torn."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    adapter = read_adapter(folder / ADAPTER_FILE)
    if tensors_sha256(adapter) != manifest.adapter_sha256:
        raise ValueError(f"{folder}: adapter sha256 does not match its manifest")
    router = load_file(str(folder / ROUTER_FILE))["router"]
    null_route = None
    if (folder / NULL_ROUTE_FILE).exists():
        null_route = load_file(str(folder / NULL_ROUTE_FILE))
        check_null_route(null_route, tuple(router.shape), str(folder / NULL_ROUTE_FILE))
    return Expert(
        manifest=manifest,
        adapter=adapter,
        adapter_config=json.loads((folder / ADAPTER_CONFIG).read_text()),
        router=router,
        path=folder,
        null_route=null_route,
    )
