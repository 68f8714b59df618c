"""Proof-of-Loss: score a candidate by how much it lowers the held-out loss of the current version.

Definitions (all on the same seeded held-out batches, fixed before candidates are collected):

- block loss: for a block x_1..x_T of token ids, the next-token cross-entropy
  ``-(1/(T-1)) * sum_{t=2..T} log p(x_t | x_1..x_{t-1})`` (natural log, no token masked);
- batch loss: the mean of that over all ``B * (T-1)`` predicted tokens of a batch of B blocks;
- L(adapter): :func:`mean_finite_loss` of the batch losses: the mean over the finite batch losses
  (a batch whose loss is NaN or inf is dropped); +inf when none is finite;
- score: ``pol_score(L(current), L(candidate), p) = max(0, L(current) - L(candidate)) ** p``.

:class:`PolEvaluator` loads the base model once, wraps it with a PEFT LoRA and swaps adapter
weights in place for each evaluation; ``None`` disables the adapter (the base, zero delta).
Evaluation runs in eval mode under ``torch.inference_mode``; on CPU the same inputs give the same
numbers. Each loss is computed once per (base, batch plan, adapter): repeated requests (the base
for every candidate, the current and merged versions at WiSE-FT's alpha 0 and 1) are answered from
memory, and with a ``cache_dir`` from ``<cache_dir>/<plan key>/<adapter key>.json`` across
evaluators, tasks and reruns. The plan key hashes the base's sha256, the held-out blocks, the
batch indices and the evaluation dtype; the adapter key hashes the tensors and their LoRA config.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from factory.hashing import bytes_sha256, json_sha256, tensors_sha256
from infra.atomic import atomic_write_json

#: bumped whenever the loss definition or its numerics change, so old cache entries are not read
LOSS_CACHE_VERSION = 1

Adapter = dict[str, torch.Tensor]


def heldout_batch_indices(
    num_blocks: int, num_batches: int, batch_size: int, seed: int
) -> list[list[int]]:
    """Seeded batches of block indices: consecutive slices of shuffled passes over the blocks.

    Blocks do not repeat within a pass; when more than ``num_blocks`` indices are needed another
    independently shuffled pass follows.
    """
    for name, value in (("num_blocks", num_blocks), ("num_batches", num_batches)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    needed = num_batches * batch_size
    order: list[int] = []
    while len(order) < needed:
        order.extend(rng.sample(range(num_blocks), num_blocks))
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]


def mean_finite_loss(per_batch: list[float]) -> float:
    """The mean of the finite batch losses; +inf when there is none."""
    finite = [x for x in per_batch if math.isfinite(x)]
    return math.fsum(finite) / len(finite) if finite else math.inf


def pol_score(current_loss: float, candidate_loss: float, p: float) -> float:
    """max(0, L_cur - L_cand) ** p; a non-finite candidate loss scores 0."""
    if not math.isfinite(current_loss):
        raise ValueError(f"current_loss must be finite to score candidates, got {current_loss}")
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"power p must be a finite number > 0, got {p}")
    if not math.isfinite(candidate_loss):
        return 0.0
    return max(0.0, current_loss - candidate_loss) ** p


@dataclass(frozen=True)
class LossReport:
    mean: float
    per_batch: list[float] = field(default_factory=list)
    batch_indices: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": _json_float(self.mean),
            "per_batch": [_json_float(x) for x in self.per_batch],
        }


def _json_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def block_loss_sum(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of next-token cross-entropy (positions 2..T, each from its prefix)."""
    return torch.nn.functional.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float(),
        input_ids_BT[:, 1:].reshape(-1),
        reduction="sum",
    )


