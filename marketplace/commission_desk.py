"""Commission from the marketplace: a signed-in buyer's upload becomes a commission spec.

:meth:`CommissionDesk.stage` writes the upload and a spec into a committed folder
``<home>/marketplace/uploads/<buyer>/<token>/`` only after the same checks as
``taas commission validate`` pass (:func:`factory.commission.load_spec`, the base model, and
:func:`factory.data.prepare.prepare_data` into a scratch folder: the intake's quality, size and
split rules with their one-line errors); a refused upload leaves nothing behind. The buyer then
sees the estimate, cycles x steps_per_cycle x production_lines line-steps at
``MarketplaceConfig.commission_price_per_step`` each, and :meth:`CommissionDesk.submit` starts
it, once:

- by default on the local runner: a background ``taas commission submit`` process, in its own
  session, logging to ``run.log``;
- in team mode (``Settings.commission_deployment``, e.g. ``buyer-commission/buyer-commission``)
  as a run of that deployment (:mod:`flows.buyer_commission`) on whichever worker takes it: the
  upload (spec and data file) and the base go to the object store as content-addressed trees
  (:mod:`infra.line_io`) and the run gets their two hashes, nothing else.

The spec names neither the base's nor the data's path on this machine (``base_model: {}`` with
the desk's base as ``base_model_dir``; the data file beside the spec), so it is the same bytes
wherever it runs. :meth:`CommissionDesk.commissions_of` reads each submission's state from the
commission store, shared in team mode, matched on :func:`upload_key`; before intake records it,
"starting" while the runner (its process, or its flow run on the Prefect server) is alive, else
"not started" with the runner's last word.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import yaml
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from factory.commission import FORMATS, CommissionSpec, CommissionTerms, load_spec
from factory.customer import expert_id_for
from factory.hashing import json_sha256
from infra.atomic import atomic_write_json, committed_dir, file_lock, verify_committed
from infra.settings import Settings

REPO = Path(__file__).resolve().parents[1]
_TOKEN = re.compile(r"^[0-9a-f]{16}$")
VISIBILITIES = {"public": "public", "private": "exclusive"}


@dataclass(frozen=True)
class Staged:
    token: str
    domain: str
    visibility: str  # public | private
    warm_start: str
    train_rows: int
    heldout_rows: int
    line_steps: int
    estimate: Decimal


@dataclass(frozen=True)
class BuyerCommission:
    token: str
    domain: str
    state: str  # the store's state; "starting" before intake; "not started" if the runner died
    detail: str
    commission_id: str
    visibility: str = "public"  # public | private
    expert_name: str = ""  # the library name its expert registers under


class CommissionDesk:
    def __init__(
        self,
        settings: Settings,
        base_model_path: Path,
        price_per_step: Decimal,
        terms: CommissionTerms | None = None,
    ):
        self.settings, self.base_model_path = settings, Path(base_model_path)
        self.price_per_step, self.terms = price_per_step, terms or CommissionTerms()
        self.uploads = settings.home / "marketplace" / "uploads"

    def _folder(self, buyer_id: str, token: str) -> Path:
        if not _TOKEN.match(token) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", buyer_id):
            raise LookupError("no such submission")
        return self.uploads / buyer_id / token

    def _checked_settings(self) -> Settings:
        # Uploads are the only data root of these commissions, whatever the operator's roots,
        # and the desk's base is their base, whatever the operator's base_model_dir.
        return self.settings.model_copy(
            update={"data_roots": [self.uploads], "base_model_dir": self.base_model_path}
        )

    def stage(
        self, buyer_id: str, data: bytes, filename: str, domain: str, visibility: str,
        warm_start: str = "auto",
    ) -> Staged:  # fmt: skip
        """ValueError (one line, naming the field or file) for anything intake would refuse."""
        from factory.base_model import resolve_base_model
        from factory.data.prepare import prepare_data

        if visibility not in VISIBILITIES:
            raise ValueError(f"visibility: choose one of {sorted(VISIBILITIES)}")
        suffix = Path(filename or "").suffix.lower().lstrip(".")
        if suffix not in FORMATS:
            raise ValueError(f"data: {filename or 'the upload'}: name a file ending in "
                             f".{', .'.join(FORMATS)}")  # fmt: skip
        if not data:
            raise ValueError(f"data: {filename} is empty; upload your data")
        token = secrets.token_hex(8)
        spec = {
            "version": 1,
            "customer": buyer_id,
            "domain": domain,
            "data": [{"uri": f"data.{suffix}", "format": suffix}],
            "base_model": {},  # the base_model_dir of _checked_settings, here or on a worker
            **self.terms.sections(),
            "licence": {"type": "usage" if visibility == "public" else "exclusive"},
            "visibility": VISIBILITIES[visibility],
            "warm_start": warm_start,
        }
        folder = self._folder(buyer_id, token)
        settings = self._checked_settings()
        with committed_dir(folder) as tmp:
            (tmp / f"data.{suffix}").write_bytes(data)
            (tmp / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            loaded = load_spec(tmp / "spec.yaml")
            base = resolve_base_model(loaded.base_model, settings, log=lambda *_: None)
            with tempfile.TemporaryDirectory(prefix="taas-upload-") as scratch:
                try:
                    prepared = prepare_data(loaded, base.path, Path(scratch) / "data", settings)
                except ValueError as exc:  # the buyer's file name, never the server's path
                    message = str(exc).splitlines()[0].replace(str(tmp / f"data.{suffix}"),
                                                               filename)  # fmt: skip
                    raise ValueError(message) from None
            budget = loaded.budget
            line_steps = budget.cycles * budget.steps_per_cycle * budget.production_lines
            staged = Staged(
                token=token,
                domain=loaded.domain,
                visibility=visibility,
                warm_start=loaded.warm_start,
                train_rows=prepared.num_train_rows,
                heldout_rows=prepared.num_heldout_rows,
                line_steps=line_steps,
                estimate=(self.price_per_step * line_steps).quantize(Decimal("0.01")),
            )
            (tmp / "staged.json").write_text(json.dumps({**vars(staged), "estimate": str(
                staged.estimate)}))  # fmt: skip
        return staged

    def staged(self, buyer_id: str, token: str) -> Staged:
        folder = self._folder(buyer_id, token)
        if not verify_committed(folder):
            raise LookupError("no such submission")
        raw = json.loads((folder / "staged.json").read_text())
        return Staged(**{**raw, "estimate": Decimal(raw["estimate"])})

    def submit(self, buyer_id: str, token: str) -> Staged:
        """Starts the commission once per staged upload (a second submit, concurrent or not, is
        a no-op): on the local runner, or as a run of ``Settings.commission_deployment``."""
        staged = self.staged(buyer_id, token)
        folder = self._folder(buyer_id, token)
        marker = folder.parent / f"{token}.submitted.json"
        with file_lock(folder.parent / ".submit.lock"):
            if marker.exists():
                return staged
            key = upload_key(load_spec(folder / "spec.yaml"))
            if self.settings.commission_deployment:
                runner = {"flow_run_id": self._start_deployment_run(folder)}
            else:
                runner = {"pid": self._start_local_runner(folder)}
            atomic_write_json(marker, {**runner, "upload_key": key})
        return staged

    def _start_local_runner(self, folder: Path) -> int:
        env = {
            **os.environ,
            "TAAS_HOME": str(self.settings.home),
            "TAAS_DATA_ROOTS": json.dumps([str(self.uploads)]),
            "TAAS_BASE_MODEL_DIR": str(self.base_model_path),
        }
        with open(folder.parent / f"{folder.name}.run.log", "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "commission", "submit",
                 str(folder / "spec.yaml")],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: the server's signals skip it
            )  # fmt: skip
        return child.pid

    def _start_deployment_run(self, folder: Path) -> str:
        """Uploads the spec, the data file and the base; returns the new flow run's id."""
        from prefect.deployments import run_deployment

        from infra import line_io
        from infra.storage import open_store

        try:  # the trees first: a run never starts on inputs the store does not hold
            store = open_store(self.settings.objects_url, self.settings.s3_endpoint_url)
            files = ("spec.yaml", *sorted(p.name for p in folder.glob("data.*")))
            upload = line_io.put_tree(store, folder, include=files)
            base = line_io.put_tree(store, self.base_model_path)
        except (OSError, ValueError) as exc:  # a store error, a base folder with links
            raise RunnerUnavailable(
                f"object_store_url: cannot take the upload ({_said(exc)})"
            ) from None
        try:
            run = run_deployment(
                self.settings.commission_deployment,
                parameters={"upload_tree": upload, "base_tree": base},
                timeout=0,  # submitted, not awaited: the account page follows it
                tags=["marketplace"],
            )
        except Exception as exc:  # unreachable server, unknown deployment: nothing submitted
            raise RunnerUnavailable(
                f"commission_deployment: {self.settings.commission_deployment} cannot take "
                f"runs ({_said(exc)})"
            ) from None
        return str(run.id)

    def commissions_of(self, buyer_id: str) -> list[BuyerCommission]:
        from factory.commission_store import CommissionStore

        folder = self.uploads / buyer_id
        markers = sorted(folder.glob("*.submitted.json")) if folder.is_dir() else []
        if not markers:
            return []
        records = {
            upload_key(r.spec()): r
            for r in CommissionStore(self.settings.db_url).list()
            if r.customer == buyer_id
        }
        shown = []
        for marker in markers:
            token = marker.name.split(".")[0]
            submitted = json.loads(marker.read_text())
            staged = self.staged(buyer_id, token)
            record = records.get(submitted["upload_key"])
            if record is not None:
                state, detail, cid = record.state, record.detail or "", record.commission_id
            elif "flow_run_id" in submitted:
                state, detail = _flow_run_state(submitted["flow_run_id"])
                cid = ""
            elif _alive(submitted["pid"]):
                state, detail, cid = "starting", "", ""
            else:
                log = folder / f"{token}.run.log"
                lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
                state, detail, cid = "not started", (lines or [""])[-1][:300], ""
            expert = expert_id_for(staged.domain, buyer_id)  # the spec's customer is the buyer
            shown.append(BuyerCommission(token, staged.domain, state, detail, cid,
                                         staged.visibility, expert))  # fmt: skip
        return shown


