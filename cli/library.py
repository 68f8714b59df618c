"""``taas library``: browse, compare, export and roll back experts in the MLflow-backed library.

    taas library list [--domain legal]
    taas library show expert-legal [--version 3]
    taas library compare expert-legal@1 expert-legal@champion
    taas library lineage expert-legal
    taas library export expert-legal [--version 3 | --alias champion] --dest ./bundle
    taas library rollback expert-legal
    taas library match sample.jsonl [--json]

``match`` ranks the library's public experts on the marketplace's base (and the bare base) by
held-out loss on a sample of your text (JSONL with a ``text`` field, or plain text; at most
1 MiB, read into memory only), with each expert's loss difference against the base and its
standard error over batches (:func:`evaluation.library_match.match_sample`).

The store comes from settings (``TAAS_MLFLOW_TRACKING_URI`` etc., see :mod:`infra.settings`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _library():
    from factory.library import ExpertLibrary
    from infra.settings import get_settings

    return ExpertLibrary(get_settings())


def _version_json(v) -> dict:
    """One library version as JSON-ready data (what ``--json`` prints)."""
    return {
        "name": v.name,
        "version": v.version,
        "domain": v.domain,
        "aliases": v.aliases,
        "run_id": v.run_id,
        "source": v.source,
        "created_at": v.created_at,
        "tags": dict(sorted(v.tags.items())),
    }


def _cmd_list(args: argparse.Namespace) -> int:
    entries = _library().list(domain=args.domain)
    if args.json:
        print(json.dumps([_version_json(v) for v in entries], indent=2))
        return 0
    if not entries:
        print("no experts" + (f" in domain {args.domain}" if args.domain else ""))
        return 0
    print(f"{'name':32} {'version':>7} {'domain':16} {'aliases':20} benchmark")
    for v in entries:
        aliases = ",".join(v.aliases) or "-"
        summary = v.tags.get("benchmark_summary", "") or "-"
        print(f"{v.name:32} {v.version:>7} {v.domain:16} {aliases:20} {summary}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    v = _library().show(args.name, args.version)
    if args.json:
        print(json.dumps(_version_json(v), indent=2))
        return 0
    shown = {"name": v.name, "version": v.version, "aliases": v.aliases, "run_id": v.run_id}
    shown["source"] = v.source
    shown["tags"] = dict(sorted(v.tags.items()))
    print(json.dumps(shown, indent=2))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    result = _library().compare(args.a, args.b)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    left, right = result["refs"]
    print(f"| | {left} | {right} |")
    print("|---|---|---|")
    for key, (a, b) in result["benchmarks"].items():
        print(f"| {key} | {_cell(a)} | {_cell(b)} |")
    for key, (a, b) in result["provenance"].items():
        print(f"| {key} | {_cell(a)} | {_cell(b)} |")
    return 0


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cmd_lineage(args: argparse.Namespace) -> int:
    rows = _library().lineage(args.name)
    if not rows:
        raise ValueError(f"name: no expert '{args.name}' in the library; see `taas library list`")
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'version':>7} {'aliases':20} {'adapter':14} {'parent':14} {'cycles':>6} commission"
          "  warm start")  # fmt: skip
    for row in rows:
        aliases = ",".join(row["aliases"]) + (" (rolled back)" if row["rolled_back"] else "")
        print(
            f"{row['version']:>7} {aliases or '-':20} {row['adapter_sha256'][:12]:14} "
            f"{row['parent_adapter_sha256'][:12] or '-':14} {row['cycles']:>6} "
            f"{row['commission_id']}  {row.get('parent') or '-'}"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    ref = args.version or args.alias
    dest = _library().export(args.name, ref, Path(args.dest))
    print(dest)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    v = _library().rollback(args.name)
    print(f"{v.name}: champion is version {v.version} again")
    return 0


def _cmd_match(args: argparse.Namespace) -> int:
    from cli.marketplace import build_market
    from marketplace.demand import DemandBoard
    from marketplace.match import Matcher

    path = Path(args.file)
    if not path.is_file():
        raise ValueError(f"file: no such file {path}; check the path")
    market = build_market(args)
    report = Matcher(market, DemandBoard(market.licensing.engine)).match(
        _head(path, 1024 * 1024 + 1), path.name, None
    )
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
        return 0
    print(f"{report.num_blocks} blocks in {report.num_batches} batches; base loss "
          f"{report.base_loss:.4f}")  # fmt: skip
    print(f"{'rank':>4} {'expert':32} {'version':>7} {'loss':>8} {'vs base':>9} {'stderr':>8}")
    for rank, row in enumerate(report.rows, 1):
        r = row.result
        mark = " confident" if r.confident else ""
        print(f"{rank:>4} {row.entry.name:32} {row.entry.champion:>7} {r.loss:8.4f} "
              f"{r.delta:+9.4f} {r.delta_stderr:8.4f}{mark}")  # fmt: skip
    if report.best:
        print(f"best: {report.best.entry.name} (warm start: {report.best.entry.name})")
    else:
        print(f"no expert beats the base by {report.margin}; demand recorded: "
              f"{', '.join(report.demand_words)}")  # fmt: skip
    return 0


NAME_HELP = "the expert's registered name (see `taas library list`)"


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(subparsers) -> None:
    parser = subparsers.add_parser("library", help="the expert library (MLflow registry)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="experts, their champion (or latest) version")
    p.add_argument("--domain", default=None, help="only experts of this domain (e.g. legal)")
    _json_flag(p)
    p.set_defaults(handler=_cmd_list)

    p = sub.add_parser("show", help="one version with its provenance tags")
    p.add_argument("name", help=NAME_HELP)
    p.add_argument("--version", default=None, help="version number or alias; default champion")
    _json_flag(p)
    p.set_defaults(handler=_cmd_show)

    p = sub.add_parser("compare", help="benchmarks and provenance of two NAME[@VERSION|@ALIAS]")
    p.add_argument("a", help="the first expert: NAME, NAME@VERSION or NAME@ALIAS")
    p.add_argument("b", help="the second expert: NAME, NAME@VERSION or NAME@ALIAS")
    _json_flag(p)
    p.set_defaults(handler=_cmd_compare)

    p = sub.add_parser("lineage", help="every version with its parent adapter and commission")
    p.add_argument("name", help=NAME_HELP)
    _json_flag(p)
    p.set_defaults(handler=_cmd_lineage)

    p = sub.add_parser("export", help="write a weight bundle folder")
    p.add_argument("name", help=NAME_HELP)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--version", default=None, help="version number; default the champion")
    group.add_argument("--alias", default=None, help="alias, e.g. champion or challenger")
    p.add_argument("--dest", required=True, help="a new or empty folder for the bundle")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("rollback", help="restore the previous champion")
    p.add_argument("name", help=NAME_HELP)
    p.set_defaults(handler=_cmd_rollback)

    p = sub.add_parser("match", help="rank experts by held-out loss on a sample of your text")
    p.add_argument("file", help="JSONL (a 'text' field per line) or plain text, at most 1 MiB")
    p.add_argument("--json", action="store_true", help="print the ranking as JSON")
    p.set_defaults(handler=_cmd_match)


def _head(path: Path, size: int) -> bytes:
    """At most ``size`` bytes of the file: an oversize sample is refused without reading it."""
    with path.open("rb") as handle:
        return handle.read(size)
