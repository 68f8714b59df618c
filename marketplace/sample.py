"""A sample catalog: small random LoRA experts on a local base model, for previews and tests.

``sample_catalog(base, folder, domains)`` writes one committed expert folder per domain (seeded
random LoRA factors on every MLP projection and random router rows, so each expert visibly
changes the base model's output) and returns a :class:`StaticCatalog` over them with made-up
benchmark rows, provenance and prices. ``taas marketplace serve --sample N`` uses it when no
library is configured.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path

import torch

from factory.base_model import BaseModelRef
from factory.expert import (
    LORA_TARGETS,
    Expert,
    ExpertManifest,
    adapter_key,
    lora_config_dict,
    save_expert,
)
from factory.hashing import tensors_sha256
from factory.ledger import Ledger
from infra.atomic import verify_committed
from marketplace.catalog import BenchmarkRow, CatalogEntry, Price, StaticCatalog

RANK = 4


def random_expert(base: BaseModelRef, name: str, domain: str, seed: int) -> Expert:
    config = json.loads((Path(base.path) / "config.json").read_text())
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    layers = config["num_hidden_layers"]
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }
    adapter = {}
    for layer in range(layers):
        for projection in LORA_TARGETS:
            fan_in, fan_out = shapes[projection]
            adapter[adapter_key(layer, projection, "A")] = (
                torch.randn(RANK, fan_in, generator=generator) * 0.5
            )
            adapter[adapter_key(layer, projection, "B")] = (
                torch.randn(fan_out, RANK, generator=generator) * 0.5
            )
    manifest = ExpertManifest(
        expert_id=name,
        domain=domain,
        version=1,
        base_model=base.name,
        base_model_sha256=base.sha256,
        adapter_sha256=tensors_sha256(adapter),
        rank=RANK,
        lora_alpha=float(2 * RANK),
        target_modules=sorted(LORA_TARGETS),
        num_layers=layers,
        provenance={
            "sample": True,
            "seed": seed,
            "base_licence": base.licence,
            "base_origin": base.origin,
        },
    )
    return Expert(
        manifest=manifest,
        adapter=adapter,
        adapter_config=lora_config_dict(RANK, float(2 * RANK)),
        router=torch.randn(layers, hidden, generator=generator),
    )


def sample_entry(
    base: BaseModelRef, name: str, domain: str, seed: int, cycles: int
) -> CatalogEntry:
    expert = random_expert(base, name, domain, seed)
    trained = date(2026, 1, 1) + timedelta(days=seed)
    return CatalogEntry(
        name=name,
        domain=domain,
        base_model=base.name,
        base_model_sha256=base.sha256,
        versions=["1"],
        champion="1",
        price=Price(
            per_token=Decimal("0.0002") * (1 + seed % 3),
            weight_fee=Decimal("750.00"),
            maintenance_fee=Decimal("120.00"),
            exclusive_premium=Decimal("9000.00"),
        ),
        licence="usage+weight+exclusive",
        pol_validated=True,
        pol_summary=f"mean score {0.01 * (1 + seed % 5):.4f} over {cycles} cycles",
        cycles=cycles,
        last_trained=trained.isoformat(),
        dataset_sha256=f"{seed:064x}",
        adapter_sha256=expert.manifest.adapter_sha256,
        contributors={"line-0": "0.6", "line-1": "0.4"},
        benchmarks=[
            BenchmarkRow(f"{domain}_qa", "acc", 0.40 + 0.05 * (seed % 4), 0.31),
            BenchmarkRow("general_ppl", "word_perplexity", 41.0 + seed % 3, 40.2, False),
        ],
        model_card=f"# {name}\n\nA sample {domain} expert (random LoRA, seed {seed}).",
        champion_history=[("1", trained.isoformat())],
    )


def sample_catalog(
    base: BaseModelRef, folder: Path, domains: list[str], cycles: int = 3
) -> StaticCatalog:
    """One expert ``<domain>-expert`` per domain, written under ``folder`` (reused if present)."""
    entries, folders = [], {}
    for seed, domain in enumerate(domains):
        name = f"{domain}-expert"
        target = Path(folder) / name / "1"
        if not verify_committed(target):
            save_expert(target, random_expert(base, name, domain, seed), overwrite=True)
        entries.append(sample_entry(base, name, domain, seed, cycles))
        folders[(name, "1")] = target
    return StaticCatalog(entries, folders)


def record_sample_shares(ledger: Ledger, catalog: StaticCatalog) -> None:
    """Records each sample entry's contributors as its champion's shares (idempotent)."""
    for entry in catalog.entries():
        for contributor in entry.contributors:
            # sample contributors sign nothing; the placeholder key only satisfies the table
            ledger.register_contributor(contributor, "sample", kind="external")
        shares = {who: Decimal(share) for who, share in entry.contributors.items()}
        ledger.record_shares(entry.name, "sample", shares, {}, expert_version=entry.champion)
