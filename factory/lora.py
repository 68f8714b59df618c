"""The LoRA scaling factor, the one definition shared by the mixture and the merge algebra.

PEFT applies ``delta_W = s * B @ A`` per module with

    s = alpha / r          (alpha / sqrt(r) when ``use_rslora`` is set)

where ``r`` and ``alpha`` are the module's own: the first key of ``rank_pattern`` /
``alpha_pattern`` (in the config's order) that matches the module name wins, else the config's
``r`` / ``lora_alpha``. A pattern matches a module name when the name ends with it at a dot
boundary, exactly as :func:`peft.utils.other.get_pattern_key` does:
``re.match(rf"(.*\\.)?({pattern})$", name)``. Module names are the base model's, e.g.
``model.layers.0.mlp.gate_proj``; an adapter key ``base_model.model.<name>.lora_A.weight`` maps to
one with :func:`module_name`.

Pure: no torch, prefect, mlflow or boto3.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_PEFT_PREFIX = "base_model.model."


def module_name(adapter_key_or_prefix: str) -> str:
    """The base model's module name behind a PEFT adapter key (or its ``.lora_`` prefix):
    ``base_model.model.model.layers.0.mlp.up_proj.lora_B.weight`` -> ``model.layers.0.mlp.up_proj``.
    """
    name = adapter_key_or_prefix.split(".lora_", 1)[0]
    return name.removeprefix(_PEFT_PREFIX)


def _pattern_value(patterns: Mapping[str, Any] | None, name: str | None, default: Any) -> Any:
    if not patterns or name is None:
        return default
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", name):
            return patterns[pattern]
    return default


def module_rank(config: Mapping[str, Any], module: str | None = None) -> int:
    """The LoRA rank PEFT gives ``module`` (a module name or adapter key) under ``config``."""
    name = None if module is None else module_name(module)
    return int(_pattern_value(config.get("rank_pattern"), name, config["r"]))


def lora_scaling(
    config: Mapping[str, Any], rank: int | None = None, module: str | None = None
) -> float:
    """The factor s in delta_W = s * B @ A for ``module`` (a module name or adapter key; None:
    the config's defaults) under an adapter_config; ``rank`` overrides the module's rank (for
    an adapter whose factors were stacked or truncated to another rank)."""
    name = None if module is None else module_name(module)
    r = module_rank(config, module) if rank is None else int(rank)
    alpha = float(_pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]))
    if r < 1:
        raise ValueError(f"adapter_config: r must be >= 1 for {name or 'every module'}, got {r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def has_patterns(config: Mapping[str, Any]) -> bool:
    """True when some module's rank or alpha differs from the config's defaults by pattern."""
    return bool(config.get("rank_pattern") or config.get("alpha_pattern"))