class PolEvaluator:
    """Held-out loss of the base model plus any LoRA adapter, base loaded once.

    ``adapter_config`` is the LoRA config candidates are evaluated under (the factory's own,
    never a candidate's). An adapter of another config (for example a stacked-rank WiSE-FT
    adapter) is evaluated by passing its config to :meth:`loss`; a PEFT adapter slot is added
    for each distinct config.
    """

    def __init__(
        self,
        base_model_path: Path,
        heldout_path: Path,
        batch_size: int,
        num_batches: int,
        seed: int,
        adapter_config: dict[str, Any],
        base_model_sha256: str | None = None,
        cache_dir: Path | None = None,
    ):
        from datasets import load_from_disk
        from peft import get_peft_model

        from factory.base_model import load_base

        data = load_from_disk(str(heldout_path))
        if "input_ids" not in data.column_names:
            raise ValueError(f"heldout_path: {heldout_path} has no 'input_ids' column")
        self.blocks = torch.tensor(data["input_ids"], dtype=torch.long)
        if self.blocks.ndim != 2 or self.blocks.shape[1] < 2:
            raise ValueError("heldout_path: input_ids must be lists of one fixed length >= 2")
        self.batch_indices = heldout_batch_indices(
            self.blocks.shape[0], num_batches, batch_size, seed
        )
        model, _ = load_base(Path(base_model_path))
        self.adapter_config = dict(adapter_config)
        self._default = self._slot_name(self.adapter_config)
        self.model = get_peft_model(model, self._lora_config(adapter_config), self._default)
        self.model.eval()
        if cache_dir is not None and base_model_sha256 is None:
            raise ValueError("cache_dir: give base_model_sha256 too (it keys the loss cache)")
        self.plan_key = json_sha256(
            {
                "version": LOSS_CACHE_VERSION,
                "base_model_sha256": base_model_sha256 or str(Path(base_model_path).resolve()),
                "blocks_sha256": bytes_sha256(self.blocks.numpy().tobytes()),
                "blocks_shape": list(self.blocks.shape),
                "batch_indices": self.batch_indices,
                "dtype": str(next(model.parameters()).dtype),
            }
        )
        self.cache_dir = Path(cache_dir) / self.plan_key[:24] if cache_dir is not None else None
        self._memo: dict[str, list[float]] = {}
        self.forward_passes = 0  # evaluations actually run (not answered from a cache)

    @staticmethod
    def _slot_name(config: dict[str, Any]) -> str:
        return "cfg" + json_sha256(config)[:12]

    @staticmethod
    def _lora_config(config: dict[str, Any]):
        from peft import LoraConfig

        return LoraConfig.from_peft_type(**config)

    def _activate(self, config: dict[str, Any]) -> str:
        name = self._slot_name(config)
        if name not in self.model.peft_config:
            self.model.add_adapter(name, self._lora_config(config))
        self.model.set_adapter(name)
        return name

    def _load_weights(self, adapter: Adapter, slot: str) -> None:
        from factory.expert import parse_adapter_key

        expected = {
            n.replace(f".{slot}.", ".")
            for n, _ in self.model.named_parameters()
            if "lora_" in n and f".{slot}." in n
        }
        if set(adapter) != expected:
            missing, extra = sorted(expected - set(adapter)), sorted(set(adapter) - expected)
            raise ValueError(
                f"adapter keys do not match the config: missing {missing[:3]}, "
                f"unexpected {extra[:3]}"
            )
        with torch.no_grad():
            for key, tensor in adapter.items():
                _, _, part = parse_adapter_key(key)
                module = self.model.get_submodule(key.rsplit(".lora_", 1)[0])
                target = getattr(module, f"lora_{part}")[slot].weight
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"adapter[{key}]: shape {tuple(tensor.shape)}, "
                        f"expected {tuple(target.shape)}"
                    )
                target.copy_(tensor)

    @torch.inference_mode()
    def _batch_losses(self) -> list[float]:
        self.forward_passes += 1
        losses = []
        for indices in self.batch_indices:
            batch = self.blocks[indices]
            logits = self.model(input_ids=batch).logits
            losses.append(
                float(block_loss_sum(logits, batch)) / (batch.shape[0] * (batch.shape[1] - 1))
            )
        return losses

    def loss(self, adapter: Adapter | None, adapter_config: dict | None = None) -> LossReport:
        """Held-out loss with ``adapter`` (None: the base) under its config (default: ours)."""
        config = adapter_config or self.adapter_config
        key = "base" if adapter is None else adapter_key(adapter, config)
        per_batch = self._cached(key)
        if per_batch is None:
            if adapter is None:
                with self.model.disable_adapter():
                    per_batch = self._batch_losses()
            else:
                self._load_weights(adapter, self._activate(config))
                per_batch = self._batch_losses()
            self._store(key, per_batch)
        return LossReport(
            mean=mean_finite_loss(per_batch),
            per_batch=per_batch,
            batch_indices=[list(b) for b in self.batch_indices],
        )

    def _cached(self, key: str) -> list[float] | None:
        if key in self._memo:
            return list(self._memo[key])
        path = self.cache_dir / f"{key}.json" if self.cache_dir is not None else None
        if path is None or not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            per_batch = [float(x) for x in entry["per_batch"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # an unreadable entry is recomputed (and rewritten), never trusted
        if entry.get("plan_key") != self.plan_key or len(per_batch) != len(self.batch_indices):
            return None
        self._memo[key] = per_batch
        return list(per_batch)

    def _store(self, key: str, per_batch: list[float]) -> None:
        self._memo[key] = list(per_batch)
        if self.cache_dir is not None:
            atomic_write_json(
                self.cache_dir / f"{key}.json",
                {"plan_key": self.plan_key, "per_batch": [_json_float(x) for x in per_batch]},
            )


def adapter_key(adapter: Adapter, config: dict[str, Any]) -> str:
    """The loss cache's name for an adapter: sha256 over its tensors and its LoRA config."""
    return json_sha256({"tensors": tensors_sha256(adapter), "config": config})[:40]
