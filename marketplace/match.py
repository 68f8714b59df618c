""" "Find an expert for my data": rank the library's visible experts and the base on a sample.

:class:`Matcher` takes a buyer's sample (:mod:`evaluation.match_sample`: JSONL or plain text,
size-capped, held in memory only for the match), packs it into blocks with the marketplace's
base tokenizer and ranks every expert the buyer may see (:meth:`Market.visible_entries`: another
buyer's exclusive expert is never loaded, scored or shown) that was trained on this base, by
held-out loss next to the bare base (:func:`evaluation.library_match.match_sample`). When no
expert beats the base, the sample's domain words go to the demand board.

Pages: ``GET /match`` (upload or paste), ``POST /match`` (results like the catalog, with
"license" and "refine with my data" actions). ``taas library match FILE`` uses the same
:class:`Matcher`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse

from evaluation.library_match import WARM_START_MARGIN, CandidateLoss, match_sample
from evaluation.match_sample import MAX_SAMPLE_BYTES, domain_words, read_sample, sample_blocks
from marketplace.catalog import CatalogEntry
from marketplace.demand import DemandBoard
from marketplace.market import Market

MATCH_SEQ_LEN = 64


@dataclass(frozen=True)
class MatchRow:
    entry: CatalogEntry
    result: CandidateLoss


@dataclass(frozen=True)
class MatchReport:
    base_loss: float
    rows: list[MatchRow]  # best (lowest loss) first
    num_blocks: int
    num_batches: int
    margin: float
    demand_words: list[str]  # recorded on the demand board ([] when an expert beat the base)

    @property
    def best(self) -> MatchRow | None:
        first = self.rows[0] if self.rows else None
        return first if first and first.result.beats_base(self.margin) else None

    def as_json(self) -> dict:
        return {
            "base_loss": self.base_loss,
            "num_blocks": self.num_blocks,
            "num_batches": self.num_batches,
            "margin": self.margin,
            "best": self.best.entry.name if self.best else None,
            "experts": [
                {
                    "name": row.entry.name,
                    "version": row.entry.champion,
                    "domain": row.entry.domain,
                    "loss": row.result.loss,
                    "delta": row.result.delta,
                    "delta_stderr": row.result.delta_stderr,
                    "confident": row.result.confident,
                }
                for row in self.rows
            ],
            "demand_words": self.demand_words,
        }


class Matcher:
    """Loads the base once (lazily, under a lock) and scores samples against the library."""

    def __init__(self, market: Market, demand: DemandBoard, margin: float = WARM_START_MARGIN):
        self.market, self.demand, self.margin = market, demand, margin
        self._lock = threading.Lock()
        self._base = None

    def _loaded(self):
        from factory.base_model import base_model_sha256, load_base

        if self._base is None:
            path = Path(self.market.config.base_model_path)
            model, tokenizer = load_base(path)
            model.eval()
            self._base = (model, tokenizer, base_model_sha256(path))
        return self._base

    def match(self, data: bytes, name: str, buyer_id: str | None) -> MatchReport:
        """ValueError ``sample: ...`` for a sample that is too big, malformed or too short."""
        from factory.expert import load_expert

        texts = read_sample(data, name, MAX_SAMPLE_BYTES)
        with self._lock:
            model, tokenizer, base_sha = self._loaded()
            blocks = sample_blocks(texts, tokenizer, MATCH_SEQ_LEN)
            entries = [
                e for e in self.market.visible_entries(buyer_id) if e.base_model_sha256 == base_sha
            ]
            experts = []
            for entry in entries:
                expert = load_expert(self.market.catalog.expert_folder(entry.name, entry.champion))
                # Scored under the catalog's name: two versions' manifests may share an id.
                manifest = expert.manifest.model_copy(update={"expert_id": entry.name})
                experts.append(replace(expert, manifest=manifest))
            found = match_sample(model, experts, blocks)
        by_name = {e.name: e for e in entries}
        rows = [MatchRow(by_name[c.expert_id], c) for c in found.candidates]
        words: list[str] = []
        if not rows or not rows[0].result.beats_base(self.margin):
            words = domain_words(texts)
            self.demand.record(words, "match")
        return MatchReport(
            found.base_loss, rows, found.num_blocks, found.num_batches, self.margin, words
        )


def add_match_routes(app: FastAPI, market: Market, matcher: Matcher, page, form_buyer) -> None:
    """``page(request, template, **context)`` renders; ``form_buyer(request, csrf)`` is the
    session's buyer after its CSRF check (or None after a pre-session check): 403 otherwise."""

    @app.get("/match", response_class=HTMLResponse)
    def match_form(request: Request) -> HTMLResponse:
        return page(request, "match.html", report=None, max_bytes=MAX_SAMPLE_BYTES)

    @app.post("/match", response_class=HTMLResponse)
    def match_sample_page(
        request: Request,
        text: str = Form(""),
        sample: UploadFile | None = File(None),
        csrf: str | None = Form(None),
    ) -> HTMLResponse:
        buyer_id = form_buyer(request, csrf)
        if sample is not None and sample.filename:
            data, name = sample.file.read(MAX_SAMPLE_BYTES + 1), sample.filename
        else:
            data, name = text.encode("utf-8"), "pasted text"
        try:
            report = matcher.match(data, name, buyer_id)
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc).splitlines()[0]) from None
        return page(request, "match.html", report=report, max_bytes=MAX_SAMPLE_BYTES)
