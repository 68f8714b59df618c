"""What the hardware and the settings decide about a run: precision, device, process-group
backend, DeepSpeed's accelerator, and the user's DeepSpeed config overlay.

One place, so that the GPU path is reached without code changes: on CUDA a line trains in bf16
(where the device supports it) over NCCL and lm-eval runs on the GPU; on CPU everything is fp32
over gloo and ``DS_ACCELERATOR=cpu`` is set for the ranks (only where CUDA is absent: forcing it
on a GPU host would put DeepSpeed on the CPU).

``Settings.ds_config_overlay`` names a JSON object deep-merged over the DeepSpeed config each
line builds (:func:`deep_merge`). Keys the factory derives itself (batch sizes from the spec's
budget, precision from :func:`select_precision`, clipping, the ZeRO stage, and the optimizer and
scheduler it passes as client objects) are refused with a one-line error: an overlay that
changed them would silently break the spec's meaning or the training loop.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

Precision = Literal["fp32", "bf16"]
# Dotted keys an overlay may not set (see the module docstring).
FORBIDDEN_OVERLAY_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16",
    "fp16",
    "optimizer",
    "scheduler",
    "zero_optimization.stage",
)


def machine_slots(environ: Mapping[str, str] | None = None) -> int:
    """This machine's process slots for lines, found without importing torch (a line's flow
    run stays light): its visible GPUs (``CUDA_VISIBLE_DEVICES``, else the NVIDIA driver's
    list), else its CPU cores."""
    environ = os.environ if environ is None else environ
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
        if devices:
            return len(devices)
    else:
        driver = Path("/proc/driver/nvidia/gpus")
        if driver.is_dir() and (gpus := len(list(driver.iterdir()))):
            return gpus
    return os.cpu_count() or 1


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def select_precision(
    requested: str = "auto", cuda: bool | None = None, bf16_supported: bool | None = None
) -> Precision:
    """``auto``: bf16 on a CUDA device that supports it, else fp32; ``fp32`` always works;
    ``bf16`` needs CUDA (ValueError otherwise: CPU training stays fp32)."""
    if requested not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision: {requested!r}; use auto, fp32 or bf16")
    if requested == "fp32":
        return "fp32"
    cuda = cuda_available() if cuda is None else cuda
    if requested == "bf16":
        if not cuda:
            raise ValueError("precision: bf16 needs a CUDA device; use fp32 or auto on CPU")
        return "bf16"
    if not cuda:
        return "fp32"
    if bf16_supported is None:
        import torch

        bf16_supported = torch.cuda.is_bf16_supported()
    return "bf16" if bf16_supported else "fp32"


def dist_backend(cuda: bool | None = None) -> Literal["nccl", "gloo"]:
    return "nccl" if (cuda_available() if cuda is None else cuda) else "gloo"


def torch_device(cuda: bool | None = None) -> Literal["cuda", "cpu"]:
    return "cuda" if (cuda_available() if cuda is None else cuda) else "cpu"


def accelerator_env(environ: Mapping[str, str] | None = None, cuda: bool | None = None):
    """``{"DS_ACCELERATOR": "cpu"}`` where CUDA is absent and the variable is unset, else {}."""
    environ = os.environ if environ is None else environ
    if "DS_ACCELERATOR" in environ or (cuda_available() if cuda is None else cuda):
        return {}
    return {"DS_ACCELERATOR": "cpu"}


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` merged in: nested mappings merge key by key, anything else in
    the overlay replaces the base's value. Neither input is modified."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _dotted_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + str(key))
        if isinstance(value, Mapping):
            keys.extend(_dotted_keys(value, f"{prefix}{key}."))
    return keys


def read_ds_overlay(path: Path, sha256: str | None = None) -> dict[str, Any]:
    """A DeepSpeed config overlay file, validated (and its bytes' sha256 checked when given);
    ValueError naming the file and the key."""
    path = Path(path)
    if sha256 is not None and path.is_file():
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise ValueError(f"ds_config_overlay: {path} changed since the line was planned")
    try:
        overlay = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"ds_config_overlay: no such file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"ds_config_overlay: {path} is not JSON ({exc})") from None
    if not isinstance(overlay, dict):
        raise ValueError(f"ds_config_overlay: {path} must hold a JSON object")
    for key in _dotted_keys(overlay):
        if key in FORBIDDEN_OVERLAY_KEYS:
            raise ValueError(
                f"ds_config_overlay: {path} sets {key}, which the factory derives from the spec "
                "and the hardware; remove it"
            )
    return overlay


def line_hardware_fields(settings=None) -> dict[str, Any]:
    """The training worker's config fields that come from the hardware and the settings:
    precision, and the overlay's path and sha256 (so the overlay is part of the config hash)."""
    if settings is None:
        from infra.settings import get_settings

        settings = get_settings()
    overlay_path = settings.ds_config_overlay
    overlay_sha = None
    if overlay_path is not None:
        overlay_path = Path(overlay_path).absolute()
        read_ds_overlay(overlay_path)
        overlay_sha = hashlib.sha256(overlay_path.read_bytes()).hexdigest()
    return {
        "precision": select_precision(settings.precision),
        "ds_config_overlay": str(overlay_path) if overlay_path else None,
        "ds_config_overlay_sha256": overlay_sha,
    }
