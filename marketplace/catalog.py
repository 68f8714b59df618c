"""What the marketplace knows about each expert: the :class:`Catalog` protocol and two sources.

A :class:`CatalogEntry` carries exactly what the pages, the API and the downloads need. Names from
requests are only ever looked up here (``get``); a folder path comes from the catalog's own
``expert_folder``, never from request text. :class:`StaticCatalog` holds entries given in code
(tests, demos); :class:`LibraryCatalog` reads the MLflow-backed expert library
(:mod:`factory.library`), mapping its registration tags to entries; the registered model's
price tags (set by ``taas marketplace price``) override the version's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol

from factory.commission import PRICE_TAGS, price_amount
from factory.customer import OWNER_TAG

log = logging.getLogger(__name__)
# What an expert registered without a price costs.
DEFAULT_PRICES = {
    "price_per_1k_tokens": "0.1",
    "weight_fee": "500.00",
    "maintenance_fee": "100.00",
    "exclusive_premium": "5000.00",
}


@dataclass(frozen=True)
class Price:
    """Prices in the marketplace currency; Decimal, never float."""

    per_token: Decimal
    weight_fee: Decimal
    maintenance_fee: Decimal  # per year
    exclusive_premium: Decimal


@dataclass(frozen=True)
class BenchmarkRow:
    task: str
    metric: str
    expert: float
    base: float | None  # None when the base model's result was not recorded
    higher_is_better: bool = True


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    domain: str
    base_model: str
    base_model_sha256: str
    versions: list[str]  # oldest first
    champion: str  # the version served and sold
    price: Price
    licence: str  # licence terms offered, e.g. "usage+weight+exclusive"
    pol_validated: bool  # the champion passed Proof-of-Loss validation
    pol_summary: str  # e.g. "mean score 0.041 over 3 cycles"
    cycles: int
    last_trained: str  # ISO-8601 (UTC) date or timestamp of the end of training; "" unknown
    dataset_sha256: str
    adapter_sha256: str
    contributors: dict[str, str]  # contributor -> share (exact decimal string)
    benchmarks: list[BenchmarkRow]
    model_card: str
    champion_history: list[tuple[str, str]]  # (version, ISO-8601 UTC time promoted), oldest first
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def base_licence(self) -> str:
        """The base model's own licence ("" when the version did not record it)."""
        return self.tags.get("base_licence", "")

    @property
    def base_origin(self) -> str:
        """Where the base model came from ("" when the version did not record it)."""
        return self.tags.get("base_origin", "")

    @property
    def private(self) -> bool:
        """Registered with a visibility other than public (an exclusive commission): shown only
        to the buyer holding its exclusive licence (see :meth:`Market.visible`)."""
        return self.tags.get("visibility", "public") != "public"

    def matches(self, query: str) -> bool:
        text = " ".join([self.name, self.domain, self.base_model, self.model_card]).lower()
        return all(word in text for word in query.lower().split())


class Catalog(Protocol):
    def entries(self) -> list[CatalogEntry]: ...

    def get(self, name: str) -> CatalogEntry | None: ...

    def expert_folder(self, name: str, version: str) -> Path: ...


class StaticCatalog:
    """Entries and their expert folders given in code."""

    def __init__(self, entries: list[CatalogEntry], folders: dict[tuple[str, str], Path]):
        self._entries = {entry.name: entry for entry in entries}
        self._folders = dict(folders)

    def entries(self) -> list[CatalogEntry]:
        return sorted(self._entries.values(), key=lambda e: (e.domain, e.name))

    def get(self, name: str) -> CatalogEntry | None:
        return self._entries.get(name)

    def expert_folder(self, name: str, version: str) -> Path:
        try:
            return self._folders[(name, version)]
        except KeyError:
            raise LookupError(f"no folder for {name} version {version}") from None


def _json_tag(tags: dict[str, str], key: str, default: Any) -> Any:
    try:
        return json.loads(tags[key])
    except (KeyError, ValueError, TypeError):
        return default


def _amount(tags: dict[str, str], key: str) -> Decimal:
    return Decimal(price_amount(key, tags.get(key) or DEFAULT_PRICES[key]))


