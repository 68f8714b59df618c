"""Prefect tasks for composition: stage the library's experts, then compose the new expert.

:func:`build_expert` picks the last accepted cycle's adapter. :func:`stage_library` downloads
(once; committed folders are reused) the champions of the library's other experts on the same
base model, and the commission's own current champion.
:func:`compose` anneals the new expert's router row into that mixture, checks that no other
domain regresses, and writes the composed expert folder (adapter, router row, the mixture's null
route, a replay sample) plus ``compose.json`` (:class:`ComposeResult`) and a routing heatmap.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from factory.commission import CommissionSpec
from factory.expert import ADAPTER_CONFIG, ADAPTER_FILE, Expert, ExpertManifest
from infra.atomic import atomic_write_text, verify_committed
from infra.settings import Settings
from tasks.cycle_commit import CycleResult
from tasks.job import Job

REPLAY_ROWS = 64  # training rows kept with an expert so later compositions can replay its domain
ROUTER_TOLERANCE = 0.05  # relative loss change allowed by the router acceptance check
REPLAY_BLOCKS = 32
COMPOSE_FILE = "compose.json"


class LibrarySnapshot(BaseModel):
    """Local folders of the library's champions this commission composes with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experts: list[Path]  # the other experts' champions on the same base model, library order
    champion: Path | None  # this expert's own champion, when it has one


