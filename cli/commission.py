"""``taas commission``: validate, submit, list, show and cancel commissions.

``validate spec.yaml`` runs intake without training (spec, sources, quality report, split sizes,
token counts) and exits 0, or 2 on bad input. ``submit spec.yaml`` validates the spec, then runs
the commission flow. Bad input is one line on stderr, exit code 2, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from factory.commission import load_spec, spec_sha256


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("commission", help="commission domain experts")
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser("validate", help="check a spec and its data; no training")
    validate.add_argument("spec", type=Path, help="the commission spec (YAML)")
    validate.set_defaults(handler=_validate)
    submit = sub.add_parser("submit", help="validate a spec, then run the commission flow")
    submit.add_argument("spec", type=Path, help="the commission spec (YAML)")
    submit.set_defaults(handler=_submit)
    listing = sub.add_parser("list", help="list commissions and their states")
    listing.set_defaults(handler=_list)
    show = sub.add_parser("show", help="show one commission")
    show.add_argument("commission_id", help="the id `taas commission list` shows")
    show.set_defaults(handler=_show)
    cancel = sub.add_parser("cancel", help="cancel a commission")
    cancel.add_argument("commission_id", help="the id `taas commission list` shows")
    cancel.set_defaults(handler=_cancel)


def _settings():
    from infra.settings import get_settings

    return get_settings()


def _store():
    from factory.commission_store import CommissionStore

    settings = _settings()
    settings.ensure_home()
    return CommissionStore(settings.db_url)


def _storage_failure(exc: Exception) -> int:
    import sys

    print(f"taas: error: {str(exc).splitlines()[0]}", file=sys.stderr)
    return 2


def _validate(args: argparse.Namespace) -> int:
    from factory.base_model import resolve_base_model
    from factory.data.prepare import prepare_data
    from infra.storage import StorageError

    spec = load_spec(args.spec)
    settings = _settings()
    print(f"spec ok: {args.spec} (domain {spec.domain}, sha256 {spec_sha256(spec)[:12]})")
    ref = resolve_base_model(spec.base_model, settings)
    print(f"base model: {ref.name} sha256 {ref.sha256[:12]} ({ref.path})")
    base = ref.path
    with tempfile.TemporaryDirectory(prefix="taas-validate-") as scratch:
        try:
            prepared = prepare_data(spec, base, Path(scratch) / "data", settings)
        except StorageError as exc:
            return _storage_failure(exc)
        for uri, sha in prepared.file_sha256.items():
            print(f"source: {uri} sha256 {sha[:12]}")
        quality = prepared.quality
        print(f"quality: {quality['rows_in']} rows in, {quality['rows_kept']} kept")
        for check, found in quality["checks"].items():
            # Where, never what: a report does not echo the content of rows it refused.
            shown = found.get("locations") or []
            example = f" e.g. {shown[0]}" if shown else ""
            print(f"  {check}: {found['count']}{example}")
        print(f"contamination: {prepared.contamination['rows_removed']} rows removed")
        print(
            f"split: {prepared.num_train_rows} train rows, {prepared.num_heldout_rows} held-out "
            f"rows (fraction {spec.heldout.fraction})"
        )
        print(
            f"tokens: {prepared.num_train_blocks} train blocks x {prepared.seq_len}, "
            f"{prepared.num_heldout_blocks} held-out blocks, {prepared.heldout_tokens} held-out "
            f"tokens (min {spec.heldout.min_tokens})"
        )
        print(f"dataset sha256 {prepared.dataset_sha256}")
    print("valid: ready to submit")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from factory.base_model import resolve_base_model

    spec = load_spec(args.spec)
    settings = _settings()
    # The base is refused here as in validate (one line, nothing written), not inside the flow.
    resolve_base_model(spec.base_model, settings)
    try:
        from flows.commission import run_commission
    except ModuleNotFoundError as exc:
        if exc.name not in ("flows.commission", "flows"):
            raise
        raise ValueError("the commission flow (flows.commission) is not installed") from None
    result = run_commission(spec_path=args.spec.absolute(), settings=settings)
    print(json.dumps(result, indent=2, default=str) if result is not None else "submitted")
    return 0


def _list(args: argparse.Namespace) -> int:
    records = _store().list()
    if not records:
        print("no commissions")
    for r in records:
        when = r.updated_at.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{r.commission_id}  {r.state:<10}  {r.domain:<24}  {r.customer:<20}  {when}")
    return 0


def _show(args: argparse.Namespace) -> int:
    r = _store().get(args.commission_id)
    body = {
        "commission_id": r.commission_id,
        "state": r.state,
        "detail": r.detail,
        "customer": r.customer,
        "domain": r.domain,
        "spec_sha256": r.spec_sha256,
        "dataset_sha256": r.dataset_sha256,
        "timestamps": {k: v.isoformat() for k, v in r.timestamps.items()},
        "spec": json.loads(r.spec_json),
    }
    print(json.dumps(body, indent=2))
    return 0


def _cancel(args: argparse.Namespace) -> int:
    r = _store().cancel(args.commission_id)
    print(f"{r.commission_id} cancelled")
    return 0
