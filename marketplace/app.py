"""The marketplace web app: server-rendered pages (Jinja2) plus the buyer API.

Pages: ``/`` catalog with search and filters, ``/experts/{name}``, ``/compare``, ``/demo`` with a
streamed generation (``POST /demo/stream``: one JSON line per token with its expert), ``/account``
(buyer sign-up, sign-in, sign-out, licences, usage, invoices, downloads, API keys: issue and
revoke), ``POST /download/...`` (signed, expiring, logged), ``/statements/{contributor}`` (signed
link), ``/readiness`` (with the demand board), ``/match`` ("Find an expert for my data",
:mod:`marketplace.match`), ``/commission`` (upload, estimate, submit:
:mod:`marketplace.commission_desk`). Run with ``taas marketplace serve``.

Buyers are known by an expiring signed session cookie (SameSite=Lax, HttpOnly, Secure when
``secure_cookies``), signed at the buyer's session version: signing out or revoking a key ends
every session of the buyer (the one that revoked gets a fresh cookie). Every POST that acts for
a session (license, issue key, revoke key, sign out) must carry the session's CSRF token in the
form field ``csrf``; sign-up and sign-in carry a token tied to a pre-session cookie; and a POST
whose ``Origin`` (or ``Referer``) names another site is refused. All of these are answered 403.
Prompts and download signatures travel in POST bodies, never in URLs (access logs keep URLs).
Sign-ups are rate limited per client address, the demo per visitor and per address.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.templating import Jinja2Templates

from evaluation.match_sample import domain_words
from marketplace.api import build_router
from marketplace.auth import (
    RateLimiter,
    check_csrf,
    check_link,
    check_presession,
    csrf_token,
    link_signature,
    presession_token,
    session_buyer,
    session_cookie,
)
from marketplace.charts import benchmark_svg
from marketplace.commission_desk import CommissionDesk, add_commission_routes
from marketplace.demand import DemandBoard
from marketplace.guards import BodyLimit, SecurityHeaders
from marketplace.licensing import period_of
from marketplace.market import Market, TornBundle
from marketplace.match import Matcher, add_match_routes

COOKIE = "taas_session"
PRESESSION = "taas_presession"
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


def create_app(market: Market) -> FastAPI:
    config = market.config
    app = FastAPI(title="taas marketplace", docs_url=None, redoc_url=None)
    app.add_middleware(
        BodyLimit,
        max_body_bytes=config.max_body_bytes,
        max_form_bytes=config.max_form_bytes,
        max_upload_bytes=config.max_upload_bytes,
        upload_paths=("/match", "/commission"),
    )
    app.add_middleware(SecurityHeaders, hsts=config.secure_cookies)
    app.include_router(build_router(market))
    limiter = RateLimiter(config.demo_rate_per_minute, config.demo_burst)
    signups = RateLimiter(config.signup_rate_per_minute, config.signup_burst)

    def buyer_of(request: Request) -> str | None:
        return session_buyer(
            market.secret,
            request.cookies.get(COOKIE),
            version_of=market.licensing.session_version,
        )

    def client_of(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    @app.middleware("http")
    async def same_origin_posts(request: Request, call_next):
        """A POST from a page of another site is refused before it reaches a route."""
        if request.method == "POST" and not request.url.path.startswith("/v1/"):
            claimed = request.headers.get("origin") or request.headers.get("referer")
            host = request.headers.get("host", "")
            if claimed and claimed != "null" and urlsplit(claimed).netloc != host:
                return JSONResponse({"detail": "origin: cross-site form refused"}, 403)
        return await call_next(request)

    def page(
        request: Request,
        name: str,
        as_buyer: str | None = None,
        cookie: str | None = None,
        **context,
    ) -> HTMLResponse:
        buyer_id = as_buyer or buyer_of(request)
        cookie = cookie or request.cookies.get(COOKIE)
        nonce = None
        if not buyer_id:  # sign-up and sign-in forms: a token tied to a pre-session cookie
            nonce = request.cookies.get(PRESESSION) or secrets.token_urlsafe(24)
        context.update(
            buyer_id=buyer_id,
            buyer_name=market.licensing.buyer_name(buyer_id) if buyer_id else None,
            ready=market.readiness(),
            csrf=csrf_token(market.secret, cookie) if buyer_id and cookie else "",
            presession=presession_token(market.secret, nonce) if nonce else "",
        )
        response = TEMPLATES.TemplateResponse(request, name, context)
        if nonce and nonce != request.cookies.get(PRESESSION):
            set_cookie(response, PRESESSION, nonce, None)
        return response

    def set_cookie(response: Response, name: str, value: str, max_age: int | None) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            httponly=True,
            samesite="lax",
            secure=config.secure_cookies,
        )

    def check_entry_form(request: Request, csrf: str | None) -> None:
        """403 unless a sign-up/sign-in form carries this browser's pre-session token."""
        if not check_presession(market.secret, request.cookies.get(PRESESSION), csrf):
            raise HTTPException(403, detail="csrf: reload the page and submit the form again")

    def acting_buyer(request: Request, csrf: str | None) -> str | None:
        """The session's buyer for a state-changing POST (None without a session); 403 when
        the form does not carry this session's CSRF token."""
        buyer_id = buyer_of(request)
        if buyer_id is not None and not check_csrf(
            market.secret, request.cookies.get(COOKIE), csrf
        ):
            raise HTTPException(403, detail="csrf: reload the page and submit the form again")
        return buyer_id

    def form_buyer(request: Request, csrf: str | None) -> str | None:
        """A form open to visitors too: the session's CSRF token, else the pre-session one."""
        if buyer_of(request) is not None:
            return acting_buyer(request, csrf)
        check_entry_form(request, csrf)
        return None

    demand = DemandBoard(market.licensing.engine)
    desks: list[CommissionDesk] = []

    def desk_of() -> CommissionDesk:
        """Built on first use: the settings name the commission store and the uploads."""
        if not desks:
            from infra.settings import get_settings

            desks.append(CommissionDesk(get_settings(), config.base_model_path,
                                        config.commission_price_per_step,
                                        config.commission_terms))  # fmt: skip
        return desks[0]

    def entry_or_404(name: str, request: Request):
        entry = market.visible(name, buyer_of(request))
        if entry is None:
            raise HTTPException(404, detail="no such expert")
        return entry

    @app.get("/", response_class=HTMLResponse)
    def catalog(
        request: Request,
        q: str = "",
        domain: str = "",
        base_model: str = "",
        benchmark: str = "",
        licence: str = "",
    ) -> HTMLResponse:
        every = market.visible_entries(buyer_of(request))
        shown = [
            e
            for e in every
            if (not q or e.matches(q))
            and (not domain or e.domain == domain)
            and (not base_model or e.base_model == base_model)
            and (not benchmark or any(r.task == benchmark for r in e.benchmarks))
            and (not licence or licence in e.licence.split("+"))
        ]
        facets = {
            "domain": sorted({e.domain for e in every}),
            "base_model": sorted({e.base_model for e in every}),
            "benchmark": sorted({r.task for e in every for r in e.benchmarks}),
            "licence": ["usage", "weight", "exclusive"],
        }
        chosen = {"q": q, "domain": domain, "base_model": base_model, "benchmark": benchmark}
        chosen["licence"] = licence
        if q and not shown:  # a search nothing answered: its domain words, not the query
            demand.record(domain_words([q]), "search")
        by_domain: dict[str, list] = {}
        for entry in shown:
            by_domain.setdefault(entry.domain, []).append(entry)
        return page(request, "catalog.html", by_domain=by_domain, facets=facets, chosen=chosen)

    @app.get("/experts/{name}", response_class=HTMLResponse)
    def expert(name: str, request: Request) -> HTMLResponse:
        entry = entry_or_404(name, request)
        return page(request, "expert.html", e=entry, chart=benchmark_svg(entry.benchmarks))

    @app.get("/compare", response_class=HTMLResponse)
    def compare(request: Request, names: list[str] = Query(default=[])) -> HTMLResponse:
        chosen = list(dict.fromkeys(n for n in names if n))
        if not 2 <= len(chosen) <= 4:
            raise HTTPException(400, detail="names: choose 2 to 4 experts to compare")
        entries = [entry_or_404(n, request) for n in chosen]
        tasks = sorted({r.task for e in entries for r in e.benchmarks})
        table = {e.name: {r.task: r for r in e.benchmarks} for e in entries}
        return page(request, "compare.html", entries=entries, tasks=tasks, table=table)

    @app.get("/demo", response_class=HTMLResponse)
    def demo(request: Request, expert: str = "") -> HTMLResponse:
        entries = market.visible_entries(buyer_of(request))
        if expert:
            entry_or_404(expert, request)
        return page(request, "demo.html", entries=entries, selected=expert)

    @app.post("/demo/stream")
    def demo_stream(
        request: Request, expert: str = Form(..., max_length=512), prompt: str = Form(...)
    ) -> StreamingResponse:
        entry = entry_or_404(expert, request)
        # Per buyer and per address: new accounts from one address share the address's bucket.
        visitor = buyer_of(request)
        allowed = limiter.allow("addr:" + client_of(request))
        if visitor is not None:
            allowed = limiter.allow("buyer:" + visitor) and allowed
        if not allowed:
            raise HTTPException(429, detail="demo: too many requests, wait a minute")
        handle = market.handle(entry)
        try:
            market.generator.prompt_ids(prompt, chat=True)
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from None

        def lines() -> Iterator[str]:
            # the live demo is a chat: the prompt is one user turn in the base's chat template
            tokens = market.generator.stream(
                [handle], prompt, config.demo_max_new_tokens, chat=True
            )
            for token in tokens:
                yield json.dumps({"text": token.text, "expert": token.expert}) + "\n"
            yield json.dumps({"done": True}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get("/readiness", response_class=HTMLResponse)
    def readiness_page(request: Request) -> HTMLResponse:
        return page(request, "readiness.html", demand=demand.domains())

    @app.get("/api/readiness")
    def readiness_json() -> dict:
        ready = market.readiness()
        return {"open": ready.open, "ready_domains": ready.ready_domains, "short": ready.short}

    def transparency_file(*parts: str) -> bytes:
        """A file of the factory's transparency folder (factory.transparency_log); 404 when
        this marketplace publishes none."""
        folder = config.transparency_dir
        market.refresh_transparency()
        path = None if folder is None else Path(folder).joinpath(*parts)
        if path is None or path.is_symlink() or not path.is_file():
            raise HTTPException(404, detail="no attestation published here")
        return path.read_bytes()

    @app.get("/transparency-log")
    def transparency_log() -> Response:
        """Every attestation the factory signed, hash-chained: ``taas verify BUNDLE --log``."""
        return Response(
            transparency_file("log.jsonl"),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": attachment("transparency-log.jsonl")},
        )

    @app.get("/transparency-log/key")
    def factory_key() -> Response:
        """The factory's public key (base64, raw Ed25519): ``taas verify BUNDLE --key``."""
        return Response(transparency_file("factory-key.pub"), media_type="text/plain")

    @app.get("/experts/{name}/attestation")
    def expert_attestation(name: str, request: Request, version: str = "") -> Response:
        """The signed statement (DSSE envelope) of a visible expert's version (the champion)."""
        entry = entry_or_404(name, request)
        version = version or entry.champion
        if version not in entry.versions:
            raise HTTPException(404, detail="no such version")
        data = transparency_file("versions", entry.name, version, "attestation.json")
        disposition = attachment(f"{entry.name}-{version}.attestation.json")
        return Response(
            data, media_type="application/json", headers={"Content-Disposition": disposition}
        )

    def account_page(
        request: Request, buyer_id: str, new_key: str | None, cookie: str | None = None
    ) -> HTMLResponse:
        commissions = desk_of().commissions_of(buyer_id)
        for c in commissions:
            if c.state == "registered" and c.visibility == "private":
                market.claim_commissioned(buyer_id, c.expert_name)
        licences = market.licensing.licences_of(buyer_id)
        expires = int(time.time()) + config.link_ttl_s
        downloads = {}  # licence id -> the POST form's action and signed fields
        for lic in licences:
            entry = market.visible(lic.expert_name, buyer_id)
            if entry and lic.kind in ("weight", "exclusive"):
                path = f"/download/{buyer_id}/{entry.name}/{entry.champion}"
                sig = link_signature(market.secret, path, expires)
                downloads[lic.licence_id] = (quote(path, safe="/"), expires, sig)
        return page(
            request,
            "account.html",
            as_buyer=buyer_id,
            cookie=cookie,
            new_key=new_key,
            licences=licences,
            links=downloads,
            usage=sorted(market.licensing.usage(buyer_id).items()),
            invoice=market.licensing.invoice(buyer_id, period_of(datetime.now(UTC))),
            keys=market.api_keys(buyer_id),
            downloads=market.licensing.downloads_of(buyer_id),
            commissions=commissions,
        )

    def new_cookie(buyer_id: str) -> str:
        expires = int(time.time()) + config.session_ttl_s
        version = market.licensing.session_version(buyer_id) or 0
        return session_cookie(market.secret, buyer_id, expires, version)

    def open_session(request: Request, buyer_id: str, new_key: str | None) -> HTMLResponse:
        cookie = new_cookie(buyer_id)
        response = account_page(request, buyer_id, new_key, cookie)
        set_cookie(response, COOKIE, cookie, config.session_ttl_s)
        response.delete_cookie(PRESESSION)
        return response

    @app.post("/account")
    def sign_up(
        request: Request, name: str = Form(...), csrf: str | None = Form(None)
    ) -> HTMLResponse:
        check_entry_form(request, csrf)
        if not signups.allow(client_of(request)):
            raise HTTPException(429, detail="sign-up: too many accounts from here, wait a minute")
        try:
            buyer_id = market.licensing.create_buyer(name)
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc)) from None
        # The key is rendered once in this response and never stored in clear anywhere.
        return open_session(request, buyer_id, market.licensing.issue_key(buyer_id))

    @app.post("/account/signin")
    def sign_in(
        request: Request, key: str = Form(""), csrf: str | None = Form(None)
    ) -> HTMLResponse:
        """A new session for the holder of one of the buyer's active API keys (the way back in
        once a session has expired); refused keys get the API's reasons."""
        check_entry_form(request, csrf)
        found = market.licensing.authenticate(key.strip())
        if isinstance(found, str):
            raise HTTPException(401, detail={"error": "api_key", "reason": found})
        return open_session(request, found[0], None)

    @app.post("/account/signout")
    def sign_out(request: Request, csrf: str | None = Form(None)) -> Response:
        """Ends every session of the buyer, on every device."""
        buyer_id = acting_buyer(request, csrf)
        if buyer_id is not None:
            market.licensing.end_sessions(buyer_id)
        response = RedirectResponse("/account", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    @app.get("/account", response_class=HTMLResponse)
    def account(request: Request) -> HTMLResponse:
        buyer_id = buyer_of(request)
        if buyer_id is None:
            return page(request, "signup.html")
        return account_page(request, buyer_id, None)

    @app.post("/account/keys")
    def issue_key(request: Request, csrf: str | None = Form(None)) -> Response:
        buyer_id = acting_buyer(request, csrf)
        if buyer_id is None:
            return RedirectResponse("/account", status_code=303)
        return account_page(request, buyer_id, market.licensing.issue_key(buyer_id))

    @app.post("/account/keys/{key_id}/revoke")
    def revoke_key(key_id: str, request: Request, csrf: str | None = Form(None)) -> Response:
        buyer_id = acting_buyer(request, csrf)
        if buyer_id is None:
            return RedirectResponse("/account", status_code=303)
        # Another buyer's key is answered like a missing one: its existence is not revealed.
        if not market.revoke_key(buyer_id, key_id):
            raise HTTPException(404, detail="no such key")
        # Revoking ended every session of the buyer (a leaked key may have opened one); the
        # buyer who revoked stays signed in with a cookie at the new version.
        response = RedirectResponse("/account", status_code=303)
        set_cookie(response, COOKIE, new_cookie(buyer_id), config.session_ttl_s)
        return response

    @app.post("/experts/{name}/license")
    def license_expert(
        name: str, request: Request, kind: str = Form(...), csrf: str | None = Form(None)
    ) -> Response:
        buyer_id = acting_buyer(request, csrf)
        if buyer_id is None:
            return RedirectResponse("/account", status_code=303)
        entry = entry_or_404(name, request)
        if kind not in entry.licence.split("+"):
            raise HTTPException(400, detail=f"kind: {name} is offered as {entry.licence}")
        try:
            market.grant(buyer_id, entry, kind)
        except ValueError as exc:
            raise HTTPException(409, detail=str(exc)) from None
        return RedirectResponse("/account", status_code=303)

    @app.post("/download/{buyer_id}/{name}/{version}")
    def download(
        buyer_id: str,
        name: str,
        version: str,
        request: Request,
        expires: str | None = Form(None),
        sig: str | None = Form(None),
    ) -> Response:
        # The signed path is the decoded one: a name with '?', '#' or '%' is quoted in the form.
        refused = check_link(market.secret, request.scope["path"], expires, sig)
        if refused:
            raise HTTPException(403, detail=f"download link refused: {refused}")
        entry = market.visible(name, buyer_id)
        if entry is None or version not in entry.versions:
            raise HTTPException(404, detail="no such expert")
        if not market.licensing.holds(buyer_id, name, ("weight", "exclusive")):
            raise HTTPException(403, detail="no weight licence")
        try:
            data, digest = market.bundle(entry, version)
        except TornBundle as exc:  # never serve (or log) a folder that fails its marker
            raise HTTPException(503, detail=f"bundle: {exc}; try again shortly") from None
        market.licensing.log_download(buyer_id, name, version, digest, client_of(request))
        return Response(
            data,
            media_type="application/gzip",
            headers={
                "Content-Disposition": attachment(f"{name}-{version}.tar.gz"),
                "X-Bundle-SHA256": digest,
            },
        )

    @app.get("/statements/{contributor}", response_class=HTMLResponse)
    def statement(
        contributor: str, request: Request, expires: str | None = None, sig: str | None = None
    ) -> HTMLResponse:
        refused = check_link(market.secret, request.url.path, expires, sig)
        if refused:
            raise HTTPException(403, detail=f"statement link refused: {refused}")
        return page(request, "statement.html", s=market.licensing.statement(contributor))

    add_match_routes(app, market, Matcher(market, demand), page, form_buyer)
    add_commission_routes(app, desk_of, page, buyer_of, acting_buyer, config.max_upload_bytes)
    return app


def attachment(filename: str) -> str:
    """A Content-Disposition for any file name (RFC 6266/5987): an ASCII fallback plus the
    UTF-8 name, so a non-latin-1 expert name never breaks the header."""
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\%' else "_"
                       for c in filename)  # fmt: skip
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"
