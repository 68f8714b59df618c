"""The marketplace's rules in one object: who may see, try, call and download which expert.

:class:`Market` joins the catalog, the licensing ledger and the generator. Every name from a
request is resolved with :meth:`Market.visible` (catalog lookup plus the exclusivity rule), and
every expert folder comes from the catalog, so no request text reaches the filesystem. A buyer
manages only their own API keys: :meth:`Market.revoke_key` answers False for anyone else's.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from factory.bundle import WEIGHT_FILES
from factory.commission import CommissionTerms
from factory.hashing import bytes_sha256
from infra.atomic import MARKER, verify_committed
from marketplace.catalog import Catalog, CatalogEntry
from marketplace.demo import ExpertHandle, RoutedGenerator
from marketplace.licensing import KeyRecord, Licensing
from marketplace.readiness import Readiness, readiness

log = logging.getLogger(__name__)


class TornBundle(ValueError):
    """An expert folder that does not match its commit marker: never served."""


class MarketplaceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    secret: str = Field(min_length=16, description="HMAC key for sessions and download links")
    base_model_path: Path
    min_domains: int = Field(default=20, ge=1)
    min_cycles: int = Field(default=3, ge=1)
    demo_rate_per_minute: float = Field(default=6.0, gt=0)
    demo_burst: int = Field(default=3, ge=1)
    demo_max_new_tokens: int = Field(default=32, ge=1)
    max_prompt_tokens: int = Field(default=256, ge=1)
    max_new_tokens: int = Field(default=64, ge=1)
    link_ttl_s: int = Field(default=900, ge=1)
    session_ttl_s: int = Field(default=12 * 3600, ge=1, description="buyer session lifetime")
    secure_cookies: bool = Field(default=False, description="Secure cookies and HSTS (HTTPS)")
    signup_rate_per_minute: float = Field(default=2.0, gt=0, description="per client address")
    signup_burst: int = Field(default=5, ge=1)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description="JSON API bodies")
    max_form_bytes: int = Field(default=16 * 1024, ge=1024, description="form posts")
    transparency_dir: Path | None = Field(
        default=None, description="<home>/transparency: the attestation log, key and versions"
    )
    max_upload_bytes: int = Field(
        default=2 * 1024 * 1024, ge=1024, description="multipart sample and data uploads"
    )
    commission_price_per_step: Decimal = Field(
        default=Decimal("0.05"), ge=0, description="estimate: price of one line's step"
    )
    commission_terms: CommissionTerms = Field(
        default_factory=CommissionTerms, description="spec sections of buyers' commissions"
    )


@dataclass(frozen=True)
class Routed:
    """One completion: its text, prompt size and the (expert, version) of every token."""

    text: str
    prompt_tokens: int
    routes: list[tuple[str, str]]

    def per_expert(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        for route in self.routes:
            counts[route] = counts.get(route, 0) + 1
        return counts


class Market:
    def __init__(
        self,
        config: MarketplaceConfig,
        catalog: Catalog,
        licensing: Licensing,
        generator: RoutedGenerator | None = None,
        refresh_transparency: Callable[[], None] | None = None,
    ):
        """``refresh_transparency`` brings ``config.transparency_dir`` up to date before it is
        read (a :class:`factory.library.shared_log.TransparencyMirror` in team mode)."""
        self.config, self.catalog, self.licensing = config, catalog, licensing
        self.refresh_transparency = refresh_transparency or (lambda: None)
        self._generator = generator
        self._generator_lock = threading.Lock()

    @property
    def generator(self) -> RoutedGenerator:
        """Built on first use, once: concurrent first requests wait for the same model."""
        with self._generator_lock:
            if self._generator is None:
                limit = max(self.config.max_new_tokens, self.config.demo_max_new_tokens)
                self._generator = RoutedGenerator(
                    self.config.base_model_path, self.config.max_prompt_tokens, limit
                )
            return self._generator

    @property
    def secret(self) -> bytes:
        return self.config.secret.encode("utf-8")

    def visible(self, name: str, buyer_id: str | None) -> CatalogEntry | None:
        """The entry when it exists, is not exclusive to another buyer and, when private, is
        exclusive to this one; else None."""
        entry = self.catalog.get(name)
        if entry is None:
            return None
        owner = self._claimed(entry, self.licensing.exclusive_owner(name), buyer_id)
        return entry if _shown(entry, owner, buyer_id) else None

    def visible_entries(self, buyer_id: str | None) -> list[CatalogEntry]:
        owners = self.licensing.exclusive_experts()
        return [
            e
            for e in self.catalog.entries()
            if _shown(e, self._claimed(e, owners.get(e.name), buyer_id), buyer_id)
        ]

    def _claimed(
        self, entry: CatalogEntry, exclusive_owner: str | None, buyer_id: str | None
    ) -> str | None:
        """The expert's exclusive holder, after the first look of the buyer who commissioned a
        private expert nobody holds yet: that look claims it (whether from a page or the API),
        so a commissioning buyer never has to open their account page first."""
        if exclusive_owner is None and buyer_id is not None and self._claim(entry, buyer_id):
            return buyer_id
        return exclusive_owner

    def claim_commissioned(self, buyer_id: str, name: str) -> bool:
        """Grants the buyer who commissioned the private expert ``name`` its exclusive licence
        (no fee: the commission paid for it); True when they hold it. Only the expert's owner
        (the customer id registration recorded) can claim it; a repeat is a no-op."""
        entry = self.catalog.get(name)
        return entry is not None and self._claim(entry, buyer_id)

    def _claim(self, entry: CatalogEntry, buyer_id: str) -> bool:
        from factory.customer import OWNER_TAG, customer_id_for

        if not entry.private or entry.tags.get(OWNER_TAG) != customer_id_for(buyer_id):
            return False
        try:
            self.licensing.grant(buyer_id, entry.name, entry.champion, "exclusive")
        except ValueError:  # someone else was granted a licence on it: never taken from them
            log.warning("private expert %s has another licensee; not claimed", entry.name)
            return False
        return True

    def readiness(self) -> Readiness:
        public = self.visible_entries(None)
        return readiness(
            ((e.domain, e.pol_validated, e.cycles) for e in public),
            self.config.min_domains,
            self.config.min_cycles,
        )

    def handle(self, entry: CatalogEntry) -> ExpertHandle:
        return ExpertHandle(
            entry.name, entry.champion, self.catalog.expert_folder(entry.name, entry.champion)
        )

    def complete(
        self, entries: list[CatalogEntry], prompt: str | list[dict[str, str]], max_tokens: int
    ) -> Routed:
        """Greedy completion of a prompt (plain text) or of chat messages (through the base's
        chat template) with the entries' mixture; batched with the completions of the same
        experts that arrive together (:meth:`RoutedGenerator.complete`)."""
        handles = [self.handle(entry) for entry in entries]
        prompt_tokens, tokens = self.generator.complete(handles, prompt, max_tokens)
        routes = [(token.expert, token.version) for token in tokens]
        return Routed("".join(token.text for token in tokens), prompt_tokens, routes)

    def api_keys(self, buyer_id: str) -> list[KeyRecord]:
        """The buyer's keys, oldest first."""
        return self.licensing.keys_of(buyer_id)

    def revoke_key(self, buyer_id: str, key_id: str) -> bool:
        """Revokes one of the buyer's own keys; False when no key of theirs has this id, so a
        caller cannot tell another buyer's key from one that does not exist."""
        if key_id not in {key.key_id for key in self.api_keys(buyer_id)}:
            return False
        self.licensing.revoke_key(key_id)
        return True

    def grant(self, buyer_id: str, entry: CatalogEntry, kind: str) -> int:
        price = entry.price
        fee = {"weight": price.weight_fee, "exclusive": price.exclusive_premium}.get(
            kind, Decimal(0)
        )
        maintenance = price.maintenance_fee if kind == "weight" else Decimal(0)
        return self.licensing.grant(
            buyer_id, entry.name, entry.champion, kind, price.per_token, fee, maintenance
        )

    def _attestation(self, name: str, version: str) -> dict[str, bytes]:
        """The version's attestation files (factory.transparency_log), so ``taas verify``
        checks a downloaded bundle; {} for a version registered before attestations."""
        from factory.attestation import ATTESTATION_FILES

        if self.config.transparency_dir is None:
            return {}
        self.refresh_transparency()
        folder = Path(self.config.transparency_dir) / "versions" / name / version
        if not verify_committed(folder):
            return {}
        return {n: (folder / n).read_bytes() for n in ATTESTATION_FILES}

    def bundle(self, entry: CatalogEntry, version: str) -> tuple[bytes, str]:
        """A reproducible tar.gz of an expert version's committed folder and its sha256.

        Only the files its commit marker lists go in (no symlinks, nothing added later), each
        checked against the marker's sha256 as it is read: a folder torn or changed underneath
        raises :class:`TornBundle` (and the catalog forgets it) instead of being served.
        """
        folder = Path(self.catalog.expert_folder(entry.name, version))
        prefix = f"{entry.name}-{version}/"
        try:
            listing = json.loads((folder / MARKER).read_bytes())["files"]
            # Deliverables only (factory.bundle): never a legacy replay.jsonl of customer text.
            listing = {rel: sha for rel, sha in listing.items() if rel in WEIGHT_FILES}
            marker = json.dumps({"files": listing}, indent=2, sort_keys=True) + "\n"
            contents = {MARKER: marker.encode()}
            for rel in sorted(listing):
                path = folder / rel
                if path.is_symlink() or not path.is_file():
                    raise TornBundle(f"{entry.name}@{version}: {rel} is missing")
                data = path.read_bytes()
                if bytes_sha256(data) != listing[rel]:
                    raise TornBundle(f"{entry.name}@{version}: {rel} differs from its marker")
                contents[rel] = data
            contents.update(self._attestation(entry.name, version))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            forget = getattr(self.catalog, "forget", None)
            if forget is not None:
                forget(entry.name, version)
            if isinstance(exc, TornBundle):
                raise
            raise TornBundle(f"{entry.name}@{version}: commit marker unreadable") from None
        buffer = io.BytesIO()
        # gzip's header holds a time stamp (the current second unless given): fixed, so that
        # one version's bundle has one sha256 however many requests build it, and when.
        with (
            gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=6, mtime=0) as gz,
            tarfile.open(fileobj=gz, mode="w") as tar,
        ):
            for rel in sorted(contents):
                info = tarfile.TarInfo(prefix + rel)
                info.size, info.mode, info.mtime = len(contents[rel]), 0o644, 0
                tar.addfile(info, io.BytesIO(contents[rel]))
        data = buffer.getvalue()
        return data, bytes_sha256(data)


def _shown(entry: CatalogEntry, exclusive_owner: str | None, buyer_id: str | None) -> bool:
    """Public experts: to everyone until someone holds them exclusively, then to that buyer.
    Private ones (an exclusive commission): only to the buyer holding the exclusive licence."""
    if entry.private:
        return exclusive_owner is not None and exclusive_owner == buyer_id
    return exclusive_owner is None or exclusive_owner == buyer_id
