"""The named steps of the commission flow after the cycles: compose, benchmark, gate, register.

Each step reads and writes committed folders under ``<home>/commissions/<id>/`` and returns a
small JSON-able dict, so a rerun of a crashed flow skips what is already done.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from factory.commission import PRICE_TAGS, CommissionSpec
from factory.commission_store import CommissionStore
from factory.expert import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    Expert,
    ExpertManifest,
    load_expert,
    read_adapter,
    save_expert,
)
from factory.hashing import json_sha256, tensors_sha256
from infra.atomic import atomic_write_json, verify_committed
from infra.settings import Settings

REPLAY_ROWS = 64  # training rows kept with an expert so later compositions can replay its domain
ROUTER_TOLERANCE = 0.05  # relative loss change allowed by the router acceptance check
REPLAY_BLOCKS = 32


@dataclass(frozen=True)
class Job:
    """One running commission: its ids, folders, base model and MLflow run."""

    commission_id: str
    expert_id: str
    root: Path
    spec_sha256: str
    dataset_sha256: str
    base_model_name: str
    base_model_path: Path
    base_model_sha256: str
    data_dir: Path
    general_dir: Path
    parent_dir: Path | None
    run_id: str
    tracking_uri: str

    def log_cycle(self, settings: Settings, result: dict[str, Any]) -> None:
        from infra import tracking

        t = tracking.configure(settings)
        step = int(result["cycle"])
        metrics = {f"pol.{line}": score for line, score in result["pol"].items()}
        metrics["cycle.rejections"] = len(result["rejections"])
        for key in ("heldout_loss_before", "heldout_loss_after", "alpha", "recompress_error"):
            if result.get(key) is not None:
                metrics[f"cycle.{key}"] = float(result[key])
        tracking.log_metrics(t, self.run_id, metrics, step=step)
        cycle_dir = self.root / "cycles" / f"cycle-{step}"
        for name in ("cycle.json", "alpha_curve.png"):
            if (cycle_dir / name).exists():
                tracking.log_artifacts(t, self.run_id, cycle_dir / name, f"cycles/cycle-{step}")

    def fail(self, settings: Settings, exc: BaseException) -> None:
        from infra import tracking

        store = CommissionStore(settings.db_url)
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:500]
        state = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            if store.get(self.commission_id).state != "cancelled":
                store.set_state(self.commission_id, state, detail)
        finally:
            tracking.end_run(tracking.configure(settings), self.run_id, "FAILED")

    def finish(self, settings: Settings, registered: dict[str, Any] | None) -> None:
        from infra import tracking

        store = CommissionStore(settings.db_url)
        if registered:
            store.set_state(self.commission_id, "registered", f"{registered['name']} "
                            f"v{registered['version']}")  # fmt: skip
        else:
            store.set_state(self.commission_id, "failed", "no cycle improved the held-out loss")
        tracking.end_run(tracking.configure(settings), self.run_id)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "x"


def open_job(
    intake: dict[str, Any], spec: CommissionSpec, settings: Settings, warm_start: str | None = None
) -> Job:
    """Marks the commission running, opens (or reopens) its MLflow run, packs the general set,
    and stages the warm-start expert (at the commission's LoRA rank) when one is named."""
    from factory.base_model import PRESETS, base_model_sha256
    from factory.corpus import general_heldout_text
    from factory.data.packing import pack_rows
    from infra import tracking

    commission_id = intake["commission_id"]
    root = settings.home / "commissions" / commission_id
    store = CommissionStore(settings.db_url)
    if store.get(commission_id).state != "running":
        store.set_state(commission_id, "running")
    base_path = Path(intake["base_model_path"])
    general = pack_rows(
        general_heldout_text(), base_path, intake["seq_len"], settings.home / "cache" / "packs"
    )
    parent_dir = _stage_warm_start(root, spec, settings, warm_start) if warm_start else None
    t = tracking.configure(settings)
    run_file = root / "mlflow_run.json"
    run_id = json.loads(run_file.read_text())["run_id"] if run_file.exists() else None
    if run_id is None:
        run_id = tracking.start_run(
            t,
            f"commission-{commission_id}",
            {"commission_id": commission_id, "domain": spec.domain},  # fmt: skip
        )
        atomic_write_json(run_file, {"run_id": run_id})
        tracking.log_params(t, run_id, {
            "spec_sha256": intake["spec_sha256"], "dataset_sha256": intake["dataset_sha256"],
            **{f"spec.{k}": v for k, v in spec.model_dump(mode="json").items()},
        })  # fmt: skip
    return Job(
        commission_id=commission_id,
        expert_id=f"{slug(spec.domain)}-{slug(spec.customer)}",
        root=root,
        spec_sha256=intake["spec_sha256"],
        dataset_sha256=intake["dataset_sha256"],
        base_model_name=PRESETS[spec.base_model.preset].name,
        base_model_path=base_path,
        base_model_sha256=base_model_sha256(base_path),
        data_dir=Path(intake["data_dir"]),
        general_dir=general.path,
        parent_dir=parent_dir,
        run_id=run_id,
        tracking_uri=settings.tracking_uri,
    )


def _stage_warm_start(root: Path, spec: CommissionSpec, settings: Settings, name: str) -> Path:
    """Downloads a library expert and re-compresses it to the spec's rank when it differs."""
    from factory.expert import lora_config_dict, write_adapter_files
    from factory.library import ExpertLibrary
    from infra.atomic import committed_dir
    from merging.lora_algebra import recompress, rescale_to_config

    folder = root / "warm_start"
    if verify_committed(folder):
        return folder
    name, _, ref = name.partition("@")
    source = ExpertLibrary(settings).download(name, ref or "champion", root / "warm_start.src",
                                              overwrite=True)  # fmt: skip
    expert = load_expert(source)
    adapter, config = expert.adapter, expert.adapter_config
    if int(config["r"]) != spec.expert.rank:
        packed = recompress(adapter, config, spec.expert.rank)
        adapter, config = packed.adapter, packed.adapter_config
    target = lora_config_dict(spec.expert.rank, spec.expert.alpha, tuple(config["target_modules"]))
    with committed_dir(folder, overwrite=True) as tmp:
        write_adapter_files(tmp, rescale_to_config(adapter, config, target), target)
    return folder


def build_expert(job: Job, spec: CommissionSpec, cycles: list[dict[str, Any]]) -> Path:
    """The adapter folder of the last accepted version; ValueError when no cycle improved."""
    accepted = [c for c in cycles if c["improved"]]
    if not accepted:
        if job.parent_dir is not None:
            return job.parent_dir
        raise ValueError(
            f"commission {job.commission_id}: no cycle lowered the held-out loss; add data or "
            "raise budget.steps_per_cycle"
        )
    return job.root / "cycles" / f"cycle-{accepted[-1]['cycle']}"


def _blocks(path: Path, limit: int | None = None) -> torch.Tensor:
    from datasets import load_from_disk

    data = load_from_disk(str(path))
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return torch.tensor(data["input_ids"], dtype=torch.long)


def _library_experts(job: Job, settings: Settings) -> list[Expert]:
    """The champions of the library's other experts on the same base model."""
    from factory.library import ExpertLibrary

    library = ExpertLibrary(settings)
    experts = []
    for version in library.list():
        if version.name == job.expert_id or "champion" not in version.aliases:
            continue
        if version.tags.get("base_model_sha256") != job.base_model_sha256:
            continue
        folder = job.root / "library" / version.name
        if not verify_committed(folder):
            library.download(version.name, "champion", folder, overwrite=True)
        experts.append(load_expert(folder))
    return experts


def _replay_blocks(expert: Expert, tokenizer, seq_len: int) -> torch.Tensor | None:
    path = expert.path / "replay.jsonl" if expert.path else None
    if path is None or not path.exists():
        return None
    rows = [json.loads(line)["text"] for line in path.read_text().splitlines() if line]
    ids: list[int] = []
    for row in rows:
        ids += tokenizer(row)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len) if n else None