def price_from_tags(tags: dict[str, str]) -> Price:
    """Prices from tags: per_token = price_per_1k_tokens / 1000 (exact in Decimal); an absent
    tag takes :data:`DEFAULT_PRICES`. ValueError names a tag that is not a finite decimal >= 0."""
    return Price(
        per_token=_amount(tags, "price_per_1k_tokens") / 1000,
        weight_fee=_amount(tags, "weight_fee"),
        maintenance_fee=_amount(tags, "maintenance_fee"),
        exclusive_premium=_amount(tags, "exclusive_premium"),
    )


def entry_from_tags(
    name: str, versions: list[str], champion: str, tags: dict[str, str], model_card: str = ""
) -> CatalogEntry:
    """Builds an entry from a registered model version's provenance tags.

    Tags read (missing ones fall back to empty values): domain, base_model, base_model_sha256,
    dataset_sha256, adapter_sha256, pol_scores (JSON list or mapping), cycles, contributors
    (JSON mapping contributor -> share), licence, benchmark (JSON list of rows with task, metric,
    expert, base), trained_at, champion_history (JSON list of [version, date]), and the prices
    of :func:`price_from_tags`. ValueError when a price tag is not an amount.
    """
    scores = _json_tag(tags, "pol_scores", [])
    values = list(scores.values()) if isinstance(scores, dict) else list(scores)
    numeric = [float(v) for v in values if isinstance(v, int | float)]
    cycles = int(tags.get("cycles", "0") or 0)
    rows = [
        BenchmarkRow(
            task=str(row["task"]),
            metric=str(row.get("metric", "")),
            expert=float(row["expert"]),
            base=_float(row["base"]),
            higher_is_better=bool(row.get("higher_is_better", True)),
        )
        for row in _json_tag(tags, "benchmark", [])
        if isinstance(row, dict) and {"task", "expert", "base"} <= row.keys()
    ]
    if not rows:
        base_scores = _json_tag(tags, "benchmark_base_scores", {})
        for task, metrics in sorted(_json_tag(tags, "benchmark_scores", {}).items()):
            for metric, value in sorted(metrics.items()):
                base = base_scores.get(task, {}).get(metric)
                lower = "perplexity" in metric or metric.endswith("loss")
                rows.append(BenchmarkRow(task, metric, float(value), _float(base), not lower))
    summary = (
        f"mean score {sum(numeric) / len(numeric):.4f} over {cycles} cycles"
        if numeric
        else "no Proof-of-Loss scores"
    )
    return CatalogEntry(
        name=name,
        domain=tags.get("domain", "general"),
        base_model=tags.get("base_model", ""),
        base_model_sha256=tags.get("base_model_sha256", ""),
        versions=versions,
        champion=champion,
        price=price_from_tags(tags),
        licence=tags.get("licence", "usage+weight+exclusive"),
        pol_validated=bool(numeric) and any(v > 0 for v in numeric),
        pol_summary=summary,
        cycles=cycles,
        last_trained=tags.get("trained_at", ""),
        dataset_sha256=tags.get("dataset_sha256", ""),
        adapter_sha256=tags.get("adapter_sha256", ""),
        contributors={str(k): str(v) for k, v in _json_tag(tags, "contributors", {}).items()},
        benchmarks=rows,
        model_card=model_card,
        champion_history=[tuple(x) for x in _json_tag(tags, "champion_history", [])],
        tags=dict(tags),
    )


class LibraryCatalog:
    """Entries read from the expert library (``factory.library.ExpertLibrary``).

    The library is passed in; ``describe(name) -> (versions, champion, tags, model_card)`` and
    ``folder(name, version) -> Path`` adapt it, so a change in its return types touches only
    :func:`library_catalog`.
    """

    def __init__(
        self,
        names: Callable[[], list[str]],
        describe: Callable[[str], tuple[list[str], str, dict[str, str], str]],
        folder: Callable[[str, str], Path],
    ):
        self._names, self._describe, self._folder = names, describe, folder

    def entries(self) -> list[CatalogEntry]:
        # One listing per page, not one per entry (that made a page O(N^2) registry calls).
        found = [self._entry(name) for name in self._names()]
        return sorted((e for e in found if e), key=lambda e: (e.domain, e.name))

    def get(self, name: str) -> CatalogEntry | None:
        return self._entry(name) if name in self._names() else None

    def _entry(self, name: str) -> CatalogEntry | None:
        versions, champion, tags, card = self._describe(name)
        try:
            return entry_from_tags(name, versions, champion, tags, card)
        except ValueError as exc:
            # Never sell at a price nobody set: an unreadable price hides the expert until fixed.
            log.warning("expert %s is not offered: %s", name, exc)
            return None

    def expert_folder(self, name: str, version: str) -> Path:
        return self._folder(name, version)

    def forget(self, name: str, version: str) -> None:
        """Drops what is remembered of a version's local folder (it no longer verifies)."""
        forget = getattr(self._folder, "forget", None)
        if forget is not None:
            forget(name, version)


