"""``warm_start: auto``: pick the library expert the commission's lines start from.

:func:`choose_warm_start` ranks the library's candidates (each expert's champion, else latest
version, on the commission's base model, public or the commission's own customer's, and not
under another buyer's exclusive licence) by loss on the commission's own held-out split against
the bare base (:func:`evaluation.library_match.match_sample`). The best one is taken only when
its mean per-batch loss is at least ``margin`` (default
:data:`evaluation.library_match.WARM_START_MARGIN`) nats per token below the base's. The ranking
is written to ``<commission>/warm_start.json`` (atomic) so the choice can be audited.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from evaluation.library_match import WARM_START_MARGIN, match_sample
from infra.atomic import atomic_write_text
from infra.settings import Settings

WARM_START_FILE = "warm_start.json"


class WarmStartChoice(BaseModel):
    """The auto warm start's ranking and what it chose ("" for the base)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    chosen: str  # "name@version", or "" when no candidate beat the base by the margin
    margin: float
    base_loss: float
    ranking: list[tuple[str, float, float, float]]  # (name@version, loss, delta, stderr)


def exclusive_owners(db_url: str) -> dict[str, str]:
    """expert name -> buyer id of every active exclusive licence in the ledger database ({}
    before the marketplace made its tables). Read with plain SQL: the factory never imports
    the marketplace."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(db_url)
    try:
        if "licences" not in inspect(engine).get_table_names():
            return {}
        query = text(
            "SELECT expert_name, buyer_id FROM licences "
            "WHERE kind = 'exclusive' AND revoked_at IS NULL"
        )
        with engine.connect() as conn:
            return {name: buyer for name, buyer in conn.execute(query)}
    finally:
        engine.dispose()


def choose_warm_start(
    root: Path,
    customer: str,
    base_model_path: Path,
    heldout_dir: Path,
    settings: Settings,
    margin: float = WARM_START_MARGIN,
) -> WarmStartChoice:
    from datasets import load_from_disk

    from factory.base_model import base_model_sha256, load_base
    from factory.customer import OWNER_TAG, customer_id_for
    from factory.expert import load_expert
    from factory.library.registry import ExpertLibrary

    library = ExpertLibrary(settings)
    base_sha = base_model_sha256(base_model_path)
    owners = exclusive_owners(settings.db_url)
    own = customer_id_for(customer)
    candidates = [
        v
        for v in library.list()
        if v.tags.get("base_model_sha256") == base_sha
        and (
            v.tags.get("visibility") == "public" or library.model_tags(v.name).get(OWNER_TAG) == own
        )
        and owners.get(v.name, customer) == customer
    ]
    experts, refs = [], {}
    for v in candidates:
        folder = library.download(v.name, v.version, root / "warm_start.candidates" / v.name,
                                  overwrite=True)  # fmt: skip
        expert = load_expert(folder)
        ref = f"{v.name}@{v.version}"
        refs[ref] = v
        manifest = expert.manifest.model_copy(update={"expert_id": ref})
        experts.append(replace(expert, manifest=manifest))
    blocks = load_from_disk(str(heldout_dir)).with_format("torch")[:]["input_ids"].long()
    model, _ = load_base(base_model_path)
    model.eval()
    found = match_sample(model, experts, blocks)
    best = found.best(margin)
    choice = WarmStartChoice(
        chosen=best.expert_id if best else "",
        margin=margin,
        base_loss=found.base_loss,
        ranking=[(c.expert_id, c.loss, c.delta, c.delta_stderr) for c in found.candidates],
    )
    atomic_write_text(root / WARM_START_FILE, choice.model_dump_json(indent=2))
    return choice