def compose(job: Job, spec: CommissionSpec, adapter_dir: Path, settings: Settings) -> dict:
    """Router annealing into the library's mixture, the acceptance check, the expert folder."""
    from factory.base_model import load_base
    from factory.mixture import MixtureModel
    from merging.router_annealing import (
        AnnealConfig,
        accept_addition,
        anneal_router,
        routing_heatmap,
        routing_stats,
    )

    out = job.root / "composed"
    if (out / "compose.json").exists() and verify_committed(out / "expert"):
        return json.loads((out / "compose.json").read_text())
    base, tokenizer = load_base(job.base_model_path)
    adapter = read_adapter(adapter_dir / ADAPTER_FILE)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
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
        },  # fmt: skip
    )
    expert = Expert(
        manifest, adapter, config, torch.zeros(manifest.num_layers, base.config.hidden_size)
    )
    existing = _library_experts(job, settings)
    before = MixtureModel.from_experts(base, existing, top_k=spec.router.top_k)
    if existing and existing[-1].path and (existing[-1].path / "null_route.safetensors").exists():
        from safetensors.torch import load_file

        before.load_null_route(load_file(str(existing[-1].path / "null_route.safetensors")))
    heldout = _blocks(job.data_dir / "heldout")
    general = _blocks(job.general_dir)
    replay = {"general": general[:REPLAY_BLOCKS]}
    heldout_by_domain = {job.expert_id: heldout, "general": general}
    for other in existing:
        blocks = _replay_blocks(other, tokenizer, heldout.shape[1])
        if blocks is not None:
            replay[other.manifest.expert_id] = blocks[:REPLAY_BLOCKS]
            heldout_by_domain[other.manifest.expert_id] = blocks
    cfg = AnnealConfig(
        steps=max(1, spec.router.steps),
        lr=5e-2,
        seed=spec.seed,
        temperature_start=spec.router.temperature_start,
        temperature_end=min(spec.router.temperature_end, spec.router.temperature_start),
        schedule=spec.router.schedule,
        load_balance=spec.router.load_balance,
        top_k=spec.router.top_k,
        # Library experts keep the rows they were registered with, so a mixture loaded from
        # the library reproduces the one accepted here.
        train_existing_rows=False,
    )
    result = anneal_router(before, expert, _blocks(job.data_dir / "train", 256), replay, cfg)
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
    _save_composed_expert(out / "expert", final, result.null_route, job.data_dir / "train.jsonl")
    summary = {
        "expert_dir": str(out / "expert"),
        "accepted": accepted,
        "acceptance": report,
        "routing_stats": stats,
        "members": [e.manifest.expert_id for e in existing] + [job.expert_id],
        "base_heldout_loss": base_loss,
        "expert_heldout_loss": expert_alone,
        "mixture_heldout_loss": report["new"]["mixture_loss"],
        "router_loss_curve": result.loss_curve,
        "plots": [str(heatmap)],
    }
    atomic_write_json(out / "compose.json", summary)
    return summary


