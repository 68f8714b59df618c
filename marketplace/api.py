"""The buyer API: an OpenAI-compatible ``POST /v1/completions`` with metering, and usage reads.

Every call carries ``Authorization: Bearer <api key>``; a missing, malformed, unknown, wrong or
revoked key is answered 401 with the reason. ``model`` is an expert name, ``mixture`` (every
expert the buyer holds a usage or exclusive licence on) or ``mixture:a,b``. An expert that does
not exist or is exclusive to someone else is answered 404, one without a licence 403. Each
generated token is metered against the expert version it was routed through (tokens on the
mixture's null route against ``base`` at price 0); the response's ``usage.completion_tokens``
equals the tokens metered for the call, and ``routes`` names the route of every token. The
input is a ``prompt`` or, as in OpenAI's chat API, ``messages`` (system/user/assistant turns,
formatted with the base model's chat template).
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from typing import Literal

from fastapi import APIRouter, Header, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from factory.mixture import BASE_ROUTE
from marketplace.auth import bearer_key
from marketplace.catalog import CatalogEntry
from marketplace.market import Market

USAGE_KINDS = ("usage", "exclusive")
MAX_MIXTURE_EXPERTS = 8


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=8192)


class CompletionRequest(BaseModel):
    """A ``prompt`` (plain text, continued as given) or chat ``messages`` (formatted with the
    base model's chat template, the assistant's turn opened): exactly one."""

    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str = Field(min_length=1, max_length=512)
    prompt: str | None = Field(default=None, min_length=1, max_length=8192)
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=64)
    max_tokens: int = Field(default=16, ge=1)
    temperature: float | None = None  # decoding is greedy; accepted for compatibility

    @model_validator(mode="after")
    def _one_input(self) -> CompletionRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self

    def text(self) -> str | list[dict[str, str]]:
        if self.messages is not None:
            return [m.model_dump() for m in self.messages]
        assert self.prompt is not None  # the validator holds one of them
        return self.prompt


def _buyer(market: Market, authorization: str | None) -> tuple[str, str]:
    found = market.licensing.authenticate(bearer_key(authorization))
    if isinstance(found, str):
        raise HTTPException(401, detail={"error": "invalid_api_key", "reason": found})
    return found


def _entries(market: Market, buyer_id: str, model: str) -> list[CatalogEntry]:
    if model == "mixture":
        names = sorted(
            {
                lic.expert_name
                for lic in market.licensing.licences_of(buyer_id)
                if lic.kind in USAGE_KINDS
            }
        )
        if not names:
            raise HTTPException(403, detail={"error": "no_licence", "model": model})
    elif model.startswith("mixture:"):
        names = list(dict.fromkeys(n for n in model.removeprefix("mixture:").split(",") if n))
    else:
        names = [model]
    if len(names) > MAX_MIXTURE_EXPERTS:
        raise HTTPException(400, detail={"error": "model", "limit": MAX_MIXTURE_EXPERTS})
    entries = []
    for name in names:
        entry = market.visible(name, buyer_id)
        if entry is None:
            raise HTTPException(404, detail={"error": "model_not_found", "model": name})
        if not market.licensing.holds(buyer_id, name, USAGE_KINDS):
            raise HTTPException(403, detail={"error": "no_licence", "model": name})
        entries.append(entry)
    return entries


def build_router(market: Market) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/completions")
    async def completions(request: Request, authorization: str | None = Header(None)) -> dict:
        # The key is checked before the body is read or parsed: a caller without one costs a
        # header lookup (and the body's size is capped in front of the app, see guards).
        buyer_id, key_id = await run_in_threadpool(_buyer, market, authorization)
        try:
            body = CompletionRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            errors = [
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()
            ]
            raise HTTPException(422, detail=errors) from None
        return await run_in_threadpool(_complete, market, buyer_id, key_id, body)

    def _complete(market: Market, buyer_id: str, key_id: str, body: CompletionRequest) -> dict:
        entries = _entries(market, buyer_id, body.model)
        if body.max_tokens > market.config.max_new_tokens:
            raise HTTPException(
                400, detail={"error": "max_tokens", "limit": market.config.max_new_tokens}
            )
        try:
            result = market.complete(entries, body.text(), body.max_tokens)
        except ValueError as exc:
            raise HTTPException(
                400, detail={"error": "invalid_request", "reason": str(exc)}
            ) from None
        # Tokens on the null route were served by the base model alone: metered, priced 0.
        prices = {entry.name: entry.price.per_token for entry in entries}
        prices[BASE_ROUTE] = Decimal(0)
        market.licensing.meter(key_id, buyer_id, result.per_expert(), prices)
        completion = len(result.routes)
        return {
            "id": "cmpl-" + uuid.uuid4().hex,
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": [
                {
                    "index": 0,
                    "text": result.text,
                    "logprobs": None,
                    "finish_reason": "length" if completion == body.max_tokens else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": result.prompt_tokens + completion,
            },
            "routes": [name for name, _ in result.routes],
        }

    @router.get("/models")
    def models(authorization: str | None = Header(None)) -> dict:
        buyer_id, _ = _buyer(market, authorization)
        names = sorted({lic.expert_name for lic in market.licensing.licences_of(buyer_id)})
        visible = [n for n in names if market.visible(n, buyer_id)]
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in visible]}

    def usage_of(buyer_id: str, period: str | None) -> dict:
        totals = market.licensing.usage(buyer_id, period)
        return {
            "buyer": buyer_id,
            "period": period or "all",
            "usage": [
                {"expert": name, "version": version, "tokens": tokens}
                for (name, version), tokens in sorted(totals.items())
            ],
            "total_tokens": sum(totals.values()),
        }

    @router.get("/usage")
    def usage(period: str | None = None, authorization: str | None = Header(None)) -> dict:
        buyer_id, _ = _buyer(market, authorization)
        return usage_of(buyer_id, period)

    @router.get("/buyers/{buyer_id}/usage")
    def buyer_usage(
        buyer_id: str, period: str | None = None, authorization: str | None = Header(None)
    ) -> dict:
        caller, _ = _buyer(market, authorization)
        if caller != buyer_id:
            raise HTTPException(403, detail={"error": "forbidden", "reason": "not your account"})
        return usage_of(buyer_id, period)

    @router.get("/invoices/{period}")
    def invoice(period: str, authorization: str | None = Header(None)) -> dict:
        buyer_id, _ = _buyer(market, authorization)
        found = market.licensing.invoice(buyer_id, period)
        return {
            "buyer": buyer_id,
            "period": period,
            "lines": [
                {
                    "expert": line.expert_name,
                    "version": line.expert_version,
                    "item": line.item,
                    "tokens": line.tokens,
                    "unit_price": str(line.unit_price),
                    "amount": str(line.amount),
                }
                for line in found.lines
            ],
            "total": str(found.total),
        }

    return router
