"""``taas marketplace``: serve the marketplace, print revenue statements and readiness.

    taas marketplace serve [--host 127.0.0.1 --port 8000] [--sample N] [--secure-cookies]
                           [--commission-terms FILE]
    taas marketplace statement CONTRIBUTOR [--period YYYY-MM] [--link-base http://host:port]
    taas marketplace readiness [--min-domains 20 --min-cycles 3]
    taas marketplace price NAME [--per-1k-tokens 0.002] [--weight-fee 900] [--maintenance-fee 150]
                                [--exclusive-premium 12000]

``serve`` reads the expert library (MLflow registry under the settings); ``--sample N`` serves N
sample experts on the embedded base model instead. The HMAC secret for sessions and download
links comes from ``TAAS_MARKETPLACE_SECRET`` or is created once under ``<home>/marketplace``.
``--commission-terms`` names a YAML file of the spec sections (``expert``, ``budget``,
``heldout``, ``router``, ``benchmarks``) every commission from the marketplace is trained with;
without it they take a spec's defaults. ``price`` sets or changes a registered expert's prices
without retraining (registered-model tags that override the prices its commission recorded); it
prints the expert's price overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from pathlib import Path

SAMPLE_DOMAINS = [
    "law", "medicine", "finance", "tax", "chemistry", "biology", "physics", "insurance",
    "logistics", "energy", "retail", "security", "hr", "education", "agriculture", "aviation",
    "maritime", "telecom", "mining", "pharma", "real-estate", "gaming",
]  # fmt: skip


MIN_DOMAINS_HELP = "domains the library needs before the marketplace opens"
MIN_CYCLES_HELP = "training cycles an expert needs to count for its domain"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("marketplace", help="the expert marketplace")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the web app and the buyer API")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--sample", type=int, default=0, help="serve N sample experts")
    serve.add_argument("--min-domains", type=int, default=20, help=MIN_DOMAINS_HELP)
    serve.add_argument("--min-cycles", type=int, default=3, help=MIN_CYCLES_HELP)
    serve.add_argument(
        "--secure-cookies", action="store_true", help="served over HTTPS: Secure cookies, HSTS"
    )
    serve.add_argument(
        "--commission-terms", type=Path, default=None,
        help="YAML of the spec sections buyers' commissions get (expert, budget, heldout, ...)",
    )  # fmt: skip
    serve.set_defaults(handler=_serve)
    statement = sub.add_parser("statement", help="a contributor's revenue statement")
    statement.add_argument("contributor", help="the contributor id (e.g. line-0)")
    statement.add_argument("--period", default=None, help="YYYY-MM; default all time")
    statement.add_argument("--link-base", default=None, help="also print a signed page link")
    statement.set_defaults(handler=_statement)
    ready = sub.add_parser("readiness", help="whether the library meets the opening threshold")
    ready.add_argument("--sample", type=int, default=0, help="count N sample experts too")
    ready.add_argument("--min-domains", type=int, default=20, help=MIN_DOMAINS_HELP)
    ready.add_argument("--min-cycles", type=int, default=3, help=MIN_CYCLES_HELP)
    ready.set_defaults(handler=_readiness)
    _register_price(sub)


# flag -> price tag written by ExpertLibrary.set_price
PRICE_FLAGS = {
    "--per-1k-tokens": "price_per_1k_tokens",
    "--weight-fee": "weight_fee",
    "--maintenance-fee": "maintenance_fee",
    "--exclusive-premium": "exclusive_premium",
}


def _register_price(sub: argparse._SubParsersAction) -> None:
    price = sub.add_parser("price", help="set the prices of a registered expert")
    price.add_argument("name", help="the expert's registered name")
    for flag, tag in PRICE_FLAGS.items():
        price.add_argument(flag, dest=tag, default=None, metavar="AMOUNT",
                           help=f"the {tag.replace('_', ' ')} (a decimal amount)")  # fmt: skip
    price.set_defaults(handler=_price)


def _price(args: argparse.Namespace) -> int:
    from factory.commission import price_amount
    from factory.library import ExpertLibrary
    from infra.settings import get_settings

    # Checked before the library opens, so a bad amount changes nothing and names its flag.
    amounts = {
        tag: price_amount(flag, getattr(args, tag))
        for flag, tag in PRICE_FLAGS.items()
        if getattr(args, tag) is not None
    }
    if not amounts:
        raise ValueError(f"price: give at least one of {', '.join(PRICE_FLAGS)}")
    prices = ExpertLibrary(get_settings()).set_price(args.name, **amounts)
    print(json.dumps({"name": args.name, "prices": prices}, indent=2))
    return 0


def _secret(home: Path) -> str:
    from_env = os.environ.get("TAAS_MARKETPLACE_SECRET")
    if from_env:
        return from_env
    from infra.atomic import atomic_write_text

    path = home / "marketplace" / "secret"
    if not path.exists():
        atomic_write_text(path, secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def build_market(args: argparse.Namespace):
    from factory.base_model import BaseModelRef, base_model_sha256, ensure_base_model
    from factory.commission import CommissionTerms, load_commission_terms
    from factory.ledger import Ledger
    from infra.settings import get_settings
    from marketplace.licensing import Licensing
    from marketplace.market import Market, MarketplaceConfig

    settings = get_settings()
    home = settings.ensure_home()
    ledger = Ledger(settings.db_url)
    if getattr(args, "sample", 0):
        if not 1 <= args.sample <= len(SAMPLE_DOMAINS):
            raise ValueError(f"--sample: give 1 to {len(SAMPLE_DOMAINS)} experts")
        from marketplace.sample import record_sample_shares, sample_catalog

        if settings.base_model_dir:
            folder = Path(settings.base_model_dir)
            base = BaseModelRef(folder.name, folder, base_model_sha256(folder))
        else:
            base = ensure_base_model(home, "tiny")
        catalog = sample_catalog(
            base, home / "marketplace" / "sample", SAMPLE_DOMAINS[: args.sample]
        )
        record_sample_shares(ledger, catalog)
        base_path = base.path
    else:
        from marketplace.catalog import library_catalog

        catalog = library_catalog(settings)
        base_path = settings.base_model_dir or ensure_base_model(home, "demo").path
    terms = getattr(args, "commission_terms", None)
    config = MarketplaceConfig(
        commission_terms=CommissionTerms() if terms is None else load_commission_terms(terms),
        secret=_secret(home),
        transparency_dir=home / "transparency",
        base_model_path=base_path,
        min_domains=getattr(args, "min_domains", 20),
        min_cycles=getattr(args, "min_cycles", 3),
        secure_cookies=getattr(args, "secure_cookies", False),
    )
    commission_of = parent_of = None
    if not getattr(args, "sample", 0):
        from marketplace.catalog import library_commission_of
        from marketplace.lineage import library_parent_of

        commission_of, parent_of = library_commission_of(settings), library_parent_of(settings)
    mirror = None
    if settings.transparency_url:  # the team's log, as every machine appended to it
        from factory.library.shared_log import TransparencyMirror

        mirror = TransparencyMirror(settings, config.transparency_dir).refresh
    return Market(config, catalog, Licensing(ledger, commission_of, parent_of),
                  refresh_transparency=mirror)  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from marketplace.app import create_app

    market = build_market(args)
    print(f"[marketplace] {market.readiness().summary}")
    uvicorn.run(create_app(market), host=args.host, port=args.port, log_level="info")
    return 0


def _statement(args: argparse.Namespace) -> int:
    from factory.ledger import Ledger
    from infra.settings import get_settings
    from marketplace.catalog import library_commission_of
    from marketplace.licensing import Licensing

    settings = get_settings()
    from marketplace.lineage import library_parent_of

    licensing = Licensing(
        Ledger(settings.db_url), library_commission_of(settings), library_parent_of(settings)
    )
    statement = licensing.statement(args.contributor, args.period)
    print(json.dumps(statement, indent=2))
    if args.link_base:
        from marketplace.auth import sign_link

        secret = _secret(settings.ensure_home()).encode("utf-8")
        link = sign_link(secret, f"/statements/{args.contributor}", int(time.time()) + 3600)
        print(args.link_base.rstrip("/") + link)
    return 0


def _readiness(args: argparse.Namespace) -> int:
    ready = build_market(args).readiness()
    print(
        json.dumps({"open": ready.open, "summary": ready.summary, "short": ready.short}, indent=2)
    )
    return 0