def _save_composed_expert(folder: Path, expert: Expert, null_route: dict, train_jsonl: Path):
    """Saves the expert plus the mixture's null route and a replay sample of its domain."""
    from safetensors.torch import save as safetensors_bytes

    rows = train_jsonl.read_text().splitlines()[:REPLAY_ROWS]
    extras = {
        "null_route.safetensors": safetensors_bytes(
            {k: v.detach().contiguous() for k, v in null_route.items()}
        ),
        "replay.jsonl": "".join(r + "\n" for r in rows).encode("utf-8"),
    }
    save_expert(folder, expert, overwrite=True, extra_files=extras)


def benchmark(job: Job, spec: CommissionSpec, composed: dict, settings: Settings) -> dict:
    """lm-eval on the commission's held-out perplexity, its own tasks and the general tasks:
    base, expert and mixture (and the current champion, when there is one) in one run."""
    from evaluation.benchmark import (
        GENERAL_TASKS,
        BenchmarkResult,
        make_perplexity_task,
        prepare_tasks,
    )
    from factory.base_model import load_base
    from factory.mixture import MixtureModel
    from tasks.benchmarking import benchmark_task

    results_path = job.root / "bench" / "results.json"
    if results_path.exists():
        return BenchmarkResult.load(results_path).to_dict()
    general_dir = prepare_tasks(settings.home / "cache")
    task_name = "heldout_" + job.expert_id.replace("-", "_")
    own = make_perplexity_task(
        job.data_dir / "heldout.jsonl", task_name, job.root / "bench" / "tasks"
    )
    base, _ = load_base(job.base_model_path)
    expert = load_expert(Path(composed["expert_dir"]))
    mixture = MixtureModel.from_experts(base, [*_library_experts(job, settings), expert],
                                        top_k=spec.router.top_k)  # fmt: skip
    from safetensors.torch import load_file

    mixture.load_null_route(load_file(str(Path(composed["expert_dir"]) / "null_route.safetensors")))
    models: dict[str, Any] = {"base": None, "expert": composed["expert_dir"], "mixture": mixture}
    champion = _champion_folder(job, settings)
    if champion is not None:
        models["champion"] = str(champion)
    tasks = [task_name, *GENERAL_TASKS, *spec.benchmarks.tasks]
    result = benchmark_task(
        job.base_model_path, models, tasks, [general_dir, own.parent], results_path
    )
    return result.to_dict()


def _champion_folder(job: Job, settings: Settings) -> Path | None:
    from factory.library import ExpertLibrary

    library = ExpertLibrary(settings)
    try:
        version = library.show(job.expert_id, "champion")
    except (ValueError, LookupError):
        return None
    folder = job.root / "champion"
    if not verify_committed(folder):
        library.download(version.name, "champion", folder, overwrite=True)
    return folder