def upload_key(spec: CommissionSpec) -> str:
    """sha256 of the spec's canonical JSON with each data URI reduced to its file name: the same
    for the staged folder here and for the copy a worker fetches into its own home, where
    :func:`factory.commission.spec_sha256` (of the resolved, absolute URIs) differs."""
    dumped = spec.model_dump(mode="json")
    dumped["data"] = [{**d, "uri": Path(d["uri"]).name} for d in dumped["data"]]
    return json_sha256(dumped)


def _said(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    first = (str(exc).splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


class RunnerUnavailable(RuntimeError):
    """The commission could not be handed to its runner; nothing was submitted."""


def _flow_run_state(flow_run_id: str) -> tuple[str, str]:
    """A team-mode submission before intake records it: "starting" while its flow run is
    scheduled, pending or running on the Prefect server, else "not started" with its state's
    message (a run that failed before intake, a cancelled or crashed one)."""
    from uuid import UUID

    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(UUID(flow_run_id))
    except Exception as exc:  # the page still renders; the state is only unknown for now
        return "starting", f"orchestrator unreachable ({type(exc).__name__})"
    if run.state is None or not run.state.is_final():
        return "starting", ""
    return "not started", f"{run.state.name}: {run.state.message or ''}".strip()[:300]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the id: ours is gone
        return False
    # A child of this server that exited but was not reaped is a zombie: not running.
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return status != "Z"


def add_commission_routes(app: FastAPI, desk_of, page, buyer_of, acting_buyer, max_bytes: int):
    """``GET /commission`` (the upload form), ``POST /commission`` (stage: checks and the
    estimate), ``POST /commission/{token}/submit`` (start it; then the account page shows its
    state). Signed-in buyers only; POSTs carry the session's CSRF token (``acting_buyer``)."""

    @app.get("/commission", response_class=HTMLResponse)
    def commission_form(request: Request, warm_start: str = "auto") -> Response:
        if buyer_of(request) is None:
            return RedirectResponse("/account", status_code=303)
        return page(request, "commission.html", staged=None, warm_start=warm_start,
                    max_bytes=max_bytes)  # fmt: skip

    @app.post("/commission", response_class=HTMLResponse)
    def commission_stage(
        request: Request,
        data: UploadFile = File(...),
        domain: str = Form(..., max_length=63),
        visibility: str = Form("public"),
        warm_start: str = Form("auto", max_length=256),
        csrf: str | None = Form(None),
    ) -> Response:
        buyer_id = acting_buyer(request, csrf)
        if buyer_id is None:
            return RedirectResponse("/account", status_code=303)
        body = data.file.read(max_bytes + 1)
        if len(body) > max_bytes:
            raise HTTPException(413, detail=f"data: {data.filename} is over {max_bytes} bytes")
        try:
            staged = desk_of().stage(buyer_id, body, data.filename or "", domain, visibility,
                                     warm_start)  # fmt: skip
        except ValueError as exc:
            raise HTTPException(400, detail=str(exc).splitlines()[0]) from None
        return page(request, "commission.html", staged=staged, warm_start=warm_start,
                    max_bytes=max_bytes)  # fmt: skip

    @app.post("/commission/{token}/submit")
    def commission_submit(token: str, request: Request, csrf: str | None = Form(None)) -> Response:
        buyer_id = acting_buyer(request, csrf)
        if buyer_id is None:
            return RedirectResponse("/account", status_code=303)
        try:
            desk_of().submit(buyer_id, token)
        except LookupError:
            raise HTTPException(404, detail="no such submission") from None
        except RunnerUnavailable as exc:
            raise HTTPException(503, detail=str(exc)) from None
        return RedirectResponse("/account", status_code=303)