class DomainCheck(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    before: float
    after: float
    relative_change: float
    ok: bool


class NewExpertCheck(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expert_id: str
    mixture_loss: float
    expert_alone_loss: float
    relative_gap: float
    ok: bool


class Acceptance(BaseModel):
    """:func:`merging.router_annealing.accept_addition`'s report."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tolerance: float
    new: NewExpertCheck
    existing: dict[str, DomainCheck]
    accepted: bool


class ComposeResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    expert_dir: Path
    accepted: bool
    acceptance: Acceptance
    routing_stats: dict[str, dict[str, float]]  # domain -> route -> share of its tokens
    members: list[str]
    base_heldout_loss: float
    expert_heldout_loss: float
    mixture_heldout_loss: float
    router_loss_curve: list[float]
    plots: list[Path]


@task(name="build-expert", cache_policy=NO_CACHE)
def build_expert(job: Job, cycles: list[CycleResult]) -> Path:
    """The adapter folder of the last accepted version; ValueError when no cycle improved."""
    accepted = [c for c in cycles if c.improved]
    if not accepted:
        if job.parent_dir is not None:
            return job.parent_dir
        raise ValueError(
            f"commission {job.commission_id}: no cycle lowered the held-out loss; add data or "
            "raise budget.steps_per_cycle"
        )
    return job.cycle_dir(accepted[-1].cycle)


@task(name="stage-library", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def stage_library(job: Job, settings: Settings) -> LibrarySnapshot:
    """Downloads the champions composition, benchmarks and the gate compare against."""
    from factory.library.registry import ExpertLibrary
    from factory.replay import stage_replay
    from infra.storage import open_store

    library = ExpertLibrary(settings)
    store = open_store(settings.objects_url, settings.s3_endpoint_url)
    experts = []
    for version in library.list():
        if version.name == job.expert_id or "champion" not in version.aliases:
            continue
        if version.tags.get("base_model_sha256") != job.base_model_sha256:
            continue
        folder = job.root / "library" / version.name
        if not verify_committed(folder):
            library.download(version.name, "champion", folder, overwrite=True)
        stage_replay(store, folder)  # its replay rows, kept by the factory, beside the folder
        experts.append(folder)
    champion = None
    try:
        library.show(job.expert_id, "champion")
    except (ValueError, LookupError):
        pass  # a first version: there is no champion to compare against
    else:
        champion = job.root / "champion"
        if not verify_committed(champion):
            library.download(job.expert_id, "champion", champion, overwrite=True)
    return LibrarySnapshot(experts=experts, champion=champion)


def blocks(path: Path, limit: int | None = None) -> torch.Tensor:
    """A packed dataset's token blocks [N, T] (the first ``limit``)."""
    from datasets import load_from_disk

    data = load_from_disk(str(path))
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return torch.tensor(data["input_ids"], dtype=torch.long)


def replay_rows(expert: Expert) -> list[str]:
    """The replay sample of a library expert, staged beside its folder (none without one)."""
    from factory.replay import read_staged

    return read_staged(expert.path) if expert.path else []


def _replay_blocks(expert: Expert, tokenizer, seq_len: int) -> torch.Tensor | None:
    ids: list[int] = []
    for row in replay_rows(expert):
        ids += tokenizer(row)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len) if n else None


def save_composed_expert(folder: Path, expert: Expert, null_route: dict, train_jsonl: Path) -> None:
    """Saves the expert plus the mixture's null route; a replay sample of its domain goes beside
    the folder, never into it (customer text stays out of every bundle: factory.replay)."""
    from safetensors.torch import save as safetensors_bytes

    from factory.expert import save_expert
    from factory.replay import sample_rows, write_sidecar

    extras = {
        "null_route.safetensors": safetensors_bytes(
            {k: v.detach().contiguous() for k, v in null_route.items()}
        ),
    }
    save_expert(folder, expert, overwrite=True, extra_files=extras)
    write_sidecar(folder, sample_rows(train_jsonl, REPLAY_ROWS))


@task(name="compose", cache_policy=NO_CACHE, persist_result=False)
def compose(
    job: Job, spec: CommissionSpec, adapter_dir: Path, library: LibrarySnapshot
) -> ComposeResult:
    """Router annealing into the library's mixture, the acceptance check, the expert folder."""
    from factory.base_model import base_model_ref, load_base
    from factory.expert import load_expert, read_adapter
    from factory.hashing import tensors_sha256
    from factory.mixture import load_mixture
    from merging.router_annealing import (
        AnnealConfig,
        accept_addition,
        anneal_router,
        routing_heatmap,
        routing_stats,
    )

    out = job.root / "composed"
    if (out / COMPOSE_FILE).exists() and verify_committed(out / "expert"):
        return ComposeResult.model_validate_json((out / COMPOSE_FILE).read_text())
    base, tokenizer = load_base(job.base_model_path)
    adapter = read_adapter(adapter_dir / ADAPTER_FILE)
    # The library expert names its base for peft (AutoPeftModelForCausalLM loads it from there).
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base_ref = base_model_ref(job.base_model_path, spec.base_model)
    config = {**config, "task_type": "CAUSAL_LM",
              "base_model_name_or_path": str(Path(job.base_model_path).resolve())}  # fmt: skip
    manifest = ExpertManifest(
        expert_id=job.expert_id,
        domain=spec.domain,
        version=len(list((job.root / "cycles").glob("cycle-*[0-9]"))),
        base_model=job.base_model_name,
        base_model_sha256=job.base_model_sha256,
        adapter_sha256=tensors_sha256(adapter),
        rank=int(config["r"]),
        lora_alpha=float(config["lora_alpha"]),
        target_modules=sorted(config["target_modules"]),
        num_layers=base.config.num_hidden_layers,
        provenance={
            "commission_id": job.commission_id,
            "dataset_sha256": job.dataset_sha256,
            "spec_sha256": job.spec_sha256,
            # The card's licence and base name (an adapter inherits its base's terms).
            "base_licence": base_ref.licence,
            "base_origin": base_ref.origin,
        },  # fmt: skip
    )
    expert = Expert(
        manifest, adapter, config, torch.zeros(manifest.num_layers, base.config.hidden_size)
    )
    existing = [load_expert(folder) for folder in library.experts]
    before = load_mixture(base, library.experts, top_k=spec.router.top_k)
    # The router checks read a bounded sample of each held-out set (spec heldout.eval_blocks):
    # on a 30-layer base a full general set costs minutes per mixture evaluated.
    heldout = blocks(job.data_dir / "heldout", spec.heldout.eval_blocks)
    general = blocks(job.general_dir, spec.heldout.eval_blocks)
    replay = {"general": general[:REPLAY_BLOCKS]}
    heldout_by_domain = {job.expert_id: heldout, "general": general}
    for other in existing:
        other_blocks = _replay_blocks(other, tokenizer, heldout.shape[1])
        if other_blocks is not None:
            replay[other.manifest.expert_id] = other_blocks[:REPLAY_BLOCKS]
            heldout_by_domain[other.manifest.expert_id] = other_blocks
    # Library experts keep the rows they were registered with, so a mixture loaded from the
    # library reproduces the one accepted here.
    cfg = AnnealConfig.for_commission(spec.router, seed=spec.seed, train_existing_rows=False)
    # New-domain blocks for the centroid and the router's batches: 8 per step (at least 64, at
    # most 256), so a short annealing does not pay for a full pass over the training set.
    train = blocks(job.data_dir / "train", min(256, 8 * max(8, cfg.steps)))
    result = anneal_router(before, expert, train, replay, cfg)
    with result.mixture.forced_route(job.expert_id):
        expert_alone = result.mixture.lm_loss(heldout)
    with result.mixture.forced_route("base"):
        base_loss = result.mixture.lm_loss(heldout)
    accepted, report = accept_addition(
        before, result.mixture, expert, heldout_by_domain, expert_alone, ROUTER_TOLERANCE
    )
    stats = routing_stats(
        result.mixture, {k: v[:REPLAY_BLOCKS] for k, v in heldout_by_domain.items()}
    )
    out.mkdir(parents=True, exist_ok=True)
    heatmap = routing_heatmap(stats, out / "routing_heatmap.png")
    final = result.annealed_expert(expert)
    save_composed_expert(out / "expert", final, result.null_route, job.data_dir / "train.jsonl")
    composed = ComposeResult(
        expert_dir=out / "expert",
        accepted=accepted,
        acceptance=Acceptance.model_validate(report),
        routing_stats=stats,
        members=[e.manifest.expert_id for e in existing] + [job.expert_id],
        base_heldout_loss=base_loss,
        expert_heldout_loss=expert_alone,
        mixture_heldout_loss=report["new"]["mixture_loss"],
        router_loss_curve=result.loss_curve,
        plots=[Path(heatmap)],
    )
    atomic_write_text(out / COMPOSE_FILE, composed.model_dump_json(indent=2))
    return composed