def plot_pol(job: Job, cycles: list[dict[str, Any]]) -> str:
    """Bar chart of Proof-of-Loss score per line per cycle (PNG)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from infra.atomic import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(6, 3.2))
    lines = sorted({line for c in cycles for line in c["pol"]})
    width = 0.8 / max(1, len(lines))
    for k, line in enumerate(lines):
        xs = [c["cycle"] + k * width for c in cycles]
        ax.bar(xs, [c["pol"].get(line, 0.0) for c in cycles], width, label=line)
    ax.set_xlabel("cycle")
    ax.set_ylabel("PoL score (loss drop)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    path = job.root / "plots" / "pol_per_line.png"
    atomic_write_bytes(path, buffer.getvalue())
    return str(path)


def _scores(table: dict, model: str, tasks: list[str]) -> dict[str, float]:
    return {
        f"{task}/{metric}": value
        for task in tasks
        for metric, value in table.get(model, {}).get(task, {}).items()
    }


def gate_and_register(job, spec, cycles, composed, bench, plots, settings) -> dict[str, Any]:
    """Registers the expert (alias challenger); promotes it to champion only through the gate."""
    from decimal import Decimal

    from evaluation.benchmark import GENERAL_TASKS
    from evaluation.proof_of_loss import PolEvaluator
    from factory.library import ExpertLibrary, GateInputs
    from flows.cycle import pol_plan
    from merging.rewards import reward_shares
    from tasks.registration import promote_task, register_task

    expert_dir = Path(composed["expert_dir"])
    expert = load_expert(expert_dir)
    # A contributor's share of the version: its shares summed over the cycles, renormalized.
    totals: dict[str, float] = {}
    for cycle in cycles:
        for contributor, share in cycle["shares"].items():
            totals[contributor] = totals.get(contributor, 0.0) + float(Decimal(share))
    shares = {k: str(v) for k, v in reward_shares(totals).items()} if totals else {}
    provenance = {
        "commission_id": job.commission_id,
        "dataset_sha256": job.dataset_sha256,
        "config_hash": json_sha256({"spec": job.spec_sha256}),
        "pol_scores": {f"cycle-{c['cycle']}/{k}": v for c in cycles for k, v in c["pol"].items()},
        "wise_ft_alpha": next((c["alpha"] for c in reversed(cycles) if c["improved"]), None),
        "cycles": len(cycles),
        "contributors": shares,
        "licence": spec.licence.type if spec.licence else "usage",
        "visibility": "public" if spec.visibility == "public" else "private",
        "parent_adapter_sha256": cycles[0]["parent_adapter_sha256"] or "",
        # The licence section's prices (decimal strings); unset ones are left to the catalog.
        **{
            key: getattr(spec.licence, key)
            for key in PRICE_TAGS
            if spec.licence is not None and getattr(spec.licence, key) is not None
        },
    }
    version = register_task(settings, expert_dir, provenance, bench, [Path(p) for p in plots],
                            job.run_id)  # fmt: skip
    # PoL gain over the champion (or the base) on the same seeded held-out batches.
    plan = pol_plan(len(_blocks(job.data_dir / "heldout")), spec.seed, len(cycles) + 1)
    evaluator = PolEvaluator(job.base_model_path, job.data_dir / "heldout", plan["batch_size"],
                             plan["num_batches"], plan["seed"], expert.adapter_config)  # fmt: skip
    candidate_loss = evaluator.loss(expert.adapter, expert.adapter_config)
    champion = _champion_folder(job, settings)
    if champion is not None:
        reference = load_expert(champion)
        reference_loss = evaluator.loss(reference.adapter, reference.adapter_config)
    else:
        reference_loss = evaluator.loss(None)
    batches = json_sha256(candidate_loss.batch_indices)
    table = bench["table"]
    domain_tasks = [t for t in bench["tasks"] if t.startswith("heldout_")] + list(
        spec.benchmarks.tasks
    )
    general_tasks = list(GENERAL_TASKS)
    reference_model = "champion" if champion is not None else "base"
    # Domain tasks judge the expert itself; general tasks judge the deployed mixture, where
    # general text routes to the base (an expert alone is not meant to be a general model).
    gate = GateInputs(
        candidate_heldout_loss=candidate_loss.mean,
        reference_heldout_loss=reference_loss.mean,
        candidate_batches_sha256=batches,
        reference_batches_sha256=json_sha256(reference_loss.batch_indices),
        candidate_benchmarks={
            **_scores(table, "expert", domain_tasks),
            **_scores(table, "mixture", general_tasks),
        },  # fmt: skip
        reference_benchmarks={
            **_scores(table, reference_model, domain_tasks),
            **_scores(table, "base", general_tasks),
        },  # fmt: skip
        other_domain_losses_before={
            k: v["before"] for k, v in composed["acceptance"]["existing"].items()
        },
        other_domain_losses_after={
            k: v["after"] for k, v in composed["acceptance"]["existing"].items()
        },
    )
    decision = promote_task(settings, version.name, version.version, gate)
    shown = ExpertLibrary(settings).show(version.name, version.version)
    return {
        "name": shown.name,
        "version": shown.version,
        "aliases": sorted(shown.aliases),
        "promoted": decision.promote,
        "gate_reasons": decision.reasons,
        "pol_gain_over_reference": decision.pol_gain,
    }