class _CachedFolders:
    """``folder(name, version)`` through an :class:`ExpertCache` over the library's download."""

    def __init__(self, cache):
        self.cache = cache

    def __call__(self, name: str, version: str) -> Path:
        return self.cache.folder(name, version)

    def forget(self, name: str, version: str) -> None:
        self.cache.forget(name, version)


def library_catalog(settings: Any) -> LibraryCatalog:
    """A catalog over ``factory.library.ExpertLibrary(settings)``: one entry per expert (its
    champion, else its latest version). Private experts are entries too, with the owner's
    customer id (tag :data:`factory.customer.OWNER_TAG`); the market shows them only to the buyer
    holding their exclusive licence.

    Prices: the registered model's price tags override the shown version's. Dates: the version's
    ``trained_at`` tag, else MLflow's creation time of the version; the champion history lists
    every version that was ever champion with its ``promoted_at`` tag, oldest promotion first.
    """
    from factory.library import ExpertLibrary

    library = ExpertLibrary(settings)

    def names() -> list[str]:
        return sorted({item.name for item in library.list()})

    def describe(name: str) -> tuple[list[str], str, dict[str, str], str]:
        shown = library.show(name)
        every = [library.show(name, str(row["version"])) for row in library.lineage(name)]
        history = sorted(
            (
                (v.tags.get("promoted_at", ""), v.version)
                for v in every
                if "champion" in v.aliases or "promoted_at" in v.tags or "superseded_by" in v.tags
            ),
            key=lambda pair: (pair[0], int(pair[1])),
        )
        tags = dict(shown.tags)
        tags.setdefault("trained_at", shown.created_at)
        overrides = library.model_tags(name)
        tags.update({key: overrides[key] for key in PRICE_TAGS if overrides.get(key)})
        tags[OWNER_TAG] = overrides.get(OWNER_TAG, "")
        tags["champion_history"] = json.dumps([[version, date] for date, version in history])
        return [v.version for v in every], str(shown.version), tags, _card_text(tags)

    from marketplace.expert_cache import ExpertCache

    # download() verifies the folder against the version's adapter_sha256 tag and renames it
    # into place atomically; the cache fetches each version once, under a file lock.
    cache = ExpertCache(
        Path(settings.home) / "marketplace" / "experts",
        lambda name, version, dest: library.download(name, version, dest),
    )
    return LibraryCatalog(names, describe, _CachedFolders(cache))


def library_version_tags(settings: Any) -> Callable[[str, str], dict[str, str] | None]:
    """``(name, version) -> tags`` of a registered version (None when the library does not
    know it); remembered, since a version's provenance tags never change. The library opens
    on first use."""
    found: dict[tuple[str, str], dict[str, str]] = {}
    opened: list[Any] = []

    def tags_of(name: str, version: str) -> dict[str, str] | None:
        if (name, version) not in found:
            if not opened:
                from factory.library import ExpertLibrary

                opened.append(ExpertLibrary(settings))
            try:
                found[(name, version)] = dict(opened[0].show(name, version).tags)
            except Exception as exc:
                # Not registered (a sample, a removed version): no tags. Anything else (the
                # registry is down) must not silently re-attribute revenue: raised.
                missing = getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
                if isinstance(exc, ValueError | LookupError) or missing:
                    return None
                raise
        return found[(name, version)]

    return tags_of


def library_commission_of(settings: Any) -> Callable[[str, str], str | None]:
    """``(name, version) -> commission_id`` of a registered version (None when the library
    does not know it)."""
    tags_of = library_version_tags(settings)

    def commission_of(name: str, version: str) -> str | None:
        tags = tags_of(name, version)
        return (tags or {}).get("commission_id") or None

    return commission_of


def _card_text(tags: dict[str, str]) -> str:
    keys = ("commission_id", "licence", "benchmark_summary", "wise_ft_alpha", "code_version")
    return "\n".join(f"{key}: {tags[key]}" for key in keys if tags.get(key))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)
